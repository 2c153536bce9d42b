"""Export to ONNX or TorchScript, one graph per segment and branch plus a manifest."""

from pteenet.exporter._export import (
    FORMATS,
    MANIFEST,
    MANIFEST_VERSION,
    export,
    manifest_for,
)
from pteenet.exporter._single_graph import (
    MIN_OPSET,
    single_graph,
)

__all__ = [
    "FORMATS",
    "MANIFEST",
    "MANIFEST_VERSION",
    "MIN_OPSET",
    "export",
    "manifest_for",
    "single_graph",
]
