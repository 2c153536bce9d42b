"""Run an exported cascade with true early exit: numpy and onnxruntime, no torch."""

from pteenet.runtime._cascade import (
    MANIFEST,
    Cascade,
    CascadeResult,
)

__all__ = [
    "Cascade",
    "CascadeResult",
    "MANIFEST",
]
