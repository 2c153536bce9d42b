"""``pteenet inspect``: where a backbone's compute goes and where exits would sit."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from pteenet.backbone._registry import create_backbone
from pteenet.cascade._branches import branch_flops, cache_bytes, make_branch
from pteenet.choices import DEFAULT_BRANCH, DEFAULT_BUDGET, DEFAULT_POLICY
from pteenet.graph._head import find_head
from pteenet.graph._placement import choose_cuts, spread_note, useful_cuts
from pteenet.graph._tracing import trace_backbone

__all__ = ["CutInfo", "InspectResult", "inspect"]


@dataclass(frozen=True)
class CutInfo:
    """One cut point: its map's shape and layout, the backbone's FLOPs and parameters up to
    it (and that as a fraction of the total), whether a placement chose it and whether an exit
    there could pay (not in the last few percent); for a chosen cut, the branch's FLOPs and the
    bytes per image its reduced map takes in the training cache."""

    name: str
    shape: list[int]
    layout: str
    flops: int
    fraction: float
    params: int
    chosen: bool
    useful: bool
    branch_flops: int | None
    cache_bytes: int | None


@dataclass(frozen=True)
class InspectResult:
    """Where a backbone's compute goes: the model resolved, its preprocessing and classes
    (``inferred`` says what was read off the checkpoint), its totals, every cut point, and the
    cuts a placement would choose (``to_json()`` is what ``--json`` prints)."""

    model: str
    source: str
    input_size: list[int]
    mean: list[float]
    std: list[float]
    num_classes: int
    inferred: list[str]
    notes: list[str]
    total_flops: int
    total_macs: int
    total_params: int
    thop_macs: int | None
    placement: str | None
    chosen: list[str]
    cache_bytes: int
    cuts: list[CutInfo]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def inspect(
    model: str,
    *,
    checkpoint: str | os.PathLike | None = None,
    num_classes: int | None = None,
    branches: int | None = None,
    placement: str = DEFAULT_POLICY,
    at: Sequence[float] | None = None,
    cuts: Sequence[str] | None = None,
    input_size: tuple[int, int] | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
    branch: str = DEFAULT_BRANCH,
    branch_budget: float | None = DEFAULT_BUDGET,
    pretrained: bool = False,
) -> InspectResult:
    """Trace ``model`` and describe every cut point; mark those a placement would choose, with
    what a ``branch`` there would cost (as attach would build it under ``branch_budget``).

    FLOPs do not depend on the weights, so ``pretrained`` (download the registry's) is off by
    default.
    """
    bb = create_backbone(model, checkpoint=checkpoint, num_classes=num_classes,
                         pretrained=pretrained,
                         input_size=input_size, mean=mean, std=std)
    trace = trace_backbone(bb.model, bb.preprocess.input_size, cuts=cuts)
    chosen: list[str] = []
    if cuts:
        chosen = list(cuts)
    elif branches or at:
        chosen = choose_cuts(trace, branches, placement, at)
    total = trace.total_flops
    useful = {c.name for c in useful_cuts(trace)}
    costs = _branch_costs(trace, chosen, bb.num_classes, branch, branch_budget)
    cache = {name: c for name, (_, c) in costs.items()}
    return InspectResult(
        model=bb.full_name, source=bb.source, input_size=list(bb.preprocess.input_size),
        mean=list(bb.preprocess.mean), std=list(bb.preprocess.std),
        num_classes=bb.num_classes, inferred=list(bb.notes),
        notes=[n for n in [None if cuts else spread_note(trace, chosen, placement, at)] if n],
        total_flops=total, total_macs=total // 2, total_params=trace.total_params,
        thop_macs=trace.thop_macs,
        placement=None if cuts else ("at" if at else placement) if chosen else None,
        chosen=chosen, cache_bytes=sum(cache.values()),
        cuts=[CutInfo(name=c.name, shape=list(c.shape), layout=c.layout, flops=c.flops,
                      fraction=c.flops / total if total else 0.0, params=c.params,
                      chosen=c.name in chosen, useful=c.name in useful,
                      branch_flops=costs[c.name][0] if c.name in costs else None,
                      cache_bytes=cache.get(c.name))
              for c in trace.cuts])


def _branch_costs(trace, chosen: Sequence[str], num_classes: int, branch: str,
                  budget: float | None) -> dict[str, tuple[int, int]]:
    """FLOPs of the branch attach would put at each chosen cut, and the bytes per image its
    reduced map takes in the training cache."""
    cap = None if budget is None else budget * trace.total_flops
    head = find_head(trace) if branch in ("distill", "auto") else None
    out = {}
    for name in chosen:
        shape = trace.cut(name).shape
        b = make_branch(branch, shape, num_classes, cap, layout=trace.cut(name).layout,
                        head=None if head is None else (head.weight, head.bias))
        out[name] = branch_flops(b, shape), cache_bytes(b.reduce, shape)
    return out
