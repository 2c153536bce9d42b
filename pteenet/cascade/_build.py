"""Building an early-exit model from a traced backbone: segments, fresh branches, FLOPs."""

from __future__ import annotations

from collections.abc import Sequence

from pteenet.cascade._branches import FrozenHead, branch_flops, make_branch
from pteenet.cascade._model import EarlyExitModel
from pteenet.choices import DEFAULT_BRANCH, DEFAULT_BUDGET
from pteenet.errors import OptionError
from pteenet.graph._head import find_head, pre_logit_segment
from pteenet.graph._split import split_at
from pteenet.graph._tracing import Cut, Trace

__all__ = ["build_early_exit"]


def build_early_exit(
    trace: Trace,
    cut_names: Sequence[str],
    num_classes: int,
    branch: str | Sequence[str] = DEFAULT_BRANCH,
    *,
    budget: float | None = DEFAULT_BUDGET,
    widths: Sequence[int | None] | None = None,
    thresholds: object = 0.5,
    score: str = "softmax",
    gamma: Sequence[float] | None = None,
    flops: tuple[Sequence[int], Sequence[int]] | None = None,
) -> EarlyExitModel:
    """Split the traced backbone at ``cut_names`` and attach a fresh branch after each cut.

    ``budget`` caps each branch's FLOPs as a share of the backbone's (``None``: no cap);
    ``widths`` (from a bundle) rebuilds branches at the widths they were trained with, and
    ``flops`` (each segment's and each branch's, from a bundle) is taken as recorded instead
    of counted again.
    """
    kinds = [branch] * len(cut_names) if isinstance(branch, str) else list(branch)
    if len(kinds) != len(cut_names):
        raise OptionError(f"{len(kinds)} branch types given for {len(cut_names)} cuts")
    if budget is not None and not 0 < budget <= 1:
        raise OptionError(f"`branch_budget` must lie in (0, 1], got {budget}")
    segments = split_at(trace, cut_names)
    cuts = [trace.cut(c) for c in cut_names]
    cap = None if budget is None else budget * trace.total_flops
    widths = list(widths) if widths is not None else [None] * len(cuts)
    head = find_head(trace) if {"distill", "auto"} & set(kinds) else None
    shared = None if head is None else (head.weight, head.bias)
    branches = [make_branch(k, c.shape, num_classes, cap, width=w, layout=c.layout, head=shared)
                for k, c, w in zip(kinds, cuts, widths)]
    seg_flops, br_flops = flops or (_segment_flops(trace, cuts),
                                    [branch_flops(b, c.shape) for b, c in zip(branches, cuts)])
    model = EarlyExitModel(
        segments, branches, segment_flops=seg_flops, branch_flops=br_flops,
        num_classes=num_classes, thresholds=thresholds, score=score, gamma=gamma,
        whole=trace.model,
    )
    if any(isinstance(b.classifier, FrozenHead) for b in branches):
        model.use_pre_logits(pre_logit_segment(trace, cut_names[-1], head), head)
    return model


def _segment_flops(trace: Trace, cuts: Sequence[Cut]) -> list[int]:
    """Each segment's own FLOPs, from the cumulative counts at its ends."""
    ends = [c.flops for c in cuts] + [trace.total_flops]
    return [b - a for a, b in zip([0, *ends[:-1]], ends)]
