"""Stage 2: the "pretrained" backbone, a CIFAR ResNet-20 trained on the digits here in seconds.

It stands in for the model a user would bring; it is cached with a record of how it was trained.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from pteenet.backbone._cifar_resnet import cifar_resnet
from pteenet.backbone._preprocess import Preprocess
from pteenet.backbone._registry import sha256_file
from pteenet.data._datasets import open_data
from pteenet.data._loading import make_loader
from pteenet.demo.settings import DemoSettings, Log, to_stderr
from pteenet.errors import DataError
from pteenet.storage import atomic_path, write_text

__all__ = ["MODEL", "train_backbone"]

MODEL = "resnet20"


def _load_split(root: Path, preprocess: Preprocess, split: str) -> tuple[Tensor, Tensor]:
    """A whole split as tensors: the digits fit in memory, so training needs no loader."""
    data = open_data(root, preprocess, split=split)
    xs, ys = [], []
    for batch in make_loader(data, batch_size=512):
        if batch.images is not None:
            xs.append(batch.images)
            ys.append(batch.labels)
    if not xs:
        raise DataError(f"no readable images in {root}/{split}: delete {root} and run again")
    return torch.cat(xs), torch.cat(ys)


def _shift(x: Tensor, gen: torch.Generator) -> Tensor:
    """Random translation by up to 1/8 of the image: cheap augmentation against overfitting."""
    pad = max(1, x.shape[-1] // 8)
    dy, dx = torch.randint(0, 2 * pad + 1, (2,), generator=gen).tolist()
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    return padded[..., dy:dy + x.shape[-2], dx:dx + x.shape[-1]]


def _fit(model: torch.nn.Module, x: Tensor, y: Tensor, epochs: int, seed: int,
         on_epoch: Callable[[int, float], None]) -> None:
    """Plain supervised training: Adam with a one-cycle schedule, seeded batch order."""
    gen = torch.Generator().manual_seed(seed)
    batch = 64
    steps = epochs * math.ceil(len(y) / batch)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=4e-3, total_steps=steps)
    model.train()
    for epoch in range(epochs):
        total = 0.0
        for pos in torch.randperm(len(y), generator=gen).split(batch):
            loss = F.cross_entropy(model(_shift(x[pos], gen)), y[pos])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(pos)
        on_epoch(epoch, total / len(y))
    model.eval()


@torch.no_grad()
def _accuracy(model: torch.nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).double().mean())


def _backbone_paths(workdir: Path, quick: bool) -> tuple[Path, Path]:
    stem = f"backbone-{MODEL}{'-quick' if quick else ''}"
    return workdir / f"{stem}.pt", workdir / f"{stem}.json"


def _cached_backbone(ckpt: Path, record: Path, config: dict) -> dict | None:
    """The recorded backbone, if it was trained with ``config`` and its file is intact."""
    try:
        meta = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if meta.get("config") != config or not ckpt.is_file():
        return None
    return meta if sha256_file(ckpt) == meta.get("sha256") else None


def train_backbone(workdir: str | os.PathLike, data: dict, settings: DemoSettings, *,
                   quick: bool = False, log: Log = to_stderr) -> dict:
    """Train ResNet-20 on the digits' train split and cache it (checkpoint + JSON record).

    It stands in for a pretrained model a user would bring: pteenet only ever sees the frozen
    checkpoint. The record names the data split it was trained on, so regenerated data retrains.
    """
    ckpt, record = _backbone_paths(Path(workdir), quick)
    config = {"model": MODEL, "input_size": list(settings.input_size),
              "epochs": settings.backbone_epochs, "seed": settings.seed,
              "split_sha256": data["split_sha256"]}
    meta = _cached_backbone(ckpt, record, config)
    if meta is not None:
        return {**meta, "checkpoint": str(ckpt), "cached": True}
    start = time.perf_counter()
    pre = Preprocess(settings.input_size)
    x, y = _load_split(Path(data["root"]), pre, "train")
    x_test, y_test = _load_split(Path(data["root"]), pre, "test")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        model = cifar_resnet(MODEL, num_classes=10)
        _fit(model, x, y, settings.backbone_epochs, settings.seed,
             lambda e, loss: log(f"      epoch {e + 1}/{settings.backbone_epochs}: "
                                 f"loss {loss:.3f}"))
    with atomic_path(ckpt) as tmp:
        torch.save(model.state_dict(), tmp)
    meta = {"config": config, "sha256": sha256_file(ckpt),
            "train_accuracy": _accuracy(model, x, y),
            "test_accuracy": _accuracy(model, x_test, y_test),
            "seconds": time.perf_counter() - start}
    write_text(record, json.dumps(meta, indent=1))
    return {**meta, "checkpoint": str(ckpt), "cached": False}
