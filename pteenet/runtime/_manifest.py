"""An exported folder's ``manifest.json``, read and checked before any graph is loaded.

Nothing in it is trusted (an export may come from anywhere): graph files must be plain names
inside the folder whose SHA-256 matches the manifest's, thresholds must lie in [0, 1] or be
null, and every count and FLOP figure must be a sane number; anything else is one
:class:`BundleError` line.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

from ._errors import BundleError

__all__ = ["MANIFEST", "MANIFEST_VERSION", "read_manifest"]

MANIFEST = "manifest.json"
MANIFEST_VERSION = 2  # 2: branches of a ZTW ensemble read the exits before them
_MAX_DIGITS = 19  # longer integers are refused while parsing (no count of ours needs more)
_MAX_COUNT = 1 << 20  # branches or classes: beyond it the manifest is edited, not exported
_MAX_SIDE = 2048  # pteenet.backbone._preprocess.MAX_INPUT_SIDE (this package must run alone)


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_DIGITS:
        raise ValueError(f"an integer of {len(text)} digits")
    return int(text)


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """Read and check an exported folder's manifest (one clear line on anything wrong).

    Nothing in it is trusted: graph files must be plain names inside the folder (no ``..``,
    no absolute paths, no links out) whose SHA-256 the manifest records and matches,
    thresholds must lie in [0, 1] or be null, the normalisation must be three finite numbers
    (stds above 0), ``active`` one boolean per branch, and every count and FLOP figure a sane
    number."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise BundleError(f"no exported cascade at {folder} ({MANIFEST} missing); "
                          f"run `pteenet export` first")
    try:
        doc = json.loads(path.read_bytes(), parse_int=_bounded_int)
    except (OSError, ValueError, RecursionError) as e:
        raise BundleError(f"{path} is not valid JSON ({type(e).__name__}); run `pteenet export` "
                          f"again") from None
    _check_manifest(doc, path)
    for f in doc["files"]["segments"] + doc["files"]["branches"] + doc["files"].get("single",
                                                                                    []):
        _check_file(path.parent, f, doc.get("sha256"), path)
    _check_fresh(doc, path)
    return doc


def _check_fresh(doc: dict[str, Any], path: Path) -> None:
    """An export inside its bundle (``<bundle>/export-*``) must still be of that bundle: after a
    re-attach or re-calibration its graphs or thresholds are another model's. (The same rule
    as :mod:`pteenet.bundle._derived`, inlined: this module runs without the rest of pteenet.)"""
    folder = path.parent
    record = folder.parent / "bundle.json"
    recorded = doc.get("bundle_sha256")
    if not folder.name.startswith("export-") or recorded is None or not record.is_file():
        return
    if hashlib.sha256(record.read_bytes()).hexdigest() != recorded:
        raise BundleError(f"{folder} is stale: the bundle in {folder.parent} was re-attached or "
                          f"re-calibrated since this export; run `pteenet export` again")


def _number(v: Any, low: float = 0.0, high: float = math.inf) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and low <= v <= high and \
        math.isfinite(v)


def _check_manifest(doc: Any, path: Path) -> None:
    bad = f"{path} is malformed (edited?); run `pteenet export` again"
    if not isinstance(doc, dict):
        raise BundleError(bad)
    version = doc.get("format_version")
    if isinstance(version, int) and version > MANIFEST_VERSION:
        raise BundleError(f"{path} has format version {str(version)[:20]}, newer than this "
                          f"runtime understands ({MANIFEST_VERSION}); upgrade pteenet")
    if doc.get("format") not in ("onnx", "torchscript"):
        raise BundleError(f"{path}: unknown format {str(doc.get('format'))[:40]!r}")
    try:
        b, k, files = doc["num_branches"], doc["num_classes"], doc["files"]
        ok = (_number(b, 1, _MAX_COUNT) and _number(k, 1, _MAX_COUNT)
              and isinstance(b, int) and isinstance(k, int)
              and len(files["segments"]) == b + 1 and len(files["branches"]) == b
              and len(doc["thresholds"]) == b and len(doc["segment_flops"]) == b + 1
              and len(doc["branch_flops"]) == b and len(doc["input_size"]) == 2
              and all(isinstance(v, int) and _number(v, 1, _MAX_SIDE) for v in doc["input_size"])
              and (doc.get("resize_size") is None or isinstance(doc["resize_size"], int)
                   and _number(doc["resize_size"], 1, 2 * _MAX_SIDE))
              and doc.get("interpolation", "bilinear") in ("nearest", "bilinear", "bicubic")
              and all(_number(v) for v in doc["segment_flops"] + doc["branch_flops"])
              and doc.get("ensemble", False) in (True, False)
              and _single_ok(doc, b)
              and all(isinstance(r, list) and len(r) == k for r in doc["thresholds"])
              and _hashes_ok(doc.get("sha256"))
              and _normalisation_ok(doc["mean"], doc["std"])
              and _flags_ok(doc.get("active", [True] * b), b)
              and (doc.get("classes") is None or isinstance(doc["classes"], list)
                   and len(doc["classes"]) == k
                   and all(isinstance(c, str) for c in doc["classes"])))
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(bad) from e
    if not ok:
        raise BundleError(bad)
    if not all(v is None or _number(v, 0, 1) for r in doc["thresholds"] for v in r):
        raise BundleError(f"{path}: thresholds must be numbers in [0, 1] or null (never); "
                          f"run `pteenet export` again")


def _hashes_ok(hashes: Any) -> bool:
    """Every graph's SHA-256 is recorded: a manifest without them would switch the check of
    each graph off (a swapped segment would run), so it is malformed, not unchecked."""
    return isinstance(hashes, dict) and all(
        isinstance(h, str) and len(h) == 64 and all(c in "0123456789abcdef" for c in h)
        for h in hashes.values())


def _normalisation_ok(mean: Any, std: Any) -> bool:
    """Three finite means and three finite stds above 0: preprocess divides by them."""
    return all(isinstance(v, list) and len(v) == 3 and all(_number(x, -math.inf) for x in v)
               for v in (mean, std)) and min(std) > 0


def _flags_ok(flags: Any, b: int) -> bool:
    """One boolean per branch (``active``: calibration switched the exit on)."""
    return isinstance(flags, list) and len(flags) == b and all(isinstance(f, bool) for f in flags)


def _single_ok(doc: dict[str, Any], b: int) -> bool:
    """An exported batch-1 graph (ONNX, plain exits) is one file plus the B booleans of the
    branches it holds; neither key, or both."""
    if "single" not in doc["files"]:
        return "single_runs" not in doc
    single, runs = doc["files"]["single"], doc.get("single_runs")
    return doc.get("format") == "onnx" and not doc.get("ensemble", False) and \
        isinstance(single, list) and len(single) == 1 and isinstance(runs, list) and \
        len(runs) == b and all(isinstance(r, bool) for r in runs)


def _check_file(folder: Path, name: Any, hashes: Any, manifest: Path) -> None:
    """A graph file: a plain name inside ``folder``, present, and as exported."""
    plain = isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and \
        "\\" not in name and "\x00" not in name
    if not plain or (folder / name).resolve().parent != folder.resolve():
        raise BundleError(f"{manifest} names a graph outside its folder "
                          f"({str(name)[:60]!r}); refused")
    f = folder / name
    if not f.is_file():
        raise BundleError(f"{f} is missing; run `pteenet export` again")
    want = hashes.get(name) if isinstance(hashes, dict) else None
    if not isinstance(want, str) or _sha256(f) != want:
        raise BundleError(f"{f} does not match {MANIFEST} (changed, or an export was "
                          f"interrupted); run `pteenet export` again")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

