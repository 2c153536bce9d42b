"""Crash-safe writes: single files, groups of files with one commit point, and the writer lock.

* :func:`atomic_path` / :func:`write_text`: a temp file in the same folder, fsync, rename over the
  target. A crash at any moment leaves the old file or the new one, never half of one.
* :func:`commit_files`: a group of files that belong together (a bundle's branches and its
  threshold table). Renaming several files is several steps, and a kill between two renames
  would pair new with old, so the group gets **one commit point**: every new file is first
  written beside its target as ``.<name>.pteenet-new``, then the manifest ``bundle.json`` (each
  member's SHA-256 and size) is renamed into place -- that rename is the commit -- and only then
  are the pending files renamed over the targets. Readers (:func:`read_member`) take each
  member from whichever of ``<name>`` and its pending file matches the manifest, so after a
  kill at any step they see exactly the old group (not yet committed) or exactly the new one
  (committed, renames still pending); the next writer finishes or discards what a killed one
  left.
* :func:`writer_lock`: one writer per folder. An exclusive ``fcntl.flock`` on ``.pteenet.lock``
  (holding the pid, so a second writer can say who holds it), re-entrant within a process. It is
  also the writability check, made before any work, and where leftovers of killed writers (temp
  files, uncommitted pending files, feature caches of dead processes) are swept. Every such
  name is pteenet's own, so a sweep never touches a user's file in a shared ``--out``.

``$PTEENET_PAUSE_DIR`` is the fault-injection hook (:func:`pause_point`): with it set, a writer
announces every step there and waits, so a test can kill it at exactly that step.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import inspect
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pteenet.errors import BundleError

__all__ = [
    "CACHE_PREFIX",
    "LOCK_FILE",
    "MANIFEST",
    "MANIFEST_VERSION",
    "PAUSE_ENV",
    "PENDING_SUFFIX",
    "atomic_path",
    "commit_files",
    "pause_point",
    "parse_manifest",
    "read_manifest",
    "read_member",
    "recover",
    "sha256_file",
    "write_text",
    "writer_lock",
    "writes_into",
]

MANIFEST = "bundle.json"
MANIFEST_VERSION = 1
LOCK_FILE = ".pteenet.lock"
CACHE_PREFIX = ".pteenet-cache-"
PAUSE_ENV = "PTEENET_PAUSE_DIR"
PENDING_SUFFIX = ".pteenet-new"
_TEMP = re.compile(r"^\..+\.pteenet-[a-z0-9_]{8}\.tmp$")  # what _temp_beside names
# Temp and backup files of pteenet versions before bundle.json, named only by their target:
# swept for these targets alone.
_LEGACY_TEMP = re.compile(r"^\.(branches\.safetensors|thresholds\.json|thresholds\.csv|"
                          r"\.attach-state\.pt|bench\.json)\.[a-z0-9_]{8}\.(tmp|bak)$")
_CACHE = re.compile(rf"^{re.escape(CACHE_PREFIX)}(\d+)-.*\.bin$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_held: dict[Path, int] = {}  # folders whose lock this process holds, with the nesting depth

F = TypeVar("F", bound=Callable[..., Any])


# -- single files -----------------------------------------------------------------------------
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp_beside(target: Path, suffix: str = ".tmp") -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.pteenet-", suffix=suffix,
                               dir=target.parent)
    os.close(fd)
    return Path(tmp)


def _follow_umask(path: Path) -> None:
    """Give a finished file the mode any tool's new file gets (0666 less the umask): mkstemp
    makes 0600, and some writers (safetensors) create their file anew with 0600 too."""
    os.chmod(path, 0o666 & ~_umask())


def _fsync(path: Path) -> None:
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
    tmp = _temp_beside(target)
    try:
        yield tmp
        _follow_umask(tmp)
        _fsync(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(target: str | os.PathLike, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


# -- the fault-injection hook -----------------------------------------------------------------
def pause_point(step: str) -> None:
    """With ``$PTEENET_PAUSE_DIR`` set: create ``<dir>/<step>`` and wait until it is removed.

    Lets a test (tests/test_crash_safety.py) stop a writer between any two steps of a commit
    and kill it there. Unset, it costs one environment lookup.
    """
    folder = os.environ.get(PAUSE_ENV)
    if not folder:
        return
    marker = Path(folder) / step
    marker.write_text(str(os.getpid()))
    while marker.exists():
        time.sleep(0.001)


# -- the writer lock --------------------------------------------------------------------------
def _unwritable(folder: Path, e: OSError) -> BundleError:
    return BundleError(f"cannot write into {folder} ({e.strerror or e}); check its permissions "
                       f"and free space, or write somewhere else")


def _acquire(folder: Path) -> int:
    """Lock ``folder/.pteenet.lock`` and write our pid into it; fail at once if it is held."""
    path = folder / LOCK_FILE
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise _unwritable(folder, e) from e
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
        _temp_beside(folder / "probe").unlink()
    except OSError as e:
        raise _unwritable(folder, e) from e


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
        raise _unwritable(folder, e) from e
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


# -- groups of files with one commit point ----------------------------------------------------
def _pending(folder: Path, name: str) -> Path:
    return folder / f".{name}{PENDING_SUFFIX}"


def sha256_file(path: str | os.PathLike) -> str:
    """A file's SHA-256, read in 1 MiB blocks (checkpoints run to gigabytes): manifests and
    bundles record it to notice a file that changed under them."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _entry(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "size": path.stat().st_size}


def _matches(path: Path, entry: Mapping[str, Any]) -> bytes | None:
    """The file's bytes when it has the manifest's size and SHA-256, else None."""
    try:
        if path.stat().st_size != entry["size"]:
            return None
        data = path.read_bytes()
    except OSError:
        return None
    return data if hashlib.sha256(data).hexdigest() == entry["sha256"] else None


def read_manifest(folder: str | os.PathLike) -> dict[str, dict[str, Any]] | None:
    """The committed members (name -> sha256, size), or None for a folder without a manifest
    (a bundle written before manifests existed: its files are read as they are)."""
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


def read_member(folder: str | os.PathLike, name: str, files: Mapping[str, Any] | None,
                fix: str) -> bytes | None:
    """The bytes of member ``name`` as committed, or None when the group has no such file.

    With a manifest the bytes must match it: taken from ``name`` or, when a writer was killed
    after its commit but before its renames, from its pending file. A file that matches neither
    was changed after it was written: :class:`BundleError` naming it and ``fix``.
    """
    folder = Path(folder)
    final = folder / name
    if files is None:
        return final.read_bytes() if final.is_file() else None
    entry = files.get(name)
    if entry is None:
        return None
    for path in (final, _pending(folder, name)):
        data = _matches(path, entry)
        if data is not None:
            return data
    if not final.exists():
        return None
    raise BundleError(f"{final} has changed since pteenet wrote it (its SHA-256 or size differs "
                      f"from {MANIFEST}: edited or copied over?); {fix}")


def commit_files(folder: str | os.PathLike, writers: Mapping[str, Callable[[Path], None]],
                 members: Sequence[str]) -> None:
    """Replace the files ``writers`` names (each writes its file's new contents to the path it
    is given) as one group with one commit point; see the module docstring.

    ``members`` are every file of the group: those not rewritten keep their committed entry
    (hashed from disk for a folder written before manifests existed).
    """
    folder = Path(folder)
    with writer_lock(folder, create=True):
        for name in writers:
            if (folder / name).is_dir():
                raise BundleError(f"{folder / name} is a folder, not a file; remove it and "
                                  f"run again")
        files = _base_entries(folder, [m for m in members if m not in writers])
        pending = [_pending(folder, name) for name in writers]
        try:
            pause_point("start")
            for (name, write), path in zip(writers.items(), pending):
                write(path)
                _follow_umask(path)
                _fsync(path)
                files[name] = _entry(path)
                pause_point(f"wrote-{name}")
            doc = {"format_version": MANIFEST_VERSION, "files": dict(sorted(files.items()))}
            with atomic_path(folder / MANIFEST) as tmp:
                tmp.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
                pause_point(f"wrote-{MANIFEST}")
            _fsync(folder)
            pause_point("committed")
            for name, path in zip(writers, pending):
                os.replace(path, folder / name)
                pause_point(f"renamed-{name}")
            _fsync(folder)
        except BaseException as e:
            if not _committed(folder, files):  # asked of the disk: the rename is the commit
                for path in pending:
                    path.unlink(missing_ok=True)
            if isinstance(e, OSError):  # a full disk, a folder turned read-only meanwhile
                raise _unwritable(folder, e) from e
            raise


def _committed(folder: Path, files: Mapping[str, Any]) -> bool:
    try:
        return read_manifest(folder) == files
    except BundleError:
        return False


def _base_entries(folder: Path, keep: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The committed entries of the members not rewritten (none: a damaged manifest is no
    obstacle to replacing the whole group)."""
    if not keep:
        return {}
    files = read_manifest(folder)
    if files is not None:
        return {name: dict(files[name]) for name in keep if name in files}
    return {name: _entry(folder / name) for name in keep if (folder / name).is_file()}


def recover(folder: str | os.PathLike) -> None:
    """Finish or discard what killed writers left in ``folder`` (call holding its lock).

    A pending file the manifest has committed is renamed into place; any other is removed, as
    are temp files and the feature caches of processes that no longer run.
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
        elif _TEMP.match(name) or _LEGACY_TEMP.match(name) or _dead_cache(name):
            path.unlink(missing_ok=True)
    _fsync(folder)


def _roll_forward(folder: Path, member: str, files: Mapping[str, Any]) -> bool:
    """Rename a committed pending file into place; False when it was never committed."""
    entry = files.get(member)
    if entry is None or _matches(_pending(folder, member), entry) is None:
        return False
    if _matches(folder / member, entry) is not None:
        return False  # already in place: the pending file is a leftover
    os.replace(_pending(folder, member), folder / member)
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
