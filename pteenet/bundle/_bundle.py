"""The bundle: trained branches plus everything needed to rebuild the early-exit model.

A bundle is a folder with ``branches.safetensors`` (every branch tensor; the metadata as JSON in the
safetensors header: format version, backbone and checkpoint hash, cuts, FLOPs, branch specs,
preprocessing, training settings, the calibration split) and a threshold table
(``thresholds.json`` plus a human-readable ``thresholds.csv``), committed together by
``bundle.json`` (each file's SHA-256 and size; see :mod:`pteenet.storage`), so a write killed at any
step leaves the old bundle or the new one and a reader gets exactly one of them. Nothing in it is
pickled, so loading a bundle can never run code; every field read back is validated (sizes against
the tensors actually present) before anything is allocated from it. Bundles written before
``bundle.json`` existed are read as they are.

A bundle attached with a ZTW ensemble (:mod:`pteenet.cascade._ensemble`) also holds its weights
(``ensemble.weight`` ``[B, B]`` and ``ensemble.bias`` ``[B, K]`` beside the branch tensors) and
an ``ensemble`` field in the metadata (its kind and the held-out samples it was fitted on); it is
written as format version 3, which pteenet versions without ensembles refuse rather than run its
exits alone. Bundles without the field load as before.

Bundles whose branches read whole feature maps are refused as written by an older pteenet, with
``pteenet attach`` as the fix: format version 1 (no reduction at all) by its version, and format
version 2 written before wide maps were reduced to at most ``MAX_VALUES`` numbers by its branch
specs (no ``reduce`` recorded) and tensors (exactly the unreduced layout, see
:func:`_unbounded_branches`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from pteenet import __version__
from pteenet.backbone._preprocess import INTERPOLATIONS, MAX_INPUT_SIDE, Preprocess
from pteenet.backbone._registry import Backbone, create_backbone, sha256_file
from pteenet.cascade._branches import MAX_VALUES, make_branch, unbounded_reduction
from pteenet.cascade._ensemble import ZTWEnsemble
from pteenet.cascade._model import EarlyExitModel, build_early_exit
from pteenet.cascade._profile import TimeProfile
from pteenet.choices import COSTS, ENSEMBLES, SCORES
from pteenet.errors import BundleError, OptionError, PteenetError
from pteenet.graph._tracing import trace_backbone
from pteenet.storage._atomic import MANIFEST, commit_files, parse_manifest, read_member
from pteenet.thresholds import as_table, json_rows

__all__ = [
    "BRANCHES_FILE",
    "FORMAT_VERSION",
    "MANIFEST",
    "MEMBERS",
    "THRESHOLDS_FILE",
    "Bundle",
    "BundleInfo",
    "ThresholdTable",
    "calibration_digest",
    "load",
    "load_backbone",
    "read_bundle",
    "read_info",
    "read_thresholds",
    "save_bundle",
    "write_thresholds",
]

FORMAT_VERSION = 3  # 3: with a ZTW ensemble; 2: branches reduce their map first; 1 is refused
_PLAIN_VERSION = 2  # what a bundle without an ensemble is written as (older pteenets read it)
_ENSEMBLE_TENSORS = ("ensemble.weight", "ensemble.bias")
BRANCHES_FILE = "branches.safetensors"
THRESHOLDS_FILE = "thresholds.json"
THRESHOLDS_CSV = "thresholds.csv"
MEMBERS = (BRANCHES_FILE, THRESHOLDS_CSV, THRESHOLDS_FILE)  # the files bundle.json commits
_META_KEY = "pteenet"
_MAX_DIGITS = 19  # no integer of ours needs more (int64)
_SHOW = 60  # longest value echoed in an error message
_MAX_DEPTH = 32  # pteenet's own JSON nests a few levels; deeper is an edit, refused the same way
_OLDER = ("was written by an older pteenet (format version {version}) whose branches read whole "
          "feature maps")  # format 1: no reduction at all; 2 without 'reduce': wide maps unbounded


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
            "format_version": _PLAIN_VERSION if self.ensemble is None else FORMAT_VERSION,
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


# -- writing ----------------------------------------------------------------------------------
def calibration_digest(indices: list[int]) -> str:
    """The SHA-256 recorded beside the held-out indices, checked on every read."""
    return hashlib.sha256(",".join(map(str, indices)).encode()).hexdigest()


def save_bundle(out: str | os.PathLike, model: EarlyExitModel, info: BundleInfo,
                table: ThresholdTable | None = None) -> Path:
    """Write ``branches.safetensors`` and the threshold table (default: the model's own) as one
    commit (see :func:`pteenet.storage._atomic.commit_files`), holding the folder's writer lock."""
    out = Path(out)
    tensors = {f"branches.{k}": v.detach().cpu().contiguous()
               for k, v in model.branches.state_dict().items()}
    tensors["calibration_indices"] = torch.tensor(info.calibration_indices, dtype=torch.int64)
    if model.ensemble is not None:
        tensors.update(zip(_ENSEMBLE_TENSORS, (model.ensemble.weight.detach().cpu().contiguous(),
                                               model.ensemble.bias.detach().cpu().contiguous())))
    doc = info.to_meta()
    doc["extra"] = {**info.extra, "calibration_sha256": calibration_digest(
        list(info.calibration_indices))}
    meta = {_META_KEY: json.dumps(doc, sort_keys=True)}
    csv_text, json_text = _threshold_texts(table or ThresholdTable.of(model))
    commit_files(out, {
        BRANCHES_FILE: lambda p: save_file(tensors, str(p), metadata=meta),
        THRESHOLDS_CSV: lambda p: p.write_text(csv_text, encoding="utf-8"),
        THRESHOLDS_FILE: lambda p: p.write_text(json_text, encoding="utf-8"),
    }, MEMBERS)
    info.path = out
    return out


def _threshold_texts(table: ThresholdTable) -> tuple[str, str]:
    """The CSV (empty cell / ``never`` = never exits) and JSON texts of a threshold table."""
    t = table.thresholds
    doc = {"format_version": _PLAIN_VERSION, "num_branches": int(t.shape[0]),
           "num_classes": int(t.shape[1]), "score": table.score, "method": table.method,
           "params": table.params, "thresholds": json_rows(t), "summary": table.summary}
    if table.gamma is not None:
        doc["gamma"] = json_rows(torch.tensor([table.gamma], dtype=torch.float64))[0]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["branch", "class", "threshold"])
    for b, row in enumerate(doc["thresholds"]):
        for c, v in enumerate(row):
            w.writerow([b, c, "never" if v is None else v])
    return buf.getvalue(), json.dumps(doc, indent=1)


def write_thresholds(out: str | os.PathLike, table: ThresholdTable) -> None:
    """Replace ``thresholds.json`` and ``thresholds.csv`` as one commit, whatever the old
    table was (missing, corrupt, for another branch count): the branches stay as committed."""
    _check_table_file(Path(out) / THRESHOLDS_FILE)
    csv_text, json_text = _threshold_texts(table)
    commit_files(out, {THRESHOLDS_CSV: lambda p: p.write_text(csv_text, encoding="utf-8"),
                       THRESHOLDS_FILE: lambda p: p.write_text(json_text, encoding="utf-8")},
                 MEMBERS)


def _check_table_file(f: Path) -> None:
    if f.exists() and not f.is_file():
        raise BundleError(f"{f} is not a file; remove it and re-run `pteenet calibrate`")


# -- reading ----------------------------------------------------------------------------------
class _TooLong(ValueError):
    """An integer with more digits than any field of ours can hold."""


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_DIGITS:
        raise _TooLong(text)
    return int(text)


def _parse_json(data: str | bytes, what: str, fix: str) -> Any:
    """``json.loads`` whose every failure (bad syntax or UTF-8, deep nesting, integers too long
    to be ours) is one BundleError line, so no parser error escapes as an internal one."""
    try:
        doc = json.loads(data, parse_int=_bounded_int)
        if _depth(doc) > _MAX_DEPTH:
            raise RecursionError
        return doc
    except _TooLong as e:
        raise BundleError(f"{what} holds an integer of {len(str(e))} digits (edited?); {fix}") \
            from None
    except RecursionError:
        raise BundleError(f"{what} is nested too deeply to be pteenet's (edited?); {fix}") \
            from None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BundleError(f"{what} is not valid JSON (edited?); {fix}") from e


def _depth(doc: Any) -> int:
    """How deeply lists and objects nest (iteratively: the document may be deeper than the
    interpreter's recursion limit allows a recursive walk)."""
    deepest, stack = 0, [(doc, 1)]
    while stack:
        node, d = stack.pop()
        if isinstance(node, (list, dict)):
            deepest = max(deepest, d)
            stack.extend((v, d + 1) for v in (node.values() if isinstance(node, dict) else node))
    return deepest


def _show(value: Any) -> str:
    """A value for an error message, cut short: an edited file may hold anything."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= _SHOW else text[:_SHOW] + "..."


def _need(d: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(d, dict) or key not in d or not isinstance(d[key], kind) or \
            isinstance(d[key], bool) and kind is int:
        raise BundleError(
            f"{where}: field '{key}' is missing or malformed; re-run `pteenet attach`")
    return d[key]


def _int_list(v: Any, key: str, where: str) -> list[int]:
    if not isinstance(v, list) or not all(isinstance(x, int) and x >= 0 for x in v):
        raise BundleError(f"{where}: field '{key}' is malformed; re-run `pteenet attach`")
    return v


@dataclass
class _Snapshot:
    """One committed generation of a bundle, read once: later reads cannot mix generations."""

    folder: Path
    where: str
    meta: dict[str, str]
    tensors: dict[str, torch.Tensor]
    table: bytes | None
    digest: str | None  # SHA-256 of the bundle.json these files were read under


def _manifest(folder: Path) -> tuple[dict[str, dict[str, Any]] | None, str | None]:
    """The committed members and the SHA-256 of ``bundle.json``, from one read of it (None,
    None: a bundle from before manifests existed)."""
    f = folder / MANIFEST
    if not f.exists():
        return None, None
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
        _check_table_file(table_file)
    files, digest = _manifest(folder) if name == BRANCHES_FILE else (None, None)
    try:
        raw = read_member(folder, name, files, "re-run `pteenet attach`")
        doc = read_member(folder, THRESHOLDS_FILE, files, "re-run `pteenet calibrate`") \
            if table else None
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
                          f"{_show(first)}") from e
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return _Snapshot(folder, str(f), meta if isinstance(meta, dict) else {}, tensors, doc,
                     digest)


def _preprocess(d: dict, where: str) -> Preprocess:
    size = d.get("input_size")
    ok = isinstance(size, list) and len(size) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_INPUT_SIDE for v in size)
    if not ok:
        raise BundleError(f"{where}: field 'preprocess' holds an impossible input size "
                          f"{_show(size)} (each side 1..{MAX_INPUT_SIDE}; edited?)")
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
                 where: str) -> None:
    """Every size-like field must agree with the tensors actually present (before anything is
    allocated from it): one classifier per cut, each with ``num_classes`` rows."""
    for i in range(len(cuts)):
        w = tensors.get(f"branches.{i}.classifier.weight")
        if w is None or w.ndim != 2:
            raise BundleError(f"{where}: branch tensors do not match the metadata (no classifier "
                              f"for branch {i}; edited?)")
        if w.shape[0] != num_classes:
            raise BundleError(f"{where}: branch tensors do not match the metadata (num_classes "
                              f"{_show(num_classes)}, classifiers for {w.shape[0]}; edited?)")


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
    meta = _parse_json(snap.meta.get(_META_KEY, ""), f"{where}: metadata",
                       "re-run `pteenet attach`")
    version = _need(meta, "format_version", int, where)
    if version > FORMAT_VERSION:
        raise BundleError(f"{where} has format version {_show(version)}, newer than this pteenet "
                          f"understands ({FORMAT_VERSION}); upgrade pteenet")
    if version < _PLAIN_VERSION:
        raise BundleError(f"{where} {_OLDER.format(version=version)}; re-run `pteenet attach`")
    backbone = _need(meta, "backbone", dict, where)
    for key, kind in (("name", str), ("source", str), ("num_classes", int)):
        _need(backbone, key, kind, where)
    for key in ("checkpoint_path", "checkpoint_sha256"):
        if backbone.get(key) is not None and not isinstance(backbone[key], str):
            raise BundleError(f"{where}: field '{key}' is malformed; re-run `pteenet attach`")
    cuts = _need(meta, "cuts", list, where)
    branches = _need(meta, "branches", list, where)
    if not cuts or len(cuts) != len(branches) or not all(isinstance(c, str) for c in cuts):
        raise BundleError(f"{where}: cuts and branches disagree; re-run `pteenet attach`")
    for b in branches:
        _need(b, "type", str, where)
        if _need(b, "flops", int, where) < 0:
            raise BundleError(f"{where}: field 'flops' is malformed; re-run `pteenet attach`")
    _check_sizes(snap.tensors, cuts, backbone["num_classes"], where)
    seg = _int_list(meta.get("segment_flops"), "segment_flops", where)
    if len(seg) != len(cuts) + 1:
        raise BundleError(f"{where}: segment_flops has the wrong length")
    classes = meta.get("classes")
    if classes is not None and (not isinstance(classes, list) or
                                len(classes) != backbone["num_classes"]):
        raise BundleError(f"{where}: classes do not match the number of classes")
    pre = _preprocess(_need(meta, "preprocess", dict, where), where)
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
    found = [tensors.get(k) for k in _ENSEMBLE_TENSORS]
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
        raise BundleError(f"{where}: the ensemble's weights are corrupt ({_show(str(e))}; "
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
    table = _table(snap.table, str(info.path / THRESHOLDS_FILE), info)
    state = {k[len("branches."):]: v for k, v in snap.tensors.items()
             if k.startswith("branches.")}
    return Bundle(info, table, state, snap.digest, _ensemble(snap.tensors, info, snap.where))


def read_thresholds(path: str | os.PathLike, info: BundleInfo) -> ThresholdTable:
    """Read the bundle's threshold table, checked against the bundle (branches, classes).

    ``path`` is the bundle folder (the table as committed) or a thresholds file."""
    p = Path(path)
    f = p / THRESHOLDS_FILE if p.is_dir() else p
    _check_table_file(f)
    if p.is_dir():
        data = _snapshot(p, table=True).table
    else:
        try:
            data = f.read_bytes() if f.is_file() else None
        except OSError as e:
            raise BundleError(f"{f} is unreadable ({e.strerror or e})") from e
    return _table(data, str(f), info)


def _table(data: bytes | None, where: str, info: BundleInfo) -> ThresholdTable:
    if data is None:  # never calibrated: every exit off, the model is the backbone
        return ThresholdTable(as_table(None, info.num_branches, info.num_classes),
                              method="none")
    doc = _parse_json(data, where, "re-run `pteenet calibrate`")
    rows = _need(doc, "thresholds", list, where)
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
        found = "NaN, which is refused" if math.isnan(bad[0]) else _show(bad[0])
        raise BundleError(f"{where}: thresholds must lie in [0, 1] (null = never); found "
                          f"{found}; re-run `pteenet calibrate`")
    score = doc.get("score", "head")
    if score not in SCORES:
        raise BundleError(f"{where}: unknown score '{_show(score)}'")
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


def load_backbone(info: BundleInfo, checkpoint: str | os.PathLike | None = None,
                  force: bool = False) -> Backbone:
    """Rebuild the bundle's backbone and check its checkpoint is the one it was trained on.

    The hash is checked before the weights are loaded (and handed on, so the file is hashed
    once); a bundle that records a checkpoint but no hash (edited?) cannot be checked, so it
    needs ``force`` like a mismatch does."""
    bb = info.backbone
    ckpt = checkpoint if checkpoint is not None else bb.get("checkpoint_path")
    if ckpt is not None and not Path(ckpt).is_file() and checkpoint is None:
        raise BundleError(f"the bundle's checkpoint {_show(ckpt)} is gone; pass `checkpoint`")
    want, have = bb.get("checkpoint_sha256"), None
    if ckpt is not None and Path(ckpt).is_file() and not force:
        have = sha256_file(ckpt)
        if not want:
            raise BundleError(f"the bundle records no SHA-256 for its checkpoint, so {ckpt} "
                              f"cannot be checked; pass `force` to use it anyway")
        if have != want:
            raise BundleError(
                f"checkpoint {ckpt} (sha256 {have[:12]}) is not the one the branches were "
                f"trained on ({_show(want)[:12]}); pass `force` to use it anyway")
    return create_backbone(  # bundles before --no-pretrained recorded no "pretrained"
        f"{bb['source']}:{bb['name']}", checkpoint=ckpt,
        pretrained=ckpt is None and bb.get("pretrained", True) is not False,
        num_classes=info.num_classes, input_size=info.preprocess.input_size,
        mean=info.preprocess.mean, std=info.preprocess.std, known_sha256=have,
    )


def load(path: str | os.PathLike | Bundle = "pteenet-out", *,
         checkpoint: str | os.PathLike | None = None, force: bool = False,
         device: str | torch.device = "cpu", thresholds: bool = True) -> EarlyExitModel:
    """Rebuild the early-exit model of a bundle, with its threshold table, in eval mode.

    ``path`` is a bundle folder, read once (:func:`read_bundle`), or a :class:`Bundle` already
    read. The FLOPs come from the bundle (nothing is counted again). ``thresholds=False``
    uses no stored table (every exit off): what calibrate needs to replace a table that is
    missing, corrupt or for another bundle."""
    b = path if isinstance(path, Bundle) else read_bundle(path, thresholds)
    info = b.info
    table = b.table if thresholds else _table(None, "", info)
    backbone = load_backbone(info, checkpoint, force)
    try:
        trace = trace_backbone(backbone.model, info.preprocess.input_size,
                               cuts=info.cuts if info.module_cuts else None, with_thop=False,
                               flops=False)
        model = build_early_exit(trace, info.cuts, info.num_classes,
                                 [br["type"] for br in info.branches], budget=None,
                                 widths=[br.get("width") for br in info.branches],
                                 thresholds=table.thresholds, score=table.score,
                                 gamma=table.gamma,
                                 flops=(info.segment_flops, [br["flops"] for br in info.branches]))
        shapes = [trace.cut(c).shape for c in info.cuts]
    except (PteenetError, RuntimeError) as e:
        raise BundleError(f"{info.path}: cannot rebuild the model ({_show(str(e))})") from e
    _load_state(model, b.state, info, shapes)
    model.set_ensemble(b.ensemble)
    model.use_cost(info.cost, info.latency)
    return model.to(device).eval()


def _load_state(model: EarlyExitModel, state: dict[str, torch.Tensor], info: BundleInfo,
                shapes: list[tuple[int, ...]]) -> None:
    """The branches' tensors into ``model``, each checked for dtype and shape first; tensors
    shaped as an older pteenet wrote them (:func:`_unbounded_branches`) are named as such."""
    own, where = model.branches.state_dict(), info.path
    bad = [k for k, v in own.items() if k in state and (state[k].dtype != v.dtype
                                                       or state[k].shape != v.shape)]
    if bad:
        old = _unbounded_branches(state, own, info, shapes)
        if old:
            i = old[0]
            reads = math.prod(unbounded_reduction(info.branches[i]["type"]).out_shape(shapes[i]))
            raise BundleError(
                f"{where} {_OLDER.format(version=info.format_version)} (branch {i} at "
                f"'{_show(info.cuts[i])}' reads {reads} numbers of its map; branches now read at "
                f"most {MAX_VALUES}); re-run `pteenet attach`")
        raise BundleError(f"{where}: branch tensors do not match the metadata ({bad[0]} has "
                          f"the wrong dtype or shape; edited?)")
    try:
        model.branches.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise BundleError(f"{where}: branch tensors do not match the metadata (edited?)") from e


def _same_layout(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
                                        for k in a)


def _by_branch(tensors: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]] | None:
    """``tensors`` split by branch (their names start with its index); None if one belongs to
    no branch of ``n``."""
    groups: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for k, v in tensors.items():
        head = k.partition(".")[0]
        if not head.isdigit() or int(head) >= n:
            return None
        groups[int(head)][k] = v
    return groups


def _unbounded_branches(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor],
                        info: BundleInfo, shapes: list[tuple[int, ...]]) -> list[int]:
    """The branches laid out as pteenet wrote them before wide maps were reduced to at most
    ``MAX_VALUES`` numbers (:func:`pteenet.cascade._branches.unbounded_reduction`), or [] unless the
    whole bundle is such a one: format version 2, and every branch either records no
    ``reduce`` and holds exactly the tensors (names, dtypes, shapes) of that layout for its
    cut and recorded width, or holds exactly those this pteenet builds, and at least one the
    old ones. A tensor edited in a bundle of today's layout fails both, and stays an edit."""
    if info.format_version != _PLAIN_VERSION:
        return []
    stored, built = _by_branch(state, len(info.cuts)), _by_branch(own, len(info.cuts))
    if stored is None or built is None:
        return []
    old = []
    for i, (spec, shape, mine) in enumerate(zip(info.branches, shapes, stored)):
        if _same_layout(mine, built[i]):
            continue
        if "reduce" in spec:  # recorded since wide maps are reduced: this pteenet's layout
            return []
        try:
            with torch.device("meta"):  # shapes only: an old wide branch may be large
                then = make_branch(spec["type"], shape, info.num_classes, width=spec.get("width"),
                                   reduce=unbounded_reduction(spec["type"])).state_dict()
        except (PteenetError, RuntimeError, ValueError, TypeError):
            return []
        if not _same_layout(mine, {f"{i}.{k}": v for k, v in then.items()}):
            return []
        old.append(i)
    return old
