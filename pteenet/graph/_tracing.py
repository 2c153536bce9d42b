"""Tracing: where a backbone can be split, and how many FLOPs lie before each split.

The backbone is traced with ``torch.fx``. A *cut point* is a node after which the only live value
is that node's output, so the network can be split there and resumed from that tensor alone
(parameters fetched with ``get_attr``, anything computed from them alone -- EVA's rotary
tables -- and sizes read from shapes do not count: a later segment rebuilds them,
:mod:`pteenet.graph._free`). Only cuts whose
output is a feature map an exit can read are kept, each with its layout (:mod:`pteenet.graph.
_layout`): a convolutional [N, C, H, W] map, a channels-last [N, H, W, C] one (Swin, MaxViT,
PVT) or a transformer's token stream [N, T, C] (ViT, Mixer, PiT's stages); window-partitioned
tensors are refused. Forward arguments after the image that have defaults (timm ViT's
``attn_mask=None``) are traced at those defaults, so they never cross a cut.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` at the aten level, so every
model is counted the same way whatever modules it is built from. thop's module-hook count is
reported beside it because it is the figure most users know; it adds BatchNorm and pooling
(which the aten count leaves out) and cannot see functional ops or module subclasses (timm's
``Linear``, ``BatchNormAct2d``), so the two differ by a few percent, by family (README).

Like torchvision's feature extraction, there are two public steps: *discover*
(:func:`trace_backbone`, which lists the cuts) and *act* (:func:`split_at`, which returns the
segments between chosen cuts). Models that fx cannot trace can name modules with ``cuts=``; their
outputs then become the cut points (the modules are kept whole as fx leaves).
"""

from __future__ import annotations

import copy
import inspect
import operator
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from pteenet.errors import TraceError
from pteenet.graph._flops import flop_counter
from pteenet.graph._free import free_values
from pteenet.graph._layout import layout_of

__all__ = ["Cut", "Trace", "count_flops", "thop_macs", "trace_backbone"]


@dataclass(frozen=True)
class Cut:
    """A place where the backbone can be split: its name and what lies before it.

    ``name`` is a module path where the cut is a module's output (``layer2.3``), as
    torchvision's ``get_graph_node_names`` names nodes; ``node`` is the fx node's own name
    (``relu_14``), what bundles before module-path names recorded, still accepted."""

    name: str
    shape: tuple[int, ...]  # per-sample output shape in ``layout``: (C, H, W), (H, W, C), (T, C)
    flops: int  # cumulative FLOPs per image up to and including this node
    params: int  # cumulative parameters up to and including this node
    node: str = ""  # the fx node's name ("" : the same as ``name``)
    layout: str = "chw"  # one of pteenet.graph.LAYOUTS


@dataclass
class Trace:
    """The traced backbone with its cut points and totals (FLOPs per image)."""

    graph_module: fx.GraphModule
    cuts: list[Cut]
    total_flops: int
    total_params: int
    input_size: tuple[int, int]
    thop_macs: int | None = None
    _index: dict[str, int] = field(default_factory=dict, repr=False)
    model: nn.Module | None = field(default=None, repr=False)  # the eager backbone traced
    free: dict[str, object] = field(default_factory=dict, repr=False)  # node name -> rebuild

    def cut(self, name: str) -> Cut:
        """The cut called ``name``: its module-path name, or its fx node name (old bundles)."""
        by_name = [c for c in self.cuts if c.name == name]
        found = by_name or [c for c in self.cuts if c.node == name]  # a name wins over a node
        if found:
            return found[0]
        raise TraceError(
            f"'{name}' is not a cut point of this backbone; list them with `pteenet inspect`"
        )


def _timm_notrace() -> tuple[tuple[type, ...], tuple[Callable, ...]]:
    """timm's own fx registries: the modules and functions its feature extraction keeps whole
    because fx cannot trace through them (data-dependent control flow). Only when timm is
    loaded, which it is whenever the model came from timm. They live in ``timm.layers``
    (``timm.models._features_fx`` only re-exports them). Names registered as strings are left
    out: fx wraps functions, not names."""
    if "timm" not in sys.modules:
        return (), ()
    from timm.layers import get_notrace_functions, get_notrace_modules

    modules = tuple(m for m in get_notrace_modules() if isinstance(m, type))
    return modules, tuple(f for f in get_notrace_functions() if callable(f))


class _LeafTracer(fx.Tracer):
    """Overrides ``is_leaf_module`` (to keep named modules, and timm's untraceable ones, whole)
    and ``call_module`` (to remember which module was being traced, so a failure can name it)."""

    def __init__(self, leaves: Sequence[str] = ()) -> None:
        self.leaf_types, functions = _timm_notrace()
        super().__init__(autowrap_functions=functions)
        self.leaves = set(leaves)
        self.stack: list[str] = []

    def create_node(self, *args, **kwargs) -> fx.Node:
        """Each node remembers the module whose forward created it (for its cut name)."""
        node = super().create_node(*args, **kwargs)
        node.meta[_SCOPE] = self.stack[-1] if self.stack else ""
        return node

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (qualname in self.leaves or isinstance(m, self.leaf_types)
                or super().is_leaf_module(m, qualname))

    def call_module(self, m, forward, args, kwargs):
        path = self.path_of_module(m)
        self.stack.append(path)
        out = super().call_module(m, forward, args, kwargs)
        self.stack.pop()
        if isinstance(out, fx.Proxy):  # innermost module first: inner calls return first
            out.node.meta.setdefault(_OUTPUT_OF, []).append((path, self.is_leaf_module(m, path)))
        return out


_SCOPE = "pteenet_scope"  # node.meta: the module path whose forward made the node
_OUTPUT_OF = "pteenet_output_of"  # node.meta: (path, is leaf) of each module it is the output of


def _cut_name(n: fx.Node, taken: set[str]) -> str:
    """A cut's name: the innermost non-leaf module whose output it is (``layer2.3``, a block,
    rather than its last ``relu``), else the leaf module's path, else the operation's name
    inside its module (``layer1.0.add``, numbered ``_1``, ``_2`` where it repeats there, as
    torchvision numbers them). At the top level that is the fx node's own name, so an old
    bundle's node name never means another cut."""
    outputs = n.meta.get(_OUTPUT_OF, [])
    blocks = [p for p, leaf in outputs if not leaf] or [p for p, _ in outputs]
    if blocks and blocks[0] not in taken:
        return blocks[0]
    scope = n.meta.get(_SCOPE, "")
    if not scope:
        return n.name
    base = f"{scope}.{re.sub(r'_[0-9]+$', '', n.name)}"
    return next(name for name in (base, *(f"{base}_{k}" for k in range(1, len(taken) + 2)))
                if name not in taken)


def _symbolic_trace(model: nn.Module, leaves: Sequence[str]) -> fx.GraphModule:
    names = dict(model.named_modules())
    unknown = [n for n in leaves if n not in names or n == ""]
    if unknown:
        raise TraceError(f"`cuts` names unknown modules: {', '.join(unknown)}")
    tracer = _LeafTracer(leaves)
    defaults = _defaults(model)
    try:
        graph = tracer.trace(model, concrete_args=defaults or None)
    except Exception as e:  # fx raises many types; each becomes one line naming the module
        where = tracer.stack[-1] if tracer.stack else type(model).__name__
        first = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise TraceError(
            f"torch.fx cannot trace module '{where}' ({first}); pass `cuts` with module names "
            f"around it (e.g. layer1,layer2) to keep it whole"
        ) from e
    _drop_default_checks(graph, len(defaults))
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


_CHECKS = (torch._assert, fx._symbolic_trace._assert_is_none, operator.eq)


def _drop_default_checks(graph: fx.Graph, count: int) -> None:
    """Remove the placeholders of the last ``count`` (defaulted) arguments with the checks fx
    adds on them (``_assert_is_none``, ``_assert(x == default)``), so the traced module takes
    the image alone; a placeholder that anything else reads is kept, with its default."""
    extra = [n for n in graph.nodes if n.op == "placeholder"][1:][-count:] if count else []
    for p in extra:
        closure, todo = [], [p]
        while todo:
            for u in todo.pop().users:
                if u not in closure:
                    closure.append(u)
                    todo.append(u)
        if not all(u.op == "call_function" and u.target in _CHECKS for u in closure):
            continue
        for u in sorted(closure, key=lambda u: -list(graph.nodes).index(u)):
            graph.erase_node(u)
        graph.erase_node(p)


def _defaults(model: nn.Module) -> dict[str, object]:
    """The forward arguments after the image that have a default (timm ViT's ``attn_mask``,
    ``is_causal``): traced as constants, so no later block reads a placeholder across a cut."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in params[1:]
            if p.default is not inspect.Parameter.empty
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


class _Profiler(fx.Interpreter):
    """Overrides ``run_node`` to record each node's output shape and (with ``count``) its
    FLOPs."""

    def __init__(self, gm: fx.GraphModule, count: bool = True) -> None:
        super().__init__(gm)
        self.count = count
        self.flops: dict[str, int] = {}
        self.shapes: dict[str, tuple[int, ...] | None] = {}
        self.values: dict[str, int] = {}  # the int-valued nodes' values (sizes)

    def run_node(self, n: fx.Node):
        if not self.count:
            out = super().run_node(n)
        else:
            with flop_counter() as counter:
                out = super().run_node(n)
            self.flops[n.name] = counter.get_total_flops()
        self.shapes[n.name] = tuple(out.shape) if isinstance(out, torch.Tensor) else None
        if isinstance(out, int):
            self.values[n.name] = out
        return out


def _cut_nodes(graph: fx.Graph, free: dict[fx.Node, object]) -> list[fx.Node]:
    """Nodes after which the only live value (none of ``free``, :mod:`pteenet.graph._free`)
    is their own output."""
    nodes = list(graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((pos[u] for u in n.users), default=-1) for n in nodes}
    live: set[fx.Node] = set()
    dying: dict[int, list[fx.Node]] = {}
    cuts = []
    for i, n in enumerate(nodes):
        if n.op != "output" and n not in free and last_use[n] > i:
            live.add(n)
            dying.setdefault(last_use[n], []).append(n)
        for d in dying.pop(i, []):
            live.discard(d)
        if n.op in ("call_module", "call_function", "call_method") and live == {n} \
                and n not in free:
            cuts.append(n)
    return cuts


def _param_counts(gm: fx.GraphModule) -> dict[str, int]:
    """Cumulative parameter count at each node (each parameter counted once)."""
    seen: set[int] = set()
    total, out = 0, {}
    for n in gm.graph.nodes:
        tensors: list[torch.Tensor] = []
        if n.op == "call_module":
            tensors = list(gm.get_submodule(n.target).parameters())
        elif n.op == "get_attr":
            obj = _fetch(gm, n.target)
            tensors = [obj] if isinstance(obj, nn.Parameter) else []
        for t in tensors:
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel()
        out[n.name] = total
    return out


def _fetch(gm: fx.GraphModule, target: str) -> object:
    obj: object = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def thop_macs(model: nn.Module, input_size: tuple[int, int]) -> int | None:
    """thop's MAC count (hooks on standard ``torch.nn`` modules only; see the module docstring).

    thop leaves ``total_ops``/``total_params`` buffers on every module it profiles, so it profiles
    a deep copy and the backbone's state_dict stays clean.
    """
    try:
        with warnings.catch_warnings():  # thop uses distutils' LooseVersion
            warnings.simplefilter("ignore", DeprecationWarning)
            from thop import profile
    except ImportError:
        return None
    clone = copy.deepcopy(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            macs, _ = profile(clone, inputs=(torch.zeros(1, 3, *input_size),), verbose=False)
    except Exception:  # thop cannot profile every model; its figure is only informative
        return None
    return int(macs)


def count_flops(module: nn.Module, *inputs: torch.Tensor) -> int:
    """FLOPs of one forward pass, counted like the backbone's (aten-level FlopCounterMode)."""
    with torch.no_grad(), flop_counter() as counter:
        module(*inputs)
    return int(counter.get_total_flops())


def trace_backbone(
    model: nn.Module, input_size: tuple[int, int], *, cuts: Sequence[str] | None = None,
    with_thop: bool = True, flops: bool = True,
) -> Trace:
    """Trace ``model`` and profile every cut point on one ``input_size`` image.

    ``cuts`` names modules to keep whole; then only their outputs are offered as cut points.
    ``flops=False`` records shapes only (every FLOP figure 0): for a bundle, which records its
    FLOPs. The model is left as found (its training mode is restored).
    """
    was_training = model.training
    model.eval()
    try:
        gm = _symbolic_trace(model, list(cuts or ()))
        prof = _Profiler(gm, flops)
        with torch.no_grad():
            prof.run(torch.zeros(1, 3, *input_size))
    finally:
        model.train(was_training)
    params = _param_counts(gm)
    cumulative, running = {}, 0
    for n in gm.graph.nodes:
        running += prof.flops.get(n.name, 0)
        cumulative[n.name] = running
    found: list[Cut] = []
    wanted = {str(c) for c in cuts or ()}
    modules = dict(gm.named_modules())
    free = free_values(gm.graph, prof.values)
    for n in _cut_nodes(gm.graph, free):
        layout = layout_of(n, prof.shapes, modules)
        if layout is None:
            continue
        if wanted and not (n.op == "call_module" and n.target in wanted):
            continue
        name = str(n.target) if wanted else _cut_name(n, {c.name for c in found})
        found.append(Cut(name, tuple(prof.shapes[n.name][1:]), cumulative[n.name],
                         params[n.name], n.name, layout))
    if wanted and len(found) < len(wanted):
        missing = wanted - {c.name for c in found}
        raise TraceError(
            f"`cuts` {', '.join(sorted(missing))}: not a place where the network can be split "
            f"(something else computed before it is still needed after it)"
        )
    total_params = sum(p.numel() for p in model.parameters())
    return Trace(gm, found, running, total_params, tuple(input_size),
                 thop_macs(model, input_size) if with_thop else None,
                 {c.name: i for i, c in enumerate(found)}, model,
                 {n.name: how for n, how in free.items()})
