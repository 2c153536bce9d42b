"""Stage 1: scikit-learn's handwritten digits written out as an ordinary image folder, once.

They ship with scikit-learn, so the demo needs no network; the tree is cached in the workdir.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pteenet.demo.settings import DemoSettings
from pteenet.storage import write_text

__all__ = ["DATA_DIR", "DATA_MARKER", "prepare_digits"]

DATA_DIR = "digits"
DATA_MARKER = "digits.json"  # written last: its presence means the image tree is complete


def _digit_png(pixels: np.ndarray, size: int) -> bytes:
    """One 8x8 digit (ink 0..16) as a ``size`` x ``size`` greyscale PNG, ink bright."""
    img = Image.fromarray(np.round(pixels * (255 / 16)).astype(np.uint8), mode="L")
    buf = io.BytesIO()
    img.resize((size, size), Image.BILINEAR).save(buf, format="PNG")
    return buf.getvalue()


def _split(targets: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """A seeded, stratified train/test assignment (True = test), so both splits see every digit."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(targets))
    _, test = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=targets)
    mask = np.zeros(len(targets), dtype=bool)
    mask[test] = True
    return mask


def _read_marker(root: Path) -> dict[str, Any] | None:
    try:
        return json.loads((root / DATA_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_tree(tmp: Path, images: np.ndarray, targets: np.ndarray, test: np.ndarray,
                size: int) -> None:
    for i, (pixels, label) in enumerate(zip(images, targets)):
        folder = tmp / ("test" if test[i] else "train") / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:04d}.png").write_bytes(_digit_png(pixels, size))


def prepare_digits(workdir: str | os.PathLike, settings: DemoSettings = DemoSettings()) -> dict:
    """Write scikit-learn's digits as ``<workdir>/digits/{train,test}/<digit>/<n>.png``, once.

    The tree is built in a temp folder and renamed into place with its marker inside, so a crash
    never leaves a half-written data set that later runs would trust; a complete tree with the
    same settings is reused.
    """
    from sklearn.datasets import load_digits

    workdir = Path(workdir)
    root = workdir / DATA_DIR
    want = {"source": "sklearn.datasets.load_digits", "image_size": settings.image_size,
            "test_fraction": settings.test_fraction, "seed": settings.seed}
    found = _read_marker(root)
    if found is not None and found.get("settings") == want:
        return {**found, "root": str(root), "cached": True}
    digits = load_digits()
    test = _split(digits.target, settings.test_fraction, settings.seed)
    marker = {"settings": want, "classes": 10, "train": int((~test).sum()),
              "test": int(test.sum()),
              "split_sha256": hashlib.sha256(np.packbits(test).tobytes()).hexdigest()}
    workdir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".digits-", dir=workdir))
    try:
        _write_tree(tmp, digits.images, digits.target, test, settings.image_size)
        write_text(tmp / DATA_MARKER, json.dumps(marker, indent=1))
        _swap_in(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {**marker, "root": str(root), "cached": False}


def _swap_in(tmp: Path, root: Path) -> None:
    """Replace ``root`` (stale or absent) by the finished tree ``tmp`` with one rename."""
    if root.exists():
        old = root.with_name(f".{root.name}-old-{os.getpid()}")
        os.replace(root, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, root)
