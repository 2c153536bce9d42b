"""Run an exported cascade with true early exit: numpy and onnxruntime, no torch."""

_NAMES = {
    "Cascade": "_cascade",
    "CascadeResult": "_cascade",
    "MANIFEST": "_manifest",
    "MANIFEST_VERSION": "_manifest",
    "preprocess": "_preprocess",
    "read_manifest": "_manifest",
    "session_options": "_sessions",
}
__all__ = ["MANIFEST", "MANIFEST_VERSION", "Cascade", "CascadeResult", "preprocess",
           "read_manifest", "session_options"]  # = sorted(_NAMES), spelled out for the eager branch
try:
    from pteenet._face import lazy_face
except ImportError:  # this folder copied alone beside an export, outside pteenet: eager names
    from ._cascade import Cascade, CascadeResult
    from ._manifest import MANIFEST, MANIFEST_VERSION, read_manifest
    from ._preprocess import preprocess
    from ._sessions import session_options
else:
    __getattr__, __dir__ = lazy_face(__name__, _NAMES)
