"""Values that may cross a cut: what a later segment can compute again without its input.

A cut point is where one tensor is the only live value, but traced transformers keep other
values alive across their blocks that carry no information about the image: tables built from
parameters alone (EVA's rotary embedding), and sizes read from a tensor's shape (PiT's and
Twins' ``B, C, H, W`` kept to fold tokens back into a map). Counting those as live leaves such a
model without a cut between its stem and its head. So a segment rebuilds them instead: a value
of parameters alone is computed again; a size is the batch (first axis) of the segment's own
input, or a number fixed by the input size the backbone was traced at, as every segment is.
"""

from __future__ import annotations

import operator

from torch import fx

__all__ = ["BATCH", "CONST", "free_values", "rebuild"]

CONST = "const"  # computed from parameters alone: copy the computation into the segment
BATCH = "batch"  # the batch size: the first axis of the segment's input


def _size_read(n: fx.Node) -> tuple[fx.Node, int] | None:
    """(tensor, axis) where ``n`` is ``t.shape[axis]`` or ``t.size(axis)``."""
    if n.op == "call_method" and n.target == "size" and len(n.args) == 2:
        t, axis = n.args
        return (t, axis) if isinstance(t, fx.Node) and isinstance(axis, int) else None
    if n.op == "call_function" and n.target is operator.getitem and isinstance(n.args[1], int):
        src = n.args[0]
        if isinstance(src, fx.Node) and (
                (src.op == "call_function" and src.target is getattr and src.args[1] == "shape")
                or (src.op == "call_method" and src.target == "size" and len(src.args) == 1)):
            return src.args[0], n.args[1]
    return None


def free_values(graph: fx.Graph, values: dict[str, object]) -> dict[fx.Node, object]:
    """Nodes that do not pin a cut, each with how a segment rebuilds it: :data:`CONST`,
    :data:`BATCH`, or the int it held at the traced input size (``values``: each node's
    output from the profiling run, batch 1)."""
    free: dict[fx.Node, object] = {}
    for n in graph.nodes:
        if n.op == "get_attr" or (n.op in ("call_function", "call_method") and n.all_input_nodes
                                  and all(free.get(a) == CONST for a in n.all_input_nodes)):
            free[n] = CONST
            continue
        read = _size_read(n)
        value = values.get(n.name)
        if read is None or not isinstance(value, int) or isinstance(value, bool):
            continue
        if read[1] == 0:
            if value == 1:  # the profiling batch: a first axis that grows with the batch
                free[n] = BATCH
        else:
            free[n] = value
    return free


def rebuild(a: fx.Node, how: object, g: fx.Graph, start: fx.Node | None, lookup) -> object:
    """``a`` in segment graph ``g`` (whose input placeholder is ``start``)."""
    if how == CONST:
        return g.node_copy(a, lookup)
    if how == BATCH:
        if start is None:
            raise KeyError(a.name)
        return g.call_method("size", (start, 0))
    return how
