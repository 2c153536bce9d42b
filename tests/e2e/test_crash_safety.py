"""Crash-safe bundles (issue 13): one commit point, one writer at a time, writability first,
nothing left behind.

* kill -9 at every step of a bundle write (the ``$PTEENET_PAUSE_DIR`` hook stops the writer
  between steps; the test kills it there): ``pteenet.load`` then returns the old bundle or the
  new one, never a mix, and the next writer leaves exactly that generation's files;
* a second writer (attach, calibrate, export, bench, the Python API) is refused with one line
  naming the holder's pid;
* read-only folders are refused before any work, in one line, exit 3;
* temp files, uncommitted pending files and feature caches of killed runs are swept by the
  next writer; the feature cache lives in the out folder, not in ``$TMPDIR``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from pteenet_cli.app import app
from typer.testing import CliRunner

import pteenet
import pteenet.calibration._calibrate
import pteenet.exporter._export
import pteenet.jobs._attach
from pteenet.bundle import (
    BRANCHES_FILE,
    MEMBERS,
    THRESHOLDS_FILE,
    ThresholdTable,
    read_info,
    read_thresholds,
    save_bundle,
    write_thresholds,
)
from pteenet.errors import BundleError
from pteenet.jobs import attach
from pteenet.storage import (
    CACHE_PREFIX,
    LOCK_FILE,
    MANIFEST,
    PAUSE_ENV,
    PENDING_SUFFIX,
    commit_files,
    writer_lock,
)
from pteenet.training import TrainConfig
from tests._helpers import (
    fails_cleanly,
    kill_when,
)

runner = CliRunner()
SAVE_STEPS = ["start", "wrote-branches.safetensors", "wrote-thresholds.csv",
              "wrote-thresholds.json", f"wrote-{MANIFEST}", "committed",
              "renamed-branches.safetensors", "renamed-thresholds.csv", "renamed-thresholds.json"]
TABLE_STEPS = ["start", "wrote-thresholds.csv", "wrote-thresholds.json", f"wrote-{MANIFEST}",
               "committed", "renamed-thresholds.csv", "renamed-thresholds.json"]


@pytest.fixture(scope="module")
def old(shared, tmp_path_factory) -> Path:
    """A 1-branch bundle on the shared data: what a 2-branch write must never be mixed with."""
    data, ckpt, _ = shared
    out = tmp_path_factory.mktemp("old") / "bundle"
    attach("resnet20", data, checkpoint=ckpt, num_classes=3, branches=1, branch="pool", out=out,
           val_fraction=0.25, config=TrainConfig(epochs=1, batch_size=16), progress=False)
    return out


@pytest.fixture(scope="module")
def new(shared, tmp_path_factory):
    """(model, folder): the shared 2-branch model with its own table, saved once whole."""
    model = pteenet.load(shared[2])
    model.set_thresholds(0.25)
    folder = tmp_path_factory.mktemp("new") / "bundle"
    save_bundle(folder, model, read_info(shared[2]))
    return model, folder


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def members(folder: Path) -> dict[str, bytes]:
    return {n: b for n, b in files_of(folder).items() if n in (*MEMBERS, MANIFEST)}


def same_model(a, b) -> bool:
    sa, sb = a.branches.state_dict(), b.branches.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(v, sb[k]) for k, v in sa.items()) and \
        torch.equal(a.thresholds, b.thresholds)


def kill_at(step: int, write: Callable[[], None], pause: Path) -> list[str]:
    """Run ``write`` in a forked child with the pause hook on; let it pass ``step`` steps and
    SIGKILL it at the next. Returns the steps it reached (all of them if it finished)."""
    pause.mkdir()
    pid = os.fork()
    if pid == 0:  # the child: write, then leave without running pytest's exit handlers
        code = 1
        try:
            os.environ[PAUSE_ENV] = str(pause)
            write()
            code = 0
        finally:
            os._exit(code)
    seen: list[str] = []
    deadline = time.monotonic() + 60
    while True:
        markers = list(pause.iterdir())
        if markers:
            seen.append(markers[0].name)
            if len(seen) > step:
                os.kill(pid, signal.SIGKILL)
                break
            markers[0].unlink()
        elif os.waitpid(pid, os.WNOHANG) != (0, 0):
            return seen  # finished (or failed: the caller's checks will say)
        assert time.monotonic() < deadline, f"the writer stalled after {seen}"
        time.sleep(0.001)
    os.waitpid(pid, 0)
    return seen


def leftovers(folder: Path) -> list[str]:
    return sorted(n for n in files_of(folder) if n.endswith((".tmp", ".bak", PENDING_SUFFIX))
                  or n in (LOCK_FILE,) or n.startswith(CACHE_PREFIX))


# --------------------------------------------------------------------------- kill -9 at each step


def test_kill_at_every_step_of_a_bundle_write(old, new, tmp_path):
    """Old: 1 branch; new: 2 branches (the case where a mix broke every command)."""
    model, ref_new = new
    old_model = pteenet.load(old)
    steps = kill_at(99, lambda: save_bundle(tmp_path / "full", model, read_info(ref_new)),
                    tmp_path / "pause-full")
    assert steps == SAVE_STEPS
    for k, step in enumerate(SAVE_STEPS):
        out = Path(shutil.copytree(old, tmp_path / f"out-{k}"))
        assert kill_at(k, lambda o=out: save_bundle(o, model, read_info(ref_new)),
                       tmp_path / f"pause-{k}")[-1] == step
        loaded = pteenet.load(out)
        committed = k >= SAVE_STEPS.index("committed")
        assert same_model(loaded, model if committed else old_model), (step, "a mixed bundle")
        with writer_lock(out):  # the next writer finishes or discards what the kill left
            pass
        assert members(out) == members(ref_new if committed else old), step
        assert leftovers(out) == [], (step, leftovers(out))


def test_kill_at_every_step_of_a_table_write(new, tmp_path):
    model, ref = new
    table = ThresholdTable(torch.full((2, 3), 0.75))
    for k, step in enumerate(TABLE_STEPS):
        out = Path(shutil.copytree(ref, tmp_path / f"out-{k}"))
        assert kill_at(k, lambda o=out: write_thresholds(o, table), tmp_path / f"p-{k}") \
            [-1] == step
        committed = k >= TABLE_STEPS.index("committed")
        want = 0.75 if committed else 0.25
        assert torch.equal(pteenet.load(out).thresholds, torch.full((2, 3), want)), step
        with writer_lock(out):
            pass
        assert leftovers(out) == [], (step, leftovers(out))
        assert files_of(out)[BRANCHES_FILE] == files_of(ref)[BRANCHES_FILE]
        info = read_info(out)  # the sweep kept the generation that was read
        assert torch.equal(read_thresholds(out, info).thresholds, torch.full((2, 3), want))


def test_calibrate_killed_after_its_commit_then_calibrate_again(new, tmp_path):
    """The hook drives a real ``pteenet calibrate`` process: killed just after its commit, the
    bundle reads as the new table, and the next calibrate finishes the job and writes its own."""
    out = Path(shutil.copytree(new[1], tmp_path / "out"))
    pause = tmp_path / "pause"
    pause.mkdir()
    env = {**os.environ, PAUSE_ENV: str(pause), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pteenet", "calibrate", "-b", str(out),
                             "-t", "0.6"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)

    def release() -> None:
        for marker in pause.iterdir():
            if marker.name != "committed":  # it may appear while we look: keep it there
                marker.unlink()

    kill_when(proc, lambda: (pause / "committed").exists(), meanwhile=release)
    assert (out / f".{THRESHOLDS_FILE}{PENDING_SUFFIX}").exists()  # killed before its renames
    assert torch.equal(pteenet.load(out).thresholds, torch.full((2, 3), 0.6))
    result = runner.invoke(app, ["calibrate", "-b", str(out), "-t", "0.4"])
    assert result.exit_code == 0, result.output
    assert torch.equal(pteenet.load(out).thresholds, torch.full((2, 3), 0.4))
    assert leftovers(out) == []


def test_bundle_without_its_manifest_is_refused(shared, tmp_path):
    """A bundle folder without bundle.json (from before manifests existed, or stripped of it)
    is refused with one line that says to re-run attach, by every reader and by calibrate."""
    out = Path(shutil.copytree(shared[2], tmp_path / "stripped"))
    (out / MANIFEST).unlink()
    with pytest.raises(BundleError, match="bundle.json missing.*pteenet attach"):
        pteenet.load(out)
    result = runner.invoke(app, ["calibrate", "-b", str(out), "-t", "0.3"])
    assert result.exit_code == 3, result.output
    assert "bundle.json missing" in result.output and "Traceback" not in result.output
    assert not (out / MANIFEST).exists()


# --------------------------------------------------------------------------- two writers


@contextlib.contextmanager
def held_elsewhere(folder: Path) -> Iterator[int]:
    """Another process holding ``folder``'s writer lock; yields its pid."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            with writer_lock(folder):
                os.write(w, b"1")
                time.sleep(120)
        finally:
            os._exit(0)
    os.close(w)
    try:
        assert os.read(r, 1) == b"1"
        yield pid
    finally:
        os.close(r)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_a_second_writer_is_refused_naming_the_first(shared, tmp_path, monkeypatch):
    data, ckpt, bundle = shared
    out = Path(shutil.copytree(bundle, tmp_path / "out"))
    before = files_of(out)
    monkeypatch.setattr(pteenet.jobs._attach, "create_backbone", _no_work)
    monkeypatch.setattr(pteenet.calibration._calibrate, "load", _no_work)
    with held_elsewhere(out) as pid:
        for args in (["calibrate", "-b", out, "-t", "0.5"],
                     ["attach", "resnet20", "--data", data, "-c", ckpt, "--num-classes", "3",
                      "-n", "2", "--quiet", "--out", out],
                     ["bench", "-b", out, "--quiet"]):
            line = fails_cleanly(runner.invoke(app, [str(a) for a in args]), 3)
            assert f"pid {pid}" in line and "another pteenet" in line, line
        with pytest.raises(BundleError, match=f"pid {pid}"):
            pteenet.calibrate(out, threshold=0.5)
        assert {k: v for k, v in files_of(out).items() if k != LOCK_FILE} == before
    monkeypatch.undo()
    result = runner.invoke(app, ["calibrate", "-b", str(out), "-t", "0.5"])  # free again
    assert result.exit_code == 0, result.output
    assert leftovers(out) == []  # the dead holder's lock file went with the next release


def _no_work(*args, **kwargs):
    raise AssertionError("no work may start before the bundle folder is locked and writable")


# --------------------------------------------------------------------------- read-only folders


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[Path]:
    """``folder`` made read-only (chmod; for root, which chmod does not stop, chattr +i too);
    skipped where neither works."""
    os.chmod(folder, 0o555)
    immutable = not _denied(folder) and subprocess.run(
        ["chattr", "+i", str(folder)], capture_output=True).returncode == 0
    try:
        if not _denied(folder):
            pytest.skip("cannot make a folder read-only here")
        yield folder
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        os.chmod(folder, 0o755)


def _denied(folder: Path) -> bool:
    try:
        (folder / ".probe").touch()
    except OSError:
        return True
    (folder / ".probe").unlink()
    return False


def test_read_only_folders_are_refused_before_any_work(shared, tmp_path, monkeypatch):
    data, ckpt, bundle = shared
    out = Path(shutil.copytree(bundle, tmp_path / "ro"))
    monkeypatch.setattr(pteenet.jobs._attach, "create_backbone", _no_work)
    monkeypatch.setattr(pteenet.calibration._calibrate, "load", _no_work)
    monkeypatch.setattr(pteenet.exporter._export, "load", _no_work)
    attach_args = ["attach", "resnet20", "--data", data, "-c", ckpt, "--num-classes", "3",
                   "-n", "2", "--quiet"]
    with read_only(out):
        for args in ([*attach_args, "--out", out / "new"],  # a new folder in a read-only one
                     [*attach_args, "--resume", "--out", out],  # the resume state's folder
                     ["calibrate", "-b", out, "-t", "0.5"],
                     ["export", "-b", out],  # into <bundle>/export-onnx
                     ["bench", "-b", out, "--quiet"]):
            line = fails_cleanly(runner.invoke(app, [str(a) for a in args]), 3)
            assert "cannot write into" in line and "--format" not in line, line
    assert files_of(out) == files_of(bundle)


# --------------------------------------------------------------------------- leftovers


def test_the_next_writer_sweeps_what_killed_ones_left(shared, tmp_path):
    out = Path(shutil.copytree(shared[2], tmp_path / "out"))
    before = files_of(out)
    dead = _dead_pid()
    junk = [".thresholds.json.pteenet-abcd1234.tmp", f".{BRANCHES_FILE}{PENDING_SUFFIX}",
            f"{CACHE_PREFIX}{dead}-x1y2z3.bin"]
    kept = [f"{CACHE_PREFIX}{os.getpid()}-alive.bin", "notes.tmp", "my.bak",  # the user's
            ".notes.txt.abcd1234.tmp", ".config.new", ".branches.safetensors.q1w2e3r4.bak"]
    for name in junk + kept:
        (out / name).write_bytes(b"x" * 10)
    with writer_lock(out):
        pass
    assert sorted(files_of(out)) == sorted([*before, *kept])
    assert same_model(pteenet.load(out), pteenet.load(shared[2]))


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_feature_cache_of_a_killed_attach_is_in_out_and_swept(shared, tmp_path):
    data, ckpt, _ = shared
    out, tmp = tmp_path / "out", tmp_path / "tmpdir"
    tmp.mkdir()
    code = (f"from pteenet import attach, TrainConfig; "
            f"attach('resnet20', {str(data)!r}, checkpoint={str(ckpt)!r}, num_classes=3, "
            f"branches=2, branch='pool', out={str(out)!r}, progress=False, "
            f"config=TrainConfig(epochs=10000, batch_size=16, cache_limit=1))")
    env = {**os.environ, "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE)
    kill_when(proc, lambda: out.is_dir() and any(p.name.startswith(CACHE_PREFIX)
                                                 for p in out.iterdir()), poll=0.01)
    assert list(tmp.iterdir()) == []  # nothing in $TMPDIR ...
    assert any(n.startswith(CACHE_PREFIX) for n in files_of(out))  # ... it is in --out
    with writer_lock(out):
        pass
    assert leftovers(out) == []


def test_a_write_error_is_one_line_and_leaves_the_old_bundle(new, tmp_path):
    """A full disk while the new files are written: BundleError, nothing half-written left."""
    out = Path(shutil.copytree(new[1], tmp_path / "out"))
    before = files_of(out)

    def disk_full(path: Path) -> None:
        path.write_bytes(b"half a table")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(BundleError, match="cannot write into .*No space left on device"):
        commit_files(out, {THRESHOLDS_FILE: disk_full}, MEMBERS)
    assert files_of(out) == before


def test_a_damaged_manifest_is_refused_and_a_new_bundle_replaces_it(new, tmp_path):
    model, ref = new
    out = Path(shutil.copytree(ref, tmp_path / "out"))
    (out / MANIFEST).write_text('{"format_version": 1, "files": "edited"}')
    with pytest.raises(BundleError, match="bundle.json is malformed"):
        pteenet.load(out)
    with pytest.raises(BundleError, match="bundle.json is malformed"):  # the branches are
        write_thresholds(out, ThresholdTable(torch.full((2, 3), 0.5)))  # unverifiable
    save_bundle(out, model, read_info(ref))  # what attach does: the whole bundle anew
    assert members(out) == members(ref) and leftovers(out) == []
