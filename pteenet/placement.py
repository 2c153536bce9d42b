"""Placement: which cut points get an exit, chosen by where the FLOPs lie.

The policies are those of EENets (Demir & Akbas, section 3.4): ``pareto`` lets each exit split the
remaining FLOPs 20/80, ``golden`` 61.8/38.2, ``fine`` 5/95; ``linear`` spaces exits so the FLOPs
between consecutive exits are equal; ``quadratic`` makes those gaps grow quadratically. Explicit
fractions (``--at``) are the escape hatch. Targets are fractions of the backbone's FLOPs; each is
mapped to the nearest unused cut.
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import PlacementError
from .tracing import Trace

__all__ = ["POLICIES", "choose_cuts", "target_fractions"]

_SPLIT_RATIO = {"pareto": 0.2, "golden": 0.618, "fine": 0.05}
POLICIES = ("pareto", "golden", "fine", "linear", "quadratic")


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
        raise PlacementError("--at needs at least one fraction")
    if any(not 0 < a < 1 for a in at):
        raise PlacementError(f"--at fractions must lie strictly between 0 and 1, got {at}")
    if sorted(set(at)) != at:
        raise PlacementError(f"--at fractions must be distinct and increasing, got {at}")
    return at


def choose_cuts(
    trace: Trace, n: int | None = None, policy: str = "pareto", at: Sequence[float] | None = None
) -> list[str]:
    """Names of the cuts nearest to the policy's targets (or ``at``), distinct and in order.

    Targets are served in order; each takes the unused cut nearest to it in FLOP fraction while
    leaving enough later cuts for the targets after it, so no two exits share a cut.
    """
    targets = _check_fractions(at) if at is not None else target_fractions(policy, n or 0)
    cuts = trace.cuts
    if len(targets) > len(cuts):
        raise PlacementError(
            f"asked for {len(targets)} branches but this backbone has only {len(cuts)} cut points"
        )
    fracs = [c.flops / trace.total_flops for c in cuts]
    chosen: list[int] = []
    for i, t in enumerate(targets):
        lo = chosen[-1] + 1 if chosen else 0
        hi = len(cuts) - (len(targets) - i)  # leave room for the remaining targets
        best = min(range(lo, hi + 1), key=lambda j: (abs(fracs[j] - t), j))
        chosen.append(best)
    return [cuts[j].name for j in chosen]
