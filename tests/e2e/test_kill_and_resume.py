"""A failed, killed or interrupted run loses nothing: earlier bundles stay byte for byte, no temp
files are left behind, ``--resume`` continues to exactly the uninterrupted result, and a NaN loss
stops training with the last good branch weights.

Issue 6 ("Reliability and security"). (Same seed -> byte-identical bundle is covered by
tests/jobs/test_attach.py::test_same_seed_gives_byte_identical_bundles.)
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pteenet_cli.app import app
from typer.testing import CliRunner

import pteenet
import pteenet.storage._commit as commit
import pteenet.training._train as training
from pteenet.backbone import cifar_resnet, create_backbone
from pteenet.bundle import THRESHOLDS_FILE, ThresholdTable, read_info, save_bundle, write_thresholds
from pteenet.cascade import build_early_exit
from pteenet.data import open_data, split_indices
from pteenet.errors import TrainingError
from pteenet.graph import choose_cuts, trace_backbone
from pteenet.jobs import STATE_FILE, attach
from pteenet.storage import LOCK_FILE, MANIFEST, PENDING_SUFFIX
from pteenet.training import Resume, TrainConfig, compute_features, train_branches
from tests._helpers import kill_when, write_images

runner = CliRunner()



@pytest.fixture(scope="module")
def material(tmp_path_factory) -> tuple[Path, Path]:
    """72 real images (3 classes) and a real, untrained resnet20 3-class checkpoint."""
    root = tmp_path_factory.mktemp("nothing-lost")
    data = write_images(root / "data", per_class=24, splits=("train",))
    torch.manual_seed(0)
    ckpt = root / "resnet20-3.pt"
    torch.save(cifar_resnet("resnet20", num_classes=3).state_dict(), ckpt)
    return data, ckpt


@pytest.fixture(scope="module")
def old_bundle(material, tmp_path_factory) -> Path:
    """An earlier bundle (1 branch, 1 epoch), never modified: copy it first."""
    data, ckpt = material
    out = tmp_path_factory.mktemp("old") / "bundle"
    attach("resnet20", data, checkpoint=ckpt, num_classes=3, branches=1, branch="pool", out=out,
           config=TrainConfig(epochs=1, batch_size=16), progress=False)
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file in ``folder`` (hidden ones included) by name, with its bytes."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def temp_files(folder: Path) -> list[str]:
    """Temp, backup and not-yet-renamed files (pteenet.storage's)."""
    ends = (".tmp", ".bak", PENDING_SUFFIX)
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(ends))


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(v, b[k]) for k, v in a.items())


# --------------------------------------------------------------------------- SIGKILL, then --resume

EPOCHS = 20


def _attach_args(data: Path, ckpt: Path, out: Path) -> list[str]:
    return ["attach", "resnet20", "--data", str(data), "--checkpoint", str(ckpt),
            "--num-classes", "3", "--branches", "2", "--branch", "pool", "--epochs",
            str(EPOCHS), "--batch-size", "8", "--resume", "--quiet", "--out", str(out)]


def test_sigkill_mid_training_loses_nothing_and_resume_matches(material, old_bundle, tmp_path,
                                                              monkeypatch):
    data, ckpt = material
    out = Path(shutil.copytree(old_bundle, tmp_path / "out"))
    before = snapshot(out)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pteenet", *_attach_args(data, ckpt, out)],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    state = out / STATE_FILE
    # the moment the first epoch's state is in place
    kill_when(proc, state.exists, timeout=300, poll=0.001)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    saved = torch.load(state, map_location="cpu", weights_only=True)
    assert 0 <= saved["epoch"] < EPOCHS - 1  # really killed mid-training

    # The earlier bundle is intact, byte for byte; the only new files are the training state
    # and the killed writer's lock file (inert: the kernel released its lock). (Were the kill
    # to land while the next epoch's state is being written, that state's temp file would
    # remain too, until the next writer sweeps it. The poll above kills right after a save, an
    # epoch before the next one, so this is rare; it is tolerated, nothing else is.)
    state_tmp = f".{STATE_FILE}."
    after = {k: v for k, v in snapshot(out).items() if not k.startswith(state_tmp)}
    assert set(after) == set(before) | {STATE_FILE, LOCK_FILE}, sorted(after)
    assert {k: v for k, v in after.items() if k not in (STATE_FILE, LOCK_FILE)} == before
    killed_tmp = [n for n in temp_files(out) if n.startswith(state_tmp)]
    assert temp_files(out) == killed_tmp

    # --resume continues from the saved epoch (not from scratch) ...
    starts: list[int] = []
    real_load = Resume.load

    def recording_load(self, *args):
        starts.append(real_load(self, *args))
        return starts[-1]

    monkeypatch.setattr(Resume, "load", recording_load)
    result = runner.invoke(app, _attach_args(data, ckpt, out))
    assert result.exit_code == 0, result.output
    assert starts == [saved["epoch"] + 1]
    assert not state.exists() and temp_files(out) == []  # the resumed writer swept them
    assert sorted(p.name for p in out.iterdir()) == sorted(before)

    # ... to exactly the branches of a run that was never interrupted.
    ref = tmp_path / "reference"
    attach("resnet20", str(data), checkpoint=str(ckpt), num_classes=3, branches=2,
           branch="pool", out=ref, config=TrainConfig(epochs=EPOCHS, batch_size=8),
           progress=False)
    resumed, uninterrupted = pteenet.load(out), pteenet.load(ref)
    assert same_weights(resumed.branches.state_dict(), uninterrupted.branches.state_dict())
    assert read_info(out).training["losses"] == read_info(ref).training["losses"]
    assert (out / THRESHOLDS_FILE).read_bytes() == (ref / THRESHOLDS_FILE).read_bytes()


# --------------------------------------------------------------------------- killed mid-write


def _interrupt_nth_replace(monkeypatch, folder: Path, n: int) -> list[str]:
    """``os.replace`` as pteenet.storage calls it raises KeyboardInterrupt (Ctrl-C) on the n-th
    file renamed into ``folder``; the renames before it go through."""
    real = os.replace
    seen: list[str] = []

    def replace(src, dst, *args, **kwargs):
        if Path(dst).parent == folder:
            seen.append(Path(dst).name)
            if len(seen) == n:
                raise KeyboardInterrupt
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(commit.os, "replace", replace)
    return seen


@pytest.fixture
def new_model(old_bundle):
    """A model to save over the old bundle: its branch weights differ from the saved ones."""
    model = pteenet.load(old_bundle)
    with torch.no_grad():
        for p in model.branches.parameters():
            p.add_(0.25)
    return model


def test_interrupt_before_the_commit_keeps_the_old_bundle(old_bundle, new_model, tmp_path,
                                                          monkeypatch):
    out = Path(shutil.copytree(old_bundle, tmp_path / "out"))
    before = snapshot(out)
    seen = _interrupt_nth_replace(monkeypatch, out, 1)
    with pytest.raises(KeyboardInterrupt):
        save_bundle(out, new_model, read_info(old_bundle))
    assert seen == [MANIFEST]  # the commit point is the first rename into the folder
    assert snapshot(out) == before
    assert temp_files(out) == []


@pytest.mark.parametrize("n", [2, 3])
def test_interrupt_after_the_commit_gives_the_new_bundle(old_bundle, new_model, tmp_path,
                                                         monkeypatch, n):
    """Committed is committed: the renames still pending are read from their pending files
    and finished by the next writer."""
    out = Path(shutil.copytree(old_bundle, tmp_path / "out"))
    _interrupt_nth_replace(monkeypatch, out, n)
    with pytest.raises(KeyboardInterrupt):
        save_bundle(out, new_model, read_info(old_bundle))
    monkeypatch.undo()
    assert temp_files(out)  # a rename was left undone ...
    want = new_model.branches.state_dict()
    assert same_weights(pteenet.load(out).branches.state_dict(), want)  # ... yet it is read
    write_thresholds(out, ThresholdTable(torch.full((1, 3), 0.5)))  # the next writer
    assert temp_files(out) == [] and LOCK_FILE not in snapshot(out)
    assert same_weights(pteenet.load(out).branches.state_dict(), want)


def test_ctrl_c_while_attach_saves_is_one_line_and_keeps_the_old_bundle(material, old_bundle,
                                                                      tmp_path, monkeypatch):
    data, ckpt = material
    out = Path(shutil.copytree(old_bundle, tmp_path / "out"))
    before = snapshot(out)
    _interrupt_nth_replace(monkeypatch, out, 1)
    result = runner.invoke(app, ["attach", "resnet20", "--data", str(data), "-c", str(ckpt),
                                 "--num-classes", "3", "-n", "2", "--branch", "pool",
                                 "--epochs", "1", "--quiet", "--out", str(out)])
    assert result.exit_code == 130, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "interrupted" in lines[0], result.stderr
    assert "Traceback" not in result.output
    assert snapshot(out) == before
    assert temp_files(out) == []


def test_written_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_thresholds(tmp_path, ThresholdTable(torch.full((2, 3), 0.5)))
    finally:
        os.umask(old)
    for name in (THRESHOLDS_FILE, "thresholds.csv"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


# --------------------------------------------------------------------------- NaN loss


def _nan_on_call(monkeypatch, n: int) -> list[int]:
    """The default loss returns NaN (still differentiable) on its n-th call, i.e. n-th batch.

    Training calls ``distill_per_sample`` once per batch (the default ``--loss distill``).
    """
    name = "distill_per_sample"
    real = getattr(training, name)
    calls: list[int] = []

    def loss(*args, **kwargs):
        value = real(*args, **kwargs)
        calls.append(1)
        return value * float("nan") if len(calls) == n else value

    monkeypatch.setattr(training, name, loss)
    return calls


@pytest.fixture(scope="module")
def features(material):
    """A 2-branch model on the frozen backbone, with cached train and held-out features."""
    data, ckpt = material
    bb = create_backbone("resnet20", checkpoint=ckpt, num_classes=3)
    trace = trace_backbone(bb.model, bb.preprocess.input_size, with_thop=False)
    dataset = open_data(data, bb.preprocess)
    train_idx, held_idx = split_indices(len(dataset), 0.1, 0)
    torch.manual_seed(0)
    model = build_early_exit(trace, choose_cuts(trace, 2), 3, "pool")
    train = compute_features(model, dataset, train_idx[:32])  # 2 batches of 16 per epoch
    held = compute_features(model, dataset, held_idx)
    return model, train, held


@pytest.mark.parametrize("bad_call", [3, 4])  # first and second batch of epoch 2
def test_nan_loss_stops_with_the_last_good_weights(features, monkeypatch, bad_call):
    model, train, held = features
    torch.manual_seed(1)
    for p in model.branches.parameters():  # a fresh start for each case
        torch.nn.init.normal_(p, std=0.1)
    initial = {k: v.clone() for k, v in model.branches.state_dict().items()}
    after_epoch: list[dict[str, torch.Tensor]] = []

    def on_epoch(epoch, loss, agree):
        after_epoch.append({k: v.clone() for k, v in model.branches.state_dict().items()})

    calls = _nan_on_call(monkeypatch, bad_call)
    with pytest.raises(TrainingError) as info:
        train_branches(model, train, held, TrainConfig(epochs=4, batch_size=16), on_epoch)
    message = str(info.value)
    assert "nan" in message.lower() and "epoch 2" in message and "`lr`" in message
    assert len(calls) == bad_call  # stopped at once
    assert len(after_epoch) == 1  # one good epoch finished
    now = model.branches.state_dict()
    assert same_weights(now, after_epoch[0])
    assert not same_weights(now, initial)  # the good epoch's training is kept, not undone
    assert all(torch.isfinite(v).all() for v in now.values() if v.is_floating_point())


def test_nan_loss_in_attach_writes_no_bundle(material, tmp_path, monkeypatch):
    data, ckpt = material
    _nan_on_call(monkeypatch, 3)
    with pytest.raises(TrainingError, match="(?i)nan"):
        attach("resnet20", data, checkpoint=ckpt, num_classes=3, branches=2, branch="pool",
               out=tmp_path / "out", config=TrainConfig(epochs=3, batch_size=16),
               progress=False)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_nan_loss_is_one_line_exit_5_and_keeps_the_old_bundle(material, old_bundle, tmp_path,
                                                             monkeypatch):
    data, ckpt = material
    out = Path(shutil.copytree(old_bundle, tmp_path / "out"))
    before = snapshot(out)
    _nan_on_call(monkeypatch, 3)
    result = runner.invoke(app, ["attach", "resnet20", "--data", str(data), "-c", str(ckpt),
                                 "--num-classes", "3", "-n", "2", "--branch", "pool",
                                 "--epochs", "3", "--batch-size", "16", "--quiet",
                                 "--out", str(out)])
    assert result.exit_code == 5, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error (training):") and "nan" in lines[0].lower()
    assert "Traceback" not in result.output
    assert snapshot(out) == before
    assert temp_files(out) == []


# --------------------------------------------------------------------------- a bad --resume state


@pytest.mark.parametrize(("state", "code", "words"), [
    ({"key": "another attach", "epoch": 0}, 2, ["different attach", "drop --resume"]),
    (b"PK\x03\x04 cut short", 3, ["unreadable", "delete it"]),  # an input file: exit 3
])
def test_stale_or_broken_resume_state_is_refused_and_kept(material, tmp_path, state, code, words):
    data, ckpt = material
    out = tmp_path / "out"
    out.mkdir()
    if isinstance(state, bytes):
        (out / STATE_FILE).write_bytes(state)
    else:
        torch.save(state, out / STATE_FILE)
    before = snapshot(out)
    result = runner.invoke(app, ["attach", "resnet20", "--data", str(data), "-c", str(ckpt),
                                 "--num-classes", "3", "-n", "2", "--branch", "pool",
                                 "--epochs", "2", "--resume", "--quiet", "--out", str(out)])
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert snapshot(out) == before  # the state is the user's to keep or delete
