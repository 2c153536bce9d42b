"""Writing a torch module as an ONNX graph: what the exporter and bench's onnxruntime baseline
share.

The TorchScript-based exporter (``dynamo=False``) needs no onnxscript and works offline, and
``nn.MultiheadAttention``'s inference fast path is switched off while it traces: that path is one
fused op ONNX has no symbol for (torchvision ``vit_b_16`` failed to export), and the unfused path
computes the same attention.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["ONNX_OPSET", "save_onnx"]

ONNX_OPSET = 17


def save_onnx(module: nn.Module, example: tuple[torch.Tensor, ...], path: str | os.PathLike,
              inputs: Sequence[str], outputs: Sequence[str], opset: int = ONNX_OPSET) -> None:
    """Export ``module`` traced on ``example`` to ``path``, every input and output with a
    dynamic batch axis. The tracer's and exporter's warnings (constant folding skipped on a
    strided slice, traced shapes taken as constants) concern no graph written here and would
    reach a bench or export user as pages of torch internals: they are silenced."""
    axes = {name: {0: "batch"} for name in [*inputs, *outputs]}
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, example, str(path), input_names=list(inputs),
                              output_names=list(outputs), dynamic_axes=axes,
                              opset_version=opset, dynamo=False, do_constant_folding=True)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
