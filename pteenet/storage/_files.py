"""Single files written whole: a temp file beside the target, fsync, rename over it.

A crash at any moment leaves the old file or the new one, never half of one. Every temp name
is pteenet's own (``.<target>.pteenet-<random>.tmp``, :func:`is_temp`), so the sweep after a
killed writer (:mod:`pteenet.storage._recover`) never touches a user's file in a shared
``--out``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pteenet.errors import BundleError

__all__ = ["atomic_path", "fsync", "follow_umask", "is_temp", "os_error", "sha256_file",
           "temp_beside", "unwritable", "write_text"]

_TEMP = re.compile(r"^\..+\.pteenet-[a-z0-9_]{8}\.tmp$")  # what temp_beside names
_OS_ERROR = re.compile(r"\(os error (\d{1,4})\)")  # how Rust's std::io::Error ends its text
#: Errors that say the disk, not the data, failed a write: a full disk or quota, a file too
#: large for it, a file system turned read-only.
_NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def unwritable(folder: Path, e: OSError) -> BundleError:
    """The one line for a folder we cannot write into (permissions, a full disk)."""
    return BundleError(f"cannot write into {folder} ({e.strerror or e}); check its permissions "
                       f"and free space, or write somewhere else")


def os_error(e: BaseException) -> OSError | None:
    """The operating-system error behind ``e``: ``e`` itself, or the one a library reports in
    its own type (safetensors raises ``SafetensorError("... No space left on device (os error
    28)")``), so a full disk is one "cannot write" line whoever wrote the file; else None."""
    if isinstance(e, OSError):
        return e
    found = _OS_ERROR.search(str(e))
    if found is None:
        return None
    code = int(found.group(1))
    return OSError(code, os.strerror(code))


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
    except Exception as e:
        cause = os_error(e)
        if cause is not None and cause.errno in _NO_ROOM:
            raise unwritable(target.parent, cause) from e
        raise
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
