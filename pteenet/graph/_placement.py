"""Placement: which cut points get an exit, chosen by where the FLOPs lie.

The policies are those of EENets (Demir & Akbas, section 3.4): ``pareto`` lets each exit split the
remaining FLOPs 20/80, ``golden`` 61.8/38.2, ``fine`` 5/95; ``linear`` spaces exits so the FLOPs
between consecutive exits are equal; ``quadratic`` makes those gaps grow quadratically. Explicit
fractions (``--at``) are the escape hatch. Targets are fractions of the backbone's FLOPs; each is
mapped to the nearest unused *useful* cut: of several cuts at the same FLOP fraction (a residual
``add`` and the ``relu`` after it) only the last counts, and cuts in the last ``TAIL`` of the
FLOPs are never used, since an exit there could save almost nothing yet costs its branch on every
sample that reaches it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pteenet.choices import DEFAULT_BRANCHES, DEFAULT_POLICY, POLICIES
from pteenet.errors import PlacementError
from pteenet.graph._tracing import Cut, Trace

__all__ = ["SPREAD", "TAIL", "choose_cuts", "spread_note",
           "target_fractions", "useful_cuts"]

_SPLIT_RATIO = {"pareto": 0.2, "golden": 0.618, "fine": 0.05}
TAIL = 0.05
SPREAD = 0.2  # an exit this far (in FLOP fraction) from its target: the exits cannot spread


def target_fractions(policy: str, n: int) -> list[float]:
    """Cumulative FLOP fractions at which ``n`` exits should sit under ``policy``."""
    if n < 1:
        raise PlacementError(f"need at least one branch, got {n}")
    if policy in _SPLIT_RATIO:
        phi = _SPLIT_RATIO[policy]
        return [1 - (1 - phi) ** k for k in range(1, n + 1)]
    if policy == "linear":
        return [k / (n + 1) for k in range(1, n + 1)]
    if policy == "quadratic":
        gaps = [k * k for k in range(1, n + 2)]
        total = sum(gaps)
        return [sum(gaps[:k]) / total for k in range(1, n + 1)]
    raise PlacementError(f"unknown placement '{policy}': use one of {', '.join(POLICIES)}")


def _check_fractions(at: Sequence[float]) -> list[float]:
    at = [float(a) for a in at]
    if not at:
        raise PlacementError("`at` needs at least one fraction")
    if any(not 0 < a < 1 for a in at):
        raise PlacementError(f"`at` fractions must lie strictly between 0 and 1, got {at}")
    if sorted(set(at)) != at:
        raise PlacementError(f"`at` fractions must be distinct and increasing, got {at}")
    return at


def useful_cuts(trace: Trace) -> list[Cut]:
    """The cuts an exit may use: one per distinct FLOP fraction (the last), none in the tail."""
    total = max(trace.total_flops, 1)
    kept: list[Cut] = []
    for c in trace.cuts:
        if c.flops / total > 1 - TAIL:
            continue
        if kept and kept[-1].flops == c.flops:
            kept[-1] = c
        else:
            kept.append(c)
    return kept


def choose_cuts(
    trace: Trace, n: int | None = None, policy: str = DEFAULT_POLICY,
    at: Sequence[float] | None = None, fractions: Mapping[str, float] | None = None
) -> list[str]:
    """Names of the useful cuts nearest to the policy's targets (or ``at``), distinct, in order.

    ``n=None`` asks for :data:`DEFAULT_BRANCHES`, or one exit per useful cut where there are
    fewer. Targets are served in order; each takes the unused cut nearest to it in FLOP
    fraction while leaving enough later cuts for the targets after it, so no two exits share a
    cut. ``fractions`` (cut name -> share of the backbone's time before it, from
    :func:`pteenet.cascade._profile.cut_time_fractions`) replaces the FLOP fraction as the axis the
    targets live on (``--cost latency``).
    """
    cuts = useful_cuts(trace)
    if not cuts:
        raise PlacementError(f"this backbone has no cut point before the last {TAIL:.0%} of "
                             f"its FLOPs: nowhere does one image-sized tensor carry all the "
                             f"later layers need (CrossViT runs two token streams side by side)")
    if at is None and n is None:
        n = min(DEFAULT_BRANCHES, len(cuts))
    targets = _check_fractions(at) if at is not None else target_fractions(policy, n or 0)
    if len(targets) > len(cuts):
        raise PlacementError(
            f"asked for {len(targets)} branches but this backbone has only {len(cuts)} useful "
            f"cut points (one per distinct FLOP count, none in the last {TAIL:.0%} of FLOPs)")
    fracs = [fractions[c.name] if fractions else c.flops / trace.total_flops for c in cuts]
    chosen: list[int] = []
    for i, t in enumerate(targets):
        lo = chosen[-1] + 1 if chosen else 0
        hi = len(cuts) - (len(targets) - i)  # leave room for the remaining targets
        best = min(range(lo, hi + 1), key=lambda j: (abs(fracs[j] - t), j))
        chosen.append(best)
    return [cuts[j].name for j in chosen]


def spread_note(trace: Trace, names: Sequence[str], policy: str = DEFAULT_POLICY,
                at: Sequence[float] | None = None) -> str | None:
    """One line when the exits at ``names`` sit far (more than :data:`SPREAD`) from the
    targets ``policy`` or ``at`` asked for, because the useful cuts do not reach them (LeViT
    before token cuts: every cut in its convolutional stem, so every exit at 2-16 % of the
    FLOPs); ``None`` when they spread as asked."""
    if not names:
        return None
    total = max(trace.total_flops, 1)
    got = [trace.cut(n).flops / total for n in names]
    want = list(at) if at is not None else target_fractions(policy, len(names))
    if max(abs(g - w) for g, w in zip(got, want)) <= SPREAD:
        return None
    span = [c.flops / total for c in useful_cuts(trace)] or got
    return (f"the exits cannot spread over the FLOPs: this backbone's useful cut points lie "
            f"between {min(span):.0%} and {max(span):.0%} of them, so the exits sit at "
            f"{', '.join(f'{g:.0%}' for g in got)}")
