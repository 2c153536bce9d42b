"""Bad model names and impossible placements: one line on stderr, exit 2, never a traceback.

Issue 6 ("Reliability and security"). Also the one check that ``--debug`` does show the
traceback that the one-line message hides.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pteenet.backbone import cifar_resnet
from tests._helpers import cli, fails_cleanly, write_images


@pytest.fixture(scope="module")
def material(tmp_path_factory) -> tuple[Path, Path]:
    """A small real image folder and a (real, untrained) resnet20 3-class checkpoint: enough for
    attach to get past the model to whatever a test is about."""
    root = tmp_path_factory.mktemp("model-errors")
    data = write_images(root / "data", per_class=3, splits=("train",))
    ckpt = root / "resnet20-3.pt"
    torch.manual_seed(0)
    torch.save(cifar_resnet("resnet20", num_classes=3).state_dict(), ckpt)
    return data, ckpt





# --------------------------------------------------------------------------- unknown names


@pytest.mark.parametrize(("name", "closest"), [
    ("resnt20", "resnet20"),
    ("cifar:resnet21", "resnet20"),
    ("RESNET56x", None),
])
def test_attach_unknown_model_suggests_the_closest(material, name, closest):
    data, _ = material
    line = fails_cleanly(cli("attach", name, "--data", data, "--out", data.parent / "o"), 2)
    assert "unknown model" in line and name in line
    if closest:
        assert "did you mean" in line and closest in line
    else:  # nothing close: the fix is where to look
        assert "did you mean" in line or "pteenet inspect" in line
    assert not (data.parent / "o").exists()


def test_inspect_unknown_model_suggests_the_closest():
    line = fails_cleanly(cli("inspect", "resnet5"), 2)
    assert "unknown model 'resnet5'" in line and "did you mean" in line and "resnet56" in line


@pytest.mark.parametrize("cmd", ["attach", "inspect"])
def test_unknown_model_source_lists_the_known_ones(material, cmd):
    data, _ = material
    extra = ("--data", data) if cmd == "attach" else ()
    line = fails_cleanly(cli(cmd, "keras:resnet20", *extra), 2)
    assert "keras" in line
    for source in ("cifar", "timm", "torchvision"):
        assert source in line


# --------------------------------------------------------------------------- too many branches


def test_attach_more_branches_than_cut_points(material):
    data, ckpt = material
    out = data.parent / "too-many"
    line = fails_cleanly(cli("attach", "resnet20", "--data", data, "-c", ckpt,
                                "--num-classes", "3", "--branches", "23", "--out", out), 2)
    assert "23 branches" in line and "9 useful cut points" in line
    assert not out.exists()


def test_inspect_more_branches_than_cut_points(material):
    _, ckpt = material
    line = fails_cleanly(cli("inspect", "resnet20", "-c", ckpt, "--num-classes", "3",
                                "--branches", "100"), 2)
    assert "100 branches" in line and "9 useful cut points" in line


def test_attach_more_at_fractions_than_cut_points(material):
    data, ckpt = material
    at = ",".join(f"{(i + 1) / 31:.4f}" for i in range(30))
    line = fails_cleanly(cli("attach", "resnet20", "--data", data, "-c", ckpt,
                                "--num-classes", "3", "--at", at, "--out", data.parent / "o2"), 2)
    assert "30 branches" in line and "9 useful cut points" in line


# --------------------------------------------------------------------------- --debug


def test_debug_shows_the_traceback_and_still_ends_with_the_one_line(material):
    data, _ = material
    plain = cli("attach", "resnt20", "--data", data)
    debug = cli("--debug", "attach", "resnt20", "--data", data)
    assert plain.exit_code == debug.exit_code == 2
    assert "Traceback (most recent call last)" in debug.stderr
    assert "ModelNotFoundError" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1] == plain.stderr.strip()
