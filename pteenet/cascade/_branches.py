"""Exit branches: small heads that read a feature map and answer early.

Every branch is a fixed, parameter-free *reduction* of the feature map followed by a learned
*head*: a body, a classifier (K logits) and a confidence head (one logit; its sigmoid is the exit
score), the exit block of EENets (Demir & Akbas, section 3.1). The split is what makes exits
pay: the reduction (average and max pooling to a small grid, concatenated) is the same in every
epoch, so training caches the reduced map instead of the whole feature map, and the learned part
runs on a few hundred numbers instead of a full-resolution map, at a small fraction of a
full-map ConvX branch's cost (``benchmarks/results/exit-variants.md``). The reduced map
holds at most ``MAX_VALUES`` numbers (4 KB per image in the cache): wide ImageNet maps get a
smaller grid, and past one cell per channel adjacent channels are averaged (:func:`reduction`).

The types (bodies):

* ``mlp`` (default) -- the reduced map flattened, one hidden layer (Linear, BN, ReLU). Its width
  is sized so the branch costs at most ``budget`` of the backbone (see :func:`make_branch`).
* ``conv1``/``conv2``/``conv3`` -- PTEEnet's ConvX (Lahiany & Aperstein): X x [3x3 conv, BN,
  ReLU], global average pool, the heads; run on the reduced map at a width sized to the budget.
* ``conv1d`` -- BTS-EE's lightweight branch (Aperstein & Apartsin). The paper gives no layers;
  ours reduces to one value per channel (average and max), then BN+ReLU and two 1-D convolutions
  *along the channel axis* (1->8 channels, kernel 3; 8->8, kernel 3, stride 2) with ReLU.
* ``pool`` -- EENets' Bnpool: global pooling, BN, ReLU, the heads.
* ``sdn`` -- the SDN baseline (Kaya et al. 2019): a learned mix of max and average pooling to
  4x4, then a linear classifier. Used as the peer method in benchmarks.
* ``distill`` -- feature distillation: the global average of the map, standardised (BN without
  affine), one linear layer into the backbone's pre-logit space, then the backbone's own
  classifier, frozen and shared (:class:`FrozenHead`; :mod:`pteenet.graph._head` finds it).
  Trained to reproduce the pre-logits (MSE) as well as the targets, so a few thousand pool
  images need not teach 1,000 classes: on tf_efficientnet_lite0 its exit at ``blocks.6.0``
  agreed with the backbone on 81 % of ImageNet val images where the 1,000-way head agreed on
  75 % (benchmarks/results/imagenet-real-lost.md).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pteenet.cascade._pooling import grid_pool, token_cells, token_pool
from pteenet.choices import BRANCH_TYPES, DISTILL_MIN_CLASSES
from pteenet.errors import OptionError
from pteenet.graph._tracing import count_flops

__all__ = ["MAX_VALUES", "Branch", "FrozenHead", "Reduce", "branch_flops", "resolve_kind",
           "cache_bytes", "make_branch", "reduction", "softmax_stats"]

GRID = 4  # the reduced map's side for mlp, ConvX and sdn (smaller for wide maps)
MAX_VALUES = 2048  # numbers one branch's reduced map may hold per image: 4 KB in the fp16 cache
MAX_WIDTH = 256  # the widest hidden layer a budget may buy (wider did not help on CIFAR)
MIN_WIDTH = 16
DISTILL_GRID = 2  # the distill branch's cells per side (2x2: +5 to +15 pt agreement over 1x1)
DISTILL_HIDDEN = 2048  # its widest hidden layer (wider did not help on tf_efficientnet_lite0)
MIN_HIDDEN = 64  # narrower than this, the budget buys a linear map instead
CELL_POOL_MIN = 1 << 16  # values per image from which a channels-last map is cell-pooled


class Reduce(nn.Module):
    """Average and max pooling to ``size`` x ``size``, concatenated on channels: [N, 2C', s, s].

    Parameter-free and deterministic, so its output can be cached once for every epoch. Max
    pooling keeps the strongest local response that averaging alone would wash out (SDN's
    mixed pooling, Kaya et al. 2019). ``group`` > 1 then averages each run of ``group``
    adjacent channels (C' = C / group): the last resort of :func:`reduction` for maps so wide
    that even one cell per channel is more than a branch may cache.

    ``layout`` is how the cut holds its map (:data:`pteenet.graph.LAYOUTS`): ``chw`` [N, C, H,
    W]; ``hwc`` [N, H, W, C] (Swin, MaxViT, PVT), read as the same map permuted; ``tc``
    [N, T, C] tokens, reduced to [N, 2C', cells, 1] by :func:`~pteenet.cascade._pooling.
    token_pool` (the class token beside the pooled patches; ``size`` 0 keeps the head cell
    alone).
    """

    def __init__(self, size: int, group: int = 1, layout: str = "chw",
                 avg_only: bool = False) -> None:
        super().__init__()
        self.size, self.group, self.layout, self.avg_only = size, group, layout, avg_only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "tc":
            pooled = token_pool(x, self.size)
            y = pooled[0] if self.avg_only else torch.cat(pooled, 1)
        elif self.avg_only:  # the distill branch's averages: what the backbone pools, by cell
            x = x.permute(0, 3, 1, 2) if self.layout == "hwc" else x
            s = min(self.size, x.shape[-2], x.shape[-1])
            y = x.mean((2, 3), keepdim=True) if s == 1 else grid_pool(x, s, s)[0]
        else:
            if self.layout == "hwc":
                x = x.permute(0, 3, 1, 2)
            s = min(self.size, x.shape[-2], x.shape[-1])
            y = _cell_pool(x, s) if _whole_cells(x, s) else torch.cat(grid_pool(x, s, s), 1)
        if self.group > 1:
            y = y.unflatten(1, (-1, self.group)).mean(2)
        return y

    def out_shape(self, shape: tuple[int, ...]) -> tuple[int, int, int]:
        """The reduced map's per-image shape for an input of per-image ``shape`` (in its
        layout)."""
        halves = 1 if self.avg_only else 2
        if self.layout == "tc":
            t, c = shape
            return halves * c // self.group, token_cells(t, self.size), 1
        c, h, w = (shape[2], shape[0], shape[1]) if self.layout == "hwc" else shape
        return halves * c // self.group, min(self.size, h), min(self.size, w)


def _whole_cells(x: torch.Tensor, s: int) -> bool:
    """Whether :func:`_cell_pool` pays for ``x``: a large float32 channels-last map on a CPU (as
    the frozen segments hand over; where it was timed, and where its sums cannot overflow as
    fp16's would) that ``s`` x ``s`` equal cells tile. On small maps its extra ops cost more
    than the reads they save (see design-timings.md)."""
    if (x.dim() != 4 or x.dtype != torch.float32 or x.device.type != "cpu"
            or not x.is_contiguous(memory_format=torch.channels_last)
            or torch.onnx.is_in_onnx_export()):  # exported: grid_pool's pooling nodes
        return False
    c, h, w = x.shape[1:]
    return c * h * w >= CELL_POOL_MIN and h % s == 0 and w % s == 0


def _cell_pool(x: torch.Tensor, s: int) -> torch.Tensor:
    """Average and max over ``s`` x ``s`` equal cells of a channels-last map, [N, 2C, s, s]:
    what adaptive pooling gives when the cells tile the map, but summed and maxed along rows
    first and then along each cell's columns, each step over contiguous channels: faster than
    adaptive pooling on large maps (see design-timings.md)."""
    n, c, h, w = x.shape
    rows = x.permute(0, 2, 3, 1).reshape(n, s, h // s, w, c)
    avg = rows.sum(2).view(n, s, s, w // s, c).sum(3) / ((h // s) * (w // s))
    top = rows.amax(2).view(n, s, s, w // s, c).amax(3)
    return torch.cat([avg, top], -1).permute(0, 3, 1, 2).contiguous()


def reduction(shape: tuple[int, ...], grid: int, layout: str = "chw") -> Reduce:
    """The fixed reduction of a map of ``shape`` in ``layout``: at most ``MAX_VALUES`` numbers
    per image.

    The grid halves (4, 2, 1; for tokens on to 0, the head cell alone) until avg+max of every
    channel fits; past that, adjacent channels are averaged in the smallest group that divides
    C and fits. A CIFAR ResNet (16-64 channels) keeps its full 4x4 grid; ResNet-50's
    2048-channel stage caches 2048 numbers instead of 65,536, so a default attach caches under
    64 KB per image over ten cuts.
    """
    if layout == "tc":
        t, c = shape
        s = grid if grid > 1 else 0
        while s > 0 and 2 * c * token_cells(t, s) > MAX_VALUES:
            s //= 2
    else:
        c, h, w = (shape[2], shape[0], shape[1]) if layout == "hwc" else shape
        s = grid
        while s > 1 and 2 * c * min(s, h) * min(s, w) > MAX_VALUES:
            s //= 2
    group = 1
    while 2 * c // group > MAX_VALUES or c % group:
        group += 1
    return Reduce(s, group, layout)


def _grid(kind: str) -> int:
    return 1 if kind in ("conv1d", "pool") else GRID


def cache_bytes(reduce: Reduce, shape: tuple[int, ...]) -> int:
    """Bytes one image's reduced map takes in the training cache (fp16)."""
    return 2 * math.prod(reduce.out_shape(shape))


class Branch(nn.Module):
    """The reduction, then a body that maps it to a vector, then classifier and confidence heads.

    The confidence head sees the body's features *and* three statistics of the classifier's own
    softmax (top probability, top-1 minus top-2 margin, normalised entropy). A linear head on the
    features alone ranked samples worse than plain top-softmax (on CIFAR ResNet-44 it needed
    0.92 of the FLOPs where softmax needed 0.79 at the same accuracy); with the statistics it can
    learn softmax's ranking and improve on it. They are detached: the head's loss never bends the
    classifier.
    """

    def __init__(self, reduce: Reduce, body: nn.Module, width: int, num_classes: int,
                 classifier: nn.Module | None = None) -> None:
        super().__init__()
        self.reduce = reduce
        self.body = body
        self.classifier = classifier or nn.Linear(width, num_classes)
        self.confidence = nn.Linear(width + 3, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.reduce(x))

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """The logits alone: what inference runs when the exit score does not read the
        confidence head (the softmax and gate scores). The head's softmax statistics, concat
        and linear layer were 13 of a CIFAR branch's 25 ops, a third of its batch-1 time."""
        return self.classifier(self.body(self.reduce(x)))

    def head(self, reduced: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and confidence logit from the reduced map (what training caches)."""
        z = self.body(reduced)
        logits = self.classifier(z)
        stats = softmax_stats(logits.detach())
        return logits, self.confidence(torch.cat([z, stats], 1)).squeeze(1)


class FrozenHead(nn.Module):
    """The backbone's classifier inside a ``distill`` branch: its tensors held as non-persistent
    buffers, so they are neither trained (no parameters) nor saved (not in ``state_dict``: a
    bundle never carries a copy, and loading rebinds them to the backbone's own); moved with
    the branch, and baked into its exported graph."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = (int(d) for d in weight.shape)
        self.register_buffer("weight", weight.detach(), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach(), persistent=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return F.linear(z, self.weight, self.bias)


def softmax_stats(logits: torch.Tensor) -> torch.Tensor:
    """[N, 3]: top probability, top-1 minus top-2 probability, entropy / log(K)."""
    p = torch.softmax(logits.float(), 1)
    top = p.topk(min(2, p.shape[1]), dim=1).values
    margin = top[:, 0] - top[:, 1] if top.shape[1] > 1 else top[:, 0]
    entropy = -(p * p.clamp_min(1e-12).log()).sum(1) / max(math.log(p.shape[1]), 1e-12)
    return torch.stack([top[:, 0], margin, entropy], 1).to(logits.dtype)


def _conv_body(c: int, width: int, depth: int) -> nn.Module:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Conv2d(c if i == 0 else width, width, 3, padding=1, bias=False),
                   nn.BatchNorm2d(width), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())


class _ChannelConv1d(nn.Module):
    """Treat the pooled channel vector as a 1-channel signal and convolve along it."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.pre = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(c), nn.ReLU())
        self.convs = nn.Sequential(
            nn.Conv1d(1, 8, 3, padding=1), nn.ReLU(),
            nn.Conv1d(8, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(self.pre(x).unsqueeze(1))


class _MixedPool(nn.Module):
    """SDN's pooling: a learned convex mix of the reduction's max and average halves."""

    def __init__(self) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg, mx = x.chunk(2, dim=1)
        a = torch.sigmoid(self.alpha)
        return (a * mx + (1 - a) * avg).flatten(1)


def _width(per_unit: float, fixed: float, budget: float | None, cap: int) -> int:
    """The widest layer (at most ``cap``) whose MACs ``per_unit * w + fixed`` fit ``budget``."""
    if budget is None:
        return cap
    return int(max(MIN_WIDTH, min(cap, (budget - fixed) // max(per_unit, 1))))


def _parts(kind: str, shape: tuple[int, ...], k: int | tuple[int, int], budget: float | None,
           width: int | None, layout: str = "chw") -> tuple[Reduce, nn.Module, int]:
    reduce = _distill_reduce(shape, layout) if kind == "distill" else \
        reduction(shape, _grid(kind), layout)
    c2, h, w = reduce.out_shape(shape)  # c2: avg and max channels together
    cells = h * w
    if kind == "mlp":
        width = width or _width(c2 * cells + k + 4, 0, budget, MAX_WIDTH)
        body = nn.Sequential(nn.Flatten(), nn.Linear(c2 * cells, width, bias=False),
                             nn.BatchNorm1d(width), nn.ReLU())
        return reduce, body, width
    if kind in ("conv1", "conv2", "conv3"):
        depth = int(kind[-1])
        # MACs: cells * 9 * (c2*w + (depth-1)*w^2); solve for w conservatively (linear part).
        per = cells * 9 * (c2 + (depth - 1) * min(c2 // 2, MAX_WIDTH)) + k + 4
        width = width or _width(per, 0, budget, min(max(c2 // 2, MIN_WIDTH), MAX_WIDTH))
        return reduce, _conv_body(c2, width, depth), width
    if kind == "conv1d":
        return reduce, _ChannelConv1d(c2), 8 * ((c2 + 1) // 2)
    if kind == "pool":
        return reduce, nn.Sequential(nn.Flatten(), nn.BatchNorm1d(c2), nn.ReLU()), c2
    if kind == "sdn":
        return reduce, _MixedPool(), c2 // 2 * cells
    if kind == "distill":  # width: the hidden layer's (0: none); the output is the pre-logits'
        return (reduce, *_distill_body(c2 * cells, k, budget, width))
    raise ValueError(kind)


def _distill_reduce(shape: tuple[int, ...], layout: str) -> Reduce:
    """The distill branch's reduction: cell averages on a ``DISTILL_GRID`` grid, adjacent
    channels averaged until at most ``MAX_VALUES`` numbers remain."""
    reduce = Reduce(DISTILL_GRID, 1, layout, avg_only=True)
    c, h, w = reduce.out_shape(shape)
    while c * h * w // reduce.group > MAX_VALUES or c % reduce.group:
        reduce.group += 1
    return reduce


def _distill_body(n: int, pre: tuple[int, int], budget: float | None, hidden: int | None
                  ) -> tuple[nn.Module, int]:
    """The distill branch's body from ``n`` reduced values to the ``pre[0]`` pre-logits (the
    frozen classifier then maps them to ``pre[1]`` classes): standardised, then one hidden layer
    (Linear, BN, ReLU, dropout) as wide as the MAC ``budget`` allows beside the classifier (at
    most ``DISTILL_HIDDEN``; ``hidden`` fixes it, 0 = none, a linear map as before). On
    tf_efficientnet_lite0 the hidden layer and 2x2 cells raised agreement with the backbone on
    ImageNet val from 0.41 to 0.66 at blocks.5.2 and from 0.65 to 0.86 at blocks.6.0."""
    width, classes = pre
    if hidden is None:
        room = None if budget is None else budget - width * classes
        hidden = DISTILL_HIDDEN if room is None else int(min(DISTILL_HIDDEN,
                                                             room // (n + width)))
        hidden = hidden if hidden >= MIN_HIDDEN else 0
    layers: list[nn.Module] = [nn.Flatten(), nn.BatchNorm1d(n, affine=False)]
    if hidden:
        layers += [nn.Linear(n, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(),
                   nn.Dropout(0.1), nn.Linear(hidden, width)]
    else:
        layers.append(nn.Linear(n, width))
    body = nn.Sequential(*layers)
    body.hidden = hidden
    return body, width


def resolve_kind(kind: str, head: tuple[torch.Tensor, torch.Tensor | None] | None,
                 budget: float | None = None) -> str:
    """The branch type ``auto`` stands for on a backbone whose classifier is ``head`` (None: it
    has no linear one) under a branch ``budget`` (FLOPs per image; None: no cap): ``distill``
    over at least ``DISTILL_MIN_CLASSES`` classes, where a few thousand images cannot teach a
    head every class (tf_efficientnet_lite0: 81 % agreement against 75 % for ``mlp`` at
    blocks.6.0), if the backbone's classifier it reuses fits the budget (on a 41-MFLOP
    ShuffleNet it alone is 5 %); else ``mlp`` (CIFAR ResNet-44, ten classes: ``mlp`` reached
    0.45 of the FLOPs within one point on test images, ``distill`` 0.83)."""
    if kind != "auto":
        return kind
    many = head is not None and head[0].shape[0] >= DISTILL_MIN_CLASSES
    fits = head is None or budget is None or 2 * head[0].numel() <= budget
    return "distill" if many and fits else "mlp"


def make_branch(kind: str, shape: tuple[int, ...] | int, num_classes: int,
                budget: float | None = None, *, width: int | None = None,
                layout: str = "chw",
                head: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> Branch:
    """Build an untrained branch of ``kind`` for a feature map of ``shape`` (C, H, W).

    ``budget`` is the most FLOPs the branch may cost per image; ``mlp`` and ConvX widths shrink
    to fit it (never below 16). ``width`` fixes the hidden width instead (a saved bundle's). A
    bare channel count stands for a 4x4 map; ``layout`` is the cut's (:class:`Reduce`).
    ``head`` (weight, bias) is the backbone's classifier, which a ``distill`` branch needs and
    shares; its ``width`` is that of its hidden layer (sized to what ``budget`` leaves beside
    the classifier; 0 = none).
    """
    if kind not in BRANCH_TYPES:
        raise OptionError(f"unknown branch type '{kind}': use one of {', '.join(BRANCH_TYPES)}")
    if isinstance(shape, int):
        shape = (shape, GRID, GRID)
    kind = resolve_kind(kind, head, budget)
    classifier = None
    if kind == "distill":
        if head is None:
            raise OptionError("branch type 'distill' needs a backbone that ends in a linear "
                              "classifier on pooled features; use --branch mlp")
        classifier = FrozenHead(*head)
        if classifier.out_features != num_classes:
            raise OptionError(f"the backbone's classifier has {classifier.out_features} "
                              f"classes, the model {num_classes}")
    macs = None if budget is None else budget / 2
    k = (classifier.in_features, num_classes) if classifier is not None else num_classes
    reduce, body, width = _parts(kind, tuple(shape), k, macs, width, layout)
    return Branch(reduce, body, width, num_classes, classifier)


def branch_flops(branch: nn.Module, shape: tuple[int, ...]) -> int:
    """FLOPs of one branch on one ``shape`` (C, H, W) feature map, counted like the backbone."""
    was = branch.training
    branch.eval()
    try:
        return count_flops(branch, torch.zeros(1, *shape))
    finally:
        branch.train(was)
