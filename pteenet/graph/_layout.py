"""Layouts: how a cut holds its feature map, read from the ops around it in the traced graph.

A 4-D tensor is not always [N, C, H, W]: Swin, MaxViT and PVT keep their maps channels-last
([N, H, W, C], so LayerNorm and Linear act on the last axis), and a transformer's residual
stream is [N, T, C]. Reading a channels-last map as [C, H, W] pools the height axis as channels
(a branch that trains, on the wrong numbers). So the layout is read from the graph: a map whose
last axis is normalised by a LayerNorm or mixed by a Linear of that width, within a few
shape-preserving steps up or down the graph, is channels-last (``hwc``), and a 3-D tensor is a
token map (``tc``) only under the same evidence. A tensor whose first axis is not the batch (a
window-partitioned [N * windows, tokens, C]) is no cut at all: an exit cannot pool one image.
"""

from __future__ import annotations

from torch import fx, nn
from torch.nn import functional as F

__all__ = ["LAYOUTS", "layout_of"]

LAYOUTS = ("chw", "hwc", "tc")  # [N, C, H, W]; [N, H, W, C]; tokens [N, T, C]
DEPTH = 4  # steps up or down the graph searched for an op that reads the last axis


def _reads_last_axis(n: fx.Node, width: int, modules: dict[str, nn.Module],
                     shapes: dict[str, tuple[int, ...] | None]) -> bool:
    """Whether ``n`` is a LayerNorm over, or a Linear into or out of, a last axis of ``width``."""
    if n.op == "call_module":
        m = modules.get(str(n.target))
        if isinstance(m, nn.Linear):
            return width in (m.in_features, m.out_features)
        if isinstance(m, nn.LayerNorm):
            return tuple(m.normalized_shape) == (width,)
        return False
    if n.op == "call_function" and n.target is F.layer_norm:
        shape = n.args[1] if len(n.args) > 1 else n.kwargs.get("normalized_shape")
        return isinstance(shape, (tuple, list)) and tuple(shape) == (width,)
    if n.op == "call_function" and n.target is F.linear:
        ends = [shapes.get(a.name) for a in n.all_input_nodes[:1]] + [shapes.get(n.name)]
        return any(e and e[-1] == width for e in ends)
    return False


def _last_axis_read(node: fx.Node, shapes: dict[str, tuple[int, ...] | None],
                    modules: dict[str, nn.Module]) -> bool:
    """Whether an op reading the last axis lies within :data:`DEPTH` steps of ``node``, through
    tensors whose last axis keeps ``node``'s width."""
    width = (shapes.get(node.name) or (0,))[-1]
    seen, frontier = {node}, [node]
    for _ in range(DEPTH):
        nxt = []
        for v in frontier:
            for u in [*v.users, *v.all_input_nodes]:
                if u in seen:
                    continue
                seen.add(u)
                if _reads_last_axis(u, width, modules, shapes):
                    return True
                shape = shapes.get(u.name)
                if shape and shape[-1] == width:
                    nxt.append(u)
        frontier = nxt
    return False


def layout_of(node: fx.Node, shapes: dict[str, tuple[int, ...] | None],
              modules: dict[str, nn.Module], batch: int = 1) -> str | None:
    """The layout of cut ``node`` (one of :data:`LAYOUTS`), or ``None`` where it holds no map an
    exit can read: not 3-D or 4-D, a first axis that is not the batch (window-partitioned), or a
    3-D tensor with nothing reading its last axis as channels."""
    shape = shapes.get(node.name)
    if shape is None or len(shape) not in (3, 4) or shape[0] != batch:
        return None
    if len(shape) == 3:
        return "tc" if shape[1] > 1 and _last_axis_read(node, shapes, modules) else None
    return "hwc" if _last_axis_read(node, shapes, modules) else "chw"
