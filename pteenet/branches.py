"""Exit branches: small heads that read a feature map and answer early.

Every branch returns a classifier (K logits) and a confidence head (one logit; its sigmoid is the
exit score), the exit block of EENets (Demir & Akbas, section 3.1). The types:

* ``conv1``/``conv2``/``conv3`` -- PTEEnet's ConvX (Lahiany & Aperstein): X x [3x3 conv C->C, BN,
  ReLU], global average pool, the two heads. Enough capacity for large backbones.
* ``conv1d`` -- BTS-EE's lightweight branch (Aperstein & Apartsin). The paper gives no layers; ours
  is BN+ReLU on the map, global average pool to a C-vector, then two 1-D convolutions *along the
  channel axis* (1->8 channels, kernel 3; 8->8, kernel 3, stride 2) with ReLU, flattened (4C values)
  into the heads. It costs about ``4*C*(K+1)`` MACs: a tiny fraction of a ConvX branch, whose
  cost grows with C^2*H*W.
* ``pool`` -- EENets' Bnpool: BN, ReLU, global average pool, the heads.
* ``sdn`` -- the SDN baseline (Kaya et al. 2019): a learned mix of max and average pooling to 4x4,
  then a linear classifier. Used as the peer method in benchmarks (score it by softmax).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .errors import OptionError
from .tracing import count_flops

__all__ = ["BRANCH_TYPES", "Branch", "branch_flops", "make_branch"]


class Branch(nn.Module):
    """A body that maps the feature map to a vector, then the classifier and confidence heads.

    The confidence head sees the body's features *and* three statistics of the classifier's own
    softmax (top probability, top-1 minus top-2 margin, normalised entropy). A linear head on the
    features alone ranked samples worse than plain top-softmax (on CIFAR ResNet-44 it needed
    0.92 of the FLOPs where softmax needed 0.79 at the same accuracy); with the statistics it can
    learn softmax's ranking and improve on it. They are detached: the head's loss never bends the
    classifier.
    """

    def __init__(self, body: nn.Module, width: int, num_classes: int) -> None:
        super().__init__()
        self.body = body
        self.classifier = nn.Linear(width, num_classes)
        self.confidence = nn.Linear(width + 3, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.body(x)
        logits = self.classifier(z)
        stats = softmax_stats(logits.detach())
        return logits, self.confidence(torch.cat([z, stats], 1)).squeeze(1)


def softmax_stats(logits: torch.Tensor) -> torch.Tensor:
    """[N, 3]: top probability, top-1 minus top-2 probability, entropy / log(K)."""
    p = torch.softmax(logits.float(), 1)
    top = p.topk(min(2, p.shape[1]), dim=1).values
    margin = top[:, 0] - top[:, 1] if top.shape[1] > 1 else top[:, 0]
    entropy = -(p * p.clamp_min(1e-12).log()).sum(1) / max(math.log(p.shape[1]), 1e-12)
    return torch.stack([top[:, 0], margin, entropy], 1).to(logits.dtype)


def _conv_body(c: int, depth: int) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())


class _ChannelConv1d(nn.Module):
    """Treat the pooled C-vector as a 1-channel signal of length C and convolve along it."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.pre = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten())
        self.convs = nn.Sequential(
            nn.Conv1d(1, 8, 3, padding=1), nn.ReLU(),
            nn.Conv1d(8, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(self.pre(x).unsqueeze(1))


class _MixedPool(nn.Module):
    """SDN's pooling: a learned convex mix of max and average pooling to 4x4."""

    def __init__(self) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(1))
        self.max = nn.AdaptiveMaxPool2d(4)
        self.avg = nn.AdaptiveAvgPool2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.sigmoid(self.alpha)
        return (a * self.max(x) + (1 - a) * self.avg(x)).flatten(1)


def _body(kind: str, c: int) -> tuple[nn.Module, int]:
    if kind in ("conv1", "conv2", "conv3"):
        return _conv_body(c, int(kind[-1])), c
    if kind == "conv1d":
        return _ChannelConv1d(c), 8 * ((c + 1) // 2)
    if kind == "pool":
        return nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten()), c
    if kind == "sdn":
        return _MixedPool(), 16 * c
    raise ValueError(kind)


BRANCH_TYPES = ("conv1", "conv2", "conv3", "conv1d", "pool", "sdn")


def make_branch(kind: str, channels: int, num_classes: int) -> Branch:
    """Build an untrained branch of ``kind`` for a feature map with ``channels`` channels."""
    if kind not in BRANCH_TYPES:
        raise OptionError(f"unknown branch type '{kind}': use one of {', '.join(BRANCH_TYPES)}")
    body, width = _body(kind, channels)
    return Branch(body, width, num_classes)


def branch_flops(branch: nn.Module, shape: tuple[int, ...]) -> int:
    """FLOPs of one branch on one ``shape`` (C, H, W) feature map, counted like the backbone."""
    was = branch.training
    branch.eval()
    try:
        return count_flops(branch, torch.zeros(1, *shape))
    finally:
        branch.train(was)
