"""Which samples a benchmark measures: the bundle's test split, else its held-out calibration
samples, never the samples its branches were trained on."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pteenet.bundle._schema import BundleInfo
from pteenet.data._datasets import available_splits, open_data
from pteenet.data._items import ImageData
from pteenet.data._torchvision import DATASET_NAMES
from pteenet.errors import BundleError, DataError

__all__ = ["EvalSet", "select_data"]


@dataclass
class EvalSet:
    """The samples benchmarked: a dataset, the indices used, and how they were chosen."""

    data: ImageData
    indices: list[int]
    spec: str
    split: str
    subset: str  # "all" or "held-out calibration"
    labels_usable: bool
    notes: list[str] = field(default_factory=list)


def _is_name(spec: str) -> bool:
    return spec.strip().lower().replace("_", "-") in DATASET_NAMES


def _same_data(a: str, b: str) -> bool:
    """Whether two data specs name the same data (so the bundle's split indices apply)."""
    if _is_name(a) or _is_name(b):
        return a.strip().lower().replace("_", "-") == b.strip().lower().replace("_", "-")
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def _labels_usable(info: BundleInfo, data: ImageData) -> bool:
    """Labels only count when they index the backbone's classes in the same order."""
    if data.classes is None or len(data.classes) != info.num_classes:
        return False
    return info.classes is None or list(info.classes) == list(data.classes)


def select_data(info: BundleInfo, data: str | os.PathLike | None = None,
                split: str | None = None, max_samples: int | None = None,
                labels: str | None = None) -> EvalSet:
    """Pick the benchmark samples: the test split, else the bundle's held-out calibration set.
    ``labels`` (default: as the bundle was attached) "none" ignores the data's labels."""
    spec = str(data) if data is not None else info.data.get("spec")
    if not spec:
        raise BundleError(f"{info.path}: the bundle does not record its data; pass `data`")
    if split is None:
        split = "test" if "test" in available_splits(spec) else "train"
    dataset = open_data(spec, info.preprocess, split=split, label_names=info.classes,
                        labels=labels or info.data.get("labels", "auto"))
    key = "test" if str(split).lower() in ("test", "val") else "train"
    own = _same_data(spec, str(info.data.get("spec", ""))) and info.data.get("split") == key
    notes: list[str] = []
    if own:
        indices, subset = _held_out(info, dataset), "held-out calibration"
        notes.append("measured on the bundle's held-out calibration samples of its train split "
                     "(never those trained on): thresholds calibrated on them look optimistic")
    else:
        indices, subset = list(range(len(dataset))), "all"
    indices = _subsample(indices, max_samples)
    usable = _labels_usable(info, dataset)
    if dataset.has_labels and not usable:
        notes.append("the data's classes do not match the backbone's: top-1 is not reported")
    return EvalSet(dataset, indices, spec, key, subset, usable, notes)


def _held_out(info: BundleInfo, dataset: ImageData) -> list[int]:
    idx = list(info.calibration_indices)
    if not idx:
        raise BundleError(f"{info.path}: no held-out samples recorded and no test split; "
                          f"pass `data` with a test/ folder")
    if max(idx) >= len(dataset):
        raise DataError(f"{dataset.name} has {len(dataset)} images but the bundle's held-out "
                        f"indices go up to {max(idx)}: the data changed since attach")
    return idx


def _subsample(indices: list[int], max_samples: int | None) -> list[int]:
    """A seeded subset, so quick runs are repeatable."""
    if max_samples is None or max_samples >= len(indices):
        return indices
    pick = torch.randperm(len(indices), generator=torch.Generator().manual_seed(0))[:max_samples]
    return [indices[i] for i in sorted(pick.tolist())]
