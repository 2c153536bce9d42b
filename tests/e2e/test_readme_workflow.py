"""Issue 14, a new user's first hour: what the CLI says and keeps when a run is interrupted,
uncalibrated or repeated, and the options a new user reaches for first."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pteenet_cli.app import app
from typer.testing import CliRunner

from tests._helpers import (
    fails_cleanly,
)

runner = CliRunner()


def _attach(data: Path, ckpt: Path, out: Path, *extra: str) -> list[str]:
    return ["attach", "resnet20", "--data", str(data), "-c", str(ckpt), "-n", "2",
            "--branch", "pool", "--epochs", "1", "--batch-size", "16", "--val-fraction", "0.25",
            "--quiet", "--out", str(out), *extra]


# --------------------------------------------------------------------------- options


def test_bare_boosted_names_its_values(shared, tmp_path):
    data, ckpt, _ = shared
    out = tmp_path / "out"
    line = fails_cleanly(runner.invoke(app, [*_attach(data, ckpt, out), "--boosted"]))
    assert "--boosted" in line and "hard" in line and "soft" in line, line
    assert not out.exists()


def test_num_classes_is_read_from_the_checkpoint_and_said(shared, tmp_path):
    data, ckpt, _ = shared  # a 3-class resnet20; the model's own default is 10 classes
    result = runner.invoke(app, ["inspect", "resnet20", "-c", str(ckpt)])
    assert result.exit_code == 0, result.output
    said = [ln for ln in result.stdout.splitlines() if "--num-classes 3" in ln]
    assert len(said) == 1 and "checkpoint" in said[0] and "linear.weight" in said[0], \
        result.stdout
    assert "3 classes" in result.stdout


def test_attach_infers_the_class_count_and_the_bundle_loads(shared, tmp_path):
    import pteenet

    data, ckpt, _ = shared
    out = tmp_path / "out"
    result = runner.invoke(app, _attach(data, ckpt, out))
    assert result.exit_code == 0, result.output
    assert "--num-classes 3: read from the checkpoint" in result.stdout
    assert pteenet.load(out).num_classes == 3


def test_no_pretrained_backbone_is_random_seeded_and_loads_again(shared, tmp_path):
    from pteenet.backbone import create_backbone
    from pteenet.bundle import load_backbone, read_info

    data, _, _ = shared
    out = tmp_path / "out"
    result = runner.invoke(app, ["attach", "resnet20", "--no-pretrained", "--num-classes", "3",
                                 "--data", str(data), "-n", "2", "--branch", "pool",
                                 "--epochs", "1", "--batch-size", "16", "--val-fraction", "0.25",
                                 "--quiet", "--out", str(out)])
    assert result.exit_code == 0, result.output
    info = read_info(out)
    assert info.backbone["pretrained"] is False
    torch.manual_seed(123)  # whatever the global seed, the same random backbone comes back
    loaded = load_backbone(info).model.state_dict()
    torch.manual_seed(456)
    fresh = create_backbone("resnet20", num_classes=3).model.state_dict()
    assert all(torch.equal(loaded[k], fresh[k]) for k in fresh)


# --------------------------------------------------------------------------- bench


def _bench(bundle: Path, *extra: str):
    return runner.invoke(app, ["bench", "--bundle", str(bundle), "--max-samples", "8",
                               "--latency-samples", "0", "--repeats", "1", "--quiet", *extra])


def test_bench_warns_once_when_thresholds_were_never_calibrated(bundle):
    from tests._helpers import uncalibrate

    uncalibrate(bundle)
    result = _bench(bundle)
    assert result.exit_code == 0, result.output
    warned = [ln for ln in result.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warned) == 1 and "never calibrated" in warned[0], result.stderr
    assert "--threshold" in warned[0]
    quiet = _bench(bundle, "--threshold", "0.5")  # the user chose a threshold: nothing to say
    assert quiet.exit_code == 0 and "warning" not in quiet.stderr, quiet.stderr


def test_bench_on_a_calibrated_bundle_does_not_warn(bundle):
    result = _bench(bundle)
    assert result.exit_code == 0, result.output
    assert "warning" not in result.stderr, result.stderr


# --------------------------------------------------------------------------- Ctrl-C and --resume


def _stop_after_first_save(monkeypatch) -> None:
    from pteenet.training import Resume

    real = Resume._write

    def stop(self, state, done):
        real(self, state, done)
        raise KeyboardInterrupt

    monkeypatch.setattr(Resume, "_write", stop)


def test_ctrl_c_says_what_was_kept_and_the_exact_resume_command(shared, tmp_path, monkeypatch):
    import shlex

    data, ckpt, _ = shared
    out = tmp_path / "my out"  # a space: the printed command must be quoted
    args = _attach(data, ckpt, out, "--epochs", "3", "--resume")
    _stop_after_first_save(monkeypatch)
    result = runner.invoke(app, args)
    assert result.exit_code == 130, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.stderr
    assert "after epoch 1" in lines[0] and str(out / ".attach-state.pt") in lines[0], lines[0]
    command = lines[0].split("continue with: ")[1]
    assert shlex.split(command) == ["pteenet", *args]
    monkeypatch.undo()
    again = runner.invoke(app, shlex.split(command)[1:])
    assert again.exit_code == 0, again.output
    assert (out / "branches.safetensors").is_file() and not (out / ".attach-state.pt").exists()


def test_ctrl_c_without_resume_says_nothing_was_kept(shared, tmp_path, monkeypatch):
    import pteenet.training._train as training

    data, ckpt, _ = shared
    out = tmp_path / "out"

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "agreement", stop)  # Ctrl-C at the end of the first epoch
    result = runner.invoke(app, _attach(data, ckpt, out))
    assert result.exit_code == 130, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "nothing was written" in lines[0], result.stderr
    assert "with --resume" in lines[0] and "continue with" not in lines[0]


def test_boosted_resume_continues_to_the_uninterrupted_result(shared, tmp_path, monkeypatch):
    from pteenet.bundle import load

    data, ckpt, _ = shared
    extra = ("--boosted", "hard", "--margin", "0.5", "--epochs", "2", "--resume")
    full = runner.invoke(app, _attach(data, ckpt, tmp_path / "full", *extra))
    assert full.exit_code == 0, full.output
    out = tmp_path / "cut"
    _stop_after_first_save(monkeypatch)
    cut = runner.invoke(app, _attach(data, ckpt, out, *extra))
    assert cut.exit_code == 130 and "after branch 1" in cut.stderr, cut.output
    monkeypatch.undo()
    from pteenet.training import Resume

    starts: list[int] = []
    real = Resume.load_stage

    def recording(self, *a):
        got = real(self, *a)
        starts.append(got[0] if got else 0)
        return got

    monkeypatch.setattr(Resume, "load_stage", recording)
    resumed = runner.invoke(app, _attach(data, ckpt, out, *extra))
    assert resumed.exit_code == 0, resumed.output
    assert starts == [1]  # the second branch only
    a, b = load(tmp_path / "full"), load(out)
    assert all(torch.equal(v, b.branches.state_dict()[k])
               for k, v in a.branches.state_dict().items())
    assert (tmp_path / "full" / "thresholds.json").read_bytes() == \
        (out / "thresholds.json").read_bytes()


# --------------------------------------------------------------------------- stale derived files


def test_reattach_removes_what_the_old_bundle_left_and_nothing_else(shared, bundle):
    from pteenet.bundle import BUNDLE_HASH_KEY, bundle_hash

    data, ckpt, _ = shared
    assert _bench(bundle, "--sweep").exit_code == 0
    old = bundle_hash(bundle)
    assert json.loads((bundle / "bench.json").read_text())["bundle"]["sha256"] == old
    export = runner.invoke(app, ["export", "--bundle", str(bundle), "--format", "torchscript"])
    assert export.exit_code == 0, export.output
    manifest = json.loads((bundle / "export-torchscript" / "manifest.json").read_text())
    assert manifest[BUNDLE_HASH_KEY] == old
    (bundle / "notes.txt").write_text("mine")
    (bundle / "export-torchscript" / "mine.txt").write_text("mine")
    result = runner.invoke(app, _attach(data, ckpt, bundle, "--seed", "1"))
    assert result.exit_code == 0, result.output
    said = [ln for ln in result.stdout.splitlines() if ln.startswith("removed ")]
    assert len(said) == 1 and "bench.json" in said[0] and "export-torchscript" in said[0], \
        result.stdout
    for name in ("bench.json", "sweep.png", "sweep.csv", "export-torchscript/manifest.json"):
        assert not (bundle / name).exists(), name
    assert (bundle / "notes.txt").exists() and (bundle / "export-torchscript" / "mine.txt").exists()
    # a bench and an export of the new bundle are current: they stay
    assert _bench(bundle).exit_code == 0
    assert runner.invoke(app, ["export", "--bundle", str(bundle), "--format",
                               "torchscript"]).exit_code == 0
    from pteenet.bundle import remove_stale

    assert remove_stale(bundle, old) == [] and remove_stale(bundle, bundle_hash(bundle)) == []
    assert (bundle / "bench.json").exists()
    assert (bundle / "export-torchscript" / "manifest.json").exists()


def test_an_export_of_a_recalibrated_bundle_is_refused(bundle):
    from pteenet.errors import BundleError
    from pteenet.runtime import Cascade

    assert runner.invoke(app, ["export", "--bundle", str(bundle), "--format",
                               "torchscript"]).exit_code == 0
    Cascade.open(bundle / "export-torchscript")  # current: opens
    again = runner.invoke(app, ["calibrate", "--bundle", str(bundle), "--threshold", "0.3"])
    assert again.exit_code == 0, again.output
    with pytest.raises(BundleError, match="stale.*pteenet export"):
        Cascade.open(bundle / "export-torchscript")


# --------------------------------------------------------------------------- calibrate's table


def test_calibrate_shows_one_row_per_exit_by_default(bundle):
    result = runner.invoke(app, ["calibrate", "--bundle", str(bundle)])
    assert result.exit_code == 0, result.output
    out = result.stdout
    for column in ("takes", "agrees", "FLOPs at exit"):
        assert column in out, out
    rows = [ln for ln in out.splitlines() if ln.startswith("│")]
    assert len(rows) == 3, out  # two branches and the backbone, no per-class rows
    assert "blue" not in out


def test_calibrate_verbose_names_the_classes(bundle):
    result = runner.invoke(app, ["calibrate", "--bundle", str(bundle), "--cpm", "--verbose"])
    assert result.exit_code == 0, result.output
    rows = [ln for ln in result.stdout.splitlines() if ln.startswith("│")]
    assert len(rows) == 6, result.stdout  # 2 exits x 3 classes
    for name in ("blue", "green", "red"):
        assert sum(name in r for r in rows) == 2, (name, result.stdout)
    doc = json.loads(runner.invoke(app, ["calibrate", "--bundle", str(bundle), "--cpm",
                                         "--json"]).stdout)
    assert [r["class_name"] for r in doc["rows"][:3]] == ["blue", "green", "red"]


# --------------------------------------------------------------------------- progress


@pytest.fixture
def recorded_bars(monkeypatch) -> dict[str, list[float]]:
    """Every bar any command draws: its description -> the advances it got."""
    import pteenet.progress as progress

    seen: dict[str, list[float]] = {}
    real = progress.Progress

    class Recording(real):
        def add_task(self, description, *a, **k):
            seen[description] = []
            return super().add_task(description, *a, **k)

        def advance(self, task_id, advance=1):
            seen[self._tasks[task_id].description].append(advance)
            super().advance(task_id, advance)

    monkeypatch.setattr(progress, "Progress", Recording)
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich's bars; off a terminal: test_progress_log.py
    return seen


def test_every_long_step_has_a_bar_with_rate_and_eta_advancing_per_batch(shared, tmp_path,
                                                                        recorded_bars):
    from pteenet.progress import bar

    data, ckpt, _ = shared  # 24 training images, 18 after the held-out quarter
    out = tmp_path / "out"
    args = [a for a in _attach(data, ckpt, out, "--epochs", "2", "--views", "1") if a != "--quiet"]
    assert runner.invoke(app, args).exit_code == 0
    assert recorded_bars["backbone features"] == [8, 10, 6]  # one advance per (ramped) batch
    assert recorded_bars["training"] == [16, 2, 16, 2]  # batches of 16, two epochs
    assert runner.invoke(app, ["calibrate", "--bundle", str(out)]).exit_code == 0
    assert recorded_bars["calibration features"] == [6]
    result = runner.invoke(app, ["bench", "--bundle", str(out), "--latency-samples", "0",
                                 "--repeats", "1"])
    assert result.exit_code == 0 and sum(recorded_bars["measuring"]) > 0
    columns = " ".join(type(c).__name__ for c in bar().columns)
    assert "_Rate" in columns and "TimeRemainingColumn" in columns


# --------------------------------------------------------------------------- the sweep plot


@pytest.mark.parametrize(("extra", "rule", "current"), [
    ([], "the mincost table scaled", "the bundle's mincost table"),
    (["--threshold", "0.5"], "one global threshold on the gate score", "--threshold 0.5"),
])
def test_sweep_plot_labels_its_rule_and_marks_the_three_points(bundle, monkeypatch, extra, rule,
                                                               current):
    from matplotlib.figure import Figure

    figures = []
    real = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (figures.append(self),
                                                                   real(self, *a, **k)))
    assert _bench(bundle, "--sweep", *extra).exit_code == 0
    labels = [t.get_text() for t in figures[-1].axes[0].get_legend().get_texts()]
    assert len(labels) == 4, labels
    assert rule in labels[0], labels
    assert labels[1].startswith("backbone") and labels[2].startswith("oracle"), labels
    assert labels[3].startswith("current thresholds") and current in labels[3], labels


# --------------------------------------------------------------------------- file modes


def test_every_file_attach_bench_and_export_write_follows_the_umask(shared, tmp_path):
    import os
    import stat

    data, ckpt, _ = shared
    out = tmp_path / "out"
    old = os.umask(0o027)
    try:
        assert runner.invoke(app, _attach(data, ckpt, out)).exit_code == 0
        assert _bench(out, "--sweep").exit_code == 0
        assert runner.invoke(app, ["export", "--bundle", str(out), "--format",
                                   "torchscript"]).exit_code == 0
    finally:
        os.umask(old)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"branches.safetensors", "thresholds.json", "bench.json",
                                       "sweep.png", "manifest.json"}
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o640, p
