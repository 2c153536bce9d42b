"""Torchvision datasets by name (CIFAR, SVHN, MNIST...): files in the cache, else a download."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torchvision
from PIL import Image
from torch.utils.data import Dataset

from pteenet.backbone._preprocess import Preprocess
from pteenet.data._items import ImageData
from pteenet.errors import DataError, OfflineError

__all__ = ["DATASET_NAMES", "TorchvisionData", "default_cache_dir", "open_torchvision"]

DATASET_NAMES = ("cifar10", "cifar100", "svhn", "mnist", "fashion-mnist")
# name -> (torchvision class name, how the split is passed)
_TORCHVISION = {
    "cifar10": ("CIFAR10", "train"),
    "cifar100": ("CIFAR100", "train"),
    "svhn": ("SVHN", "split"),
    "mnist": ("MNIST", "train"),
    "fashion-mnist": ("FashionMNIST", "train"),
}


class TorchvisionData(ImageData):
    """A torchvision dataset (which returns PIL images) adapted to the item convention."""

    def __init__(
        self, name: str, base: Dataset, classes: list[str], preprocess: Preprocess
    ) -> None:
        super().__init__(name, classes, preprocess)
        self.base = base
        self._targets = _base_targets(base)

    def __len__(self) -> int:
        return len(self.base)

    def _label(self, index: int) -> int:
        if self._targets is not None:
            return self._targets[index]
        return int(self.base[index][1])

    def _image(self, index: int) -> Image.Image:
        image = self.base[index][0]
        return image.convert("RGB")


def _base_targets(base: Any) -> list[int] | None:
    """A torchvision dataset's labels without decoding images (SVHN calls them ``labels``)."""
    for attr in ("targets", "labels"):
        values = getattr(base, attr, None)
        if values is not None:
            return [int(v) for v in values]
    return None


def default_cache_dir() -> Path:
    """Where named datasets go: ``$PTEENET_DATA_DIR``, else ``~/.cache/pteenet/datasets``."""
    env = os.environ.get("PTEENET_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pteenet" / "datasets"


def open_torchvision(
    name: str, key: str, preprocess: Preprocess, cache_dir: str | os.PathLike | None
) -> TorchvisionData:
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    root = root / name
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(
            f"cannot create dataset folder {root} ({exc.strerror or exc}): "
            "set PTEENET_DATA_DIR or pass another cache folder"
        ) from exc
    base = _load_torchvision(name, key, root)
    classes = list(getattr(base, "classes", None) or [str(d) for d in range(10)])
    return TorchvisionData(name, base, classes, preprocess)


def _load_torchvision(name: str, key: str, root: Path) -> Dataset:
    """Use files already in ``root``; download only when they are missing or damaged."""
    cls_name, split_style = _TORCHVISION[name]
    split_kw = {"split": key} if split_style == "split" else {"train": key == "train"}
    factory = getattr(torchvision.datasets, cls_name)  # looked up late so tests can replace it
    try:
        return factory(str(root), download=False, **split_kw)
    except Exception:  # missing or corrupt: fall through to a download
        pass
    try:
        return factory(str(root), download=True, **split_kw)
    except Exception as exc:
        raise OfflineError(
            f"cannot download {name} (no network?): put the dataset in {root} "
            "or pass a folder as `data`"
        ) from exc
