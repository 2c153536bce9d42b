"""Reading a bundle: one committed generation, every field checked before anything is built.

Nothing in a bundle is pickled, so reading one can never run code; every field read back is
validated (sizes against the tensors actually present) before anything is allocated from it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError

from pteenet.backbone._preprocess import INTERPOLATIONS, MAX_INPUT_SIDE, Preprocess
from pteenet.bundle._fields import count, int_list, need, parse_json, show
from pteenet.bundle._schema import (
    BRANCHES_FILE,
    ENSEMBLE_TENSORS,
    FORMAT_VERSION,
    META_KEY,
    THRESHOLDS_CSV,
    THRESHOLDS_FILE,
    Bundle,
    BundleInfo,
    ThresholdTable,
    calibration_digest,
    check_table_file,
)
from pteenet.cascade._ensemble import ZTWEnsemble
from pteenet.cascade._profile import TimeProfile
from pteenet.choices import BRANCH_TYPES, COSTS, ENSEMBLES, SCORES
from pteenet.errors import BundleError, OptionError
from pteenet.storage import MANIFEST, parse_manifest, read_member
from pteenet.thresholds import as_table

__all__ = ["empty_or_table", "read_bundle", "read_info", "read_thresholds"]


@dataclass
class _Snapshot:
    """One committed generation of a bundle, read once: later reads cannot mix generations."""

    folder: Path
    where: str
    meta: dict[str, str]
    tensors: dict[str, torch.Tensor]
    table: bytes | None
    digest: str | None  # SHA-256 of the bundle.json these files were read under


def _manifest(folder: Path) -> tuple[dict[str, dict[str, Any]], str]:
    """The committed members and the SHA-256 of ``bundle.json``, from one read of it. A folder
    without one holds no bundle (``attach`` commits every bundle with it)."""
    f = folder / MANIFEST
    if not f.exists():
        raise BundleError(f"no bundle at {folder} ({MANIFEST} missing); run `pteenet attach` "
                          f"first")
    try:
        data = f.read_bytes()
    except OSError as e:
        raise BundleError(f"{f} is unreadable ({e.strerror or e})") from e
    return parse_manifest(data, f), hashlib.sha256(data).hexdigest()


def _snapshot(path: str | os.PathLike, table: bool = False) -> _Snapshot:
    """The branches (and with ``table`` the threshold table) as committed, read once."""
    p = Path(path)
    folder, name = (p, BRANCHES_FILE) if p.is_dir() or not p.suffix else (p.parent, p.name)
    f, table_file = folder / name, folder / THRESHOLDS_FILE
    if f.exists() and not f.is_file():
        raise BundleError(f"{f} is not a file; run `pteenet attach` first")
    table = table and name == BRANCHES_FILE
    if table:
        check_table_file(table_file)
    files, digest = _manifest(folder) if name == BRANCHES_FILE else (None, None)
    try:
        raw = read_member(folder, name, files, "re-run `pteenet attach`") if files is not None \
            else f.read_bytes() if f.is_file() else None
        doc = read_member(folder, THRESHOLDS_FILE, files, "re-run `pteenet calibrate`") \
            if table else None
        if table and files is not None:  # the CSV a person reads must be the table that runs
            read_member(folder, THRESHOLDS_CSV, files, "re-run `pteenet calibrate`")
    except OSError as e:
        raise BundleError(f"{f} is unreadable ({e.strerror or e})") from e
    if raw is None:
        raise BundleError(f"no bundle at {p} ({BRANCHES_FILE} missing); run `pteenet attach` "
                          f"first")
    try:
        tensors = safetensors.torch.load(raw)
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])  # safetensors has just parsed it: valid and shallow
    except (SafetensorError, ValueError, RuntimeError, OverflowError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise BundleError(f"{f} is not a readable bundle (truncated or edited?): "
                          f"{show(first)}") from e
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return _Snapshot(folder, str(f), meta if isinstance(meta, dict) else {}, tensors, doc,
                     digest)


def _preprocess(d: dict, where: str) -> Preprocess:
    size = d.get("input_size")
    ok = isinstance(size, list) and len(size) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_INPUT_SIDE for v in size)
    if not ok:
        raise BundleError(f"{where}: field 'preprocess' holds an impossible input size "
                          f"{show(size)} (each side 1..{MAX_INPUT_SIDE}; edited?)")
    try:
        pre = Preprocess.from_dict(d)
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise BundleError(f"{where}: field 'preprocess' is malformed") from e
    ok = (len(pre.mean) == 3 and len(pre.std) == 3
          and all(math.isfinite(v) for v in (*pre.mean, *pre.std)) and all(v > 0 for v in pre.std)
          and pre.interpolation in INTERPOLATIONS and (pre.resize_size is None or
                                                       min(pre.input_size) <= pre.resize_size
                                                       <= 2 * MAX_INPUT_SIDE))
    if not ok:
        raise BundleError(f"{where}: field 'preprocess' holds impossible values (edited?)")
    return pre


def _check_sizes(tensors: dict[str, torch.Tensor], cuts: list, num_classes: int,
                 where: str, types: Sequence[str] = ()) -> None:
    """Every size-like field must agree with the tensors actually present (before anything is
    allocated from it): one classifier per cut, each with ``num_classes`` rows."""
    for i in range(len(cuts)):
        if i < len(types) and types[i] == "distill":  # answers through the backbone's own
            continue  # classifier, which it does not store (rebound on load)
        w = tensors.get(f"branches.{i}.classifier.weight")
        if w is None or w.ndim != 2:
            raise BundleError(f"{where}: branch tensors do not match the metadata (no classifier "
                              f"for branch {i}; edited?)")
        if w.shape[0] != num_classes:
            raise BundleError(f"{where}: branch tensors do not match the metadata (num_classes "
                              f"{show(num_classes)}, classifiers for {w.shape[0]}; edited?)")


def _calibration(t: torch.Tensor | None, extra: dict, where: str) -> list[int]:
    """The held-out indices, checked against the SHA-256 recorded beside them."""
    if t is None:
        return []
    idx = t.tolist() if t.dtype == torch.int64 and t.ndim == 1 else None
    if idx is None or any(b <= a for a, b in zip(idx, idx[1:])) or (idx and idx[0] < 0):
        raise BundleError(f"{where}: calibration_indices is malformed (edited?); re-run "
                          f"`pteenet attach`")
    if idx and extra.get("calibration_sha256") != calibration_digest(idx):
        raise BundleError(f"{where}: the calibration indices do not match their recorded "
                          f"SHA-256 (edited?); re-run `pteenet attach`")
    return idx


def _info(snap: _Snapshot) -> BundleInfo:
    where = snap.where
    meta = parse_json(snap.meta.get(META_KEY, ""), f"{where}: metadata",
                       "re-run `pteenet attach`")
    version = need(meta, "format_version", int, where)
    if version > FORMAT_VERSION:
        raise BundleError(f"{where} has format version {show(version)}, newer than this pteenet "
                          f"understands ({FORMAT_VERSION}); upgrade pteenet")
    if version < FORMAT_VERSION:
        raise BundleError(f"{where} has format version {show(version)}, from a pre-release "
                          f"pteenet; re-run `pteenet attach`")
    backbone = need(meta, "backbone", dict, where)
    for key in ("name", "source"):
        need(backbone, key, str, where)
    count(backbone, "num_classes", where, low=1)
    for key in ("checkpoint_path", "checkpoint_sha256"):
        if backbone.get(key) is not None and not isinstance(backbone[key], str):
            raise BundleError(f"{where}: field '{key}' is malformed; re-run `pteenet attach`")
    cuts = need(meta, "cuts", list, where)
    branches = need(meta, "branches", list, where)
    if not cuts or len(cuts) != len(branches) or not all(isinstance(c, str) for c in cuts):
        raise BundleError(f"{where}: cuts and branches disagree; re-run `pteenet attach`")
    for b in branches:
        if need(b, "type", str, where) not in BRANCH_TYPES or b["type"] == "auto":
            raise BundleError(f"{where}: branch type {show(b['type'])} is unknown; re-run "
                              f"`pteenet attach`")
        count(b, "flops", where)
        count(b, "width", where, optional=True)
        count(b, "cache_bytes", where, optional=True)
    _check_sizes(snap.tensors, cuts, backbone["num_classes"], where,
                 [b["type"] for b in branches])
    seg = int_list(meta.get("segment_flops"), "segment_flops", where)
    if len(seg) != len(cuts) + 1:
        raise BundleError(f"{where}: segment_flops has the wrong length")
    classes = meta.get("classes")
    if classes is not None and (not isinstance(classes, list) or
                                len(classes) != backbone["num_classes"]):
        raise BundleError(f"{where}: classes do not match the number of classes")
    pre = _preprocess(need(meta, "preprocess", dict, where), where)
    for key in ("training", "data", "extra"):
        if meta.get(key) is not None and not isinstance(meta[key], dict):
            raise BundleError(f"{where}: field '{key}' is malformed; re-run `pteenet attach`")
    extra = dict(meta.get("extra") or {})
    cost, latency = _cost_model(meta, len(cuts), where)
    ensemble = meta.get("ensemble")
    if ensemble is not None and (not isinstance(ensemble, dict) or
                                 ensemble.get("kind") not in ENSEMBLES):
        raise BundleError(f"{where}: field 'ensemble' is malformed (edited?); re-run "
                          f"`pteenet attach`")
    return BundleInfo(
        path=snap.folder, backbone=backbone, preprocess=pre, cuts=cuts,
        module_cuts=bool(meta.get("module_cuts", False)), branches=branches,
        segment_flops=seg, classes=classes, training=dict(meta.get("training") or {}),
        data=dict(meta.get("data") or {}),
        calibration_indices=_calibration(snap.tensors.get("calibration_indices"), extra, where),
        extra=extra, cost=cost, latency=latency, ensemble=ensemble, format_version=version,
    )


def _ensemble(tensors: dict[str, torch.Tensor], info: BundleInfo, where: str
              ) -> ZTWEnsemble | None:
    """The ZTW weights the metadata announces, checked against it (None when it announces
    none, as in every bundle from before ensembles)."""
    found = [tensors.get(k) for k in ENSEMBLE_TENSORS]
    if info.ensemble is None:
        if any(t is not None for t in found):
            raise BundleError(f"{where}: ensemble tensors without an 'ensemble' field "
                              f"(edited?); re-run `pteenet attach`")
        return None
    weight, bias = found
    try:
        if weight is None or bias is None or bias.shape != (info.num_branches, info.num_classes):
            raise OptionError("missing, or not one row per exit and class")
        return ZTWEnsemble(weight, bias)
    except OptionError as e:
        raise BundleError(f"{where}: the ensemble's weights are corrupt ({show(str(e))}; "
                          f"edited?); re-run `pteenet attach`") from None


def _cost_model(meta: dict[str, Any], branches: int, where: str
                ) -> tuple[str, TimeProfile | None]:
    """The recorded cost kind and time profile (bundles before ``--cost`` count FLOPs)."""
    cost, raw = meta.get("cost", "flops"), meta.get("latency")
    if cost not in COSTS or (cost == "latency" and raw is None):
        raise BundleError(f"{where}: field 'cost' is malformed; re-run `pteenet attach`")
    if raw is None:
        return cost, None
    try:
        profile = TimeProfile.from_dict(raw)
        ok = len(profile.segment_ms) == branches + 1 and len(profile.branch_ms) == branches \
            and all(isinstance(v, (int, float)) and v >= 0 for v in
                    [*profile.segment_ms, *profile.branch_ms, *profile.segment_ms_batched,
                     *profile.branch_ms_batched])
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise BundleError(f"{where}: field 'latency' is malformed; re-run `pteenet attach`")
    return cost, profile


def read_info(path: str | os.PathLike) -> BundleInfo:
    """Read and validate a bundle's metadata against its tensors (nothing is built)."""
    return _info(_snapshot(path))


def read_bundle(path: str | os.PathLike, thresholds: bool = True) -> Bundle:
    """Read one committed generation of a bundle and check all of it (nothing is built).

    ``thresholds=False`` leaves the stored table unread (every exit off): what calibrate
    needs to replace a table that is missing, corrupt or for another bundle."""
    snap = _snapshot(path, table=thresholds)
    info = _info(snap)
    table = empty_or_table(snap.table, str(info.path / THRESHOLDS_FILE), info)
    state = {k[len("branches."):]: v for k, v in snap.tensors.items()
             if k.startswith("branches.")}
    return Bundle(info, table, state, snap.digest, _ensemble(snap.tensors, info, snap.where))


def read_thresholds(path: str | os.PathLike, info: BundleInfo) -> ThresholdTable:
    """Read the bundle's threshold table, checked against the bundle (branches, classes).

    ``path`` is the bundle folder (the table as committed) or a thresholds file."""
    p = Path(path)
    f = p / THRESHOLDS_FILE if p.is_dir() else p
    check_table_file(f)
    if p.is_dir():
        data = _snapshot(p, table=True).table
    else:
        try:
            data = f.read_bytes() if f.is_file() else None
        except OSError as e:
            raise BundleError(f"{f} is unreadable ({e.strerror or e})") from e
    return empty_or_table(data, str(f), info)


def empty_or_table(data: bytes | None, where: str, info: BundleInfo) -> ThresholdTable:
    if data is None:  # never calibrated: every exit off, the model is the backbone
        return ThresholdTable(as_table(None, info.num_branches, info.num_classes),
                              method="none")
    doc = parse_json(data, where, "re-run `pteenet calibrate`")
    rows = need(doc, "thresholds", list, where)
    ok = all(isinstance(r, list) for r in rows) and all(
        v is None or isinstance(v, (int, float)) and not isinstance(v, bool)
        for r in rows for v in r)
    if not ok:
        raise BundleError(f"{where}: thresholds must be numbers in [0, 1] or null (never)")
    widths = {len(r) for r in rows}
    shape = (len(rows), widths.pop() if len(widths) == 1 else -1)
    if shape != (info.num_branches, info.num_classes):
        raise BundleError(
            f"{where} is for {shape[0]} branches x {shape[1]} classes but the bundle has "
            f"{info.num_branches} x {info.num_classes}; re-run `pteenet calibrate`")
    bad = [v for row in rows for v in row if v is not None and not 0 <= v <= 1]
    if bad:
        found = "NaN, which is refused" if math.isnan(bad[0]) else show(bad[0])
        raise BundleError(f"{where}: thresholds must lie in [0, 1] (null = never); found "
                          f"{found}; re-run `pteenet calibrate`")
    score = doc.get("score", "head")
    if score not in SCORES:
        raise BundleError(f"{where}: unknown score '{show(score)}'")
    gamma = _gamma(doc.get("gamma"), info.num_branches, score, where)
    for key in ("params", "summary"):
        if doc.get(key) is not None and not isinstance(doc[key], dict):
            raise BundleError(f"{where}: field '{key}' is malformed; re-run `pteenet calibrate`")
    return ThresholdTable(as_table(rows, info.num_branches, info.num_classes), score,
                          str(doc.get("method", "global")), dict(doc.get("params") or {}),
                          dict(doc.get("summary") or {}), gamma)


def _gamma(raw: Any, b: int, score: str, f: str) -> list[float] | None:
    """The gate's powers: ``b`` finite numbers >= 0 or null (inf: off); required for the gate
    score. No upper cap: a threshold a hair below 1 maps to a power in the millions."""
    if raw is None:
        if score == "gate":
            raise BundleError(f"{f}: the gate score needs 'gamma'; re-run `pteenet calibrate`")
        return None
    ok = isinstance(raw, list) and len(raw) == b and all(
        v is None or isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < math.inf
        for v in raw)
    if not ok:
        raise BundleError(f"{f}: 'gamma' must hold {b} numbers >= 0 or null; re-run "
                          f"`pteenet calibrate`")
    return [math.inf if v is None else float(v) for v in raw]
