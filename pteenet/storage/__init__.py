"""Files that are never half-written: atomic writes, the writer lock, the commit manifest."""

from pteenet._face import lazy_face

_NAMES = {
    "CACHE_PREFIX": "_recover",
    "LOCK_FILE": "_lock",
    "MANIFEST": "_manifest",
    "MANIFEST_VERSION": "_manifest",
    "PAUSE_ENV": "_pause",
    "PENDING_SUFFIX": "_manifest",
    "atomic_path": "_files",
    "commit_files": "_commit",
    "parse_manifest": "_manifest",
    "pause_point": "_pause",
    "read_manifest": "_manifest",
    "read_member": "_manifest",
    "recover": "_recover",
    "sha256_file": "_files",
    "write_text": "_files",
    "writer_lock": "_lock",
    "writes_into": "_lock",
}
__all__ = sorted(_NAMES)
__getattr__, __dir__ = lazy_face(__name__, _NAMES)
