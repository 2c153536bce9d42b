"""Training targets and losses for exit branches on a frozen backbone.

Targets: the backbone's pseudo-labels (PTEEnet, Lahiany & Aperstein) hard or soft, the labels,
or both mixed. Losses: each branch on its own (SDN's IC-only recipe, Kaya et al. 2019) or EENets'
cost-aware L_v2 over the cascade (Demir & Akbas, eq. 5-8); each also trains the branch's
confidence head to predict whether the branch is right.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pteenet.cascade._branches import FrozenHead

__all__ = ["branch_per_sample", "distill_per_sample", "eenet_loss", "eenet_per_sample",
           "feature_per_sample", "make_targets"]


MIX = 0.5  # the labels' share of a mixed target


def make_targets(final: Tensor, labels: Tensor, target: str, temperature: float = 4.0) -> Tensor:
    """Target distributions [N, K]: the backbone's argmax, its tempered softmax, the labels, or
    the labels mixed half and half with the tempered softmax (``auto`` must be resolved first)."""
    k = final.shape[1]
    soft = torch.softmax(final.float() / temperature, dim=1)
    if target == "soft":
        return soft
    hard = labels if target in ("labels", "mixed") else final.argmax(1)
    one_hot = F.one_hot(hard.clamp_min(0), k).float()
    return MIX * one_hot + (1 - MIX) * soft if target == "mixed" else one_hot


def eenet_loss(logits: Sequence[Tensor], conf: Sequence[Tensor], final: Tensor, target: Tensor,
               costs: Sequence[float], lam: float, weight: Tensor | None = None) -> Tensor:
    """The mean over samples of :func:`eenet_per_sample`."""
    return _mean(eenet_per_sample(logits, conf, final, target, costs, lam), weight)


def eenet_per_sample(logits: Sequence[Tensor], conf: Sequence[Tensor], final: Tensor,
                     target: Tensor, costs: Sequence[float], lam: float) -> Tensor:
    """EENets' L_v2 on the frozen cascade, in log space (Demir & Akbas, eq. 5-8), plus each
    branch's own cross-entropy and a confidence target.

    ``costs[i]`` is the relative cost of leaving at branch i, ``costs[-1]`` of reaching the end
    (branches evaluated on the way included). The extra per-branch term matters on a *frozen*
    cascade: its last exit is the backbone, which matches pseudo-label targets almost perfectly,
    so L_v2 alone is minimised by every confidence collapsing to 0, after which no classifier
    receives gradient (we measured 13 % agreement, chance level, on CIFAR ResNet-20). For the
    same reason the confidences sink towards 0 (we measured heads around 1e-7) and stop ranking
    samples, so each head is also trained, by binary cross-entropy, to predict whether its branch
    agrees with the target: that is what thresholds act on.
    """
    log_y = F.log_softmax(final.float(), dim=1)  # log Y_N
    big_c = torch.full_like(log_y[:, 0], float(costs[-1]))  # C_N
    total = torch.zeros_like(big_c)
    for i in range(len(logits) - 1, -1, -1):
        log_h = F.logsigmoid(conf[i]).unsqueeze(1)
        log_1mh = F.logsigmoid(-conf[i]).unsqueeze(1)
        log_y = torch.logsumexp(torch.stack([log_h + F.log_softmax(logits[i], 1),
                                             log_1mh + log_y]), dim=0)
        h = torch.sigmoid(conf[i])
        big_c = h * costs[i] + (1 - h) * big_c
        own = -(target * F.log_softmax(logits[i], 1)).sum(1)
        right = (logits[i].argmax(1) == target.argmax(1)).float()
        conf_target = F.binary_cross_entropy_with_logits(conf[i], right, reduction="none")
        total = total + (-(target * log_y).sum(1) + lam * big_c + own + conf_target)
    return total


def _mean(x: Tensor, weight: Tensor | None) -> Tensor:
    if weight is None:
        return x.mean()
    return (x * weight).sum() / weight.sum().clamp_min(1e-12)


def distill_per_sample(logits: Sequence[Tensor], conf: Sequence[Tensor], target: Tensor
                       ) -> Tensor:
    """The default loss: every branch's own cross-entropy to the targets plus its confidence
    head's, summed over branches; branches never trade off against each other (SDN's IC-only
    training, Kaya et al. 2019, on a frozen backbone)."""
    return sum(branch_per_sample(lg, c, target) for lg, c in zip(logits, conf))


def branch_per_sample(logits: Tensor, conf: Tensor, target: Tensor) -> Tensor:
    """Boosted mode: the branch's own classification loss, plus its confidence head trained to
    predict whether the branch agrees with the target (its exit score)."""
    ce = -(target * F.log_softmax(logits, 1)).sum(1)
    right = (logits.argmax(1) == target.argmax(1)).float()
    return ce + F.binary_cross_entropy_with_logits(conf, right, reduction="none")


def feature_per_sample(branches: Sequence[nn.Module], reduced: Sequence[Tensor],
                       pre: Tensor | None) -> Tensor | float:
    """Feature distillation: each ``distill`` branch's projection against the backbone's
    pre-logits, squared error over their mean variance (one scale for every model), summed over
    those branches. Matching the 1,280 pre-logits of tf_efficientnet_lite0 teaches a head far
    more per pool image than its 1,000 softmax outputs do: alone it agreed with the backbone as
    well as with the KL term added (81 % at blocks.6.0); the target loss is kept beside it."""
    if pre is None:
        return 0.0
    scale = pre.float().var(0, unbiased=False).mean().clamp_min(1e-8)
    total: Tensor | float = 0.0
    for b, r in zip(branches, reduced):
        if isinstance(getattr(b, "classifier", None), FrozenHead):
            total = total + (b.body(r).float() - pre.float()).pow(2).mean(1) / scale
    return total
