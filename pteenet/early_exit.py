"""The early-exit model: a frozen backbone cut into segments, with a branch after each cut.

It wraps the backbone's pieces and never edits them (like timm's feature wrapper). Two modes:

* training (``model.train()``): :meth:`EarlyExitModel.forward` runs every segment without grad and
  returns every branch's logits and confidence and the backbone's logits;
* inference (``model.eval()``): true early exit. After each segment the branch runs on the samples
  still in flight; those whose score passes their threshold leave, and only the rest go on (batch
  compaction with index ops; no per-sample Python loop, no ``.item()`` per exit).

Thresholds are a ``[branches, classes]`` table: a sample predicted ``c`` at branch ``k`` leaves
when its score is at least ``thresholds[k, c]``. One global value or one per branch is broadcast.
Scores are the confidence head's sigmoid (EENets/PTEEnet) or the top softmax probability.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .branches import branch_flops, make_branch
from .errors import OptionError
from .thresholds import as_table
from .tracing import Trace, split_at

__all__ = [
    "EarlyExitModel",
    "EarlyExitResult",
    "TrainOutputs",
    "build_early_exit",
]

SCORES = ("head", "softmax")


@dataclass
class TrainOutputs:
    """Every branch's outputs on the whole batch (training mode)."""

    logits: list[torch.Tensor]  # per branch, [N, K]
    confidence: list[torch.Tensor]  # per branch, [N] (logits; sigmoid gives the score)
    final_logits: torch.Tensor  # the backbone's own head, [N, K]


@dataclass
class EarlyExitResult:
    """What true early-exit inference returns, per sample in input order."""

    logits: torch.Tensor  # [N, K] the logits of the exit that answered
    exit_index: torch.Tensor  # [N] 0..B-1 for branches, B for the backbone's head
    flops: torch.Tensor  # [N] FLOPs actually spent (segments run + every branch evaluated)

    @property
    def preds(self) -> torch.Tensor:
        return self.logits.argmax(1)


class EarlyExitModel(nn.Module):
    """Segments of a frozen backbone interleaved with trainable exit branches.

    ``segment_flops[k]`` and ``branch_flops[k]`` are per-image FLOPs; their sum over segments is
    the backbone's own cost, against which relative FLOPs are reported.
    """

    def __init__(
        self,
        segments: Sequence[nn.Module],
        branches: Sequence[nn.Module],
        *,
        segment_flops: Sequence[int],
        branch_flops: Sequence[int],
        num_classes: int,
        thresholds: object = 0.5,
        score: str = "head",
    ) -> None:
        super().__init__()
        if len(segments) != len(branches) + 1:
            raise ValueError("need exactly one more segment than branches")
        self.segments = nn.ModuleList(segments).requires_grad_(False)
        self.branches = nn.ModuleList(branches)
        self.segment_flops = [int(f) for f in segment_flops]
        self.branch_flops = [int(f) for f in branch_flops]
        self.num_classes = num_classes
        self.score = score
        self.register_buffer("thresholds", torch.empty(0), persistent=False)
        self.set_thresholds(thresholds)

    # -- configuration --------------------------------------------------------------------
    @property
    def num_branches(self) -> int:
        return len(self.branches)

    @property
    def backbone_flops(self) -> int:
        return sum(self.segment_flops)

    def exit_costs(self) -> list[float]:
        """Relative FLOPs of a sample leaving at exit k (k = B: the backbone), branches included."""
        costs, spent = [], 0
        for k in range(self.num_branches):
            spent += self.segment_flops[k] + self.branch_flops[k]
            costs.append(spent / self.backbone_flops)
        costs.append((spent + self.segment_flops[-1]) / self.backbone_flops)
        return costs

    def set_thresholds(self, value: object, score: str | None = None) -> None:
        """Set the exit thresholds (float, per branch, or per branch and class)."""
        if score is not None:
            if score not in SCORES:
                raise OptionError(f"unknown score '{score}': use one of {', '.join(SCORES)}")
            self.score = score
        t = as_table(value, self.num_branches, self.num_classes).float()
        self.thresholds = t.to(self.thresholds.device if self.thresholds.numel() else "cpu")

    def train(self, mode: bool = True) -> EarlyExitModel:
        """Only branches ever train: the backbone's segments stay in eval mode."""
        super().train(mode)
        self.segments.eval()
        return self

    # -- computation ----------------------------------------------------------------------
    def exit_score(self, logits: torch.Tensor, confidence: torch.Tensor) -> torch.Tensor:
        if self.score == "head":
            return torch.sigmoid(confidence)
        return torch.softmax(logits, dim=1).amax(1)

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The frozen backbone's feature maps at every cut, and its final logits."""
        feats = []
        for seg in self.segments[:-1]:
            x = seg(x)
            feats.append(x)
        return feats, self.segments[-1](x)

    def branch_outputs(self, feats: Sequence[torch.Tensor]) -> tuple[list, list]:
        outs = [b(f) for b, f in zip(self.branches, feats)]
        return [o[0] for o in outs], [o[1] for o in outs]

    def forward(self, x: torch.Tensor) -> TrainOutputs | EarlyExitResult:
        if self.training:
            feats, final = self.features(x)
            logits, conf = self.branch_outputs(feats)
            return TrainOutputs(logits, conf, final)
        return self.early_exit(x)

    @torch.inference_mode()
    def early_exit(self, x: torch.Tensor) -> EarlyExitResult:
        """True early exit with batch compaction: later segments only see samples still running.

        On CPU a branch whose samples all stay, or all leave, skips the index work (checking
        costs nothing there); on GPUs no per-exit host sync is added beyond the compaction's.
        """
        n, dev = x.shape[0], x.device
        thr = self.thresholds.to(dev)
        out = torch.empty(n, self.num_classes, device=dev)
        exit_index = torch.full((n,), self.num_branches, dtype=torch.long, device=dev)
        flops = torch.empty(n, dtype=torch.float64, device=dev)
        alive = torch.arange(n, device=dev)
        cheap_checks = dev.type == "cpu"
        spent = 0
        h = x
        for k, branch in enumerate(self.branches):
            h = self.segments[k](h)
            spent += self.segment_flops[k] + self.branch_flops[k]
            logits, conf = branch(h)
            leave = self.exit_score(logits, conf) >= thr[k].gather(0, logits.argmax(1))
            if cheap_checks and not leave.any():
                continue
            if cheap_checks and leave.all():
                out.index_copy_(0, alive, logits.float())
                exit_index.index_fill_(0, alive, k)
                flops.index_fill_(0, alive, spent)
                return EarlyExitResult(out, exit_index, flops)
            gone = leave.nonzero().squeeze(1)
            if gone.numel():
                where = alive.index_select(0, gone)
                out.index_copy_(0, where, logits.index_select(0, gone).float())
                exit_index.index_fill_(0, where, k)
                flops.index_fill_(0, where, spent)
                stay = (~leave).nonzero().squeeze(1)
                if stay.numel() == 0:
                    return EarlyExitResult(out, exit_index, flops)
                h, alive = h.index_select(0, stay), alive.index_select(0, stay)
        out.index_copy_(0, alive, self.segments[-1](h).float())
        flops.index_fill_(0, alive, spent + self.segment_flops[-1])
        return EarlyExitResult(out, exit_index, flops)


def build_early_exit(
    trace: Trace,
    cut_names: Sequence[str],
    num_classes: int,
    branch: str | Sequence[str] = "conv2",
    *,
    thresholds: object = 0.5,
    score: str = "head",
) -> EarlyExitModel:
    """Split the traced backbone at ``cut_names`` and attach a fresh branch after each cut."""
    kinds = [branch] * len(cut_names) if isinstance(branch, str) else list(branch)
    if len(kinds) != len(cut_names):
        raise OptionError(f"{len(kinds)} branch types given for {len(cut_names)} cuts")
    segments = split_at(trace, cut_names)
    cuts = [trace.cut(c) for c in cut_names]
    branches = [make_branch(k, c.shape[0], num_classes) for k, c in zip(kinds, cuts)]
    prev, seg_flops = 0, []
    for c in cuts:
        seg_flops.append(c.flops - prev)
        prev = c.flops
    seg_flops.append(trace.total_flops - prev)
    return EarlyExitModel(
        segments, branches, segment_flops=seg_flops,
        branch_flops=[branch_flops(b, c.shape) for b, c in zip(branches, cuts)],
        num_classes=num_classes, thresholds=thresholds, score=score,
    )
