"""Issue 29's attacks on the command line, one row each, run as a user would run them.

For every row: the exit code, one line on stderr holding the row's words (nothing at all for a
success), no traceback, no file outside pteenet's own changed (the whole workspace hashed before
and after; for a successful attach, the user's files in it), no code from a pickle run, and no
process left behind (each run is its own session, checked empty afterwards).
"""

from __future__ import annotations

import errno
import hashlib
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pteenet.storage import LOCK_FILE
from tests._helpers import (
    reseal,
    write_images,
)

FAST_BENCH = ["--latency-samples", "2", "--repeats", "1", "--batch-size", "16", "--quiet",
              "--no-profile"]
MARKER = "pwned"  # what a pickle that ran code would leave


class _RunsCode:
    """Unpickling this runs ``touch <MARKER>``: the payload of an evil checkpoint or state."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __reduce__(self):
        return (os.system, (f"touch {self.folder / MARKER}",))


@dataclass
class Attack:
    """``setup(ws)`` prepares the workspace and returns the arguments after ``pteenet``."""

    name: str
    setup: Callable[[Path, tuple[Path, Path, Path]], list[str]]
    code: int
    words: list[str] = field(default_factory=list)
    keep: Callable[[Path], list[Path]] | None = None  # success rows: the user's files to hash
    stdin_closed: bool = False


def _bundle(ws: Path, shared) -> Path:
    return Path(shutil.copytree(shared[2], ws / "bundle"))


def _attach(shared, out: Path, *extra: str) -> list[str]:
    data, ckpt, _ = shared
    return ["attach", "resnet20", "--data", str(data), "-c", str(ckpt), "--num-classes", "3",
            "-n", "2", "--branch", "pool", "--epochs", "1", "--batch-size", "16", "--quiet",
            "--out", str(out), *extra]


def symlinked_lock(ws, shared):
    b = _bundle(ws, shared)
    (ws / "notes.txt").write_text("my notes\n")
    (b / LOCK_FILE).symlink_to(ws / "notes.txt")
    return ["calibrate", "-b", str(b), "-t", "0.5"]


USER_FILES = ["bench.json", "sweep.png", "sweep.csv", "export-mine/manifest.json",
              "export-mine/segment_0.onnx"]


def fresh_out_with_user_files(ws, shared):
    out = ws / "out"
    (out / "export-mine").mkdir(parents=True)
    for name in USER_FILES:
        (out / name).write_text(f"the user's own {name}\n")
    (out / "export-mine" / "manifest.json").write_text('{"files": {"segments": '
                                                        '["segment_0.onnx"]}}')
    return _attach(shared, out)


def deleted_table(ws, shared):
    b = _bundle(ws, shared)
    (b / "thresholds.json").unlink()
    return ["bench", "-b", str(b), *FAST_BENCH]


def no_manifest(ws, shared):
    b = _bundle(ws, shared)
    (b / "bundle.json").unlink()
    return ["calibrate", "-b", str(b), "-t", "0.5"]


def evil_resume_state(ws, shared):
    out = ws / "out"
    out.mkdir()
    with open(out / ".attach-state.pt", "wb") as f:
        pickle.dump({"key": _RunsCode(ws)}, f)
    return _attach(shared, out, "--resume")


def evil_checkpoint(ws, shared):
    with open(ws / "evil.pt", "wb") as f:
        pickle.dump({"state_dict": _RunsCode(ws)}, f)
    data = shared[0]
    return ["attach", "resnet20", "--data", str(data), "-c", str(ws / "evil.pt"),
            "--num-classes", "3", "-n", "2", "--quiet", "--out", str(ws / "out")]


def extra_class_folders(ws, shared):
    data = write_images(ws / "data", per_class=4)
    for split in ("train", "test"):
        shutil.copytree(data / split / "red", data / split / "zzz-extra")
    _, ckpt, _ = shared
    return ["attach", "resnet20", "--data", str(data), "-c", str(ckpt), "--num-classes", "3",
            "-n", "2", "--branch", "pool", "--epochs", "1", "--quiet", "--out", str(ws / "out")]


def _edited_meta(ws, shared, edit: Callable[[dict], None]) -> Path:
    """The bundle with its metadata edited by ``edit`` and re-hashed, as one who knows the
    format would: only the checks on each field can refuse it."""
    import json

    import safetensors.torch

    from pteenet.bundle._schema import META_KEY

    b = _bundle(ws, shared)
    f = b / "branches.safetensors"
    tensors = safetensors.torch.load_file(str(f))
    with safetensors.safe_open(str(f), "pt") as g:
        meta = g.metadata()
    doc = json.loads(meta[META_KEY])
    edit(doc)
    safetensors.torch.save_file(tensors, str(f), {**meta, META_KEY: json.dumps(doc)})
    reseal(b)
    return b


def wide_width(ws, shared):
    def edit(doc):
        doc["branches"][0]["width"] = "wide"
    return ["bench", "-b", str(_edited_meta(ws, shared, edit)), *FAST_BENCH]


def flops_past_int64(ws, shared):
    def edit(doc):
        doc["segment_flops"][0] = 2 ** 63
    return ["bench", "-b", str(_edited_meta(ws, shared, edit)), *FAST_BENCH]


def edited_csv(ws, shared):
    b = _bundle(ws, shared)
    with open(b / "thresholds.csv", "a") as f:
        f.write("0,0.0\n")
    return ["bench", "-b", str(b), *FAST_BENCH]


ATTACKS = [
    Attack("1-symlinked-lock", symlinked_lock, 3, ["not a plain file"]),
    Attack("2-attach-into-a-fresh-out-keeps-the-users-files", fresh_out_with_user_files, 0,
           keep=lambda ws: [ws / "out" / n for n in USER_FILES]),
    Attack("3-threads-100000", lambda ws, s: ["bench", "-b", str(_bundle(ws, s)), "--threads",
                                              "100000", *FAST_BENCH], 2, ["1..1024"]),
    Attack("5-seed-of-23-digits", lambda ws, s: _attach(s, ws / "out", "--seed",
                                                        "9" * 23), 2, ["--seed", "64-bit"]),
    Attack("5-max-samples-2", lambda ws, s: _attach(s, ws / "out", "--max-samples", "2"), 2,
           ["--max-samples"]),
    Attack("5-help-into-a-closed-pipe", lambda ws, s: ["attach", "--help"], 1,
           stdin_closed=True),
    Attack("8-deleted-committed-table", deleted_table, 3, ["thresholds.json missing",
                                                           "pteenet calibrate"]),
    Attack("6-width-wide", wide_width, 3, ["'width'", "pteenet attach"]),
    Attack("6-segment-flops-past-int64", flops_past_int64, 3, ["segment_flops"]),
    Attack("8-edited-threshold-csv", edited_csv, 3, ["thresholds.csv", "pteenet calibrate"]),
    Attack("bundle-without-bundle-json", no_manifest, 3, ["bundle.json missing",
                                                          "pteenet attach"]),
    Attack("11-resume-state-that-runs-code", evil_resume_state, 3, ["unreadable", "delete it"]),
    Attack("checkpoint-that-runs-code", evil_checkpoint, 3, ["could run code"]),
    Attack("12-mean-nan", lambda ws, s: _attach(s, ws / "out", "--mean", "nan,nan,nan"), 2,
           ["--mean", "finite"]),
    Attack("12-std-zero", lambda ws, s: _attach(s, ws / "out", "--std", "0,0,0"), 2,
           ["--std"]),
    Attack("threshold-negative", lambda ws, s: ["calibrate", "-b", str(_bundle(ws, s)), "-t",
                                                "-5"], 2, []),
    Attack("13-more-class-folders-than-classes", extra_class_folders, 0,
           keep=lambda ws: sorted((ws / "data").rglob("*.png"))),
]


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


def run_cli(args: list[str], closed_stdout: bool = False,
            timeout: float = 240) -> tuple[int, str, str]:
    """``pteenet args`` in a session of its own; asserts it finished and left no process."""
    r = w = None
    if closed_stdout:  # a reader that is gone before the first write: EPIPE at once
        r, w = os.pipe()
        os.close(r)
    proc = subprocess.Popen([sys.executable, "-m", "pteenet", *args], start_new_session=True,
                            stdout=w if closed_stdout else subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"hung: pteenet {' '.join(args)}")
    finally:
        if w is not None:
            os.close(w)
    deadline = time.monotonic() + 10
    while True:  # the session is empty once every process of it has exited
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        except PermissionError:  # a zombie group member on some kernels: still ours to wait
            pass
        assert time.monotonic() < deadline, f"left a process behind: pteenet {args[0]}"
        time.sleep(0.05)
    return proc.returncode, out or "", err


@pytest.mark.parametrize("attack", ATTACKS, ids=[a.name for a in ATTACKS])
def test_attack(attack, shared, tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    args = attack.setup(ws, shared)
    shared_before = {str(p): digest(p) for p in shared[:2] if p.is_dir()}
    kept = attack.keep(ws) if attack.keep else None
    before = digest(ws) if kept is None else {str(p): p.read_bytes() for p in kept}
    code, out, err = run_cli(args, closed_stdout=attack.stdin_closed)
    assert code == attack.code, (code, err[-2000:], out[-500:])
    assert code >= 0, f"killed by signal {-code}"
    assert "Traceback" not in err and "internal error" not in err, err[-2000:]
    lines = err.strip().splitlines()
    if code == 0 or attack.stdin_closed:
        assert lines == [], err
    else:
        assert len(lines) == 1, err
        for word in attack.words:
            assert word in lines[0], (word, lines[0])
    assert not (ws / MARKER).exists(), "a pickle ran code"
    after = digest(ws) if kept is None else {str(p): p.read_bytes() for p in kept}
    assert after == before, "the user's files changed"
    assert {str(p): digest(p) for p in shared[:2] if p.is_dir()} == shared_before
    if attack.name.startswith("13-"):
        assert "class folders" in out and "not used" in out, out


def test_13_unused_class_folders_are_said(shared, tmp_path):
    """The control of row 13 above: said once, on stdout, as a note."""
    ws = tmp_path / "ws"
    ws.mkdir()
    code, out, err = run_cli(extra_class_folders(ws, shared))
    assert code == 0 and out.count("class folders") == 1, (err, out)


def test_14_a_refused_second_writer_ends_at_once(shared, tmp_path):
    """A writer refused by the lock exits without tearing torch down (nothing to tear down):
    an exit hook it registered never runs, where it ran (after seconds of unwinding) before."""
    b = _bundle(tmp_path, shared)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom pteenet.storage import writer_lock\n"
        f"with writer_lock({str(b)!r}):\n    print('held', flush=True)\n    time.sleep(120)\n")],
        stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        hook = tmp_path / "torn-down"
        code = ("import atexit, sys\n"
                f"atexit.register(lambda: open({str(hook)!r}, 'w').close())\n"
                "from pteenet_cli.app import main\n"
                f"sys.argv = ['pteenet', 'calibrate', '-b', {str(b)!r}, '-t', '0.5']\n"
                "main()\n")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 3 and "being written by another" in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
        assert not hook.exists()
        assert holder.poll() is None  # the holder is untouched
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()


def _tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir()
    try:
        return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                               str(folder)], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _fill(disk: Path, leave: int) -> None:
    """Fill ``disk`` to the last byte, then give back ``leave`` bytes."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:  # no buffer left to fail at close
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC
    os.truncate(filler, max(0, filler.stat().st_size - leave))


def test_4_a_full_disk_during_attach_is_cannot_write(shared, tmp_path):
    """A real full disk (a small tmpfs; needs root, else skipped): whichever write fails first
    (safetensors raises its own type for it), the promised line and exit 3, and nothing is
    left in --out."""
    disk = tmp_path / "disk"
    if os.geteuid() != 0 or not _tmpfs(disk, "2m"):
        pytest.skip("cannot mount a small tmpfs here")
    try:
        _fill(disk, 16 * 1024)
        out = disk / "out"
        code, _, err = run_cli(_attach(shared, out))
        assert code == 3, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "cannot write into" in lines[0], err
        assert "No space left on device" in lines[0] and "internal error" not in lines[0]
        assert not out.exists() or [p.name for p in out.iterdir()] == []
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
