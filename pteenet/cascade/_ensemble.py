"""Geometric ensembling of the exits so far, after ZTW (Wołczyk et al. 2021, "Zero Time Waste").

Each exit's own branch sees only its cut's features, but by the time a sample reaches exit k the
branches of exits 0..k have all answered, and their answers err differently. ZTW combines them:
exit k answers with

    z'_k = sum_{j<=k} w_kj * log_softmax(z_j) + b_k      (w_kj >= 0, one bias per class)

a weighted product of the earlier exits' distributions (a geometric ensemble), whose softmax
gives the exit's score and prediction. The weights are fitted once, after the branches are
trained, on held-out samples (:func:`fit_ztw`); the price is that every branch up to the last
exit that may fire must run, since the ensemble reads them (:func:`pteenet.cascade._model.reach`).

Only the combination lives here; the cascade that keeps each sample's earlier log-softmaxes
through batch compaction is :class:`pteenet.cascade._model.EarlyExitModel`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pteenet.errors import OptionError

__all__ = ["FIT_ITERATIONS", "ZTWEnsemble", "fit_split", "fit_ztw"]

FIT_ITERATIONS = 200  # L-BFGS iterations per exit: B + K parameters converge well before


class ZTWEnsemble(nn.Module):
    """Per exit k: non-negative weights over exits 0..k (row k of a lower-triangular ``weight``
    ``[B, B]``) and a class bias (row k of ``bias`` ``[B, K]``)."""

    def __init__(self, weight: Tensor, bias: Tensor) -> None:
        super().__init__()
        weight, bias = torch.as_tensor(weight).float(), torch.as_tensor(bias).float()
        check_weights(weight, bias)
        self.register_buffer("weight", weight.clone())
        self.register_buffer("bias", bias.clone())

    @property
    def num_branches(self) -> int:
        return int(self.weight.shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.bias.shape[1])

    @staticmethod
    def extend(history: Tensor | None, logits: Tensor) -> Tensor:
        """The log-softmaxes of the exits so far ``[N, k, K]`` with this exit's appended."""
        own = logits.float().log_softmax(1).unsqueeze(1)
        return own if history is None else torch.cat([history, own], 1)

    def combine(self, history: Tensor, k: int) -> Tensor:
        """Exit ``k``'s ensembled logits from the log-softmaxes of exits 0..k ``[N, k+1, K]``.

        The one formula the model, calibration and the exported graphs all use, so none of
        them can compute an exit's answer differently."""
        w = self.weight[k, : k + 1]
        return (w[None, :, None] * history).sum(1) + self.bias[k]

    def step(self, history: Tensor | None, logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Exit ``k``'s ensembled logits from branch ``k``'s own and the log-softmaxes of the
        exits before (``history``, None at the first), and that history extended: one exit of
        the cascade as inference and the exported graphs run it."""
        history = self.extend(history, logits)
        return self.combine(history, k), history

    def exit_logits(self, logits: Sequence[Tensor]) -> list[Tensor]:
        """Every exit's ensembled logits from the branches' own (first ``len(logits)`` exits)."""
        history, out = None, []
        for k, z in enumerate(logits):
            z, history = self.step(history, z, k)
            out.append(z)
        return out


def check_weights(weight: Tensor, bias: Tensor) -> None:
    """Refuse weights no fit could give: wrong shapes, negative or non-finite values, or a
    weight on a later exit (which the cascade has not run yet when exit k answers)."""
    b = weight.shape[0] if weight.ndim == 2 else -1
    if weight.shape != (b, b) or bias.ndim != 2 or bias.shape[0] != b or b < 1:
        raise OptionError(f"`ensemble` needs weights [B, B] and bias [B, K], got "
                          f"{list(weight.shape)} and {list(bias.shape)}")
    if not bool(torch.isfinite(weight).all() and torch.isfinite(bias).all()):
        raise OptionError("`ensemble` weights and bias must be finite")
    if bool((weight < 0).any()) or bool(weight.triu(1).ne(0).any()):
        raise OptionError("`ensemble` weights must be >= 0 and zero above the diagonal (exit k "
                          "reads exits 0..k only)")


def fit_split(n: int, seed: int) -> tuple[list[int], list[int]]:
    """Positions ``0..n-1`` split, seeded, into (fit, calibrate) halves, both sorted.

    The ensemble is fitted on one half of the held-out split and thresholds are calibrated on
    the other: thresholds chosen on the samples the weights were fitted on would see exits more
    confident than they are on new data."""
    if n < 2:
        raise OptionError(f"`ensemble` needs at least 2 held-out samples (one to fit, one to "
                          f"calibrate), got {n}; raise `val_fraction`")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[: n // 2]), sorted(perm[n // 2:])


@torch.enable_grad()
def _fit_exit(logp: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """One exit's weights (softplus keeps them >= 0) and bias, by L-BFGS on cross-entropy,
    starting from equal weights and no bias."""
    w = torch.zeros(logp.shape[1], requires_grad=True)
    b = torch.zeros(logp.shape[2], requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=FIT_ITERATIONS)

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy((F.softplus(w)[None, :, None] * logp).sum(1) + b, targets)
        loss.backward()
        return loss

    opt.step(closure)
    return F.softplus(w).detach(), b.detach()


def fit_ztw(logits: Tensor, targets: Tensor) -> ZTWEnsemble:
    """Fit every exit's weights and bias on branch logits ``[N, B, K]`` and targets ``[N]``.

    Each exit is fitted on its own (exit k's answer only matters to the samples that reach it,
    but which those are depends on thresholds not yet chosen, so all samples count). Targets
    are the labels where the data has them, else the backbone's predictions, as calibration's
    own criterion is. Deterministic: L-BFGS from a fixed start on CPU."""
    logp = logits.detach().cpu().float().log_softmax(-1).clone()  # a normal tensor, not an
    targets = targets.detach().cpu().long().clone()  # inference one: autograd saves it
    b, k = logp.shape[1], logp.shape[2]
    weight, bias = torch.zeros(b, b), torch.zeros(b, k)
    for e in range(b):
        weight[e, : e + 1], bias[e] = _fit_exit(logp[:, : e + 1], targets)
    return ZTWEnsemble(weight, bias)
