"""Groups of files with one commit point (a bundle's branches and its threshold table).

Renaming several files is several steps, and a kill between two renames would pair new with old,
so the group gets **one commit point**: every new file is first written beside its target as
``.<name>.pteenet-new``, then the manifest ``bundle.json`` (each member's SHA-256 and size,
:mod:`pteenet.storage._manifest`) is renamed into place -- that rename is the commit -- and only
then are the pending files renamed over the targets. Readers take each member from whichever of
``<name>`` and its pending file matches the manifest, so after a kill at any step they see
exactly the old group (not yet committed) or exactly the new one (committed, renames still
pending); the next writer finishes or discards what a killed one left
(:mod:`pteenet.storage._recover`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pteenet.errors import BundleError
from pteenet.storage._files import atomic_path, follow_umask, fsync, os_error, unwritable
from pteenet.storage._lock import writer_lock
from pteenet.storage._manifest import MANIFEST, MANIFEST_VERSION, entry, pending, read_manifest
from pteenet.storage._pause import pause_point

__all__ = ["commit_files"]


def commit_files(folder: str | os.PathLike, writers: Mapping[str, Callable[[Path], None]],
                 members: Sequence[str]) -> None:
    """Replace the files ``writers`` names (each writes its file's new contents to the path it
    is given) as one group with one commit point; see the module docstring.

    ``members`` are every file of the group: those not rewritten keep their committed entry.
    """
    folder = Path(folder)
    with writer_lock(folder, create=True):
        for name in writers:
            if (folder / name).is_dir():
                raise BundleError(f"{folder / name} is a folder, not a file; remove it and "
                                  f"run again")
        files = _base_entries(folder, [m for m in members if m not in writers])
        paths = [pending(folder, name) for name in writers]
        try:
            pause_point("start")
            for (name, write), path in zip(writers.items(), paths):
                write(path)
                follow_umask(path)
                fsync(path)
                files[name] = entry(path)
                pause_point(f"wrote-{name}")
            doc = {"format_version": MANIFEST_VERSION, "files": dict(sorted(files.items()))}
            with atomic_path(folder / MANIFEST) as tmp:
                tmp.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
                pause_point(f"wrote-{MANIFEST}")
            fsync(folder)
            pause_point("committed")
            for name, path in zip(writers, paths):
                os.replace(path, folder / name)
                pause_point(f"renamed-{name}")
            fsync(folder)
        except BaseException as e:
            if not _committed(folder, files):  # asked of the disk: the rename is the commit
                for path in paths:
                    path.unlink(missing_ok=True)
            cause = os_error(e)  # a full disk, a folder turned read-only meanwhile
            if cause is not None:
                raise unwritable(folder, cause) from e
            raise


def _committed(folder: Path, files: Mapping[str, Any]) -> bool:
    try:
        return read_manifest(folder) == files
    except BundleError:
        return False


def _base_entries(folder: Path, keep: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The committed entries of the members not rewritten (none: a damaged or missing manifest
    is no obstacle to replacing the whole group)."""
    if not keep:
        return {}
    files = read_manifest(folder) or {}
    return {name: dict(files[name]) for name in keep if name in files}
