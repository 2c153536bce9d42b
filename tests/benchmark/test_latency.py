"""Latency as the cost: time profiles, ``--cost latency`` through placement, the bundle,
calibration and bench, and bench's time profile with the ideal speedup it implies."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import pytest
import torch
from pteenet_cli.app import app
from typer.testing import CliRunner

from pteenet.backbone import cifar_resnet
from pteenet.benchmark import bench
from pteenet.bundle import load, read_info
from pteenet.calibration import calibrate
from pteenet.cascade import _profile as latency
from pteenet.cascade import (
    build_early_exit,
    cut_time_fractions,
    exit_times,
    probe_images,
    relative_costs,
)
from pteenet.errors import BundleError, OptionError
from pteenet.graph import choose_cuts, trace_backbone, useful_cuts
from pteenet.jobs import attach
from pteenet.training import TrainConfig
from tests._helpers import reseal

FAST = dict(latency_samples=3, batch_size=8, repeats=1, out_json=False)


@pytest.fixture(scope="module")
def trace():
    return trace_backbone(cifar_resnet("resnet20", num_classes=3).eval(), (32, 32))


@pytest.fixture(scope="module")
def timed(tiny, tmp_path_factory) -> Path:
    data, ckpt = tiny
    out = tmp_path_factory.mktemp("lat") / "bundle"
    attach("resnet20", data, checkpoint=ckpt, branches=2, out=out, num_classes=3,
           config=TrainConfig(epochs=1, batch_size=32), progress=False, cost="latency")
    return out


def test_relative_costs_are_cumulative_shares_of_the_backbone_time():
    seg, br = relative_costs([1.0, 2.0, 1.0], [0.5, 0.25])
    assert seg == pytest.approx([0.25, 0.75, 1.0]) and br == pytest.approx([0.125, 0.0625])


def test_profile_times_every_piece_on_its_own_input(trace):
    ee = build_early_exit(trace, choose_cuts(trace, 3), 3).eval()
    prof = ee.profile(probe_images((32, 32), n=4), batch_size=4)
    assert len(prof.segment_ms) == 4 and len(prof.branch_ms) == 3
    assert all(t > 0 for t in prof.segment_ms + prof.branch_ms + prof.segment_ms_batched)
    seg, _ = prof.costs()
    assert seg[-1] == pytest.approx(1.0) and seg == sorted(seg)


def test_latency_costs_replace_flops_only_where_asked(trace):
    ee = build_early_exit(trace, choose_cuts(trace, 3), 3).eval()
    flops = ee.cost.exits(ee.active)
    prof = ee.profile(probe_images((32, 32), n=2), batch_size=2)
    prof.segment_ms = [10.0, 1.0, 1.0, 1.0]  # a slow first stage, as on CPUs
    ee.use_cost("latency", prof)
    assert ee.cost.exits(ee.active)[0] > 0.7 > flops[0]
    assert ee.cost_in("flops").exits(ee.active) == flops
    with pytest.raises(OptionError, match="branches"):
        ee.use_cost("latency", type(prof)(**{**prof.to_dict(), "branch_ms": [1.0]}))


def test_placement_follows_time_when_given(trace):
    names = [c.name for c in useful_cuts(trace)]
    by_flops = choose_cuts(trace, 3)
    front = {n: (i + 1) / len(names) for i, n in enumerate(names)}  # time spread evenly
    front = {n: f ** 0.3 for n, f in front.items()}  # ... then front-loaded
    by_time = choose_cuts(trace, 3, fractions=front)
    assert by_time != by_flops
    assert names.index(by_time[0]) < names.index(by_flops[0])
    fr = cut_time_fractions(trace, names, probe_images((32, 32), n=1), repeats=2)
    assert list(fr) == names and all(0 < v <= 1 for v in fr.values())


def test_latency_bundle_round_trips_and_bench_reports_ideal(timed):
    info = read_info(timed)
    model = load(timed)
    assert info.cost == "latency" and model.cost.kind == "latency"
    assert model.latency == info.latency
    assert model.cost.exits(model.active) != model.cost_in("flops").exits(model.active)
    res = bench(timed, threads=2, **FAST)  # the module runs on one thread
    assert res.timing["cpu_threads"] == 2 and torch.get_num_threads() == 1
    if platform.libc_ver()[0] == "glibc":  # both models timed with fixed malloc thresholds
        assert res.timing["allocator"] == "steady (mallopt)"
    prof = res.profile
    assert len(prof["pieces"]) == 2 * model.num_branches + 1
    assert res.speedup["ideal_latency"] > 0 and res.speedup["throughput_of_ideal"] > 0
    assert any("x1 threads; this run is on cpu: " in n for n in res.notes)
    assert not any("measured on" in n for n in bench(timed, **FAST).notes)


def test_bench_notes_a_profile_from_another_machine(timed, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from pteenet.bundle import BRANCHES_FILE
    from pteenet.bundle._schema import META_KEY
    copy = tmp_path / "b"
    shutil.copytree(timed, copy)
    f = copy / BRANCHES_FILE
    from safetensors import safe_open
    with safe_open(str(f), "pt") as h:
        meta = h.metadata()
    doc = json.loads(meta[META_KEY])
    doc["latency"]["device"] = "cpu: some other machine"
    save_file(load_file(str(f)), str(f), metadata={**meta, META_KEY: json.dumps(doc)})
    reseal(copy)
    res = bench(copy, **FAST)
    assert any("measured on cpu: some other machine" in n for n in res.notes)
    doc["latency"]["segment_ms"] = [1.0]
    save_file(load_file(str(f)), str(f), metadata={**meta, META_KEY: json.dumps(doc)})
    reseal(copy)
    with pytest.raises(BundleError, match="latency"):
        read_info(copy)


def test_calibrate_can_switch_the_cost_model(timed):
    res = calibrate(timed, cost="flops", write=False)
    assert res.table.params["cost"] == "flops"
    res = calibrate(timed, write=False)
    assert res.table.params["cost"] == "latency" and "cost_device" in res.table.params


def test_cli_cost_and_threads(timed):
    r = CliRunner().invoke(app, ["bench", "--bundle", str(timed), "--threads", "1",
                                 "--latency-samples", "2", "--batch-size", "8", "--repeats", "1",
                                 "--quiet"])
    assert r.exit_code == 0, r.output
    assert "time profile" in r.stdout and "ideal batch-1 speedup" in r.stdout
    r = CliRunner().invoke(app, ["calibrate", "--bundle", str(timed), "--cost", "watts"])
    assert r.exit_code == 2 and "'watts' is not one of 'flops', 'latency'" in r.stderr


def test_the_ideal_times_only_the_branches_that_run_and_the_row_on_its_own(monkeypatch):
    """Scripted clock: segment k takes k+1 s, a branch 10 s; each call is logged."""
    log: list[str] = []
    segments = [lambda x, k=k: log.append(f"s{k}") or x for k in range(3)]
    branches = [lambda x: log.append("b0"), None]  # exit 1 is off: its branch never runs
    cost = {f"s{k}": k + 1.0 for k in range(3)} | {"b0": 10.0}

    def timed(fn, x):
        out = fn(x)
        return out, cost[log[-1]]

    monkeypatch.setattr(latency, "_timed", timed)
    row, leave = exit_times(segments, branches, torch.zeros(1), repeats=1)
    assert row == 6.0  # 1 + 2 + 3: the segments in a row, no branch between them
    assert leave == [11.0, 13.0, 16.0]  # leave at 0: s0 + b0; at 1: + s1 (b1 off); end: + s2
    assert "b1" not in log
    # as many passes of the row, no branch between its segments, as of the cascade
    assert " ".join(log).count("s0 s1 s2") == log.count("b0") > 0


@pytest.mark.parametrize("per_image, want", [(None, 2.0), (3, 1.5)])
def test_the_ideal_sums_up_its_passes_as_the_speedup_it_is_held_against(monkeypatch, per_image,
                                                                        want):
    """Batched: the median pass (as the median throughput); batch 1: the mean over groups of
    each group's median (as the mean over images of each image's median over its sweeps)."""
    passes = [1.0, 1.0, 10.0, 2.0, 2.0, 9.0]  # a stall in each group of three
    clock = iter([0.0] * 2 * latency.WARMUP + [t for t in passes for _ in range(2)])
    monkeypatch.setattr(latency, "_timed", lambda fn, x: (fn(x), next(clock)))
    row, leave = exit_times([lambda x: x], [], torch.zeros(1), repeats=6, per_image=per_image)
    assert row == leave[0] == want  # median of all six: 2; groups' medians 1 and 2: 1.5
