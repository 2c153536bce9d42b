"""Splitting a traced backbone into segments at its cuts.

Each segment is an ``fx.GraphModule`` over the traced graph's own submodules (shared, not
copied): the early-exit model runs them in turn and hands each cut's tensor to its branch. A
value that crosses a cut must be the cut's tensor itself; parameters and sizes read from shapes
are rebuilt inside the later segment (:mod:`pteenet.graph._free`).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import fx

from pteenet.errors import TraceError
from pteenet.graph._free import BATCH, rebuild
from pteenet.graph._tracing import Trace

__all__ = ["node_of", "segment", "split_at"]


def node_of(gm: fx.GraphModule, cut: str) -> fx.Node:
    for n in gm.graph.nodes:
        if n.name == cut or (n.op == "call_module" and n.target == cut):
            return n
    raise TraceError(f"'{cut}' is not a node of the traced backbone; see `pteenet inspect`")


def split_at(trace: Trace, cut_names: Sequence[str]) -> list[fx.GraphModule]:
    """Split the traced backbone at ``cut_names`` (in order) into ``len(cut_names) + 1`` segments.

    Segment 0 takes the image and returns the first cut's tensor; segment k takes cut k-1's
    tensor; the last returns the backbone's output. Submodules are shared, not copied.
    """
    gm = trace.graph_module
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    bounds = [node_of(gm, trace.cut(c).node or c) for c in cut_names]
    if any(pos[a] >= pos[b] for a, b in zip(bounds, bounds[1:])):
        raise TraceError("cut points must be distinct and ordered from input to output")
    starts = [None, *bounds]
    ends = [*bounds, nodes[-1]]
    return [segment(gm, nodes, pos, s, e, trace.free) for s, e in zip(starts, ends)]


def segment(gm: fx.GraphModule, nodes: list[fx.Node], pos: dict[fx.Node, int],
             start: fx.Node | None, end: fx.Node, free: dict[str, object]) -> fx.GraphModule:
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    first = 0
    if start is not None:
        env[start] = g.placeholder("x")
        first = pos[start] + 1

    def lookup(a: fx.Node) -> object:
        if a not in env:  # a parameter, a value of parameters alone, a size: rebuilt here
            if a.name not in free or (free[a.name] == BATCH and start is None):
                raise TraceError(f"node '{a.name}' crosses the cut; this is not a valid split")
            env[a] = rebuild(a, free[a.name], g, env.get(start), lookup)
        return env[a]

    for n in nodes[first: pos[end] + 1]:
        if n.op == "output":
            g.node_copy(n, lookup)
            break
        env[n] = g.node_copy(n, lookup)
    if end.op != "output":
        g.output(env[end])
    g.lint()
    return fx.GraphModule(gm, g, "Segment")
