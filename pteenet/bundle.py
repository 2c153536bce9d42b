"""The bundle: trained branches plus everything needed to rebuild the early-exit model.

A bundle is a folder with ``branches.safetensors`` (every branch tensor; the metadata as JSON in the
safetensors header: format version, backbone and checkpoint hash, cuts, FLOPs, branch specs,
preprocessing, training settings, the calibration split) and a threshold table
(``thresholds.json`` plus a human-readable ``thresholds.csv``). Nothing in it is pickled, so
loading a bundle can never run code; every field read back is validated before use.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from .atomic import atomic_paths
from .backbones import Backbone, create_backbone
from .early_exit import SCORES, EarlyExitModel, build_early_exit
from .errors import BundleError, PteenetError
from .preprocess import Preprocess
from .thresholds import as_table
from .tracing import trace_backbone

__all__ = [
    "BRANCHES_FILE",
    "FORMAT_VERSION",
    "THRESHOLDS_FILE",
    "BundleInfo",
    "ThresholdTable",
    "load",
    "load_backbone",
    "read_info",
    "read_thresholds",
    "save_bundle",
    "write_thresholds",
]

FORMAT_VERSION = 2  # 2: branches reduce their map first (pooled grid); 1 is refused
BRANCHES_FILE = "branches.safetensors"
THRESHOLDS_FILE = "thresholds.json"
THRESHOLDS_CSV = "thresholds.csv"
_META_KEY = "pteenet"


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

    @property
    def num_classes(self) -> int:
        return int(self.backbone["num_classes"])

    @property
    def num_branches(self) -> int:
        return len(self.cuts)

    def to_meta(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION, "pteenet_version": __version__,
            "backbone": self.backbone, "preprocess": self.preprocess.to_dict(),
            "cuts": self.cuts, "module_cuts": self.module_cuts, "branches": self.branches,
            "segment_flops": self.segment_flops, "classes": self.classes,
            "training": self.training, "data": self.data, "extra": self.extra,
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


# -- writing ----------------------------------------------------------------------------------
def save_bundle(out: str | os.PathLike, model: EarlyExitModel, info: BundleInfo,
                table: ThresholdTable | None = None) -> Path:
    """Write ``branches.safetensors`` and the threshold table (default: the model's own) as one
    atomic group."""
    out = Path(out)
    tensors = {f"branches.{k}": v.detach().cpu().contiguous()
               for k, v in model.branches.state_dict().items()}
    tensors["calibration_indices"] = torch.tensor(info.calibration_indices, dtype=torch.int64)
    meta = {_META_KEY: json.dumps(info.to_meta(), sort_keys=True)}
    csv_text, json_text = _threshold_texts(table or ThresholdTable(model.thresholds, model.score))
    with atomic_paths([out / BRANCHES_FILE, out / THRESHOLDS_CSV, out / THRESHOLDS_FILE]) as tmp:
        save_file(tensors, str(tmp[0]), metadata=meta)
        tmp[1].write_text(csv_text, encoding="utf-8")
        tmp[2].write_text(json_text, encoding="utf-8")
    info.path = out
    return out


def _json_thresholds(t: torch.Tensor) -> list[list[float | None]]:
    return [[None if math.isinf(v) else float(v) for v in row] for row in t.tolist()]


def _threshold_texts(table: ThresholdTable) -> tuple[str, str]:
    """The CSV (empty cell / ``never`` = never exits) and JSON texts of a threshold table."""
    t = table.thresholds
    doc = {"format_version": FORMAT_VERSION, "num_branches": int(t.shape[0]),
           "num_classes": int(t.shape[1]), "score": table.score, "method": table.method,
           "params": table.params, "thresholds": _json_thresholds(t), "summary": table.summary}
    if table.gamma is not None:
        doc["gamma"] = _json_thresholds(torch.tensor([table.gamma], dtype=torch.float64))[0]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["branch", "class", "threshold"])
    for b, row in enumerate(doc["thresholds"]):
        for c, v in enumerate(row):
            w.writerow([b, c, "never" if v is None else v])
    return buf.getvalue(), json.dumps(doc, indent=1)


def write_thresholds(out: str | os.PathLike, table: ThresholdTable) -> None:
    """Write ``thresholds.json`` and ``thresholds.csv`` together, atomically."""
    out = Path(out)
    csv_text, json_text = _threshold_texts(table)
    with atomic_paths([out / THRESHOLDS_CSV, out / THRESHOLDS_FILE]) as (c, j):
        c.write_text(csv_text, encoding="utf-8")
        j.write_text(json_text, encoding="utf-8")


# -- reading ----------------------------------------------------------------------------------
def _need(d: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(d, dict) or key not in d or not isinstance(d[key], kind):
        raise BundleError(
            f"{where}: field '{key}' is missing or malformed; re-run `pteenet attach`")
    return d[key]


def _int_list(v: Any, key: str, where: str) -> list[int]:
    if not isinstance(v, list) or not all(isinstance(x, int) and x >= 0 for x in v):
        raise BundleError(f"{where}: field '{key}' is malformed; re-run `pteenet attach`")
    return v


def _branches_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    f = p / BRANCHES_FILE if p.is_dir() or not p.suffix else p
    if not f.is_file():
        raise BundleError(f"no bundle at {p} ({BRANCHES_FILE} missing); run `pteenet attach` first")
    return f


def _preprocess(d: dict, where: str) -> Preprocess:
    try:
        pre = Preprocess.from_dict(d)
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"{where}: field 'preprocess' is malformed") from e
    ok = (len(pre.input_size) == 2 and all(0 < v <= 8192 for v in pre.input_size)
          and len(pre.mean) == 3 and len(pre.std) == 3
          and all(math.isfinite(v) for v in (*pre.mean, *pre.std)) and all(v > 0 for v in pre.std))
    if not ok:
        raise BundleError(f"{where}: field 'preprocess' holds impossible values (edited?)")
    return pre


def read_info(path: str | os.PathLike) -> BundleInfo:
    """Read and validate a bundle's metadata (nothing else is loaded)."""
    f = _branches_path(path)
    try:
        from safetensors import safe_open

        with safe_open(str(f), "pt") as h:
            header = h.metadata() or {}
            names = set(h.keys())
            idx = h.get_tensor("calibration_indices") if "calibration_indices" in names else None
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise BundleError(f"{f} is not a readable bundle (truncated or edited?): {e}") from e
    where = str(f)
    try:
        meta = json.loads(header.get(_META_KEY, ""))
    except json.JSONDecodeError as e:
        raise BundleError(f"{where}: metadata is not valid JSON (edited?)") from e
    version = _need(meta, "format_version", int, where)
    if version > FORMAT_VERSION:
        raise BundleError(f"{where} has format version {version}, newer than this pteenet "
                          f"understands ({FORMAT_VERSION}); upgrade pteenet")
    if version < FORMAT_VERSION:
        raise BundleError(f"{where} has format version {version}, from a pteenet whose branches "
                          f"read whole feature maps; re-run `pteenet attach`")
    backbone = _need(meta, "backbone", dict, where)
    for key, kind in (("name", str), ("source", str), ("num_classes", int)):
        _need(backbone, key, kind, where)
    cuts = _need(meta, "cuts", list, where)
    branches = _need(meta, "branches", list, where)
    if not cuts or len(cuts) != len(branches) or not all(isinstance(c, str) for c in cuts):
        raise BundleError(f"{where}: cuts and branches disagree; re-run `pteenet attach`")
    for b in branches:
        _need(b, "type", str, where)
    seg = _int_list(meta.get("segment_flops"), "segment_flops", where)
    if len(seg) != len(cuts) + 1:
        raise BundleError(f"{where}: segment_flops has the wrong length")
    classes = meta.get("classes")
    if classes is not None and (not isinstance(classes, list) or
                                len(classes) != backbone["num_classes"]):
        raise BundleError(f"{where}: classes do not match the number of classes")
    pre = _preprocess(_need(meta, "preprocess", dict, where), where)
    indices = [] if idx is None else idx.to(torch.int64).tolist()
    for key in ("training", "data", "extra"):
        if meta.get(key) is not None and not isinstance(meta[key], dict):
            raise BundleError(f"{where}: field '{key}' is malformed; re-run `pteenet attach`")
    return BundleInfo(
        path=f.parent, backbone=backbone, preprocess=pre, cuts=cuts,
        module_cuts=bool(meta.get("module_cuts", False)), branches=branches,
        segment_flops=seg, classes=classes, training=dict(meta.get("training") or {}),
        data=dict(meta.get("data") or {}), calibration_indices=indices,
        extra=dict(meta.get("extra") or {}),
    )


def read_thresholds(path: str | os.PathLike, info: BundleInfo) -> ThresholdTable:
    """Read the bundle's threshold table, checked against the bundle (branches, classes)."""
    f = Path(path) / THRESHOLDS_FILE if Path(path).is_dir() else Path(path)
    if f.exists() and not f.is_file():
        raise BundleError(f"{f} is not a file; remove it and re-run `pteenet calibrate`")
    if not f.is_file():  # never calibrated: every exit off, the model is the backbone
        return ThresholdTable(as_table(None, info.num_branches, info.num_classes),
                              method="none")
    try:
        doc = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{f} is not valid JSON; re-run `pteenet calibrate`") from e
    rows = _need(doc, "thresholds", list, str(f))
    ok = all(isinstance(r, list) for r in rows) and all(
        v is None or isinstance(v, (int, float)) and not isinstance(v, bool)
        for r in rows for v in r)
    if not ok:
        raise BundleError(f"{f}: thresholds must be numbers in [0, 1] or null (never)")
    widths = {len(r) for r in rows}
    shape = (len(rows), widths.pop() if len(widths) == 1 else -1)
    if shape != (info.num_branches, info.num_classes):
        raise BundleError(
            f"{f} is for {shape[0]} branches x {shape[1]} classes but the bundle has "
            f"{info.num_branches} x {info.num_classes}; re-run `pteenet calibrate`")
    flat = [v for row in rows for v in row if v is not None]
    if any(math.isnan(v) or not 0 <= v <= 1 for v in flat):
        raise BundleError(f"{f}: thresholds must lie in [0, 1] (null = never); NaN is refused")
    score = doc.get("score", "head")
    if score not in SCORES:
        raise BundleError(f"{f}: unknown score '{score}'")
    gamma = _gamma(doc.get("gamma"), info.num_branches, score, f)
    for key in ("params", "summary"):
        if doc.get(key) is not None and not isinstance(doc[key], dict):
            raise BundleError(f"{f}: field '{key}' is malformed; re-run `pteenet calibrate`")
    return ThresholdTable(as_table(rows, info.num_branches, info.num_classes), score,
                          str(doc.get("method", "global")), dict(doc.get("params") or {}),
                          dict(doc.get("summary") or {}), gamma)


def _gamma(raw: Any, b: int, score: str, f: Path) -> list[float] | None:
    """The gate's powers: ``b`` numbers >= 0 or null (inf: off); required for the gate score."""
    if raw is None:
        if score == "gate":
            raise BundleError(f"{f}: the gate score needs 'gamma'; re-run `pteenet calibrate`")
        return None
    ok = isinstance(raw, list) and len(raw) == b and all(
        v is None or isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1e6
        for v in raw)
    if not ok:
        raise BundleError(f"{f}: 'gamma' must hold {b} numbers >= 0 or null; re-run "
                          f"`pteenet calibrate`")
    return [math.inf if v is None else float(v) for v in raw]


def load_backbone(info: BundleInfo, checkpoint: str | os.PathLike | None = None,
                  force: bool = False) -> Backbone:
    """Rebuild the bundle's backbone and check its checkpoint is the one it was trained on."""
    bb = info.backbone
    ckpt = checkpoint if checkpoint is not None else bb.get("checkpoint_path")
    if ckpt is not None and not Path(ckpt).is_file() and checkpoint is None:
        raise BundleError(f"the bundle's checkpoint {ckpt} is gone; pass --checkpoint PATH")
    backbone = create_backbone(
        f"{bb['source']}:{bb['name']}", checkpoint=ckpt, pretrained=ckpt is None,
        num_classes=info.num_classes, input_size=info.preprocess.input_size,
        mean=info.preprocess.mean, std=info.preprocess.std,
    )
    want = bb.get("checkpoint_sha256")
    if want and backbone.checkpoint_sha256 != want and not force:
        raise BundleError(
            f"checkpoint {ckpt} (sha256 {str(backbone.checkpoint_sha256)[:12]}) is not the one "
            f"the branches were trained on ({want[:12]}); pass --force (force=True) to use it "
            f"anyway"
        )
    return backbone


def load(path: str | os.PathLike = "pteenet-out", *, checkpoint: str | os.PathLike | None = None,
         force: bool = False, device: str | torch.device = "cpu") -> EarlyExitModel:
    """Rebuild the early-exit model of a bundle, with its threshold table, in eval mode."""
    info = read_info(path)
    table = read_thresholds(info.path, info)
    backbone = load_backbone(info, checkpoint, force)
    try:
        trace = trace_backbone(backbone.model, info.preprocess.input_size,
                               cuts=info.cuts if info.module_cuts else None, with_thop=False)
        model = build_early_exit(trace, info.cuts, info.num_classes,
                                 [b["type"] for b in info.branches], budget=None,
                                 widths=[b.get("width") for b in info.branches],
                                 thresholds=table.thresholds, score=table.score,
                                 gamma=table.gamma)
    except (PteenetError, RuntimeError) as e:
        raise BundleError(f"{info.path}: cannot rebuild the model ({e})") from e
    try:
        tensors = load_file(str(_branches_path(path)))
    except (SafetensorError, OSError) as e:
        raise BundleError(f"{info.path}: branch tensors are unreadable ({e})") from e
    state = {k[len("branches."):]: v for k, v in tensors.items() if k.startswith("branches.")}
    own = model.branches.state_dict()
    bad = [k for k, v in own.items() if k in state and (state[k].dtype != v.dtype
                                                       or state[k].shape != v.shape)]
    if bad:
        raise BundleError(f"{info.path}: branch tensors do not match the metadata ({bad[0]} has "
                          f"the wrong dtype or shape; edited?)")
    try:
        model.branches.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise BundleError(f"{info.path}: branch tensors do not match the metadata (edited?)") from e
    model.info = info  # type: ignore[attr-defined]
    return model.to(device).eval()
