"""Run an exported cascade with true early exit: numpy and onnxruntime, no torch."""

from pteenet._face import lazy_face

_NAMES = {
    "Cascade": "_cascade",
    "CascadeResult": "_cascade",
    "MANIFEST": "_cascade",
}
__all__ = sorted(_NAMES)
__getattr__, __dir__ = lazy_face(__name__, _NAMES)
