"""Thresholds that minimise the cascade's expected cost under an accuracy constraint.

Per-exit rules (a threshold per exit chosen on its own, CPM's per-class precision, one global T)
ignore that exits compete: a sample one exit lets go is a sample no later exit can save, and an
exit that takes few samples still costs its branch on every sample that passes it. This search
chooses the whole table at once, the way EENet (Ilhan et al. 2023) casts exit assignment as
cost-constrained optimisation, with a greedy that is cheap enough to run at every calibration:

* start with every exit off (the model is the backbone: cost 1.0, no drop);
* each step lowers one exit's threshold by one quantile of its scores (2.5 % of the samples), the
  move that saves the most expected cost per unit of added error, as long as the error stays
  within ``max_drop`` (or, with ``budget``, until the cost is at most ``budget``);
* finally every exit whose removal lowers the cost is switched off, so no exit stays that does
  not pay for its own branch;
* the greedy is myopic, so it also runs at a few tighter limits and the cheapest table within
  the asked limit wins.

Costs are those :meth:`pteenet.cascade.Cost.exits` reports: segments up to the exit plus the
branches of the exits that are *on* (an off exit is never evaluated), or with a ZTW ensemble
(``chained``) every branch up to the last exit on, since the ensemble reads them. The error is
the accuracy drop against labels when they exist, else the disagreement with the backbone.
The visited tables form a path from "all off" to the chosen one, conservative to permissive,
which risk control walks (:func:`pteenet.thresholds.risk_control`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from pteenet.cascade._cost import Cost, cascade_cost
from pteenet.errors import OptionError
from pteenet.machine import threads

__all__ = ["CostSearch", "min_cost_thresholds"]

STEPS = 40  # quantile steps per exit: each lowers a threshold past 2.5 % of the samples
ENABLE_SLACK = 0.02  # a first step may raise the cost this much (the new branch's own cost)
RETRIES = (1.0, 0.75, 0.5, 0.25)  # fractions of max_drop also searched (see below)


@dataclass
class CostSearch:
    """The chosen ``[B]`` thresholds (inf = off), their cost and error, and the path to them."""

    thresholds: Tensor
    cost: float
    error: float
    path: list[Tensor]


class _Cascade:
    """Scores, predictions and per-sample correctness, with fast evaluation of a threshold row."""

    def __init__(self, scores: Tensor, preds: Tensor, final_pred: Tensor,
                 labels: Tensor | None, cost: Cost) -> None:
        self.scores = scores.double()
        ref = final_pred if labels is None else labels
        every = torch.cat([preds, final_pred[:, None]], 1).long()
        self.right = (every == ref.long()[:, None]).double()  # [N, B+1]
        self.base = float(self.right[:, -1].mean())
        self.cost = cost

    def evaluate(self, thr: Tensor) -> tuple[float, float]:
        """(error, cost) of the cascade under per-exit thresholds ``thr`` [B]."""
        leave = self.scores >= thr[None, :]
        b = leave.shape[1]
        first = torch.where(leave.any(1), leave.to(torch.uint8).argmax(1), b)
        c = self.cost  # cascade_cost, not Cost.exits: a tensor, in the search's inner loop
        cost = cascade_cost(c.segment, c.branch, thr <= 1, c.chained)[first].mean()
        acc = self.right.gather(1, first[:, None]).mean()
        return self.base - float(acc), float(cost)


def _grid(scores: Tensor, steps: int) -> list[list[float]]:
    """Per exit, thresholds from 'off' down to its lowest score, one quantile apart."""
    q = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    return [[math.inf, *torch.quantile(scores[:, k].double(), q[1:]).tolist()]
            for k in range(scores.shape[1])]


def min_cost_thresholds(
    scores: Tensor, preds: Tensor, final_pred: Tensor, cost: Cost, *,
    labels: Tensor | None = None, max_drop: float | None = 0.01, budget: float | None = None,
    steps: int = STEPS,
) -> CostSearch:
    """Greedy cost-minimising per-exit thresholds (see the module docstring).

    Give ``max_drop`` (the most accuracy drop, or disagreement without labels, allowed on these
    samples) or ``budget`` (the relative cost to reach, with the least error), not both.
    ``cost`` is the cost model (an ensemble's counts every branch up to the last exit on).
    """
    if (max_drop is None) == (budget is None):
        raise OptionError("give either max_drop or budget")
    if max_drop is not None and not 0 <= max_drop < 1:
        raise OptionError(f"max_drop must lie in [0, 1), got {max_drop}")
    if budget is not None and not budget > 0:
        raise OptionError(f"budget must be positive, got {budget}")
    cascade = _Cascade(scores, preds, final_pred, labels, cost)
    grid = _grid(scores, steps)
    with threads(1):
        if max_drop is None:
            return _search(cascade, grid, None, budget)
        # The greedy is myopic: a tighter limit sometimes leads to a cheaper table that is
        # still within the asked one (measured on CIFAR ResNet-32: 0.46 at 2 points, 0.43 at 1),
        # so a few tighter limits are searched too and the cheapest answer within the limit wins.
        runs = [_search(cascade, grid, max_drop * f, None) for f in RETRIES]
        return min(runs, key=lambda r: (r.cost, r.error))


def _search(cascade: _Cascade, grid: list[list[float]], max_drop: float | None,
            budget: float | None) -> CostSearch:
    pos = [0] * len(grid)
    thr = torch.full((len(grid),), math.inf, dtype=torch.float64)
    err, cost = cascade.evaluate(thr)
    path = [thr.clone()]
    limit = math.inf if max_drop is None else max_drop
    while budget is None or cost > budget:
        move = _best_move(cascade, grid, pos, thr, err, cost, limit)
        if move is None:
            break
        k, thr, err, cost = move
        pos[k] += 1
        path.append(thr.clone())
    thr, err, cost = _prune(cascade, thr, err, cost, limit)
    if not torch.equal(thr, path[-1]):
        path.append(thr.clone())
    return CostSearch(thr, cost, err, path)


def _best_move(cascade: _Cascade, grid, pos, thr, err, cost, limit):
    """The one-step lowering with the best cost saved per error added, within ``limit``."""
    best = None
    for k in range(len(pos)):
        if pos[k] + 1 >= len(grid[k]):
            continue
        t = thr.clone()
        t[k] = grid[k][pos[k] + 1]
        e, c = cascade.evaluate(t)
        slack = ENABLE_SLACK if pos[k] == 0 else 0.0
        if e > limit + 1e-12 or c >= cost + slack:
            continue
        gain = (cost - c) / max(e - err, 1e-4)
        if best is None or gain > best[0]:
            best = (gain, k, t, e, c)
    return None if best is None else best[1:]


def _prune(cascade: _Cascade, thr: Tensor, err: float, cost: float, limit: float):
    """Switch off, one at a time, every exit whose removal does not raise the cost, within
    ``limit``: an exit that no calibration sample reaches is switched off too, since on new data
    it would cost its branch and, as far as anyone can tell, save nothing."""
    changed = True
    while changed:
        changed = False
        for k in torch.nonzero(thr <= 1).flatten().tolist():
            t = thr.clone()
            t[k] = math.inf
            e, c = cascade.evaluate(t)
            if c <= cost and e <= max(limit, err) + 1e-12:
                thr, err, cost, changed = t, e, c, True
    return thr, err, cost
