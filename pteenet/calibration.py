"""Calibration: decide, per branch (and class), when an exit may answer.

Three methods write the same threshold table:

* ``global`` -- one threshold T on every exit score (PTEEnet's run-time knob);
* ``cpm`` -- Class Precision Margin (BTS-EE, Aperstein & Apartsin): per branch and predicted class,
  the lowest score whose exits keep that class's precision within ``margin`` of the backbone's;
* ``risk`` -- risk control after Jazbec et al. 2024 ("Fast yet Safe"): the most permissive
  thresholds (global, or the CPM table scaled) whose upper confidence bound on the cascade's
  disagreement with the backbone (or, with labels, its accuracy drop) is at most ``max_drop``
  with probability ``1 - delta``.

By default it runs on the bundle's held-out split, which training never saw.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .atomic import writes_into
from .bundle import ThresholdTable, load, read_info, write_thresholds
from .data import open_data
from .devices import check_device
from .errors import CalibrationError, OptionError
from .thresholds import (
    as_table,
    class_precision,
    cpm_thresholds,
    exit_index,
    global_candidates,
    losses_for,
    risk_control,
    scaled_candidates,
    summarize,
)
from .training import branch_scores, compute_features

__all__ = ["DEFAULT_MARGIN", "CalibrationResult", "Outputs", "calibrate", "collect", "class_rows"]

DEFAULT_MARGIN = 0.02


@dataclass
class Outputs:
    """Every exit's score and prediction on a set of samples, and the backbone's prediction."""

    scores: Tensor  # [N, B]
    preds: Tensor  # [N, B]
    final_pred: Tensor  # [N]
    labels: Tensor | None  # [N] or None when the data has no (matching) labels
    exit_costs: list[float]


@dataclass
class CalibrationResult:
    table: ThresholdTable
    outputs: Outputs
    summary: dict[str, Any]
    rows: list[dict[str, Any]]


def collect(model, data: str | os.PathLike | None = None, *, split: str = "train",
            device: str = "cpu", max_samples: int | None = None) -> Outputs:
    """Run the model's branches and backbone on the calibration samples, once.

    Without ``data``: the bundle's own held-out split (exactly the samples recorded at attach).
    """
    info = model.info
    spec = data if data is not None else info.data.get("spec")
    if spec is None:
        raise CalibrationError("the bundle records no data; pass --data")
    if data is None:  # the recorded indices belong to the split attach trained on
        split = info.data.get("split", "train")
    dataset = open_data(spec, info.preprocess, split=split)
    indices = list(range(len(dataset))) if data is not None else list(info.calibration_indices)
    if not indices:
        raise CalibrationError("no calibration samples: the bundle records no held-out split")
    if max(indices) >= len(dataset):
        raise CalibrationError(f"{spec} has fewer images than when the bundle was made; the "
                               f"held-out split no longer exists: pass --data")
    if max_samples is not None:
        indices = indices[:max_samples]
    feats = compute_features(model, dataset, indices, device=device)
    scores, preds = branch_scores(model, feats, device)
    labels = feats.labels
    usable = dataset.has_labels and bool((labels >= 0).all()) and \
        len(dataset.classes or []) == model.num_classes
    return Outputs(scores, preds, feats.final.argmax(1), labels if usable else None,
                   model.exit_costs())


def _check(threshold: float | None, cpm: bool, max_drop: float | None, delta: float,
           margin: float, min_support: int) -> str:
    if threshold is not None and (cpm or max_drop is not None):
        raise OptionError("--threshold cannot be combined with --cpm or --max-drop")
    if threshold is not None and not 0 <= threshold <= 1:
        raise OptionError(f"--threshold must lie in [0, 1], got {threshold}")
    if max_drop is not None and not 0 < max_drop < 1:
        raise OptionError(f"--max-drop must lie strictly between 0 and 1, got {max_drop}")
    if not 0 < delta < 1:
        raise OptionError(f"--delta must lie strictly between 0 and 1, got {delta}")
    if not 0 <= margin <= 1:
        raise OptionError(f"--margin must lie in [0, 1], got {margin}")
    if min_support < 1:
        raise OptionError(f"--min-support must be at least 1, got {min_support}")
    if max_drop is not None:
        return "risk"
    return "global" if threshold is not None else "cpm"


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


@writes_into("bundle", when="write")  # one writer at a time; checks writability first
def calibrate(
    bundle: str | os.PathLike = "pteenet-out",
    *,
    threshold: float | None = None,
    cpm: bool = False,
    margin: float = DEFAULT_MARGIN,
    min_support: int = 20,
    max_drop: float | None = None,
    delta: float = 0.1,
    bound: str = "hb",
    score: str = "head",
    data: str | os.PathLike | None = None,
    split: str = "train",
    checkpoint: str | os.PathLike | None = None,
    force: bool = False,
    device: str = "cpu",
    write: bool = True,
) -> CalibrationResult:
    """Choose the threshold table and write it into the bundle (thresholds.json + .csv).

    With no method flag, CPM is used. ``max_drop`` alone scans global thresholds; with ``cpm``
    it scans the CPM table scaled from "never" towards itself.
    """
    method = _check(threshold, cpm, max_drop, delta, margin, min_support)
    check_device(device)
    read_info(bundle)  # fail fast, before the backbone is built
    model = load(bundle, checkpoint=checkpoint, force=force, device=device, thresholds=False)
    model.set_thresholds(1.0, score=score)
    out = collect(model, data, split=split, device=device)
    b, k = model.num_branches, model.num_classes
    params: dict[str, Any] = {"score": score, "samples": int(out.final_pred.numel()),
                              "labels": out.labels is not None}
    if method == "global":
        thr = as_table(threshold, b, k)
        params["threshold"] = threshold
    elif method == "cpm":
        thr = _cpm_table(out, k, margin, min_support)
        params.update(margin=margin, min_support=min_support)
    else:
        thr = _risk_table(out, b, k, cpm, margin, min_support, max_drop, delta, bound, params)
    summary = summarize(out.scores, out.preds, out.final_pred, thr, out.exit_costs, out.labels)
    table = ThresholdTable(thr, score, method, params, summary)
    if write:
        write_thresholds(model.info.path, table)
    return CalibrationResult(table, out, summary, class_rows(out, thr))


def _risk_table(out: Outputs, b: int, k: int, cpm: bool, margin: float, min_support: int,
                max_drop: float, delta: float, bound: str, params: dict) -> Tensor:
    if cpm:
        candidates = scaled_candidates(_cpm_table(out, k, margin, min_support))
    else:
        candidates = global_candidates(b, k)
    never = as_table(None, b, k)
    candidates = [never, *candidates]
    losses = torch.stack([losses_for(out.scores, out.preds, out.final_pred, t, out.labels)
                          for t in candidates])
    res = risk_control(losses, max_drop, delta, bound)
    params.update(max_drop=max_drop, delta=delta, bound=bound, family="cpm" if cpm else "global",
                  ucb=res.ucb, empirical=res.empirical, certified=res.index is not None)
    if res.index is None:
        raise CalibrationError(
            f"even the most conservative thresholds cannot be certified at max-drop {max_drop} "
            f"with {losses.shape[1]} samples (bound {res.ucb:.3f}); use more calibration data "
            f"or a larger --max-drop"
        )
    return candidates[res.index].float()
