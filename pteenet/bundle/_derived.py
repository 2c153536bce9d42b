"""Files derived from a bundle (``bench.json`` with its sweep files, ``export-*/``) and which
bundle they were derived from.

Each records :func:`bundle_hash`, the SHA-256 of the bundle's ``bundle.json``: the commit record
of its branches *and* thresholds, so a re-attach and a re-calibration both change it. A derived
file whose hash differs from its bundle's describes another model: ``attach`` removes those of
the bundle it replaced from its ``--out`` after writing the new one (:func:`remove_stale`), and
:meth:`pteenet.runtime.Cascade.open` refuses an ``export-*`` folder that is stale.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pteenet.storage import MANIFEST

__all__ = ["BENCH_FILE", "BUNDLE_HASH_KEY", "SWEEP_CSV", "SWEEP_PNG", "bundle_hash", "remove_stale"]

BUNDLE_HASH_KEY = "bundle_sha256"  # the key derived JSON files record the hash under
BENCH_FILE = "bench.json"  # written by pteenet.benchmark._bench, which records its bundle ...
SWEEP_PNG = "sweep.png"  # ... for these two as well: bench writes them with bench.json
SWEEP_CSV = "sweep.csv"
_EXPORT_MANIFEST = "manifest.json"


def bundle_hash(folder: str | os.PathLike) -> str | None:
    """The SHA-256 of ``folder/bundle.json``; None where there is none (no bundle, or one from
    before bundle.json existed: nothing to compare with)."""
    try:
        return hashlib.sha256((Path(folder) / MANIFEST).read_bytes()).hexdigest()
    except OSError:
        return None


def remove_stale(folder: str | os.PathLike, replaced: str | None) -> list[str]:
    """Remove the derived files in ``folder`` that record ``replaced``, the hash of the bundle
    a new one has just replaced there; return their names.

    Only files that name that bundle go: a ``bench.json``, ``sweep.*`` or ``export-*/`` that
    records no hash, or another one, may be the user's own (an ``--out`` that held no bundle
    holds nothing of ours), so it stays. Of an export, only the files its manifest lists go
    (the folder too when that empties it)."""
    folder = Path(folder)
    if replaced is None or replaced == bundle_hash(folder):
        return []
    removed = []
    if _recorded(folder / BENCH_FILE, ("bundle", "sha256")) == replaced:
        for name in (BENCH_FILE, SWEEP_PNG, SWEEP_CSV):
            if (folder / name).is_file():
                (folder / name).unlink()
                removed.append(name)
    for export in sorted(folder.glob("export-*")):
        manifest = _read(export / _EXPORT_MANIFEST)
        if manifest is not None and manifest.get(BUNDLE_HASH_KEY) == replaced:
            _remove_export(export, manifest)
            removed.append(export.name)
    return removed


def _read(path: Path) -> dict | None:
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None


def _recorded(path: Path, keys: tuple[str, ...]) -> Any:
    doc: Any = _read(path)
    for key in keys:
        doc = doc.get(key) if isinstance(doc, dict) else None
    return doc


def _remove_export(folder: Path, manifest: dict) -> None:
    files = manifest.get("files")
    groups = files.values() if isinstance(files, dict) else []
    names = [n for g in groups if isinstance(g, list) for n in g if isinstance(n, str)]
    for name in [*names, _EXPORT_MANIFEST]:
        path = folder / name
        if path.parent == folder and path.is_file():  # plain names inside the folder only
            path.unlink()
    if not any(folder.iterdir()):
        folder.rmdir()
