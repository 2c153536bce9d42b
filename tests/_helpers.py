"""Tiny real data and a tiny really-trained backbone, shared by the tests (written to disk)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pteenet.cifar_resnet import cifar_resnet
from pteenet.data import make_loader, open_data
from pteenet.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess

CLASSES = ("blue", "green", "red")
PRE = Preprocess((32, 32), IMAGENET_MEAN, IMAGENET_STD)


def write_images(root: Path, per_class: int = 24, seed: int = 0,
                 splits: tuple[str, ...] = ("train", "test")) -> Path:
    """Noisy 32x32 images whose dominant colour is the class: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    for split in splits:
        for c, name in enumerate(CLASSES):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = rng.integers(0, 90, (32, 32, 3))
                img[..., 2 - c] += rng.integers(80, 160)
                img[rng.integers(0, 32, 8), :, c] = 255  # stripes make early features useful
                Image.fromarray(img.clip(0, 255).astype("uint8")).save(d / f"{i:03d}.png")
    return root


def train_backbone(data_root: Path, path: Path, steps: int = 20, seed: int = 0) -> Path:
    """A resnet20 with a 3-class head, trained briefly so its predictions are meaningful."""
    torch.manual_seed(seed)
    model = cifar_resnet("resnet20", num_classes=len(CLASSES))
    data = open_data(data_root, PRE, split="train")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loader = make_loader(data, batch_size=32, shuffle=True, seed=seed)
    done = 0
    while done < steps:
        for batch in loader:
            loss = torch.nn.functional.cross_entropy(model(batch.images), batch.labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
            if done >= steps:
                break
    model.eval()
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """(data folder with train/ and test/, trained resnet20 checkpoint)."""
    root = tmp_path_factory.mktemp("tiny")
    data = write_images(root / "data")
    return data, train_backbone(data, root / "resnet20-tiny.pt")
