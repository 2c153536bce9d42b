"""Exit thresholds for an early-exit cascade: the exit rule, its summary, and two calibrators.

A cascade has ``B`` early-exit branches followed by the backbone (the final exit, index ``B``).
For ``N`` calibration samples we hold, per branch ``k``, a confidence ``scores[n, k]`` in [0, 1]
and a predicted class ``preds[n, k]``, plus the backbone's prediction ``final_pred[n]``.
Thresholds are always a float table ``thr[B, K]`` (per branch and per predicted class) so that one
exit rule serves global, per-branch and per-class calibration alike:

    sample ``n`` leaves at the first branch ``k`` with ``scores[n, k] >= thr[k, preds[n, k]]``,
    otherwise at the backbone.

``inf`` (or any value above 1) therefore means "never exits here" and 0 means "always exits here".

Two ways to choose the table live here:

* :func:`cpm_thresholds` -- Class Precision Margin from BTS-EE (Aperstein & Apartsin): per branch
  and class, the loosest threshold whose exits stay within a precision margin of the backbone.
* :func:`risk_control` -- fixed-sequence testing over a family of candidate tables with a
  distribution-free upper confidence bound on the risk, after Jazbec et al. 2024, "Fast yet Safe:
  Early-Exiting with Risk Control", using the Hoeffding-Bentkus bound of Bates et al. 2021
  ("Distribution-free, risk-controlling prediction sets") or the Waudby-Smith-Ramdas betting bound.

Everything is pure tensor math on whatever device the inputs live on; nothing here reads files or
runs models.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Literal

import torch
from torch import Tensor

from pteenet.errors import CalibrationError, OptionError

__all__ = [
    "RiskResult",
    "as_table",
    "cascade_predictions",
    "class_precision",
    "cpm_thresholds",
    "exit_index",
    "global_candidates",
    "hoeffding_bentkus_ucb",
    "losses_for",
    "risk_control",
    "scaled_candidates",
    "summarize",
    "wsr_ucb",
]

# Slack for "precision >= target" so that e.g. 9/10 >= 1.0 - 0.1 is not lost to rounding.
_PRECISION_TOL = 1e-9
# Bisection stops once the bracket is this narrow; the upper end is returned (conservative).
_BISECT_TOL = 1e-9
_BISECT_STEPS = 60


# --------------------------------------------------------------------------------------------
# Threshold tables
# --------------------------------------------------------------------------------------------


def as_table(value, num_branches: int, num_classes: int) -> Tensor:
    """Turn a global, per-branch or per-class threshold spec into a float ``[B, K]`` CPU table.

    One table shape for every granularity keeps a single exit rule (:func:`exit_index`) and a
    single on-disk format. Accepted: a number (global), a sequence of ``B`` numbers (per branch),
    a ``B x K`` nested sequence (per class; a row may also be a single number), or a tensor of
    shape ``[]``, ``[B]`` or ``[B, K]``. ``None`` anywhere means ``inf`` ("never exits").
    The table is float32, except that a floating tensor keeps its dtype (so thresholds picked
    from float64 scores stay exact).
    """
    if num_branches < 0 or num_classes < 1:
        raise OptionError(
            f"need num_branches >= 0 and num_classes >= 1, got {num_branches} and {num_classes}"
        )
    shape = (num_branches, num_classes)
    if isinstance(value, Tensor):
        dtype = value.dtype if value.dtype.is_floating_point else torch.float32
        table = _tensor_table(value.detach().to("cpu", dtype), shape)
    elif value is None or isinstance(value, numbers.Real):
        table = torch.full(shape, _number(value))
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        table = _nested_table(value, shape)
    else:
        raise OptionError(f"thresholds must be a number, a list or a tensor, not {type(value)!r}")
    _check_table_values(table)
    return table


def _number(value) -> float:
    """One threshold entry as a float; ``None`` is ``inf`` (never exits)."""
    if value is None:
        return math.inf
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise OptionError(f"a threshold must be a number or None, not {value!r}")
    return float(value)


def _tensor_table(value: Tensor, shape: tuple[int, int]) -> Tensor:
    """Broadcast a 0-d, ``[B]`` or ``[B, K]`` tensor to ``[B, K]``, refusing anything else."""
    b, k = shape
    if value.dim() == 0:
        return value.expand(shape).clone()
    if value.dim() == 1 and value.shape[0] == b:
        return value[:, None].expand(shape).clone()
    if value.dim() == 2 and tuple(value.shape) == shape:
        return value.clone()
    raise OptionError(
        f"threshold tensor has shape {list(value.shape)}; expected [], [{b}] or [{b}, {k}]"
    )


def _nested_table(value: Sequence, shape: tuple[int, int]) -> Tensor:
    """Build ``[B, K]`` from ``B`` rows, each a number/None or a sequence of ``K`` of them."""
    b, k = shape
    if len(value) != b:
        raise OptionError(f"got {len(value)} thresholds for {b} branches")
    rows = []
    for i, row in enumerate(value):
        if isinstance(row, Sequence) and not isinstance(row, (str, bytes)):
            if len(row) != k:
                raise OptionError(f"branch {i} has {len(row)} class thresholds, expected {k}")
            rows.append([_number(v) for v in row])
        else:
            rows.append([_number(row)] * k)
    return torch.tensor(rows, dtype=torch.float32).reshape(shape)


def _check_table_values(table: Tensor) -> None:
    if torch.isnan(table).any():
        raise OptionError("thresholds contain NaN; use inf (or None) for 'never exits'")
    if (table < 0).any():
        raise OptionError("thresholds must be >= 0 (0 = always exit, inf = never exit)")


def global_candidates(num_branches: int, num_classes: int, steps: int = 101) -> list[Tensor]:
    """Global tables from 1.0 down to 0.0: the conservative-to-permissive order risk control needs.

    Fixed-sequence testing (Jazbec et al. 2024) walks candidates from the safest one, so index 0
    is the strictest threshold and the last one lets every sample leave at branch 0.
    """
    _check_steps(steps)
    values = torch.linspace(1.0, 0.0, steps).tolist()
    return [as_table(v, num_branches, num_classes) for v in values]


def scaled_candidates(table: Tensor, steps: int = 101) -> list[Tensor]:
    """Shrink a per-class table towards 1.0: ``thr(s) = 1 - s * (1 - table)`` for s in [0, 1].

    This turns one calibrated table (e.g. from CPM) into a one-parameter, conservative-to-
    permissive family (s = 0: every finite entry is 1.0; s = 1: the table itself) that risk control
    or a benchmark sweep can walk. Entries above 1 (``inf`` included) never exit at any ``s`` and
    are kept as they are.
    """
    _check_steps(steps)
    base = as_table(table, *_table_shape(table))
    never = base > 1.0
    ones = torch.ones_like(base)
    out = []
    for s in torch.linspace(0.0, 1.0, steps).tolist():
        scaled = torch.lerp(ones, base, s)  # exact at both ends: s=1 returns the table itself
        out.append(torch.where(never, base, scaled))
    return out


def _table_shape(table) -> tuple[int, int]:
    if not isinstance(table, Tensor) or table.dim() != 2:
        raise OptionError("expected a [B, K] threshold tensor; build one with as_table()")
    return int(table.shape[0]), int(table.shape[1])


def _check_steps(steps: int) -> None:
    if int(steps) != steps or steps < 2:
        raise OptionError(f"steps must be an integer >= 2, got {steps}")


# --------------------------------------------------------------------------------------------
# The exit rule and its summary
# --------------------------------------------------------------------------------------------


def exit_index(scores: Tensor, preds: Tensor, thr: Tensor) -> Tensor:
    """Exit taken by each sample: the first ``k`` with ``scores[:, k] >= thr[k, preds[:, k]]``.

    Returns a LongTensor ``[N]`` with values in ``0..B`` (``B`` = the backbone). This is the same
    rule the deployed model applies, so calibration and inference cannot drift apart. Thresholds
    are compared in the scores' dtype, so a threshold picked from observed scores is exact.
    """
    n, b = _check_scores(scores, preds)
    table = _check_thr(thr, b, preds)
    if b == 0:
        return torch.zeros(n, dtype=torch.long, device=scores.device)
    table = table.to(device=scores.device, dtype=_float_dtype(scores))
    branch = torch.arange(b, device=scores.device)
    per_sample = table[branch[None, :], preds.long().to(scores.device)]  # [N, B]
    exits = scores >= per_sample
    first = exits.to(torch.uint8).argmax(dim=1)  # argmax returns the first maximum
    return torch.where(exits.any(dim=1), first, torch.full_like(first, b))


def cascade_predictions(
    scores: Tensor, preds: Tensor, final_pred: Tensor, thr: Tensor
) -> tuple[Tensor, Tensor]:
    """The cascade's prediction ``[N]`` and the exit ``[N]`` each sample took."""
    exits = exit_index(scores, preds, thr)
    _check_vector(final_pred, scores.shape[0], "final_pred")
    every = torch.cat([preds.long(), final_pred.long().to(preds.device)[:, None]], dim=1)
    return every.gather(1, exits[:, None]).squeeze(1), exits


def summarize(
    scores: Tensor,
    preds: Tensor,
    final_pred: Tensor,
    thr: Tensor,
    exit_cost,
    labels: Tensor | None = None,
) -> dict:
    """What a threshold table does on a data set: where samples leave, what it costs, what it loses.

    ``exit_cost[k]`` (length ``B + 1``) is the FLOPs of leaving at exit ``k`` relative to the
    backbone. Returns plain ints/floats (JSON-serialisable)::

        {"num_samples", "exits": [{"exit", "count", "share", "agreement", "accuracy"}, ...],
         "agreement", "accuracy", "backbone_accuracy", "mean_relative_flops"}

    ``agreement`` is the fraction whose prediction matches the backbone's; the accuracy fields are
    ``None`` without ``labels``, and every per-exit rate is ``None`` for an exit nobody takes.
    """
    n, b = _check_scores(scores, preds)
    if n == 0:
        raise CalibrationError("cannot summarize thresholds on zero samples")
    cost = _check_cost(exit_cost, b).to(scores.device)
    pred, exits = cascade_predictions(scores, preds, final_pred, thr)
    final = final_pred.long().to(pred.device)
    agree = pred == final
    right = backbone_right = None
    if labels is not None:
        _check_vector(labels, n, "labels")
        labels = labels.long().to(pred.device)
        right, backbone_right = pred == labels, final == labels
    per_exit = [_exit_stats(k, exits == k, agree, right, n) for k in range(b + 1)]
    return {
        "num_samples": n,
        "exits": per_exit,
        "agreement": _mean(agree),
        "accuracy": None if right is None else _mean(right),
        "backbone_accuracy": None if backbone_right is None else _mean(backbone_right),
        "mean_relative_flops": float(cost[exits].double().mean()),
    }


def _exit_stats(k: int, taken: Tensor, agree: Tensor, right: Tensor | None, n: int) -> dict:
    count = int(taken.sum())
    return {
        "exit": k,
        "count": count,
        "share": count / n,
        "agreement": _mean(agree[taken]) if count else None,
        "accuracy": _mean(right[taken]) if (count and right is not None) else None,
    }


def _mean(flags: Tensor) -> float:
    return float(flags.double().mean())


# --------------------------------------------------------------------------------------------
# Class Precision Margin (BTS-EE)
# --------------------------------------------------------------------------------------------


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
    _check_vector(reference, pred.shape[0], "reference")
    pred, reference = pred.long(), reference.long().to(pred.device)
    _check_classes(pred, num_classes, "pred")
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
    n, b = _check_scores(scores, preds)
    _check_vector(reference, n, "reference")
    margin, min_support = _check_cpm_options(margin, min_support)
    _check_classes(preds, num_classes, "preds")
    target = _cpm_target(backbone_precision, num_classes, margin).tolist()
    dtype = _float_dtype(scores)
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


def _check_cpm_options(margin: float, min_support: int) -> tuple[float, int]:
    if not 0.0 <= float(margin) <= 1.0:
        raise OptionError(f"margin must lie in [0, 1], got {margin}")
    if int(min_support) != min_support or min_support < 1:
        raise OptionError(f"min_support must be an integer >= 1, got {min_support}")
    return float(margin), int(min_support)


# --------------------------------------------------------------------------------------------
# Risk control (Jazbec et al. 2024)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RiskResult:
    """Outcome of :func:`risk_control`.

    ``index`` is the most permissive candidate certified to have risk <= epsilon with probability
    >= 1 - delta (``None`` if not even candidate 0 is); ``ucb``/``empirical`` are that candidate's
    bound and mean loss (candidate 0's when ``index`` is ``None``). ``ucbs``/``empiricals`` list
    every candidate's, in candidate order, for plots and reports.
    """

    index: int | None
    ucb: float
    empirical: float
    ucbs: list[float]
    empiricals: list[float]

    def to_dict(self) -> dict:
        return asdict(self)


def losses_for(
    scores: Tensor,
    preds: Tensor,
    final_pred: Tensor,
    thr: Tensor,
    labels: Tensor | None = None,
) -> Tensor:
    """Per-sample [0, 1] loss whose mean bounds the accuracy drop, for risk control.

    With labels: ``(1[cascade wrong] - 1[backbone wrong] + 1) / 2``, in {0, 1/2, 1}; its mean is
    ``(drop + 1) / 2``, so a bound on it is a bound on the drop itself, and samples where the
    exit fixes the backbone count in the cascade's favour (a one-sided "wrong where the backbone
    was right" loss only upper-bounds the drop, and needed 0.82-0.89 of ResNet-44's FLOPs where
    the uncertified rule needed 0.67-0.71). Without labels: ``1[cascade pred != backbone
    pred]``, the disagreement.
    """
    pred, _ = cascade_predictions(scores, preds, final_pred, thr)
    final = final_pred.long().to(pred.device)
    if labels is None:
        return (pred != final).float()
    _check_vector(labels, pred.shape[0], "labels")
    labels = labels.long().to(pred.device)
    return ((pred != labels).float() - (final != labels).float() + 1) / 2


def risk_control(
    candidate_losses,
    epsilon: float,
    delta: float,
    bound: Literal["hb", "wsr"] = "hb",
) -> RiskResult:
    """Pick the most permissive candidate whose risk is certified <= ``epsilon`` w.p. >= 1 - delta.

    Fixed-sequence testing as in Learn-then-Test (Angelopoulos et al. 2021) and "Fast yet Safe:
    Early-Exiting with Risk Control" (Jazbec et al. 2024): candidates (rows of the ``[M, N]``
    loss matrix) go from most conservative (0) to most permissive (M - 1); walk upward while the
    upper confidence bound stays <= epsilon and keep the last that passed. Testing in a fixed order
    needs no multiplicity correction, and under the monotone-risk assumption it also stops at the
    right place. ``bound`` is ``"hb"`` (Hoeffding-Bentkus) or ``"wsr"`` (Waudby-Smith-Ramdas).
    """
    losses = _check_losses(candidate_losses)
    _check_level(epsilon, "epsilon")
    _check_level(delta, "delta")
    empiricals = losses.mean(dim=1).clamp(0.0, 1.0).tolist()
    if bound == "hb":
        ucbs = [hoeffding_bentkus_ucb(r, losses.shape[1], delta) for r in empiricals]
    elif bound == "wsr":
        ucbs = _wsr_ucb_batch(losses, delta).tolist()
    else:
        raise OptionError(f"bound must be 'hb' or 'wsr', got {bound!r}")
    index = None
    for i, u in enumerate(ucbs):
        if u > epsilon:
            break
        index = i
    at = 0 if index is None else index
    return RiskResult(index, ucbs[at], empiricals[at], ucbs, empiricals)


def hoeffding_bentkus_ucb(risk_hat: float, n: int, delta: float) -> float:
    """Upper confidence bound on a [0, 1]-bounded mean from the Hoeffding-Bentkus p-value.

    From Bates et al. 2021, "Distribution-free, risk-controlling prediction sets":
    ``p(r) = min(exp(-n h1(min(risk_hat, r), r)), e * P(Binom(n, r) <= ceil(n risk_hat)))`` and the
    bound is the smallest ``r >= risk_hat`` with ``p(r) <= delta``, found by bisection (``p`` falls
    in ``r``). HB is valid for any [0, 1] losses, not only 0/1, and is tighter than Hoeffding
    alone. Results are cached: calibration asks for the same (risk_hat, n) many times.
    """
    if int(n) != n or n < 1:
        raise OptionError(f"n must be an integer >= 1, got {n}")
    if not 0.0 <= float(risk_hat) <= 1.0:
        raise OptionError(f"risk_hat must lie in [0, 1], got {risk_hat}")
    _check_level(delta, "delta")
    return _hb_ucb(float(risk_hat), int(n), float(delta))


@lru_cache(maxsize=4096)
def _hb_ucb(risk_hat: float, n: int, delta: float) -> float:
    if risk_hat >= 1.0:
        return 1.0
    m = math.ceil(n * risk_hat - 1e-9)
    k = torch.arange(m + 1, dtype=torch.float64)
    log_binom = math.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)

    def p_value(r: float) -> float:
        hoeffding = math.exp(-n * _h1(risk_hat, r))
        return min(hoeffding, math.e * _binom_cdf(log_binom, k, n, r))

    lo, hi = risk_hat, 1.0
    if p_value(lo) <= delta:
        return lo
    for _ in range(_BISECT_STEPS):
        if hi - lo <= _BISECT_TOL:
            break
        mid = 0.5 * (lo + hi)
        if p_value(mid) <= delta:
            hi = mid
        else:
            lo = mid
    return hi


def _h1(a: float, b: float) -> float:
    """Bernoulli KL divergence ``KL(a || b)`` (``0 log 0 = 0``); ``inf`` where ``b`` is 0 or 1."""
    if b >= 1.0:
        return 0.0 if a >= 1.0 else math.inf
    if b <= 0.0:
        return 0.0 if a <= 0.0 else math.inf
    first = a * math.log(a / b) if a > 0 else 0.0
    second = (1 - a) * math.log((1 - a) / (1 - b)) if a < 1 else 0.0
    return first + second


def _binom_cdf(log_binom: Tensor, k: Tensor, n: int, r: float) -> float:
    """``P(Binom(n, r) <= m)`` for ``k = 0..m`` via a log-sum-exp of the pmf (no scipy)."""
    if r <= 0.0:
        return 1.0
    if r >= 1.0:
        return 1.0 if k[-1] >= n else 0.0
    log_pmf = log_binom + k * math.log(r) + (n - k) * math.log1p(-r)
    return min(1.0, float(torch.logsumexp(log_pmf, dim=0).exp()))


def wsr_ucb(losses: Tensor, delta: float) -> float:
    """Waudby-Smith-Ramdas betting upper confidence bound on the mean of [0, 1] losses.

    As stated in Bates et al. 2021 (from Waudby-Smith & Ramdas, "Estimating means of bounded
    random variables by betting"): with running estimates ``mu_i``, ``sigma2_i`` and bets
    ``nu_i = min(1, sqrt(2 log(1/delta) / (n sigma2_{i-1})))``, the wealth of betting that the
    mean is below ``R`` is ``K_i(R) = prod_{j<=i} (1 - nu_j (L_j - R))``. If the mean were ``R``
    this is a non-negative martingale, so by Ville's inequality it exceeds ``1/delta`` with
    probability <= delta. Wealth grows with ``R``, hence the bound is
    ``inf {R : max_i K_i(R) > 1/delta}``, found by bisection. Often much tighter than HB when the
    losses have small variance. The result is never reported below the plug-in mean (still valid,
    only looser; the raw bound can dip below it for strongly ordered sequences).
    """
    _check_level(delta, "delta")
    losses = _check_losses(torch.as_tensor(losses).reshape(1, -1))
    return float(_wsr_ucb_batch(losses, delta)[0])


def _wsr_ucb_batch(losses: Tensor, delta: float) -> Tensor:
    """WSR bounds for each row of ``losses`` ``[M, N]`` at once (one bisection for all rows)."""
    losses = losses.double()
    n = losses.shape[1]
    nu = _wsr_bets(losses, delta)
    threshold = math.log(1.0 / delta)

    def rejected(r: Tensor) -> Tensor:
        log_wealth = torch.log1p(-nu * (losses - r[:, None])).cumsum(dim=1)
        return log_wealth.max(dim=1).values > threshold

    lo = torch.zeros(losses.shape[0], dtype=torch.float64, device=losses.device)
    hi = torch.ones_like(lo)
    for _ in range(_BISECT_STEPS):
        mid = 0.5 * (lo + hi)
        rej = rejected(mid)
        hi, lo = torch.where(rej, mid, hi), torch.where(rej, lo, mid)
        if float((hi - lo).max()) <= _BISECT_TOL:
            break
    return torch.maximum(hi, losses.sum(dim=1) / n)


def _wsr_bets(losses: Tensor, delta: float) -> Tensor:
    """Predictable bets ``nu_i`` (they use only ``L_1..L_{i-1}``), per row of ``losses``."""
    m, n = losses.shape
    steps = torch.arange(1, n + 1, dtype=torch.float64, device=losses.device)
    mu = (0.5 + losses.cumsum(dim=1)) / (1 + steps)
    sigma2 = (0.25 + ((losses - mu) ** 2).cumsum(dim=1)) / (1 + steps)
    prev = torch.cat(
        [torch.full((m, 1), 0.25, dtype=torch.float64, device=losses.device), sigma2[:, :-1]], dim=1
    )
    return torch.clamp(torch.sqrt(2 * math.log(1.0 / delta) / (n * prev)), max=1.0)


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


def _check_scores(scores: Tensor, preds: Tensor) -> tuple[int, int]:
    if not isinstance(scores, Tensor) or scores.dim() != 2:
        raise CalibrationError("scores must be an [N, B] tensor (one column per branch)")
    if not isinstance(preds, Tensor) or preds.shape != scores.shape:
        raise CalibrationError(
            f"preds must have the shape of scores {list(scores.shape)}, "
            f"got {list(getattr(preds, 'shape', []))}"
        )
    if preds.dtype.is_floating_point or preds.dtype == torch.bool:
        raise CalibrationError("preds must hold integer class indices")
    return int(scores.shape[0]), int(scores.shape[1])


def _check_thr(thr: Tensor, num_branches: int, preds: Tensor) -> Tensor:
    if not isinstance(thr, Tensor) or thr.dim() != 2 or thr.shape[0] != num_branches:
        raise OptionError(f"thresholds must be a [{num_branches}, K] tensor; use as_table()")
    _check_classes(preds, int(thr.shape[1]), "preds")
    return thr


def _check_classes(labels: Tensor, num_classes: int, name: str) -> None:
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise CalibrationError(f"{name} must hold class indices in [0, {num_classes})")


def _check_vector(values: Tensor, n: int, name: str) -> None:
    if not isinstance(values, Tensor) or values.dim() != 1 or values.shape[0] != n:
        raise CalibrationError(f"{name} must be a 1-D tensor of length {n}")


def _check_cost(exit_cost, num_branches: int) -> Tensor:
    cost = torch.as_tensor(exit_cost, dtype=torch.float64).detach().cpu().flatten()
    if cost.numel() != num_branches + 1:
        raise OptionError(f"exit_cost needs {num_branches + 1} entries, got {cost.numel()}")
    if not torch.isfinite(cost).all() or (cost < 0).any():
        raise OptionError("exit_cost entries must be finite and >= 0")
    return cost


def _check_losses(candidate_losses) -> Tensor:
    if isinstance(candidate_losses, Tensor):
        losses = candidate_losses
    elif len(candidate_losses) == 0:
        raise CalibrationError("losses must be a non-empty [M candidates, N samples] tensor")
    else:
        losses = torch.stack([torch.as_tensor(row) for row in candidate_losses])
    if losses.dim() != 2 or losses.shape[0] < 1 or losses.shape[1] < 1:
        raise CalibrationError("losses must be a non-empty [M candidates, N samples] tensor")
    losses = losses.double()
    if torch.isnan(losses).any() or (losses < 0).any() or (losses > 1).any():
        raise CalibrationError("losses must lie in [0, 1]")
    return losses


def _check_level(value: float, name: str) -> None:
    if not 0.0 < float(value) < 1.0:
        raise OptionError(f"{name} must lie strictly between 0 and 1, got {value}")


def _float_dtype(scores: Tensor) -> torch.dtype:
    return scores.dtype if scores.dtype.is_floating_point else torch.float32
