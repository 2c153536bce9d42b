"""The plain backbone on onnxruntime: on a CPU, the fastest way to run the untouched model.

A speedup over eager torch partly measures the runtime, not early exit: the backbone exported to
ONNX ran a CIFAR ResNet-44 at 0.59 ms per image where eager torch took longer than the early-exit
model (``benchmarks/results/wall-clock.md``). So ``bench`` times this backbone beside the others
and holds the early-exit model against the fastest plain runtime it measured (issue 28): eager
torch, the frozen TorchScript segments in a row, or onnxruntime.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pteenet.cascade._onnx import save_onnx

__all__ = ["PLAIN_RUNTIMES", "onnx_backbone"]

# the models wall_clock times that run the untouched backbone, by name in the timing dict
PLAIN_RUNTIMES = {"backbone": "eager torch", "segments": "TorchScript (frozen segments)",
                  "backbone_onnx": "onnxruntime"}


def onnx_backbone(backbone: nn.Module, input_size: tuple[int, int], threads: int | None = None
                  ) -> tuple[Callable[[Tensor], Any] | None, str | None]:
    """A function that runs ``backbone`` exported to ONNX on onnxruntime's CPU provider, at
    onnxruntime's best (idle workers spin); or None and a one-line note saying why not."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None, ("onnxruntime is not installed (pip install \"pteenet[onnx]\"): the plain "
                      "backbone on onnxruntime, often the fastest on a CPU, was not timed")
    from pteenet.runtime import session_options

    h, w = input_size
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "backbone.onnx"
            with torch.no_grad():
                save_onnx(backbone, (torch.zeros(1, 3, h, w),), path, ["input"], ["output"])
            session = ort.InferenceSession(str(path), session_options(threads, spin=True),
                                           providers=["CPUExecutionProvider"])
    except Exception as e:  # any exporter failure: the other rows still stand
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        return None, (f"the backbone did not export to ONNX ({type(e).__name__}: {first}); it "
                      f"was not timed on onnxruntime")
    return (lambda x: session.run(None, {"input": x.numpy()})), None
