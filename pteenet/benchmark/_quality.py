"""Quality and work from one pass over the samples: top-1, agreement with the backbone, real
per-sample FLOPs and exit shares, and the *oracle* (every sample leaves at the earliest exit
whose branch already agrees with the backbone: the floor for these branches).

The pass records every branch's score and prediction beside the real early-exit run, so the
oracle and the threshold sweep are simulated with the exact exit rule the model applies, without
running anything again; :func:`simulation_check` says how often the simulation matches the run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pteenet.benchmark._eval_set import EvalSet
from pteenet.cascade._model import EarlyExitModel
from pteenet.data._loading import make_loader, prefetched
from pteenet.errors import DataError
from pteenet.thresholds import exit_index, summarize
from pteenet.training._features import scores_and_preds

__all__ = ["Pass", "measure_pass", "oracle_flops", "quality", "simulation_check",
           "timing_positions"]


@dataclass
class Pass:
    """Everything one pass over the samples recorded (CPU tensors, input order)."""

    scores: Tensor  # [N, B] every branch's exit score
    preds: Tensor  # [N, B] every branch's argmax
    final: Tensor  # [N] the backbone's argmax
    labels: Tensor | None  # [N] or None
    ee_preds: Tensor  # [N] the real early-exit run's answer
    ee_exit: Tensor  # [N] the exit it took
    ee_flops: Tensor  # [N] float64 FLOPs it spent
    images: Tensor  # [M, 3, H, W] real images kept for timing (a seeded draw, input order)
    kept: Tensor  # [M] their positions among the samples
    skipped: int = 0

    def __len__(self) -> int:
        return int(self.final.numel())


def _run_batch(model: EarlyExitModel, x: Tensor) -> list[Tensor]:
    """Branch scores and predictions at every exit, plus the real early-exit run, on one batch."""
    feats, final = model.reduced_features(x)
    scores, preds = scores_and_preds(model, *model.branch_outputs(feats))
    res = model(x)
    return [t.cpu() for t in (scores, preds, final.argmax(1), res.preds, res.exit_index,
                              res.flops)]


def measure_pass(model: EarlyExitModel, ev: EvalSet, *, batch_size: int, device: torch.device,
                 keep: int, progress: Callable[[int], None] | None = None) -> Pass:
    """One pass: per batch, the backbone's features (for branch scores) and the real EE run."""
    loader = make_loader(ev.data, batch_size=batch_size, indices=ev.indices, ramp=True)
    cols: list[list[Tensor]] = [[] for _ in range(7)]
    wanted, kept = timing_positions(len(ev.indices), keep), []
    seen, skipped = 0, 0
    with torch.inference_mode():
        for batch in prefetched(loader):  # the next batch decodes while this one runs
            skipped += batch.skipped
            if batch.images is not None:
                for col, t in zip(cols, [*_run_batch(model, batch.images.to(device)),
                                         batch.labels]):
                    col.append(t)
                here = wanted[(wanted >= seen) & (wanted < seen + len(batch.images))]
                kept.append(batch.images[here - seen].clone())
                seen += len(batch.images)
            if progress:
                progress(len(batch) + batch.skipped)
    if not cols[0]:
        raise DataError(f"none of the {len(ev.indices)} images in {ev.data.name} could be read")
    s, p, f, ep, ee, fl, lab = (torch.cat(c) for c in cols)
    return Pass(s.float(), p, f, lab if ev.labels_usable else None, ep, ee, fl.double(),
                torch.cat(kept), wanted[wanted < seen], skipped)


def timing_positions(n: int, keep: int) -> Tensor:
    """Which of ``n`` samples to keep for timing: a seeded draw over the whole set, in order.

    The first ones would do where files are sorted by class, as an image folder's are: CIFAR-10's
    first 1,000 test images are all airplanes, and the early-exit model's time depends on how
    many images leave early, which depends on the class."""
    g = torch.Generator().manual_seed(0)
    return torch.randperm(n, generator=g)[:keep].sort().values


def _rate(flags: Tensor) -> float:
    return float(flags.double().mean())


def oracle_flops(preds: Tensor, final: Tensor, costs: Sequence[float]) -> tuple[float, list[int]]:
    """Mean relative FLOPs if every sample left at the earliest branch agreeing with the backbone.

    Samples no branch gets right pay ``costs[-1]`` (every branch evaluated, then the backbone's
    head), as they would under any threshold table that keeps them; so no table for these
    branches reaches 100 % agreement for less. Returns the mean and the count per exit.
    """
    b = preds.shape[1]
    agree = torch.cat([preds == final[:, None], torch.ones_like(final, dtype=torch.bool)[:, None]],
                      dim=1)
    first = agree.to(torch.uint8).argmax(1)
    cost = torch.tensor(list(costs), dtype=torch.float64)
    return float(cost[first].mean()), torch.bincount(first, minlength=b + 1).tolist()


def _exit_rows(p: Pass, costs: Sequence[float], oracle_counts: list[int],
               model: EarlyExitModel) -> list[dict]:
    n, rows = len(p), []
    on = [*model.active, True]
    own = [f / model.backbone_flops for f in model.branch_flops] + [None]
    agree = p.ee_preds == p.final
    right = None if p.labels is None else p.ee_preds == p.labels
    for k, cost in enumerate(costs):
        taken = p.ee_exit == k
        count = int(taken.sum())
        rows.append({
            "exit": k, "name": "backbone" if k == len(costs) - 1 else f"branch {k}",
            "relative_flops": float(cost), "count": count, "share": count / n,
            "agreement": _rate(agree[taken]) if count else None,
            "top1": _rate(right[taken]) if count and right is not None else None,
            "oracle_share": oracle_counts[k] / n, "on": on[k], "branch_cost": own[k],
        })
    return rows


def quality(p: Pass, model: EarlyExitModel) -> dict[str, Any]:
    """Top-1, agreement, real mean relative FLOPs and exit shares; the oracle's FLOPs."""
    costs = model.cost_in("flops").exits(model.active)
    oracle, counts = oracle_flops(p.preds, p.final, costs)
    top1 = (lambda pred: None) if p.labels is None else (lambda pred: _rate(pred == p.labels))
    return {
        "early_exit": {"top1": top1(p.ee_preds), "agreement": _rate(p.ee_preds == p.final),
                       "relative_flops": float((p.ee_flops / model.backbone_flops).mean()),
                       "exits": _exit_rows(p, costs, counts, model)},
        "backbone": {"top1": top1(p.final), "agreement": 1.0, "relative_flops": 1.0},
        "oracle": {"relative_flops": oracle, "agreement": 1.0, "top1": top1(p.final),
                   "shares": [c / len(p) for c in counts]},
    }


def simulation_check(p: Pass, model: EarlyExitModel) -> dict[str, Any]:
    """How often the simulated exit rule (used by the sweep) matches the real run's exits."""
    s = summarize(p.scores, p.preds, p.final, model.thresholds.cpu(),
                  model.cost_in("flops").exits(model.active), p.labels)
    same = exit_index(p.scores, p.preds, model.thresholds.cpu()) == p.ee_exit
    return {"exit_match": _rate(same), "relative_flops": s["mean_relative_flops"],
            "agreement": s["agreement"]}
