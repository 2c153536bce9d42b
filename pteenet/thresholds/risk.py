"""Risk-controlled thresholds (Jazbec et al. 2024, "Fast yet Safe: Early-Exiting with Risk
Control"): fixed-sequence testing over candidate tables with a distribution-free upper confidence
bound on the risk, Hoeffding-Bentkus (Bates et al. 2021, "Distribution-free, risk-controlling
prediction sets") or Waudby-Smith-Ramdas betting.

The binomial tail and the Bernoulli KL divergence in the Hoeffding-Bentkus p-value come from
``scipy.special`` (``bdtr``, ``rel_entr``): exact and maintained, where hand-written sums of
log-pmfs were ours to get right at the edges."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Literal

import torch
from scipy.special import bdtr, rel_entr
from torch import Tensor

from pteenet.errors import CalibrationError, OptionError
from pteenet.thresholds._checks import check_vector
from pteenet.thresholds.table import cascade_predictions

__all__ = ["RiskResult", "hoeffding_bentkus_ucb", "losses_for", "risk_control", "wsr_ucb"]

# Bisection stops once the bracket is this narrow; the upper end is returned (conservative).
_BISECT_TOL = 1e-9
_BISECT_STEPS = 60


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
    check_vector(labels, pred.shape[0], "labels")
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

    def p_value(r: float) -> float:
        hoeffding = math.exp(-n * _bernoulli_kl(risk_hat, r))
        return min(hoeffding, math.e * float(bdtr(m, n, r)))  # bdtr: P(Binom(n, r) <= m)

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


def _bernoulli_kl(a: float, b: float) -> float:
    """``KL(Bernoulli(a) || Bernoulli(b))``, Bates et al.'s ``h1``; ``inf`` where ``b`` cannot
    produce what ``a`` does (``rel_entr`` keeps ``0 log 0 = 0`` and those infinities exact)."""
    return float(rel_entr(a, b) + rel_entr(1.0 - a, 1.0 - b))


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
