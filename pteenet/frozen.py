"""Frozen inference graphs: the backbone's segments as TorchScript graphs built for CPU inference.

At batch 1 on a CPU an eager CIFAR ResNet spends most of its time around the arithmetic, not in
it: each convolution reorders its input and its weights into oneDNN's blocked layout and back,
and each BatchNorm is an op of its own. ``torch.jit.freeze`` folds every BatchNorm into its
convolution's weights, and ``torch.jit.optimize_for_inference`` keeps activations in oneDNN's
layout with the weights packed once: ResNet-44 ran 1.9x faster at batch 1 and at batch 256 on 2
cores. That layout is kept only where it pays (:func:`layout_pays`): EfficientNet and ConvNeXt
run merely frozen. The segments of a frozen backbone never change, so this is done once per
input shape.

Each piece is traced on one real input, frozen, optimized, and checked against the eager piece
at two batch sizes; a piece that fails any step (data-dependent control flow, an op the tracer
cannot record, a shape baked in as a constant, a mismatch) runs eager. TorchScript is deprecated
in favour of ``torch.compile``, which was faster again (3x) but compiled ResNet-44 for 18 s and
needs a C++ compiler; its deprecation warnings are silenced here, and a torch without
``torch.jit`` runs every piece eager.

The branches are traced but not frozen (:func:`trace_exact`): their scores must equal those
calibration measured, bit for bit, and their weights may still train.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["direct", "freeze", "freeze_all", "frozen_applies", "layout_pays", "trace_exact"]

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
    """``module`` (in eval mode, weights fixed) as a frozen, inference-optimized graph, checked
    on ``example`` (one image) and a batch of two; the eager module where any step fails."""

    def build(one: Tensor) -> Callable[[Tensor], Tensor]:
        def frozen() -> torch.jit.ScriptModule:
            return torch.jit.freeze(torch.jit.trace(module.eval(), one, check_trace=False))

        optimized = torch.jit.optimize_for_inference(frozen())  # in place: trace it again below
        return optimized if layout_pays(optimized.graph) else frozen()

    return _checked(module, example, build, _close)


def layout_pays(graph: torch.Graph) -> bool:
    """Whether an optimized graph's oneDNN layout pays: no more copies between layouts than
    convolutions that run in it.

    ``optimize_for_inference`` keeps convolutions in oneDNN's blocked layout but copies the map
    out and back around each op oneDNN lacks (a squeeze-excite's mean and product, a
    LayerNorm, a permute). Measured per segment on 2 cores, the optimized graph beat the merely
    frozen one wherever copies <= convolutions (MobileNetV3 at batch 8: up to 1.4x; CIFAR
    ResNet-44's first segment at batch 256: 1.5x, its others level within noise) and lost where
    they outnumber them (EfficientNet-B0: 18 copies for 9 convolutions, 1.2x slower; ConvNeXt-T,
    whose work is in matmuls: up to 1.3x slower). A rule, not a timing, so that every run (and
    every rank) builds the same graphs."""
    kinds = [node.kind() for node in graph.nodes()]
    copies = kinds.count("aten::to_mkldnn") + kinds.count("aten::to_dense")
    return copies <= kinds.count("prim::mkldnn_convolution")


def trace_exact(module: nn.Module, example: Tensor) -> Callable[[Tensor], Any]:
    """``module`` as a traced graph that computes exactly what it does: the same ops without
    Python's dispatch of each submodule (a CIFAR ResNet branch: 57 -> 42 us at batch 1).

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
