"""``pteenet bench`` end to end on a tiny real bundle (CIFAR ResNet-20, 3 colour classes).

Everything is real: PNG files on disk, a briefly trained checkpoint (``tests._helpers.tiny``),
``attach`` training two branches, and the CLI measuring them. The checks are invariants the
numbers must obey whatever the branches learned.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from pteenet_cli.app import app
from typer.testing import CliRunner

import pteenet
from pteenet.benchmark import Quality, oracle_flops, select_data
from pteenet.bundle import load, read_info
from pteenet.calibration import calibrate
from pteenet.jobs import attach
from pteenet.training import TrainConfig

FAST = ["--latency-samples", "3", "--batch-size", "16", "--repeats", "1", "--quiet"]


@pytest.fixture(scope="module")
def bundle(tiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    data, ckpt = tiny
    out = tmp_path_factory.mktemp("bench") / "bundle"
    attach("resnet20", data, checkpoint=ckpt, branches=2, branch="pool", out=out,
           config=TrainConfig(epochs=2, batch_size=32), num_classes=3, progress=False)
    calibrate(out, threshold=0.5)  # both exits on, on the plain softmax scale
    return out


def _bench(bundle: Path, *extra: str) -> dict:
    res = CliRunner().invoke(app, ["bench", "--bundle", str(bundle), "--json", *FAST, *extra])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


@pytest.fixture(scope="module")
def costs(bundle: Path) -> list[float]:
    model = load(bundle)
    return model.cost.exits(model.active)


def test_bench_json_is_consistent(bundle: Path, costs: list[float]) -> None:
    r = _bench(bundle)
    ee = r["early_exit"]
    assert r["data"]["split"] == "test" and r["data"]["num_samples"] == 72
    assert r["exit_costs"] == pytest.approx(costs)
    assert costs[-1] > 1.0  # branches add work to samples that never leave
    exits = ee["exits"]
    assert [e["count"] for e in exits] == [round(e["share"] * 72) for e in exits]
    assert sum(e["count"] for e in exits) == 72
    # the real run's per-sample FLOPs are exactly what leaving at each exit costs
    assert ee["relative_flops"] == pytest.approx(sum(e["share"] * c for e, c in zip(exits, costs)))
    assert r["oracle"]["relative_flops"] == pytest.approx(
        sum(s * c for s, c in zip(r["oracle"]["shares"], costs)))
    assert r["backbone"]["agreement"] == 1.0 and r["backbone"]["relative_flops"] == 1.0
    assert r["simulation"]["exit_match"] == 1.0  # the sweep's exit rule is the model's
    t = r["timing"]
    for model in ("backbone", "early_exit", "segments"):
        assert t["latency"][model]["median_ms"] > 0
        assert t["latency"][model]["p10_ms"] <= t["latency"][model]["median_ms"] \
            <= t["latency"][model]["p90_ms"]
        assert t["throughput"][model] > 0
    assert r["speedup"]["flops"] == pytest.approx(1 / ee["relative_flops"])
    # batch 1 is judged by the mean (time per image of a one-by-one stream), the median beside
    lat = t["latency"]
    assert r["speedup"]["latency"] == pytest.approx(
        lat["backbone"]["mean_ms"] / lat["early_exit"]["mean_ms"])
    assert r["speedup"]["latency_median"] == pytest.approx(
        lat["backbone"]["median_ms"] / lat["early_exit"]["median_ms"])
    # the early exits' own gain: over the backbone as the model runs it (segments in a row),
    # and that is what the ideal, made of the segments' and branches' times, is held against
    sp = r["speedup"]
    assert sp["latency_vs_segments"] == pytest.approx(
        lat["segments"]["mean_ms"] / lat["early_exit"]["mean_ms"])
    assert sp["throughput_vs_segments"] == pytest.approx(
        t["throughput"]["early_exit"] / t["throughput"]["segments"])
    for key in ("latency", "throughput"):
        assert sp[f"{key}_of_ideal"] == pytest.approx(sp[f"{key}_vs_segments"] / sp[f"ideal_{key}"])
    written = json.loads((bundle / "bench.json").read_text())
    assert written["early_exit"] == ee and r["files"]["bench_json"] == str(bundle / "bench.json")


def test_bench_returns_typed_values_that_are_bench_json(bundle: Path) -> None:
    """The library hands back a BenchResult; its JSON is bench.json, and reads back equal."""
    r = pteenet.bench(bundle, batch_size=16, latency_samples=2, repeats=1, profile=False,
                      onnx_baseline=False)
    assert isinstance(r, pteenet.BenchResult) and isinstance(r.early_exit, Quality)
    written = json.loads((bundle / "bench.json").read_text())
    assert r.to_json() == written and pteenet.BenchResult.from_json(written) == r
    assert r.early_exit.agreement == written["early_exit"]["agreement"]
    assert r.exits == written["early_exit"]["exits"] and r.oracle_shares == written["oracle"][
        "shares"]
    assert r.backbone == Quality(r.backbone.top1, 1.0, 1.0)


def test_threshold_above_one_never_exits(bundle: Path, costs: list[float]) -> None:
    r = _bench(bundle, "--threshold", "2", "--latency-samples", "0")
    ee = r["early_exit"]
    assert ee["agreement"] == 1.0
    assert ee["relative_flops"] == 1.0  # every exit off: no branch runs
    assert ee["exits"][-1]["share"] == 1.0
    assert r["oracle"]["relative_flops"] <= ee["relative_flops"]
    assert r["timing"]["latency"] is None and r["speedup"]["latency"] is None


def test_threshold_zero_exits_everything_first(bundle: Path, costs: list[float]) -> None:
    r = _bench(bundle, "--threshold", "0", "--latency-samples", "0")
    ee = r["early_exit"]
    assert ee["exits"][0]["share"] == 1.0
    assert ee["relative_flops"] == pytest.approx(costs[0], rel=1e-12)
    assert r["thresholds"]["source"] == "--threshold" and r["thresholds"]["value"] == 0.0


def test_sweep_writes_png_and_csv(bundle: Path) -> None:
    r = _bench(bundle, "--sweep", "--latency-samples", "0")
    png, table = bundle / "sweep.png", bundle / "sweep.csv"
    with Image.open(png) as img:
        img.verify()
        assert img.size[0] > 1000  # the curve, and beside it where each class leaves
    rows = list(csv.DictReader(table.open()))
    assert len(rows) >= 2 and len(rows) == len(r["sweep"]["points"])
    assert {"threshold", "relative_flops", "agreement", "top1", "share_exit_0"} <= set(rows[0])
    flops = [float(row["relative_flops"]) for row in rows]
    assert flops == sorted(flops, reverse=True)  # conservative -> permissive


def test_human_output_shows_tables(bundle: Path) -> None:
    res = CliRunner(env={"COLUMNS": "240"}).invoke(app, ["bench", "-b", str(bundle), *FAST])
    assert res.exit_code == 0, res.output
    assert "early exit vs backbone" in res.stdout and "oracle" in res.stdout
    assert "bench.json" in res.stdout
    if importlib.util.find_spec("onnxruntime"):
        assert "ONNX cascade, throughput vs fastest plain" in res.stdout


def test_calibration_samples_when_no_test_split(bundle: Path) -> None:
    info = read_info(bundle)
    train_only = dataclasses.replace(info, data={**info.data,
                                                 "spec": str(Path(info.data["spec"]) / "train")})
    ev = select_data(train_only)
    assert ev.subset == "held-out calibration" and ev.split == "train"
    assert ev.indices == info.calibration_indices and ev.notes
    assert len(select_data(train_only, max_samples=3).indices) == 3


def test_oracle_takes_earliest_agreeing_branch() -> None:
    preds = torch.tensor([[1, 1], [0, 1], [0, 0]])
    final = torch.tensor([1, 1, 1])
    mean, counts = oracle_flops(preds, final, [0.2, 0.5, 1.1])
    assert counts == [1, 1, 1] and mean == pytest.approx((0.2 + 0.5 + 1.1) / 3)


@pytest.mark.parametrize("args, needle", [
    (["--threshold", "nan"], "--threshold"),
    (["--threshold", "-0.5"], "--threshold"),
    (["--batch-size", "0"], "--batch-size"),
])
def test_bad_options_fail_cleanly(bundle: Path, args: list[str], needle: str) -> None:
    res = CliRunner().invoke(app, ["bench", "-b", str(bundle), *args])
    assert res.exit_code == 2
    assert needle in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert "Traceback" not in res.output


def test_missing_bundle_is_one_line(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["bench", "-b", str(tmp_path / "nope")])
    assert res.exit_code != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "attach" in lines[0] and "Traceback" not in res.output


def test_timing_images_are_drawn_from_the_whole_set(bundle: Path) -> None:
    """An image folder lists its files class by class: timing the first images would time one
    class only, and the early-exit model's speed depends on the class."""
    from pteenet.benchmark import measure_pass, timing_positions

    wanted = timing_positions(72, 9)
    assert torch.equal(wanted, timing_positions(72, 9)) and wanted.unique().numel() == 9
    assert torch.equal(wanted, wanted.sort().values) and int(wanted.max()) >= 36
    model, ev = load(bundle), select_data(read_info(bundle), None, "test", None)
    p = measure_pass(model, ev, batch_size=16, device=torch.device("cpu"), keep=9)
    assert torch.equal(p.kept, wanted)
    want = torch.stack([ev.data[ev.indices[int(i)]][0] for i in wanted])
    assert torch.equal(p.images, want)
    classes = {ev.data[ev.indices[int(i)]][1] for i in wanted}
    assert len(classes) > 1


def test_the_plain_backbone_on_onnxruntime_is_the_bar_when_fastest(bundle: Path) -> None:
    """Issue 28: on a CPU the backbone also runs on onnxruntime, and early exit is held against
    the fastest plain runtime timed (eager torch, the frozen segments, onnxruntime)."""
    pytest.importorskip("onnxruntime")
    r = _bench(bundle, "--no-profile")
    t, sp = r["timing"], r["speedup"]
    plain = {k: t["latency"][k]["mean_ms"] for k in ("backbone", "segments", "backbone_onnx")}
    assert sp["fastest_latency"] == min(plain, key=plain.get)
    assert sp["latency_vs_fastest"] == pytest.approx(
        plain[sp["fastest_latency"]] / t["latency"]["early_exit"]["mean_ms"])
    rates = {k: t["throughput"][k] for k in plain}
    assert sp["fastest_throughput"] == max(rates, key=rates.get)
    assert sp["fastest_throughput_runtime"] in ("eager torch", "TorchScript (frozen segments)",
                                                "onnxruntime")
    # the exported cascade, as a deployment runs it, held against the same bar
    ee_lat = t["latency"]["early_exit_onnx"]["mean_ms"]
    assert sp["onnx_cascade_latency_vs_fastest"] == pytest.approx(
        plain[sp["fastest_latency"]] / ee_lat)
    assert sp["onnx_cascade_throughput_vs_fastest"] == pytest.approx(
        t["throughput"]["early_exit_onnx"] / rates[sp["fastest_throughput"]])
    assert sp["onnx_cascade_throughput_of_flops_ideal"] == pytest.approx(
        sp["onnx_cascade_throughput_vs_fastest"] * r["early_exit"]["relative_flops"])
    assert not (bundle / "export-onnx").exists()  # exported aside: the bundle is as it was
    off = _bench(bundle, "--no-profile", "--no-onnx-baseline")
    assert "backbone_onnx" not in off["timing"]["throughput"]
    assert "early_exit_onnx" not in off["timing"]["throughput"]
    assert "onnx_cascade_throughput_vs_fastest" not in off["speedup"]
    assert off["speedup"]["fastest_throughput"] in ("backbone", "segments")


def test_without_onnxruntime_bench_says_so_and_times_the_rest(bundle, monkeypatch) -> None:
    import builtins

    real = builtins.__import__

    def no_ort(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ort)
    r = _bench(bundle, "--no-profile")
    assert "backbone_onnx" not in r["timing"]["throughput"]
    assert "early_exit_onnx" not in r["timing"]["throughput"]
    assert any("onnxruntime is not installed" in n for n in r["notes"])
