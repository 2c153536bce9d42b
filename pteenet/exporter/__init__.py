"""Export to ONNX or TorchScript, one graph per segment and branch plus a manifest."""

from pteenet._face import lazy_face

_NAMES = {
    "MANIFEST": "_export",
    "MANIFEST_VERSION": "_export",
    "export": "_export",
    "export_model": "_export",
    "manifest_for": "_export",
    "MIN_OPSET": "_single_graph",
    "single_graph": "_single_graph",
}
__all__ = sorted(_NAMES)
__getattr__, __dir__ = lazy_face(__name__, _NAMES)
