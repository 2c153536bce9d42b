"""``pteenet demo`` end to end in quick mode, and its data and backbone caches.

The demo is the README's first command, so it is tested the way a user meets it: through the CLI,
offline, writing a real bundle. Two runs share one workdir, because the promise of the cache is
what makes every run after the first one fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pteenet_cli.app import app
from sklearn.datasets import load_digits
from typer.testing import CliRunner

from pteenet.demo import DATA_MARKER, DemoSettings, default_workdir, prepare_digits

STAGES = ("[1/5] data", "[2/5] backbone", "[3/5] attach", "[4/5] calibrate", "[5/5] bench")
BUNDLE_FILES = ("branches.safetensors", "thresholds.json", "thresholds.csv", "bench.json",
                "sweep.png")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(workdir, out) shared by the two runs below."""
    root = tmp_path_factory.mktemp("demo")
    return root / "work", root / "out"


@pytest.fixture(scope="module")
def first_run(dirs: tuple[Path, Path]):
    """The cold run: writes the digits, trains the backbone, then attach/calibrate/bench."""
    work, out = dirs
    return CliRunner().invoke(app, ["demo", "--quick", "--out", str(out), "--workdir", str(work)])


@pytest.mark.slow
def test_demo_runs_every_stage_and_writes_the_bundle(first_run, dirs) -> None:
    work, out = dirs
    assert first_run.exit_code == 0, first_run.output
    for stage in STAGES:
        assert stage in first_run.output
    assert "trained in" in first_run.output  # the backbone was trained, not found in a cache
    for name in BUNDLE_FILES:
        assert (out / name).is_file(), name
    bench = json.loads((out / "bench.json").read_text())
    assert 0 < bench["early_exit"]["relative_flops"] < 1.2
    assert bench["data"]["split"] == "test"
    assert (work / "digits" / DATA_MARKER).is_file()
    assert (work / "backbone-resnet20-quick.pt").is_file()
    assert "early exit vs backbone" in first_run.stdout


@pytest.mark.slow
def test_second_run_reuses_the_cached_data_and_backbone(first_run, dirs) -> None:
    work, out = dirs
    assert first_run.exit_code == 0, first_run.output
    ckpt = work / "backbone-resnet20-quick.pt"
    before = ckpt.stat().st_mtime_ns
    again = CliRunner().invoke(app, ["demo", "--quick", "--json", "--out", str(out / "again"),
                                     "--workdir", str(work)])
    assert again.exit_code == 0, again.output
    summary = json.loads(again.stdout)
    assert summary["data"]["cached"] and summary["backbone"]["cached"]
    assert "reused cached checkpoint" in again.stderr
    assert ckpt.stat().st_mtime_ns == before
    assert summary["headline"]["relative_flops"] == summary["bench"]["early_exit"]["relative_flops"]
    assert (out / "again" / "bench.json").is_file()


def test_digits_are_a_stratified_image_folder_written_once(tmp_path: Path) -> None:
    settings = DemoSettings()
    info = prepare_digits(tmp_path, settings)
    root = Path(info["root"])
    assert (info["train"], info["test"], info["cached"]) == (1437, 360, False)
    total = np.bincount(load_digits().target, minlength=10)
    for split, n, share in (("train", 1437, 0.8), ("test", 360, 0.2)):
        classes = sorted(p.name for p in (root / split).iterdir())
        assert classes == [str(d) for d in range(10)]
        counts = np.array([len(list((root / split / c).glob("*.png"))) for c in classes])
        assert counts.sum() == n
        assert np.abs(counts - share * total).max() <= 1  # stratified: every digit 80/20
    img = Image.open(next((root / "test" / "7").glob("*.png")))
    assert img.size == (settings.image_size, settings.image_size) and img.mode == "L"
    assert np.asarray(img).max() > 128  # ink survived the rescaling
    again = prepare_digits(tmp_path, settings)
    assert again["cached"] and again["split_sha256"] == info["split_sha256"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp trees left


def test_an_incomplete_data_tree_is_rebuilt(tmp_path: Path) -> None:
    stale = tmp_path / "digits" / "train" / "0"
    stale.mkdir(parents=True)
    (stale / "broken.png").write_bytes(b"")  # a crashed earlier write: no marker
    info = prepare_digits(tmp_path)
    assert not info["cached"]
    assert not (stale / "broken.png").exists()
    assert (tmp_path / "digits" / DATA_MARKER).is_file()


def test_default_workdir_follows_pteenet_cache(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PTEENET_CACHE", str(tmp_path))
    assert default_workdir() == tmp_path / "demo"
    monkeypatch.delenv("PTEENET_CACHE")
    assert default_workdir() == Path.home() / ".cache" / "pteenet" / "demo"


def test_quick_mode_is_smaller_in_every_costly_knob() -> None:
    """Every knob that scales the demo's work is strictly smaller in quick mode (None = all
    the data); a new knob must be sorted into "costly" or "shape" here before this passes."""
    import dataclasses
    import math
    costly = {"backbone_epochs", "attach_epochs", "attach_samples", "bench_samples",
              "latency_samples", "repeats"}
    shape = {"image_size", "test_fraction", "seed", "attach_batch_size", "val_fraction"}
    names = {f.name for f in dataclasses.fields(DemoSettings)}
    assert names == costly | shape, names ^ (costly | shape)
    full, quick = DemoSettings.for_mode(False), DemoSettings.for_mode(True)

    def size(v: int | None) -> float:
        return math.inf if v is None else v

    for name in costly:
        assert size(getattr(quick, name)) < size(getattr(full, name)), name
    for name in shape:
        assert getattr(quick, name) == getattr(full, name), name
