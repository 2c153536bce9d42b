"""Atomic file writes: temp files in the same folder, fsync, then rename over the targets.

A crash or Ctrl-C at any moment leaves either the old files or the new ones, never half of one.
:func:`atomic_paths` does the same for a group of files that belong together (a bundle's
branches and its threshold table): all are written first, then renamed together; if a rename
fails or is interrupted, the ones already renamed are rolled back from hard-link backups.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

__all__ = ["atomic_path", "atomic_paths", "write_text"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp_beside(target: Path, suffix: str = ".tmp") -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; written files follow the umask
    return Path(tmp)


def _backup(target: Path) -> Path:
    """A hard link to the current file, so it can be put back without copying."""
    path = _temp_beside(target, ".bak")
    path.unlink()
    os.link(target, path)
    return path


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_paths(targets: Sequence[str | os.PathLike]) -> Iterator[list[Path]]:
    """Yield temp paths beside ``targets``; on success they replace the targets as a group."""
    targets = [Path(t) for t in targets]
    temps: list[Path] = []
    backups: dict[Path, Path] = {}
    done: list[Path] = []
    try:
        temps = [_temp_beside(t) for t in targets]
        yield temps
        for tmp in temps:
            _fsync(tmp)
        for t in targets:
            if t.is_file():
                backups[t] = _backup(t)
        for tmp, t in zip(temps, targets):
            os.replace(tmp, t)
            done.append(t)
    except BaseException:
        for t in reversed(done):  # roll back what was already renamed
            if t in backups:
                os.replace(backups.pop(t), t)
            else:
                t.unlink(missing_ok=True)
        raise
    finally:
        for p in [*temps, *backups.values()]:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``target``; on success it replaces ``target`` atomically."""
    with atomic_paths([target]) as (tmp,):
        yield tmp


def _write(target: str | os.PathLike, writer: Callable[[Path], None]) -> None:
    with atomic_path(target) as tmp:
        writer(tmp)


def write_text(target: str | os.PathLike, text: str) -> None:
    _write(target, lambda p: p.write_text(text, encoding="utf-8"))
