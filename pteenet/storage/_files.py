"""Single files written whole: a temp file beside the target, fsync, rename over it.

A crash at any moment leaves the old file or the new one, never half of one. Every temp name
is pteenet's own (``.<target>.pteenet-<random>.tmp``, :func:`is_temp`), so the sweep after a
killed writer (:mod:`pteenet.storage._recover`) never touches a user's file in a shared
``--out``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "fsync", "follow_umask", "is_temp", "sha256_file", "temp_beside",
           "write_text"]

_TEMP = re.compile(r"^\..+\.pteenet-[a-z0-9_]{8}\.tmp$")  # what temp_beside names


def is_temp(name: str) -> bool:
    """Whether ``name`` is one of :func:`temp_beside`'s temp files."""
    return _TEMP.match(name) is not None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_beside(target: Path, suffix: str = ".tmp") -> Path:
    """A new empty temp file in ``target``'s folder (made if missing), named for ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.pteenet-", suffix=suffix,
                               dir=target.parent)
    os.close(fd)
    return Path(tmp)


def follow_umask(path: Path) -> None:
    """Give a finished file the mode any tool's new file gets (0666 less the umask): mkstemp
    makes 0600, and some writers (safetensors) create their file anew with 0600 too."""
    os.chmod(path, 0o666 & ~_umask())


def fsync(path: Path) -> None:
    """Flush a file, or a folder's entries (so a rename inside it survives a power cut)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``target``; on success it replaces ``target`` atomically."""
    target = Path(target)
    tmp = temp_beside(target)
    try:
        yield tmp
        follow_umask(tmp)
        fsync(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(target: str | os.PathLike, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def sha256_file(path: str | os.PathLike) -> str:
    """A file's SHA-256, read in 1 MiB blocks (checkpoints run to gigabytes): manifests and
    bundles record it to notice a file that changed under them."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
