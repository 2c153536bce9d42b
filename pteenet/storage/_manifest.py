"""The commit manifest ``bundle.json``: each member of a group of files with its SHA-256 and size.

Writing it is the commit point of :func:`pteenet.storage._commit.commit_files`; readers take
each member through :func:`read_member`, which accepts only bytes the manifest records, from the
member's own file or from the pending file a writer killed after its commit left beside it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pteenet.errors import BundleError
from pteenet.storage._files import sha256_file

__all__ = ["MANIFEST", "MANIFEST_VERSION", "PENDING_SUFFIX", "entry", "matches",
           "parse_manifest", "pending", "read_manifest", "read_member"]

MANIFEST = "bundle.json"
MANIFEST_VERSION = 1
PENDING_SUFFIX = ".pteenet-new"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def pending(folder: Path, name: str) -> Path:
    """Where a writer puts member ``name``'s new bytes until its commit is renamed into place."""
    return folder / f".{name}{PENDING_SUFFIX}"


def entry(path: Path) -> dict[str, Any]:
    """The manifest entry of a file as it is on disk."""
    return {"sha256": sha256_file(path), "size": path.stat().st_size}


def matches(path: Path, want: Mapping[str, Any]) -> bytes | None:
    """The file's bytes when it has the manifest entry's size and SHA-256, else None."""
    try:
        if path.stat().st_size != want["size"]:
            return None
        data = path.read_bytes()
    except OSError:
        return None
    return data if hashlib.sha256(data).hexdigest() == want["sha256"] else None


def read_manifest(folder: str | os.PathLike) -> dict[str, dict[str, Any]] | None:
    """The committed members (name -> sha256, size), or None where nothing was ever committed
    (no ``bundle.json``)."""
    f = Path(folder) / MANIFEST
    if not f.exists():
        return None
    try:
        data = f.read_bytes()
    except OSError as e:
        raise BundleError(f"{f} is unreadable or not JSON (edited?); re-run `pteenet attach`") \
            from e
    return parse_manifest(data, f)


def parse_manifest(data: bytes, f: Path) -> dict[str, dict[str, Any]]:
    """The committed members of ``bundle.json`` bytes already read (``f`` names it in errors),
    so a reader that also hashes the manifest reads it once."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise BundleError(f"{f} is unreadable or not JSON (edited?); re-run `pteenet attach`") \
            from e
    version = doc.get("format_version") if isinstance(doc, dict) else None
    if isinstance(version, int) and not isinstance(version, bool) and \
            version > MANIFEST_VERSION:
        raise BundleError(f"{f} has format version {str(version)[:12]}, newer than this pteenet "
                          f"understands ({MANIFEST_VERSION}); upgrade pteenet")
    files = doc.get("files") if isinstance(doc, dict) else None
    ok = version == MANIFEST_VERSION and isinstance(files, dict) and all(
        isinstance(e, dict) and isinstance(e.get("sha256"), str) and _HEX64.match(e["sha256"])
        and isinstance(e.get("size"), int) and not isinstance(e["size"], bool)
        and e["size"] >= 0 for e in files.values())
    if not ok:
        raise BundleError(f"{f} is malformed (edited?); re-run `pteenet attach`")
    return files


def read_member(folder: str | os.PathLike, name: str, files: Mapping[str, Any],
                fix: str) -> bytes | None:
    """The bytes of member ``name`` as committed, or None when the group has no such member.

    The bytes must match the manifest: taken from ``name`` or, when a writer was killed after
    its commit but before its renames, from its pending file. A file that matches neither was
    changed after it was written, and a member that is gone was deleted: :class:`BundleError`
    naming it and ``fix``.
    """
    folder = Path(folder)
    final = folder / name
    want = files.get(name)
    if want is None:
        return None
    for path in (final, pending(folder, name)):
        data = matches(path, want)
        if data is not None:
            return data
    if not final.exists():  # committed, yet gone: a deleted table must not read as "none"
        raise BundleError(f"{name} missing from {folder}, though {MANIFEST} records it "
                          f"(deleted?); {fix}")
    raise BundleError(f"{final} has changed since pteenet wrote it (its SHA-256 or size differs "
                      f"from {MANIFEST}: edited or copied over?); {fix}")
