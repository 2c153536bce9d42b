"""onnxruntime in ``bench``: the plain backbone (on a CPU, often the fastest way to run the
untouched model) and the exported cascade (often the fastest way to run the early exits).

A speedup over eager torch partly measures the runtime, not early exit: the backbone exported to
ONNX ran a CIFAR ResNet-44 at 0.59 ms per image where eager torch took longer than the early-exit
model (``benchmarks/results/wall-clock.md``). So ``bench`` times this backbone beside the others
and holds early exit against the fastest plain runtime it measured (issue 28): eager torch, the
frozen TorchScript segments in a row, or onnxruntime; and it times the cascade a deployment would
run, :func:`pteenet.export`'s graphs on :class:`pteenet.runtime.Cascade`, against the same bar.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pteenet.bundle._schema import Bundle
from pteenet.cascade._model import EarlyExitModel
from pteenet.cascade._onnx import save_onnx
from pteenet.exporter._export import export_model

__all__ = ["PLAIN_RUNTIMES", "onnx_backbone", "onnx_cascade"]

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


def onnx_cascade(model: EarlyExitModel, bundle: Bundle, threads: int | None
                 ) -> tuple[Callable[[Tensor], Any] | None, Path | None, str | None]:
    """A function that runs ``model`` (loaded from ``bundle``) exported to ONNX, into a
    temporary folder (the bundle left as it was), on :class:`~pteenet.runtime.Cascade` under
    the model's current table, the one bench measures; the folder (the caller removes it); or
    Nones and a one-line note why not."""
    try:
        import onnxruntime  # noqa: F401 - only whether it is there
    except ImportError:
        return None, None, None  # onnx_backbone's note already says so
    from pteenet.runtime import Cascade

    tmp = Path(tempfile.mkdtemp(prefix="pteenet-bench-"))
    try:
        folder = export_model(model, bundle, tmp / "export-onnx")
        cascade = Cascade.open(folder, threads=threads)
    except Exception as e:  # any exporter failure: the other rows still stand
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        return None, tmp, (f"the cascade did not export to ONNX ({type(e).__name__}: {first}); "
                           f"it was not timed on onnxruntime")
    return (lambda x: cascade.run(x.numpy())), tmp, None
