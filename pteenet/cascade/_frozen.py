"""Frozen inference graphs: the backbone's segments as TorchScript graphs built for CPU inference.

At batch 1 on a CPU an eager CIFAR ResNet spends most of its time around the arithmetic, not in
it: each convolution reorders its input and its weights for oneDNN and back, and each BatchNorm
is an op of its own. Each piece here runs channels-last (NHWC: the layout oneDNN's convolutions
compute in, so activations pass from op to op without reorders) as a graph ``torch.jit.freeze``
built, which folds every BatchNorm into its convolution's weights. On 2 cores this beat the
eager backbone by 1.8x (CIFAR ResNet-44, batch 1) to 1.9x (EfficientNet-B0, batch 16), and it
matched or beat ``torch.jit.optimize_for_inference``'s blocked oneDNN layout (used before) on
every backbone measured: 1.35x on ResNet-44 at batch 1, 1.4-1.5x on MobileNetV3 and
EfficientNet-B0 at batch 16, level on ResNet-50 at batch 1 and on ConvNeXt-T, whose work is in
matmuls. The segments of a frozen backbone never change, so this is
done once per input shape.

Each piece is traced on one real input, frozen, and checked against the eager piece at two batch
sizes; a piece that fails any step (data-dependent control flow, an op the tracer cannot record,
a shape baked in as a constant, a mismatch) is tried again in its own layout, then runs eager.
TorchScript is deprecated in favour of ``torch.compile``, which was faster again (3x) but
compiled ResNet-44 for 18 s and needs a C++ compiler; its deprecation warnings are silenced
here, and a torch without ``torch.jit`` runs every piece eager.

The branches are traced but not frozen (:func:`trace_exact`): their scores must equal those
calibration measured, bit for bit, and their weights may still train.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["direct", "freeze", "freeze_all", "frozen_applies", "trace_exact"]

RTOL = 1e-3  # a frozen piece's output may differ from the eager one by BN folding's rounding


def frozen_applies(x: Tensor) -> bool:
    """Whether frozen graphs serve input ``x``: float32 on a CPU (oneDNN's kernels), no grad."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()


def direct(fn: Callable[[Tensor], Any]) -> Callable[[Tensor], Any]:
    """A graph's own ``forward``, called without ``nn.Module.__call__`` (its hook checks and
    Python frames: about a microsecond a call, at batch 1 where a branch is ten ops of two
    or three each); any other callable as it is, so user hooks on eager pieces still run."""
    return fn.forward if isinstance(fn, torch.jit.ScriptModule) else fn


def freeze(module: nn.Module, example: Tensor) -> Callable[[Tensor], Tensor]:
    """``module`` (in eval mode, weights fixed) as a frozen graph, channels-last where its input
    is an image-like map, checked on ``example`` (one image) and a batch of two; frozen in its
    own layout where channels-last fails, the eager module where that fails too."""

    def frozen(piece: Callable[[], nn.Module]) -> Callable[[Tensor], Callable[[Tensor], Tensor]]:
        # made inside the check, so that a module that will not copy runs in its own layout
        return lambda one: torch.jit.freeze(torch.jit.trace(piece().eval(), one,
                                                            check_trace=False))

    if example.dim() == 4:
        graph = _checked(module, example, frozen(lambda: _ChannelsLast(module)), _close)
        if graph is not module:
            return graph
    return _checked(module, example, frozen(lambda: module), _close)


class _ChannelsLast(nn.Module):
    """A copy of ``module`` with its weights channels-last, taking its input channels-last (a
    no-op for the output of the piece before, which already is)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = copy.deepcopy(module).to(memory_format=torch.channels_last)

    def forward(self, x: Tensor) -> Any:
        return self.module(x.contiguous(memory_format=torch.channels_last))


def trace_exact(module: nn.Module, example: Tensor) -> Callable[[Tensor], Any]:
    """``module`` as a traced graph that computes exactly what it does: the same ops without
    Python's dispatch of each submodule, which dominates a small branch at batch 1.

    For the branches: nothing is folded, so their scores equal, bit for bit, those calibration
    measured eagerly, and the graph shares the module's weights, so later training is seen.
    Checked for equality on ``example`` and a batch of two; the eager module otherwise."""

    def build(one: Tensor) -> Callable[[Tensor], Any]:
        return torch.jit.trace(module, one, check_trace=False)

    return _checked(module, example, build, _equal)


def _checked(module: nn.Module, example: Tensor, build: Callable[[Tensor], Callable],
             same: Callable[[object, object], bool]) -> Callable:
    """``build(example)``, kept where it matches ``module`` (``same``) at batch 1 and 2."""
    one = example[:1]
    two = torch.cat([one, one.flip(-1)])
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")
            one, two = one.clone(), two.clone()
            graph = build(one)
            ok = all(same(graph(x), module(x)) for x in (one, two))
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


def _alike(a: object, b: object, tensors: Callable[[Tensor, Tensor], bool]) -> bool:
    """Equal structure (tensors, tuples and lists of them), tensors compared by ``tensors``."""
    if isinstance(b, Tensor):
        return isinstance(a, Tensor) and a.shape == b.shape and a.dtype == b.dtype and \
            tensors(a, b)
    if isinstance(b, (tuple, list)):
        return isinstance(a, (tuple, list)) and len(a) == len(b) and \
            all(_alike(p, q, tensors) for p, q in zip(a, b))
    return False


def _equal(a: object, b: object) -> bool:
    """Equal structure and equal tensors, bit for bit."""
    return _alike(a, b, torch.equal)


def _close(a: object, b: object) -> bool:
    """Equal structure, and tensors equal up to ``RTOL`` of the eager output's scale."""
    return _alike(a, b, lambda x, y: not y.numel() or bool(
        (x - y).abs().max() <= RTOL * (float(y.abs().max()) + 1e-6)))
