"""Bad checkpoints through ``attach`` and ``inspect --checkpoint``: one line, exit 3, no traceback.

Issue 6 ("Reliability and security"): missing, empty, truncated, not a checkpoint, a pickle
that would run code (refused by ``torch.load(weights_only=True)``, and its payload never runs),
for another architecture, for another number of classes.
"""

from __future__ import annotations

import os
import pickle
import random
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pteenet.backbone import cifar_resnet
from tests._helpers import cli, fails_cleanly, write_images

MARKER = "pwned"


class _RunsShell:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class _OpensFile:
    """Unpickling this creates a marker file with ``open``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Every kind of bad checkpoint, written once, plus a data folder and the good checkpoint."""
    root = tmp_path_factory.mktemp("ckpt-errors")
    write_images(root / "data", per_class=3, splits=("train",))
    torch.manual_seed(0)
    good_sd = cifar_resnet("resnet20", num_classes=3).state_dict()
    good = root / "good.pt"
    torch.save(good_sd, good)
    raw = good.read_bytes()
    f = {"data": root / "data", "good": good, "missing": root / "missing.pt",
         "empty": root / "empty.pt", "truncated": root / "truncated.pt",
         "text": root / "notes.pt", "folder": root / "folder.pth",
         "evil-system": root / "evil-system.pt", "evil-open": root / "evil-open.pth",
         "evil-legacy": root / "evil-legacy.th", "wrong-arch": root / "resnet32.pt",
         "wrong-classes": root / "resnet20-10.pt", "random": root / "random.bin",
         "truncated-safetensors": root / "half.safetensors",
         "pickle-as-safetensors": root / "pickle.safetensors",
         "no-tensors": root / "no-tensors.pt"}
    f["empty"].write_bytes(b"")
    f["truncated"].write_bytes(raw[: len(raw) // 2])
    f["text"].write_text("this is a README, not a checkpoint\n" * 20)
    f["folder"].mkdir()
    # The state_dict is genuine, so only the extra object makes these files unsafe.
    torch.save({"state_dict": good_sd, "x": _RunsShell(root / MARKER)}, f["evil-system"])
    torch.save({"state_dict": good_sd, "x": _OpensFile(root / MARKER)}, f["evil-open"])
    torch.save({"state_dict": good_sd, "x": _RunsShell(root / MARKER)}, f["evil-legacy"],
               _use_new_zipfile_serialization=False)
    torch.save(cifar_resnet("resnet32", num_classes=3).state_dict(), f["wrong-arch"])
    torch.save(cifar_resnet("resnet20", num_classes=10).state_dict(), f["wrong-classes"])
    f["random"].write_bytes(random.Random(0).randbytes(3000))
    save_file({k: v.contiguous() for k, v in good_sd.items()}, str(root / "full.safetensors"))
    whole = (root / "full.safetensors").read_bytes()
    f["truncated-safetensors"].write_bytes(whole[: len(whole) // 2])
    f["pickle-as-safetensors"].write_bytes(pickle.dumps({"a": 1}))
    torch.save({"epoch": 3, "note": "no weights here"}, f["no-tensors"])
    assert not (root / MARKER).exists()
    return f




def run(cmd: str, files: dict[str, Path], ckpt: Path):
    if cmd == "attach":
        return cli("attach", "resnet20", "--data", files["data"], "--checkpoint", ckpt,
                      "--num-classes", "3", "--out", files["data"].parent / "out", "--quiet")
    return cli("inspect", "resnet20", "--checkpoint", ckpt, "--num-classes", "3")



CMDS = pytest.mark.parametrize("cmd", ["attach", "inspect"])

# kind -> words the one line must hold (problem and fix)
CASES = {
    "missing": ["does not exist"],
    "empty": ["is empty"],
    "truncated": ["truncated"],
    "text": ["not a checkpoint"],
    "random": ["not a readable"],
    "truncated-safetensors": ["truncated"],
    "pickle-as-safetensors": ["not a readable"],
    "wrong-arch": ["does not fit cifar:resnet20", "unexpected keys", "another architecture"],
    "wrong-classes": ["does not fit cifar:resnet20", "--num-classes 10"],
    "no-tensors": ["holds no"],
}


@CMDS
@pytest.mark.parametrize("kind", sorted(CASES))
def test_bad_checkpoint_is_one_line(files, cmd, kind):
    line = fails_cleanly(run(cmd, files, files[kind]), 3)
    assert str(files[kind]) in line
    for word in CASES[kind]:
        assert word in line, (word, line)
    # only pickles that would run code are called unsafe
    assert "refused" not in line and "run code" not in line
    assert not (files["data"].parent / "out").exists()


@CMDS
def test_folder_instead_of_checkpoint(files, cmd):
    line = fails_cleanly(run(cmd, files, files["folder"]), 3)
    assert str(files["folder"]) in line


EVIL = ["evil-system", "evil-open", "evil-legacy"]


@CMDS
@pytest.mark.parametrize("kind", EVIL)
def test_pickle_that_would_run_code_never_runs(files, cmd, kind):
    marker = files["good"].parent / MARKER
    line = fails_cleanly(run(cmd, files, files[kind]), 3)
    assert str(files[kind]) in line
    assert not marker.exists(), "the pickle's payload ran"
    assert not (files["data"].parent / "out").exists()


# torch words the refusal two ways: "Unsupported global: GLOBAL builtins.open" for a callable it
# does not allow, "Trying to load unsupported GLOBAL posix.system whose module posix is blocked"
# for one from a blocked module (os, subprocess, ...: the classic attack).


@CMDS
@pytest.mark.parametrize("kind", EVIL)
def test_pickle_that_would_run_code_is_refused_as_such(files, cmd, kind):
    line = fails_cleanly(run(cmd, files, files[kind]), 3)
    assert "refused" in line and "weights_only" in line and "run code" in line
    assert ".safetensors" in line or "state_dict" in line  # the fix: re-save it plainly


def test_the_good_checkpoint_is_accepted(files):
    """The control: the same command with the genuine file works, so the refusals above are
    about the files."""
    result = run("inspect", files, files["good"])
    assert result.exit_code == 0, result.output


def _invoke_with_warnings_shown(*args):
    """Run the CLI as a terminal would show it: Python warnings printed on stderr.

    (pytest records warnings instead of printing them, which would hide any a real run prints.)
    """

    def to_stderr(message, category, filename, lineno, file=None, line=None):
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = to_stderr
        return cli(*args)


def test_plain_pickle_payload_refusal_is_still_one_line(tmp_path):
    marker = tmp_path / MARKER
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps(_RunsShell(marker), protocol=4))
    result = _invoke_with_warnings_shown("inspect", "resnet20", "--checkpoint", path)
    assert not marker.exists(), "the pickle's payload ran"
    assert result.exit_code == 3
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    # issue 13, item 9: pteenet's refusal, not torch's advice to load it with weights_only=False
    assert "was refused" in result.stderr and "run code" in result.stderr
    assert "Re-running" not in result.stderr and "False" not in result.stderr
