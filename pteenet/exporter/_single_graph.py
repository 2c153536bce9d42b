"""The batch-1 cascade as one ONNX graph: nested ``If`` nodes instead of one session per piece.

:mod:`pteenet.exporter` writes one graph per segment and per branch, so that a runtime can feed
only the samples still in flight to the next segment (batch compaction). At batch 1 there is
nothing to compact, and the price of that design is all overhead: each ``session.run`` and
each exit's numpy calls add to a sample that goes the whole way (timings:
``benchmarks/results/design-timings.md``). This graph runs the same pieces
in one session: after each active exit an ``If`` answers with the branch's logits when its score
reaches the threshold of its predicted class, or runs the rest of the cascade in its
``else`` branch. Segments between two active exits are chained without a boundary, and each
``If`` branch holds the weights of the pieces it runs: onnxruntime pre-packs a graph's own
weights only, and with every weight at the top level a whole pass ran far slower than the
backbone.

The graph reads the thresholds as an input (``thresholds``, ``[B, K]`` float32, inf = never),
so the runtime's table applies, but *which* branches it contains is fixed at export: the exits
active then. The runtime uses it only for single images under a table with the same active
exits, and the per-piece graphs otherwise. Valid for one image at a time only: with several,
one that stays would hold back the others. Built from the exported pieces themselves, so both
paths run the same operators on the same weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["MIN_OPSET", "single_graph"]

MIN_OPSET = 12  # GreaterOrEqual


def single_graph(segments: Sequence[Any], branches: Sequence[Any], active: Sequence[bool],
                 num_classes: int) -> Any:
    """The nested-``If`` cascade from the exported ``segments`` (``B + 1`` ONNX models) and
    ``branches`` (``B``, outputs ``logits``, ``score``), with the ``active`` exits only.

    Inputs ``input`` (the image, batch 1) and ``thresholds``; outputs ``logits`` ``[1, K]``
    and ``exit_index`` ``[1]`` (int64; ``B`` for the backbone's head)."""
    from onnx import TensorProto, compose, helper

    segs = [compose.add_prefix(m, f"s{k}_") for k, m in enumerate(segments)]
    brs = [compose.add_prefix(m, f"b{k}_") for k, m in enumerate(branches)]
    exits = [k for k, on in enumerate(active) if on]
    weights: dict[str, list[Any]] = {}  # per (sub)graph: the weights of the pieces it runs

    def piece(model: Any, feed: str, where: str) -> tuple[list[Any], list[str]]:
        """The piece's nodes reading ``feed`` for its input, and its output names; its weights
        go to the graph ``where`` that runs it (onnxruntime pre-packs only a graph's own)."""
        weights.setdefault(where, []).extend(model.graph.initializer)
        own = model.graph.input[0].name
        nodes = []
        for node in model.graph.node:
            node = _copy(node)
            node.input[:] = [feed if name == own else name for name in node.input]
            nodes.append(node)
        return nodes, [o.name for o in model.graph.output]

    def chain(first: int, last: int, feed: str, where: str) -> tuple[list[Any], str]:
        nodes: list[Any] = []
        for k in range(first, last + 1):
            more, (feed,) = piece(segs[k], feed, where)
            nodes += more
        return nodes, feed

    def level(j: int, feed: str) -> tuple[list[Any], str, str]:
        """Nodes from exit ``exits[j - 1]``'s map on; their (logits, exit index) outputs."""
        start, where = (exits[j - 1] + 1, f"L{j - 1}_else") if j else (0, "main")
        if j == len(exits):  # past the last active exit: the backbone's own head answers
            nodes, out = chain(start, len(segments) - 1, feed, where)
            exit_name = f"L{j}_exit"
            nodes.append(_constant(helper, TensorProto, exit_name, len(branches)))
            return nodes, out, exit_name
        k = exits[j]
        nodes, h = chain(start, k, feed, where)
        more, (logits, score) = piece(brs[k], h, where)
        nodes += more
        p = f"L{j}_"
        nodes += [
            _constant(helper, TensorProto, p + "k", k, scalar=True),
            helper.make_node("Gather", ["thresholds", p + "k"], [p + "row"], axis=0),
            helper.make_node("ArgMax", [logits], [p + "cls"], axis=1, keepdims=0),
            helper.make_node("Gather", [p + "row", p + "cls"], [p + "thr"], axis=0),
            helper.make_node("GreaterOrEqual", [score, p + "thr"], [p + "leave"]),
        ]
        rest, rest_logits, rest_exit = level(j + 1, h)
        here = [helper.make_node("Identity", [logits], [p + "then_logits"]),
                _constant(helper, TensorProto, p + "then_exit", k)]
        then = _subgraph(helper, TensorProto, p + "then", here, p + "then_logits",
                         p + "then_exit", [])
        other = _subgraph(helper, TensorProto, p + "else", rest, rest_logits, rest_exit,
                          weights.get(p + "else", []))
        nodes.append(helper.make_node("If", [p + "leave"], [p + "logits", p + "exit"],
                                      then_branch=then, else_branch=other))
        return nodes, p + "logits", p + "exit"

    nodes, logits, exit_name = level(0, "input")
    nodes += [helper.make_node("Identity", [logits], ["logits"]),
              helper.make_node("Identity", [exit_name], ["exit_index"])]
    image = segments[0].graph.input[0]
    graph = helper.make_graph(
        nodes, "pteenet_cascade_batch1",
        [image, helper.make_tensor_value_info("thresholds", TensorProto.FLOAT,
                                              [len(branches), num_classes])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, num_classes]),
         helper.make_tensor_value_info("exit_index", TensorProto.INT64, [1])],
        initializer=weights["main"])
    model = helper.make_model(graph, opset_imports=list(segments[0].opset_import))
    model.ir_version = segments[0].ir_version
    return model


def _copy(node: Any) -> Any:
    out = type(node)()
    out.CopyFrom(node)
    return out


def _constant(helper: Any, tp: Any, name: str, value: int, scalar: bool = False) -> Any:
    tensor = helper.make_tensor(name + "_value", tp.INT64, [] if scalar else [1], [value])
    return helper.make_node("Constant", [], [name], value=tensor)


def _subgraph(helper: Any, tp: Any, name: str, nodes: list[Any], logits: str, exit_name: str,
              initializer: list[Any]) -> Any:
    return helper.make_graph(nodes, name, [],
                             [helper.make_tensor_value_info(logits, tp.FLOAT, None),
                              helper.make_tensor_value_info(exit_name, tp.INT64, None)],
                             initializer=initializer)
