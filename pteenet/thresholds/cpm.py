"""Class Precision Margin thresholds (BTS-EE, Aperstein & Apartsin): one threshold per branch and
predicted class, the loosest whose exits stay within a precision margin of the backbone."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pteenet.errors import CalibrationError, OptionError
from pteenet.thresholds._checks import check_classes, check_scores, check_vector, float_dtype

__all__ = ["check_cpm_options", "class_precision", "cpm_thresholds"]

# Slack for "precision >= target" so that e.g. 9/10 >= 1.0 - 0.1 is not lost to rounding.
_PRECISION_TOL = 1e-9


def class_precision(
    pred: Tensor, reference: Tensor, num_classes: int, empty: float = 1.0
) -> Tensor:
    """Per-class precision ``P(reference == c | pred == c)`` as a float64 ``[K]`` tensor.

    This is the ``Pr_c`` that CPM measures branches against. A class that ``pred`` never outputs
    has no precision; it gets ``empty`` (default 1.0), the strictest CPM target, so that a class
    the backbone is never seen predicting cannot loosen an early exit.
    """
    if not isinstance(pred, Tensor) or pred.dim() != 1:
        raise CalibrationError("pred must be a 1-D tensor of class indices")
    check_vector(reference, pred.shape[0], "reference")
    pred, reference = pred.long(), reference.long().to(pred.device)
    check_classes(pred, num_classes, "pred")
    hits = torch.bincount(pred[pred == reference], minlength=num_classes).double()
    total = torch.bincount(pred, minlength=num_classes).double()
    out = torch.full((num_classes,), float(empty), dtype=torch.float64, device=pred.device)
    seen = total > 0
    out[seen] = hits[seen] / total[seen]
    return out


def cpm_thresholds(
    scores: Tensor,
    preds: Tensor,
    reference: Tensor,
    num_classes: int,
    margin: float,
    min_support: int = 20,
    backbone_precision=None,
) -> Tensor:
    """Class Precision Margin thresholds, from BTS-EE (Aperstein & Apartsin).

    Why: a single confidence threshold lets easy classes exit late and hard classes exit wrongly.
    CPM instead gives each (branch ``k``, predicted class ``c``) the lowest observed score ``tau``
    such that the samples the branch would release, ``{preds[:, k] == c, scores[:, k] >= tau}``,

    * have precision w.r.t. ``reference`` of at least ``backbone_precision[c] - margin``, and
    * number at least ``min_support`` (so a lucky handful cannot open an exit).

    ``reference`` is the ground truth when available, else the backbone's predictions (for which
    ``backbone_precision`` defaults correctly to all ones; otherwise compute it with
    :func:`class_precision`). Branches are calibrated in order, each only on the samples the
    earlier branches keep, because that is the population it will see at inference. Precision is
    not monotone in ``tau``, so every candidate is scanned and the lowest qualifying one wins; if
    none qualifies the entry is ``inf`` (never exits). The table has the scores' float dtype.
    """
    n, b = check_scores(scores, preds)
    check_vector(reference, n, "reference")
    margin, min_support = check_cpm_options(margin, min_support)
    check_classes(preds, num_classes, "preds")
    target = _cpm_target(backbone_precision, num_classes, margin).tolist()
    dtype = float_dtype(scores)
    table = torch.full((b, num_classes), math.inf, dtype=dtype, device=scores.device)
    reference = reference.long().to(scores.device)
    alive = torch.ones(n, dtype=torch.bool, device=scores.device)
    for k in range(b):
        s, p = scores[:, k].to(dtype), preds[:, k].long()
        for c in range(num_classes):
            mask = alive & (p == c)
            table[k, c] = _lowest_qualifying(s[mask], reference[mask] == c, target[c], min_support)
        alive &= ~(s >= table[k, p])
    return table


def _cpm_target(backbone_precision, num_classes: int, margin: float) -> Tensor:
    if backbone_precision is None:
        return torch.full((num_classes,), 1.0 - margin, dtype=torch.float64)
    prec = torch.as_tensor(backbone_precision, dtype=torch.float64).detach().cpu().flatten()
    if prec.numel() != num_classes:
        raise OptionError(f"backbone_precision has {prec.numel()} entries, expected {num_classes}")
    if torch.isnan(prec).any() or (prec < 0).any() or (prec > 1).any():
        raise OptionError("backbone_precision values must lie in [0, 1]")
    return prec - margin


def _lowest_qualifying(s: Tensor, correct: Tensor, target: float, min_support: int) -> float:
    """Lowest observed score whose release set meets the precision target and support.

    Scores are sorted descending; cumulative sums give each prefix's precision. Only the last
    position of a run of tied scores is a valid cut, since ``score >= tau`` releases the whole tie.
    """
    if s.numel() < min_support:
        return math.inf
    order = torch.sort(s, descending=True, stable=True).indices
    s_sorted = s[order]
    hits = correct[order].double().cumsum(0)
    size = torch.arange(1, s.numel() + 1, dtype=torch.float64, device=s.device)
    end_of_tie = torch.ones_like(s_sorted, dtype=torch.bool)
    end_of_tie[:-1] = s_sorted[:-1] != s_sorted[1:]
    ok = end_of_tie & (size >= min_support) & (hits >= (target - _PRECISION_TOL) * size)
    where = torch.nonzero(ok).flatten()
    return float(s_sorted[where[-1]]) if where.numel() else math.inf


def check_cpm_options(margin: float, min_support: int = 1) -> tuple[float, int]:
    """CPM's margin (a precision share, in [0, 1]) and support, as float and int, or one
    :class:`OptionError` line naming the parameter: the one check every caller of CPM shares
    (calibrate and attach check up front, before any costly pass)."""
    if not 0.0 <= float(margin) <= 1.0:
        raise OptionError(f"`margin` must lie in [0, 1], got {margin}")
    if int(min_support) != min_support or min_support < 1:
        raise OptionError(f"`min_support` must be an integer >= 1, got {min_support}")
    return float(margin), int(min_support)
