"""What a bundle is: its files, its metadata and the values a read hands on.

A bundle is a folder with ``branches.safetensors`` (every branch tensor; the metadata as JSON in the
safetensors header: format version, backbone and checkpoint hash, cuts, FLOPs, branch specs,
preprocessing, training settings, the calibration split) and a threshold table
(``thresholds.json`` plus a human-readable ``thresholds.csv``), committed together by
``bundle.json`` (see :mod:`pteenet.storage`). A bundle attached with a ZTW ensemble
(:mod:`pteenet.cascade._ensemble`) also holds ``ensemble.weight`` ``[B, B]`` and ``ensemble.bias``
``[B, K]`` beside the branch tensors, and an ``ensemble`` field in the metadata.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pteenet import __version__
from pteenet.backbone._preprocess import Preprocess
from pteenet.cascade._ensemble import ZTWEnsemble
from pteenet.cascade._profile import TimeProfile
from pteenet.errors import BundleError

if TYPE_CHECKING:
    from pteenet.cascade._model import EarlyExitModel

__all__ = ["BRANCHES_FILE", "ENSEMBLE_TENSORS", "FORMAT_VERSION", "MEMBERS", "META_KEY",
           "THRESHOLDS_CSV", "THRESHOLDS_FILE", "Bundle", "BundleInfo", "ThresholdTable",
           "calibration_digest", "check_table_file"]

FORMAT_VERSION = 3  # the only layout this pteenet reads or writes (nothing older was released)
ENSEMBLE_TENSORS = ("ensemble.weight", "ensemble.bias")
BRANCHES_FILE = "branches.safetensors"
THRESHOLDS_FILE = "thresholds.json"
THRESHOLDS_CSV = "thresholds.csv"
MEMBERS = (BRANCHES_FILE, THRESHOLDS_CSV, THRESHOLDS_FILE)  # the files bundle.json commits
META_KEY = "pteenet"  # the safetensors header entry that holds the metadata JSON


@dataclass
class BundleInfo:
    """The validated metadata of a bundle (see the module docstring)."""

    path: Path
    backbone: dict[str, Any]
    preprocess: Preprocess
    cuts: list[str]
    module_cuts: bool
    branches: list[dict[str, Any]]
    segment_flops: list[int]
    classes: list[str] | None
    training: dict[str, Any]
    data: dict[str, Any]
    calibration_indices: list[int] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    cost: str = "flops"  # what the cost model counts (see EarlyExitModel)
    latency: TimeProfile | None = None  # measured at attach with --cost latency
    ensemble: dict[str, Any] | None = None  # a ZTW ensemble's kind and fit samples, or None
    format_version: int | None = None  # as read (a write records what its contents need)

    @property
    def num_classes(self) -> int:
        return int(self.backbone["num_classes"])

    @property
    def num_branches(self) -> int:
        return len(self.cuts)

    def to_meta(self) -> dict[str, Any]:
        extra = {} if self.ensemble is None else {"ensemble": self.ensemble}
        return {
            "format_version": FORMAT_VERSION,
            "pteenet_version": __version__, **extra,
            "backbone": self.backbone, "preprocess": self.preprocess.to_dict(),
            "cuts": self.cuts, "module_cuts": self.module_cuts, "branches": self.branches,
            "segment_flops": self.segment_flops, "classes": self.classes,
            "training": self.training, "data": self.data, "extra": self.extra,
            "cost": self.cost, "latency": self.latency.to_dict() if self.latency else None,
        }


@dataclass
class ThresholdTable:
    """Per branch and class exit thresholds (inf = never), how they were chosen, and a summary."""

    thresholds: torch.Tensor
    score: str = "softmax"
    method: str = "global"
    params: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    gamma: list[float] | None = None  # the gate score's per-exit powers (inf = exit off)

    @classmethod
    def of(cls, model: EarlyExitModel) -> ThresholdTable:
        """The table a model holds now (with the gate's powers when it uses the gate)."""
        gamma = model.gamma.tolist() if model.score == "gate" else None
        return cls(model.thresholds, model.score, gamma=gamma)


@dataclass(frozen=True)
class Bundle:
    """A bundle as committed, read and checked once (:func:`read_bundle`).

    Commands pass this one value down instead of reading the folder again: no later read can
    see another generation, and nothing the bundle records (FLOPs, the checkpoint's hash) is
    computed again."""

    info: BundleInfo  # the header: backbone, preprocessing, cuts, branch specs, FLOPs, path
    table: ThresholdTable  # "never" everywhere when not calibrated or not read
    state: dict[str, torch.Tensor]  # the branches' tensors, keyed as in their state_dict
    sha256: str | None = None  # of bundle.json, as derived files record it (None: no manifest)
    ensemble: ZTWEnsemble | None = None  # the ZTW weights, when attached with an ensemble

    @property
    def path(self) -> Path:
        return self.info.path



def calibration_digest(indices: list[int]) -> str:
    """The SHA-256 recorded beside the held-out indices, checked on every read."""
    return hashlib.sha256(",".join(map(str, indices)).encode()).hexdigest()


def check_table_file(f: Path) -> None:
    """A threshold table path that is not a file (a folder, say) is one line, read or write."""
    if f.exists() and not f.is_file():
        raise BundleError(f"{f} is not a file; remove it and re-run `pteenet calibrate`")
