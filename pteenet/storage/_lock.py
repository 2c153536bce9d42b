"""The writer lock: one writer per folder, taken before any work.

An exclusive ``fcntl.flock`` on ``.pteenet.lock`` (holding the pid, so a second writer can say
who holds it), re-entrant within a process. Taking it is also the writability check, made before
any work, and the moment the leftovers of killed writers are swept
(:func:`pteenet.storage._recover.recover`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import inspect
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from pteenet.errors import BundleError
from pteenet.storage._files import temp_beside, unwritable
from pteenet.storage._recover import recover

__all__ = ["LOCK_FILE", "writer_lock", "writes_into"]

LOCK_FILE = ".pteenet.lock"
_held: dict[Path, int] = {}  # folders whose lock this process holds, with the nesting depth

F = TypeVar("F", bound=Callable[..., Any])


def _open_lock(path: Path) -> int:
    """Open (or create) the lock file, refusing anything but a plain file of ours: the lock is
    truncated and written, so a link planted there (``ln -s ~/notes.txt .pteenet.lock``)
    would have us overwrite whatever it points to. ``O_NOFOLLOW`` refuses a symbolic link at
    the open itself; a hard link, a FIFO or a device is refused after it, before any write."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     0o666)
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise unwritable(path.parent, e) from e
        fd = None
    st = os.fstat(fd) if fd is not None else None
    if st is None or not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or \
            st.st_uid != os.geteuid():
        if fd is not None:
            os.close(fd)
        raise BundleError(f"{path} is not a plain file of this user's (a link, or someone "
                          f"else's?), so pteenet will not write its lock into it; remove it "
                          f"and run again")
    return fd


def _acquire(folder: Path) -> int:
    """Lock ``folder/.pteenet.lock`` and write our pid into it; fail at once if it is held."""
    path = folder / LOCK_FILE
    while True:
        fd = _open_lock(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise BundleError(f"{folder} is being written by another pteenet process (pid "
                              f"{pid[:12]}); wait for it to finish or write elsewhere") from None
        with contextlib.suppress(FileNotFoundError):  # the holder removes the file on release:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:  # then lock the new one instead
                break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _probe(folder: Path) -> None:
    """Create and remove a file: the lock file may predate a folder turning read-only."""
    try:
        temp_beside(folder / "probe").unlink()
    except OSError as e:
        raise unwritable(folder, e) from e


@contextlib.contextmanager
def writer_lock(folder: str | os.PathLike, *, create: bool = False) -> Iterator[Path]:
    """Hold the exclusive writer lock of ``folder`` (made first when ``create``).

    Taking it checks the folder is writable (one clear :class:`BundleError` otherwise, before
    any work) and sweeps what killed writers left. Re-entrant within a process. A path that is
    a file, or a folder that does not exist and is not to be made, is not locked: the caller's
    own check or read reports it. The lock file is removed on release, and so is a folder made
    here and left empty.
    """
    folder = Path(folder)
    if not folder.is_dir() and (folder.exists() or not create):
        yield folder  # nothing to lock: the caller's own read or check reports it
        return
    made = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise unwritable(folder, e) from e
    key = folder.resolve()
    if key in _held:
        _held[key] += 1
        try:
            yield folder
        finally:
            _held[key] -= 1
        return
    fd = _acquire(folder)
    _held[key] = 1
    try:
        _probe(folder)
        recover(folder)
        yield folder
    finally:
        del _held[key]
        (folder / LOCK_FILE).unlink(missing_ok=True)
        os.close(fd)
        if made:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty: a run that failed early leaves nothing


def writes_into(param: str, *, create: bool = False,
                when: str | Callable[[], bool] | None = None) -> Callable[[F], F]:
    """Decorate a function that writes into the folder passed as argument ``param``: it runs
    holding that folder's :func:`writer_lock`; only when ``when`` (the name of a boolean
    argument, or a function of no arguments) says so, if given.

    A decorator, so a writing function takes the lock for its whole run without its body
    changing shape.
    """

    def wrap(fn: F) -> F:
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            wanted = when() if callable(when) else bound.arguments[when] if when else True
            if not wanted:
                return fn(*args, **kwargs)
            with writer_lock(bound.arguments[param], create=create):
                return fn(*args, **kwargs)

        return run  # type: ignore[return-value]

    return wrap
