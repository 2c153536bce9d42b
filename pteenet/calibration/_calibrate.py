"""Calibration: decide, per branch (and class), when an exit may answer.

Five methods write the same threshold table:

* ``mincost`` (the default) -- the per-exit thresholds, and the set of exits left on, that
  minimise the expected cost while the accuracy drop (disagreement with the backbone without
  labels) stays within ``max_drop`` (:mod:`pteenet.calibration`); exits that do not pay for
  their branch are switched off and never run;
* ``budget`` -- the same search, stopped at the least error that reaches a relative cost;
* ``global`` -- one threshold T on every exit score (PTEEnet's run-time knob);
* ``cpm`` -- Class Precision Margin (BTS-EE, Aperstein & Apartsin): per branch and predicted class,
  the lowest score whose exits keep that class's precision within ``margin`` of the backbone's;
* ``risk`` -- risk control after Jazbec et al. 2024 ("Fast yet Safe"): the most permissive table
  among cost-search optima (or the CPM table scaled) whose upper confidence bound on the accuracy
  drop (disagreement without labels) is at most ``max_drop`` with probability ``1 - delta``. The
  family is built on a third of the calibration samples and certified on the other two thirds,
  so the guarantee does not lean on the data that chose it.

By default it runs on the bundle's held-out split, which training never saw.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from pteenet.bundle._load import load
from pteenet.bundle._read import read_bundle
from pteenet.bundle._schema import ThresholdTable
from pteenet.bundle._write import write_thresholds
from pteenet.calibration._collect import Outputs, collect
from pteenet.calibration._cost_search import min_cost_thresholds
from pteenet.cascade._model import EarlyExitModel
from pteenet.cascade._profile import device_name, probe_images
from pteenet.cascade._score import gate_power
from pteenet.choices import BOUNDS, DEFAULT_MARGIN, DEFAULT_MAX_DROP
from pteenet.errors import CalibrationError, OptionError
from pteenet.labels import class_name
from pteenet.machine import check_device
from pteenet.storage import writes_into
from pteenet.thresholds import (
    as_table,
    check_cpm_options,
    class_precision,
    cpm_thresholds,
    exit_index,
    losses_for,
    risk_control,
    scaled_candidates,
    summarize,
)

__all__ = ["CalibrationResult", "calibrate", "choose_table", "class_rows", "uses_gate"]



@dataclass
class CalibrationResult:
    """The chosen table, the outputs it was chosen on, and what it does there."""

    table: ThresholdTable
    outputs: Outputs
    summary: dict[str, Any]
    rows: list[dict[str, Any]]  # per branch and class (:func:`class_rows`)
    classes: list[str] | None = None  # the bundle's class names, for showing rows

    def class_name(self, c: int) -> str:
        """A class's short name where the bundle knows it ("tench"), else its index."""
        return class_name(self.classes, c)

    def named_rows(self) -> list[dict[str, Any]]:
        """:attr:`rows`, each with its class's name."""
        return [{**r, "class_name": self.class_name(r["class"])} for r in self.rows]

    def exit_rows(self) -> list[dict[str, Any]]:
        """One row per exit, the backbone last (``branch`` None): its threshold (None where it
        differs by class, above 1 where the exit is off), the share of samples it takes, how
        often it agrees with the backbone on them, and the relative cost of leaving there."""
        t, exits = self.table.thresholds, self.summary["exits"]
        costs = self.outputs.exit_costs(t)
        return [{"branch": k if k < len(t) else None,
                 "threshold": _uniform(t[k]) if k < len(t) else 0.0,
                 "share": e["share"], "agreement": e["agreement"], "cost": costs[k]}
                for k, e in enumerate(exits)]


def _uniform(row: Tensor) -> float | None:
    """A branch's one threshold for every class, or None where they differ."""
    return float(row[0]) if bool((row == row[0]).all()) else None


def _method(threshold: float | None, cpm: bool, max_drop: float | None, budget: float | None,
            risk: bool, delta: float, bound: str, margin: float, min_support: int) -> str:
    """Which method the options ask for, after checking them (one line per problem)."""
    if threshold is not None and (cpm or max_drop is not None or budget is not None or risk):
        raise OptionError("`threshold` cannot be combined with `cpm`, `max_drop`, `budget` or "
                          "`risk`")
    if budget is not None and (cpm or max_drop is not None or risk):
        raise OptionError("`budget` cannot be combined with `cpm`, `max_drop` or `risk`")
    if threshold is not None and not 0 <= threshold <= 1:
        raise OptionError(f"`threshold` must lie in [0, 1], got {threshold}")
    if max_drop is not None and not 0 < max_drop < 1:
        raise OptionError(f"`max_drop` must lie strictly between 0 and 1, got {max_drop}")
    if budget is not None and not 0 < budget <= 1:
        raise OptionError(f"`budget` must lie in (0, 1], got {budget}")
    if not 0 < delta < 1:
        raise OptionError(f"`delta` must lie strictly between 0 and 1, got {delta}")
    if bound not in BOUNDS:
        raise OptionError(f"`bound` must be one of {', '.join(BOUNDS)}, got {bound}")
    check_cpm_options(margin, min_support)
    if threshold is not None:
        return "global"
    if budget is not None:
        return "budget"
    if risk:
        return "risk"
    return "cpm" if cpm else "mincost"


def _cpm_table(out: Outputs, k: int, margin: float, min_support: int) -> Tensor:
    ref = out.labels if out.labels is not None else out.final_pred
    prec = class_precision(out.final_pred, ref, k) if out.labels is not None else None
    return cpm_thresholds(out.scores, out.preds, ref, k, margin, min_support, prec).float()


def class_rows(out: Outputs, thr: Tensor) -> list[dict[str, Any]]:
    """Per branch and class: threshold, share of samples it takes, precision on them, support."""
    exits = exit_index(out.scores, out.preds, thr)
    ref = out.labels if out.labels is not None else out.final_pred
    n = exits.numel()
    rows = []
    for k in range(thr.shape[0]):
        for c in range(thr.shape[1]):
            taken = (exits == k) & (out.preds[:, k] == c)
            m = int(taken.sum())
            rows.append({"branch": k, "class": c, "threshold": float(thr[k, c]),
                         "share": m / n, "support": m,
                         "precision": float((ref[taken] == c).float().mean()) if m else None})
    return rows


def choose_table(out: Outputs, num_classes: int, *, method: str = "mincost",
                 threshold: float | None = None, max_drop: float | None = None,
                 budget: float | None = None, cpm: bool = False, margin: float = DEFAULT_MARGIN,
                 min_support: int = 20, delta: float = 0.1, bound: str = "wsr",
                 score: str = "softmax") -> ThresholdTable:
    """The threshold table ``method`` picks on ``out``, with its parameters and summary.

    ``out`` must hold top-softmax scores for the cost-search methods (see :func:`uses_gate`)
    and ``score``'s scores otherwise."""
    b, k = out.scores.shape[1], num_classes
    params: dict[str, Any] = {"score": score, "samples": int(out.final_pred.numel()),
                              "labels": out.labels is not None, "cost": out.cost.kind}
    drop = DEFAULT_MAX_DROP if max_drop is None else max_drop
    if method == "global":
        thr = as_table(threshold, b, k)
        params["threshold"] = threshold
    elif method == "cpm":
        thr = _cpm_table(out, k, margin, min_support)
        params.update(margin=margin, min_support=min_support)
    elif method in ("mincost", "budget"):
        found = _search(out, drop if method == "mincost" else None, budget)
        thr = as_table(found.thresholds.float(), b, k)
        params.update(max_drop=drop if method == "mincost" else None, budget=budget,
                      expected_error=found.error, expected_cost=found.cost)
    else:
        thr = _risk_table(out, k, cpm, margin, min_support, drop, delta, bound, params)
    summary = summarize(out.scores, out.preds, out.final_pred, thr, out.exit_costs(thr),
                        out.labels)
    if uses_gate(method, cpm):
        params["softmax_thresholds"] = [None if v > 1 else v for v in thr[:, 0].tolist()]
        gamma = [gate_power(v) for v in thr[:, 0].tolist()]
        gated = torch.where(thr > 1, thr, torch.full_like(thr, 0.5))
        return ThresholdTable(gated, "gate", method, params, summary, gamma)
    return ThresholdTable(thr, score, method, params, summary)


def uses_gate(method: str, cpm: bool = False) -> bool:
    """Per-exit tables from the cost search are written on the gate scale (0.5 = calibrated);
    they are searched on the top softmax probability, which ranked samples best."""
    return method in ("mincost", "budget") or (method == "risk" and not cpm)


def _search(out: Outputs, max_drop: float | None, budget: float | None):
    return min_cost_thresholds(out.scores, out.preds, out.final_pred, out.cost,
                               labels=out.labels, max_drop=max_drop, budget=budget)


@writes_into("bundle", when="write")  # one writer at a time; checks writability first
def calibrate(
    bundle: str | os.PathLike = "pteenet-out",
    *,
    threshold: float | None = None,
    max_drop: float | None = None,
    budget: float | None = None,
    cpm: bool = False,
    margin: float = DEFAULT_MARGIN,
    min_support: int = 20,
    risk: bool = False,
    delta: float = 0.1,
    bound: str = "wsr",
    score: str = "softmax",
    data: str | os.PathLike | None = None,
    split: str = "train",
    checkpoint: str | os.PathLike | None = None,
    force: bool = False,
    device: str = "cpu",
    write: bool = True,
    cost: str | None = None,
    progress: bool = False,
    model: nn.Module | Callable[[], nn.Module] | None = None,
    labels: str | None = None,
) -> CalibrationResult:
    """Choose the threshold table and write it into the bundle (thresholds.json + .csv).

    With no method option the cost search runs at ``max_drop`` 0.01 (one point of accuracy, or
    of agreement without labels). ``risk`` certifies ``max_drop`` with probability
    ``1 - delta``; with ``cpm`` it scans the CPM table scaled from "never" towards itself.
    ``cost`` (default: the bundle's) is what the search minimises: ``"flops"``, or
    ``"latency"``, measured times (the bundle's profile when it was measured on this device,
    else a fresh one). A bundle attached with a ZTW ensemble is calibrated on its ensembled
    exits (their scores and predictions; every branch the ensemble reads is counted), on the
    held-out half its weights were not fitted on (the split the bundle records). ``model``: the
    backbone module of a bundle attached to the user's own (see :func:`pteenet.load`).
    ``labels`` "none" ignores the data's labels (default: as the bundle was attached).
    """
    method = _method(threshold, cpm, max_drop, budget, risk, delta, bound, margin, min_support)
    check_device(device)
    b = read_bundle(bundle, thresholds=False)  # all checked before the backbone is built
    ee = load(b, checkpoint=checkpoint, force=force, device=device, thresholds=False,
              model=model)
    ee.set_thresholds(1.0, score="softmax" if uses_gate(method, cpm) else score)
    use_cost(ee, cost or ee.cost.kind, b.info.preprocess.input_size, device)
    out = collect(ee, b, data, split=split, device=device, progress=progress, labels=labels)
    table = choose_table(out, ee.num_classes, method=method, threshold=threshold,
                         max_drop=max_drop, budget=budget, cpm=cpm, margin=margin,
                         min_support=min_support, delta=delta, bound=bound, score=score)
    if ee.cost.kind == "latency" and ee.latency is not None:
        table.params["cost_device"] = ee.latency.device
    if write:
        write_thresholds(b.path, table)
    return CalibrationResult(table, out, table.summary, class_rows(out, table.thresholds),
                             b.info.classes)


def use_cost(model: EarlyExitModel, cost: str, input_size: tuple[int, int],
             device: str = "cpu") -> None:
    """Put ``model`` on the ``cost`` model; for latency, re-measure the profile unless it was
    measured on this device (times from another machine would rank exits wrongly)."""
    profile = model.latency
    if cost == "latency" and (profile is None or profile.device != device_name(device)):
        profile = model.profile(probe_images(input_size, device))
    model.use_cost(cost, profile)


def _risk_table(out: Outputs, k: int, cpm: bool, margin: float, min_support: int,
                max_drop: float, delta: float, bound: str, params: dict) -> Tensor:
    """Fixed-sequence testing along a conservative-to-permissive family of tables.

    The family is built on a third of the samples (:func:`_mincost_family`, or the CPM table
    scaled) and the bound is computed on the other two thirds: the bound's margin shrinks with
    the samples it sees, while the family only needs to rank tables. With labels each sample's
    loss is ``(1[cascade wrong] - 1[backbone wrong] + 1) / 2`` in {0, 1/2, 1}, whose mean is
    ``(drop + 1) / 2``, so bounding it bounds the accuracy drop itself (the WSR bound adapts to
    its small variance); without labels the loss is disagreement with the backbone.
    """
    n, b = out.scores.shape
    if n < 6:
        raise CalibrationError(f"risk control needs at least 6 calibration samples, got {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    build, test = perm[: n // 3], perm[n // 3:]
    part = _subset(out, build)
    if cpm:
        family = [as_table(None, b, k), *scaled_candidates(_cpm_table(part, k, margin,
                                                                     min_support))]
    else:
        family = [as_table(t, b, k) for t in _mincost_family(part, max_drop)]
    checked = _subset(out, test)
    losses = torch.stack([losses_for(checked.scores, checked.preds, checked.final_pred, t,
                                      checked.labels) for t in family])
    level = (max_drop + 1) / 2 if checked.labels is not None else max_drop
    res = risk_control(losses, level, delta, bound)
    scale = (lambda v: 2 * v - 1) if checked.labels is not None else (lambda v: v)
    params.update(max_drop=max_drop, delta=delta, bound=bound, family="cpm" if cpm else "mincost",
                  ucb=scale(res.ucb), empirical=scale(res.empirical),
                  certified=res.index is not None, certified_on=int(test.numel()))
    if res.index is None:
        raise CalibrationError(
            f"even the most conservative thresholds cannot be certified at max-drop {max_drop} "
            f"with {test.numel()} samples (bound {scale(res.ucb):.3f}); use more calibration "
            f"data or a larger --max-drop"
        )
    return family[res.index].float()


FAMILY_STEPS = 31  # cost-search limits from 0 to 3 x max_drop
RAMP_STEPS = 40  # tables between "never" and the most conservative optimum
BLEND_STEPS = 4  # tables from one optimum to the next (the last is the next optimum)


def _mincost_family(out: Outputs, max_drop: float) -> list[Tensor]:
    """Per-exit tables from "never" to permissive, for risk control to walk.

    Each member is a full cost-search optimum (pruned, retried) at a limit between 0 and
    ``3 * max_drop``, ordered by cost: the greedy's own path is myopic and ranks tables by luck
    on few samples, so certifying along it stopped at 0.61-0.67 of ResNet-44's FLOPs where these
    optima reach 0.52-0.56. Before the first optimum its thresholds ramp up from 1.0, and
    between consecutive optima the thresholds move in steps (:func:`blend_tables`), so that the walk
    can stop close to where the bound gives out instead of at the last optimum before it.
    """
    limits = torch.linspace(0.0, min(3 * max_drop, 0.99), FAMILY_STEPS).tolist()
    found = sorted((_search(out, limit, None) for limit in limits), key=lambda f: -f.cost)
    optima = [f.thresholds.float() for f in found]
    ramp = [t[:, 0] for t in scaled_candidates(optima[0][:, None], RAMP_STEPS + 1)[:-1]]
    family = [torch.full_like(optima[0], math.inf), *ramp, optima[0]]
    for a, b in zip(optima, optima[1:]):
        steps = torch.linspace(0, 1, BLEND_STEPS + 1)[1:].tolist()
        family += [blend_tables(a, b, s) for s in steps]
    return family


def blend_tables(a: Tensor, b: Tensor, s: float) -> Tensor:
    """A fraction ``s`` of the way from table ``a`` to table ``b``: thresholds of exits on in
    both move linearly; an exit ``b`` switches on starts at 1.0; one ``b`` switches off stays
    as in ``a`` until ``s`` = 1."""
    on_a, on_b = a <= 1, b <= 1
    moved = torch.where(on_a & on_b, torch.lerp(a, b, s), torch.where(on_b, 1 - s * (1 - b), a))
    return b.clone() if s >= 1 else moved


def _subset(out: Outputs, idx: Tensor) -> Outputs:
    labels = None if out.labels is None else out.labels[idx]
    return Outputs(out.scores[idx], out.preds[idx], out.final_pred[idx], labels,
                   out.cost)
