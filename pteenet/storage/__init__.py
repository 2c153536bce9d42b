"""Files that are never half-written: atomic writes, the writer lock, the commit manifest."""

from pteenet._face import lazy_face

_NAMES = {
    "CACHE_PREFIX": "_atomic",
    "LOCK_FILE": "_atomic",
    "MANIFEST": "_atomic",
    "MANIFEST_VERSION": "_atomic",
    "PAUSE_ENV": "_atomic",
    "PENDING_SUFFIX": "_atomic",
    "atomic_path": "_atomic",
    "commit_files": "_atomic",
    "parse_manifest": "_atomic",
    "pause_point": "_atomic",
    "read_manifest": "_atomic",
    "read_member": "_atomic",
    "recover": "_atomic",
    "sha256_file": "_atomic",
    "write_text": "_atomic",
    "writer_lock": "_atomic",
    "writes_into": "_atomic",
}
__all__ = sorted(_NAMES)
__getattr__, __dir__ = lazy_face(__name__, _NAMES)
