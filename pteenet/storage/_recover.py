"""Finishing or discarding what killed writers left in a folder, swept under its writer lock.

Every name swept is pteenet's own (temp files, pending files, scratch files of processes that no
longer run), so a sweep never touches a user's file in a shared ``--out``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pteenet.errors import BundleError
from pteenet.storage._files import fsync, is_temp
from pteenet.storage._manifest import PENDING_SUFFIX, matches, pending, read_manifest

__all__ = ["CACHE_PREFIX", "recover"]

#: A per-process scratch file (the training feature cache) is ``<prefix><pid>-<tag>.bin``:
#: swept once process ``pid`` no longer runs.
CACHE_PREFIX = ".pteenet-cache-"
_CACHE = re.compile(rf"^{re.escape(CACHE_PREFIX)}(\d+)-.*\.bin$")


def recover(folder: str | os.PathLike) -> None:
    """Finish or discard what killed writers left in ``folder`` (call holding its lock).

    A pending file the manifest has committed is renamed into place; any other is removed, as
    are temp files and the scratch files of processes that no longer run.
    """
    folder = Path(folder)
    try:
        files = read_manifest(folder) or {}
    except BundleError:
        files = None  # a damaged manifest: leave its pending files for the user to inspect
    for path in folder.iterdir():
        name = path.name
        if name.startswith(".") and name.endswith(PENDING_SUFFIX):
            member = name[1:-len(PENDING_SUFFIX)]
            if files is not None and not _roll_forward(folder, member, files):
                path.unlink(missing_ok=True)
        elif is_temp(name) or _dead_cache(name):
            path.unlink(missing_ok=True)
    fsync(folder)


def _roll_forward(folder: Path, member: str, files: Mapping[str, Any]) -> bool:
    """Rename a committed pending file into place; False when it was never committed."""
    want = files.get(member)
    if want is None or matches(pending(folder, member), want) is None:
        return False
    if matches(folder / member, want) is not None:
        return False  # already in place: the pending file is a leftover
    os.replace(pending(folder, member), folder / member)
    return True


def _dead_cache(name: str) -> bool:
    found = _CACHE.match(name)
    if not found:
        return False
    try:
        os.kill(int(found.group(1)), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError, ValueError):
        return False
    return False
