"""What leaving at each exit costs: the backbone up to the exit plus every branch that ran.

Costs are relative to the backbone (FLOPs, or measured batch-1 time; see
:class:`~pteenet.cascade.TimeProfile`). An exit that is off runs no branch and costs nothing; with
a ZTW ensemble every branch up to the last exit that may fire runs (:func:`reach`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["Cost", "cascade_cost", "reach"]


@dataclass(frozen=True)
class Cost:
    """A cost model: what each piece of the cascade costs, relative to the backbone.

    One value carries everything a cost needs, so the model, calibration's search and L_v2's
    cost term (EENets, Demir & Akbas) cannot count it differently."""

    kind: str  # "flops", or "latency" (measured batch-1 time)
    segment: tuple[float, ...]  # [B + 1] the backbone's cumulative cost up to each cut, last 1.0
    branch: tuple[float, ...]  # [B] each branch's own cost
    chained: bool = False  # a ZTW ensemble: every branch up to the last active exit runs

    def exits(self, active: Sequence[bool] | torch.Tensor) -> list[float]:
        """Relative cost of a sample leaving at exit k (k = B: the backbone) when only the
        ``active`` exits may fire (an exit that is off runs no branch)."""
        on = torch.as_tensor(active, dtype=torch.bool)
        return cascade_cost(self.segment, self.branch, on, self.chained).tolist()


def reach(active: torch.Tensor, chained: bool) -> torch.Tensor:
    """Which branches run when ``active`` exits may fire: those exits alone, or, ``chained``
    (an ensemble reads every exit before it), every exit up to the last active one."""
    active = torch.as_tensor(active, dtype=torch.bool)
    if not chained or not len(active):
        return active
    return active.flip(0).to(torch.uint8).cummax(0).values.flip(0).bool()


def cascade_cost(segment_costs: Sequence[float], branch_costs: Sequence[float],
                 active: torch.Tensor, chained: bool = False) -> torch.Tensor:
    """Relative cost of leaving at each exit (last: the backbone) with only ``active`` branches.

    ``segment_costs[k]`` is the backbone's cumulative cost up to cut ``k`` (``B + 1`` entries,
    the last 1.0) and ``branch_costs[k]`` branch ``k``'s own, both relative to the backbone.
    ``chained``: the exits form a ZTW ensemble, so every branch up to the last active exit runs.
    """
    seg = torch.as_tensor(segment_costs, dtype=torch.float64)
    ran = reach(active, chained)
    br = torch.as_tensor(branch_costs, dtype=torch.float64) * ran.to(torch.float64)
    spent = torch.cumsum(br, 0)
    return seg + torch.cat([spent, spent[-1:]]) if len(br) else seg
