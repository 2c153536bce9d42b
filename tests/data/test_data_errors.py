"""Bad data for ``attach --data``: one line and exit 3 (4 offline) when nothing usable is there;
unreadable images skipped and counted, odd sizes and modes converted, when something is.

Issue 6 ("Reliability and security").
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pteenet_cli.app import app
from typer.testing import CliRunner

from pteenet.backbone import cifar_resnet
from pteenet.bundle import BRANCHES_FILE, read_info
from tests._helpers import block_network, fails_cleanly

runner = CliRunner()
CLASSES = ("blue", "green", "red")



def _image(rng: np.random.Generator, c: int, size: tuple[int, int] = (32, 32)) -> Image.Image:
    a = rng.integers(0, 90, (size[1], size[0], 3))
    a[..., 2 - c] += 120
    return Image.fromarray(a.clip(0, 255).astype("uint8"))


ODD = {  # name -> how a readable but unusual image is written
    "gray.png": lambda im, p: im.convert("L").save(p),
    "gray-alpha.png": lambda im, p: im.convert("LA").save(p),
    "rgba.png": lambda im, p: im.convert("RGBA").save(p),
    "palette.png": lambda im, p: im.convert("P").save(p, transparency=0),
    "cmyk.jpg": lambda im, p: im.convert("CMYK").save(p),
    "bilevel.bmp": lambda im, p: im.convert("1").save(p),
    "wide-50x20.png": lambda im, p: im.resize((50, 20)).save(p),
    "tall-7x90.jpg": lambda im, p: im.resize((7, 90)).save(p),
    "one-pixel.png": lambda im, p: im.resize((1, 1)).save(p),
    "sixteen-bit.png": lambda im, p: Image.fromarray(
        np.asarray(im.convert("L"), dtype=np.uint16) * 257).save(p),
}
CORRUPT = {  # name -> bytes that are not a readable image
    "truncated.png": lambda good: good[: len(good) // 2],
    "empty.jpg": lambda good: b"",
    "text.png": lambda good: b"not an image at all\n",
    "noise.jpg": lambda good: np.random.default_rng(1).bytes(700),
    "header-only.png": lambda good: good[:40],
}


@pytest.fixture(scope="module")
def material(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data-errors")
    rng = np.random.default_rng(0)
    mixed, allbad = root / "mixed", root / "allbad"
    for c, name in enumerate(CLASSES):
        (mixed / name).mkdir(parents=True)
        (allbad / name).mkdir(parents=True)
        for i in range(6):
            _image(rng, c).save(mixed / name / f"{i:02d}.png")
        for file, write in ODD.items():
            write(_image(rng, c), mixed / name / file)
        good = (mixed / name / "00.png").read_bytes()
        for file, make in CORRUPT.items():
            (mixed / name / file).write_bytes(make(good))
            (allbad / name / file).write_bytes(make(good))
    (root / "empty").mkdir()
    (root / "no-images" / "subfolder").mkdir(parents=True)
    (root / "no-images" / "README.txt").write_text("images go here")
    (root / "no-images" / "labels.csv").write_text("file,label\n")
    (root / "empty-classes" / "train" / "cat").mkdir(parents=True)
    (root / "empty-classes" / "train" / "dog").mkdir(parents=True)
    (root / "a-file.png").write_bytes(b"")
    torch.manual_seed(0)
    ckpt = root / "resnet20-3.pt"
    torch.save(cifar_resnet("resnet20", num_classes=3).state_dict(), ckpt)
    return {"root": root, "mixed": mixed, "allbad": allbad, "ckpt": ckpt}


def attach(material, data, out: Path, *extra):
    return runner.invoke(app, ["attach", "resnet20", "--data", str(data), "--checkpoint",
                               str(material["ckpt"]), "--num-classes", "3", "--branches", "2",
                               "--branch", "pool", "--epochs", "1", "--batch-size", "16",
                               "--quiet", "--out", str(out), *extra])



# --------------------------------------------------------------------------- nothing usable


@pytest.mark.parametrize(("name", "words"), [
    ("missing", ["does not exist", "check the path"]),
    ("empty", ["no images found", "expected <folder>/<class>/<image>"]),
    ("no-images", ["no images found", "expected <folder>/<class>/<image>"]),
    ("empty-classes", ["no images found"]),
    ("a-file.png", ["is a file, not a folder", "pass a folder"]),
])
def test_no_usable_folder_is_one_line(material, tmp_path, name, words):
    data = material["root"] / name
    line = fails_cleanly(attach(material, data, tmp_path / "out"), 3)
    assert "error (data):" in line and str(data) in line
    for word in words:
        assert word in line, (word, line)
    assert not (tmp_path / "out").exists()


def test_no_readable_image_is_one_line(material, tmp_path):
    line = fails_cleanly(attach(material, material["allbad"], tmp_path / "out"), 3)
    assert "error (data):" in line and "could be read" in line
    assert str(material["allbad"]) in line
    assert not (tmp_path / "out" / BRANCHES_FILE).exists()


# --------------------------------------------------------------------------- something usable


@pytest.fixture(scope="module")
def mixed_run(material, tmp_path_factory):
    out = tmp_path_factory.mktemp("mixed") / "out"
    return attach(material, material["mixed"], out), out


def test_unreadable_images_are_skipped_and_counted(mixed_run):
    result, out = mixed_run
    assert result.exit_code == 0, result.output
    n_bad = len(CORRUPT) * len(CLASSES)
    assert f"skipped {n_bad} unreadable images" in result.output
    assert read_info(out).training["skipped_images"] == n_bad
    assert result.stderr.strip() == ""  # nothing printed about them besides the count


def test_odd_sizes_and_modes_are_converted_not_skipped(mixed_run):
    """Grayscale, RGBA, palette, CMYK, 1-bit, 16-bit, 50x20, 7x90, 1x1: all used. The skipped
    count above is exactly the corrupt files, so none of these was dropped."""
    result, out = mixed_run
    assert result.exit_code == 0, result.output
    info = read_info(out)
    per_class = 6 + len(ODD) + len(CORRUPT)
    assert info.data["num_samples"] == per_class * len(CLASSES)
    assert info.training["skipped_images"] == len(CORRUPT) * len(CLASSES)


def test_unreadable_images_are_counted_without_the_cache(material, tmp_path):
    result = attach(material, material["mixed"], tmp_path / "out", "--no-cache")
    assert result.exit_code == 0, result.output
    assert f"skipped {len(CORRUPT) * len(CLASSES)} unreadable images" in result.output


# --------------------------------------------------------------------------- offline


@pytest.fixture
def offline(monkeypatch, tmp_path) -> Path:
    """No network at all, and an empty dataset cache."""
    block_network(monkeypatch)
    cache = tmp_path / "datasets"
    cache.mkdir()
    monkeypatch.setenv("PTEENET_DATA_DIR", str(cache))
    return cache


@pytest.mark.parametrize("name", ["cifar10", "CIFAR100", "mnist", "fashion-mnist", "svhn"])
def test_dataset_name_needing_a_download_offline(material, offline, tmp_path, name):
    start = time.monotonic()
    line = fails_cleanly(attach(material, name, tmp_path / "out"), 4)
    assert time.monotonic() - start < 60
    assert "error (offline):" in line and name.lower() in line
    assert str(offline) in line and "--data" in line  # where to put it, or what to pass instead
    assert not (tmp_path / "out").exists()
    assert not [p for p in offline.rglob("*") if p.is_file()]  # no partial download left
