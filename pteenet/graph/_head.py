"""The backbone's own classifier: the linear layer that turns its pooled pre-logits into logits.

Feature-distillation exits (the ``distill`` branch type, :mod:`pteenet.cascade`) map a cut's
features into the backbone's pre-logit space and answer through this layer, frozen: the 1,000
ImageNet classes then come with the backbone's own weights instead of being learned from a few
thousand pool images. Training them needs the pre-logits as targets, which
:func:`pre_logit_segment` computes from the last cut's map.

Found on the traced graph, so every family is read the same way: the output must be a linear
layer (``nn.Linear`` kept whole, timm's subclass traced into ``F.linear``) applied to a 2-D
vector (timm ``forward_head(pre_logits=True)``, torchvision's ``fc`` / ``classifier[-1]``, the
CIFAR ResNets' ``linear``). Anything else (a convolutional head, a tuple output) has no head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from pteenet.graph._split import node_of, segment
from pteenet.graph._tracing import Trace

__all__ = ["LinearHead", "find_head", "pre_logit_segment"]


@dataclass(frozen=True)
class LinearHead:
    """The backbone's final linear layer: its tensors (the backbone's own, not copies) and the
    fx node whose output is its input (the pre-logits)."""

    weight: torch.Tensor  # [K, D]
    bias: torch.Tensor | None  # [K]
    pre_node: str

    @property
    def dim(self) -> int:
        return int(self.weight.shape[1])

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0])


def _attr(gm: fx.GraphModule, target: str) -> object:
    obj: object = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _linear_of(gm: fx.GraphModule, n: fx.Node) -> tuple[torch.Tensor, torch.Tensor | None,
                                                        fx.Node] | None:
    """(weight, bias, input node) where ``n`` is a linear layer on one node, else None."""
    if n.op == "call_module":
        mod = _attr(gm, str(n.target))
        if isinstance(mod, nn.Linear) and len(n.args) == 1 and isinstance(n.args[0], fx.Node):
            return mod.weight, mod.bias, n.args[0]
        return None
    if n.op == "call_function" and n.target in (F.linear, torch._C._nn.linear):
        x = n.args[0] if n.args else n.kwargs.get("input")
        w = n.args[1] if len(n.args) > 1 else n.kwargs.get("weight")
        b = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
        if not (isinstance(x, fx.Node) and isinstance(w, fx.Node) and w.op == "get_attr"):
            return None
        if b is not None and not (isinstance(b, fx.Node) and b.op == "get_attr"):
            return None
        return _attr(gm, str(w.target)), None if b is None else _attr(gm, str(b.target)), x
    return None


def find_head(trace: Trace) -> LinearHead | None:
    """The linear classifier the backbone ends in, or None where it ends otherwise."""
    gm = trace.graph_module
    out = next(n for n in gm.graph.nodes if n.op == "output")
    last = out.args[0]
    if not isinstance(last, fx.Node):  # a tuple or dict output: not a plain classifier
        return None
    found = _linear_of(gm, last)
    if found is None:
        return None
    w, b, pre = found
    if not isinstance(w, torch.Tensor) or w.ndim != 2:
        return None
    return LinearHead(w, b, pre.name)


def pre_logit_segment(trace: Trace, last_cut: str, head: LinearHead) -> fx.GraphModule:
    """The backbone from ``last_cut``'s map to the pre-logits (everything but the classifier):
    what a feature-distillation exit is trained to reproduce."""
    gm = trace.graph_module
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    start = node_of(gm, trace.cut(last_cut).node or last_cut)
    end = node_of(gm, head.pre_node)
    return segment(gm, nodes, pos, start, end, trace.free)
