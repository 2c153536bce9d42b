"""Frozen inference graphs: the backbone's segments as TorchScript graphs built for CPU inference.

At batch 1 on a CPU an eager CIFAR ResNet spends most of its time around the arithmetic, not in
it: each convolution reorders its input and its weights into oneDNN's blocked layout and back,
and each BatchNorm is an op of its own. ``torch.jit.freeze`` folds every BatchNorm into its
convolution's weights, and ``torch.jit.optimize_for_inference`` keeps activations in oneDNN's
layout with the weights packed once: ResNet-44 ran 1.9x faster at batch 1 and at batch 256 on 2
cores. The segments of a frozen backbone never change, so this is done once per input shape.

Each piece is traced on one real input, frozen, optimized, and checked against the eager piece
at two batch sizes; a piece that fails any step (data-dependent control flow, an op the tracer
cannot record, a shape baked in as a constant, a mismatch) runs eager. TorchScript is deprecated
in favour of ``torch.compile``, which was faster again (3x) but compiled ResNet-44 for 18 s and
needs a C++ compiler; its deprecation warnings are silenced here, and a torch without
``torch.jit`` runs every piece eager.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["freeze", "freeze_all", "frozen_applies"]

RTOL = 1e-3  # a frozen piece's output may differ from the eager one by BN folding's rounding


def frozen_applies(x: Tensor) -> bool:
    """Whether frozen graphs serve input ``x``: float32 on a CPU (oneDNN's kernels), no grad."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()


def freeze(module: nn.Module, example: Tensor) -> Callable[[Tensor], Tensor]:
    """``module`` (in eval mode, weights fixed) as a frozen, inference-optimized graph, checked
    on ``example`` (one image) and a batch of two; the eager module where any step fails."""
    one = example[:1]
    two = torch.cat([one, one.flip(-1)])
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")
            one, two = one.clone(), two.clone()
            graph = torch.jit.optimize_for_inference(torch.jit.freeze(
                torch.jit.trace(module.eval(), one, check_trace=False)))
            ok = all(_close(graph(x), module(x)) for x in (one, two))
    except Exception:  # noqa: BLE001 - any failure to trace or run means: run it eager
        return module
    return graph if ok else module


def freeze_all(modules: Sequence[nn.Module], example: Tensor) -> list[Callable[[Tensor], Tensor]]:
    """Each module frozen on its real input: the previous ones' output for ``example``."""
    out, x = [], example[:1]
    with torch.no_grad():
        for m in modules:
            out.append(freeze(m, x))
            x = m(x)
    return out


def _close(a: object, b: object) -> bool:
    """Equal structure, and tensors equal up to ``RTOL`` of the eager output's scale."""
    if isinstance(b, Tensor):
        if not isinstance(a, Tensor) or a.shape != b.shape or a.dtype != b.dtype:
            return False
        scale = float(b.abs().max()) if b.numel() else 0.0
        return bool((a - b).abs().max() <= RTOL * (scale + 1e-6)) if b.numel() else True
    if isinstance(b, (tuple, list)):
        return isinstance(a, (tuple, list)) and len(a) == len(b) and \
            all(_close(p, q) for p, q in zip(a, b))
    return False
