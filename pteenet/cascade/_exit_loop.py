"""The inference loop of the early-exit model: true early exit with batch compaction.

After each segment the branch runs on the samples still in flight; those whose score passes
their threshold leave, and only the rest go on (index ops; no per-sample Python loop). At batch
1 on a CPU the loop is a :class:`Route` worked out once per graphs and thresholds. ``model`` is
an :class:`~pteenet.cascade.EarlyExitModel` (typed as a module: the model imports this loop).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from pteenet.cascade._frozen import direct
from pteenet.cascade._score import exit_score

__all__ = ["Answers", "EarlyExitResult", "Plan", "Route", "TrainOutputs", "answered", "early_exit",
           "keep_rows", "tensor_version"]


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


@torch.inference_mode()
def early_exit(model: nn.Module, x: torch.Tensor) -> EarlyExitResult:
    """True early exit with batch compaction: later segments only see samples still running.

    On CPU a branch whose samples all stay, or all leave, skips the index work (checking
    costs nothing there), and at batch 1 the exit test compares two Python numbers instead of
    two tensor ops (see design-timings.md). At batch 1 with frozen graphs the loop
    is a :class:`Route` worked out once per graphs and thresholds. On GPUs no per-exit host
    sync is added beyond the compaction's.
    With an ensemble each sample's earlier log-softmaxes (``history``) are compacted with it.
    """
    n, dev = x.shape[0], x.device
    plan = model.plan(dev)
    if model.whole is not None and not any(plan.active):
        return EarlyExitResult(model.whole(x).float(),
                               torch.full((n,), model.num_branches, device=dev),
                               torch.full((n,), float(model.backbone_flops),
                                          dtype=torch.float64, device=dev))
    segments, scored = model.pieces(x), model._scored(x, plan)
    if n == 1 and scored is not None:  # batch 1 on a CPU: the route, every lookup done
        return Route.of(plan, model, segments, scored).run(x)
    answers = model.answers(x) if scored is None else None
    ensemble = model.ensemble
    cheap_checks = dev.type == "cpu"
    single = cheap_checks and n == 1  # one number against another: no tensor ops to test
    spent = 0
    h, history, state = x, None, None
    for k, (on, run) in enumerate(zip(plan.active, plan.runs)):
        h = segments[k](h)
        spent += model.segment_flops[k]
        if not run:
            continue
        spent += model.branch_flops[k]
        if scored is not None:
            out = scored[k](h)
            logits, score = out[0], out[-1]
        else:
            logits, conf = answers[k](h)
            if ensemble is not None:
                logits, history = ensemble.step(history, logits, k)
            score = exit_score(model.score, logits, conf, plan.gamma[k]) if on else None
        if not on:
            continue
        if single:
            if float(score) >= float(plan.threshold(k, logits)):
                return answered(logits, k, spent)
            continue
        leave = score >= plan.threshold(k, logits)
        if cheap_checks and not leave.any():
            continue
        if cheap_checks and state is None and leave.all():
            return answered(logits, k, spent)
        state = state or Answers.start(h.shape[0], model.num_classes, model.num_branches, dev)
        stay = state.record(leave, logits, k, spent, cheap_checks)
        if stay is None:
            return state.result()
        if stay is not ...:
            h = keep_rows(h, stay)
            if history is not None:
                history = history.index_select(0, stay)
    final = segments[-1](h).float()
    if state is None:
        return answered(final, model.num_branches, spent + model.segment_flops[-1])
    state.finish(final, spent + model.segment_flops[-1])
    return state.result()

def answered(logits: torch.Tensor, k: int, spent: float) -> EarlyExitResult:
    """Every sample answered at ``k``: the result without any index work (at batch 1, the
    four buffers and three index ops this skips were a tenth of the exit loop's overhead)."""
    n, dev = logits.shape[0], logits.device
    return EarlyExitResult(logits.float(), torch.full((n,), k, device=dev),
                           torch.full((n,), float(spent), dtype=torch.float64, device=dev))


def keep_rows(h: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``h.index_select(0, rows)``, channels-last where ``h`` is. ``index_select`` writes a
    standard-layout copy: a channels-last map from the frozen graphs would be gathered
    stride by stride and then turned back by the next graph. Selecting on its NHWC view copies
    whole images instead, several times faster (see design-timings.md)."""
    if h.dim() == 4 and not h.is_contiguous() and h.is_contiguous(
            memory_format=torch.channels_last):
        return h.permute(0, 2, 3, 1).index_select(0, rows).permute(0, 3, 1, 2)
    return h.index_select(0, rows)


def tensor_version(t: torch.Tensor) -> int:
    """How often ``t`` was edited in place (-1 for an inference tensor, which keeps no count:
    such a table can only be edited inside ``torch.inference_mode``)."""
    return -1 if t.is_inference() else t._version


@dataclass
class Plan:
    """What the exit loop reads of the thresholds, worked out once per table: the loop runs on
    the batch-1 hot path, where each tensor op on the table costs as much as a small layer."""

    source: tuple  # the tensors it was made from, and their versions (in-place edits count)
    active: list[bool]
    runs: list[bool]
    gamma: list[float]
    uniform: list[float | None]  # exit k's one threshold when every class has the same
    table: torch.Tensor
    route: Route | None = None  # the batch-1 loop over these thresholds (see Route)

    def threshold(self, k: int, logits: torch.Tensor) -> torch.Tensor | float:
        """Exit k's threshold for each sample's predicted class (a number when they agree:
        the float32 table's value, so the comparison is the same)."""
        u = self.uniform[k]
        return self.table[k].gather(0, logits.argmax(1)) if u is None else u


@dataclass
class Route:
    """The batch-1 exit loop on a CPU with every lookup done: per exit its segment, its scored
    branch (None where the exit is off), its threshold (one number, or one per class) and the
    FLOPs spent by then, with the graphs called directly (:func:`pteenet.cascade._frozen.direct`).

    Kept on the thresholds' plan and rebuilt when the model's cached graphs are (other lists:
    a new shape, branches replaced, the model moved); identity of the lists says so, and they
    stay alive with the route, so an id cannot be reused. It answers exactly as the general
    loop does, which a test checks, with less Python around the small graphs of each call
    (see design-timings.md).
    """

    segments: Sequence[Callable]
    scored: Sequence[Callable]
    steps: list[tuple[Callable, Callable | None, float | list[float], int]]
    last: Callable
    total: int

    @classmethod
    def of(cls, plan: Plan, model: nn.Module, segments: Sequence[Callable],
           scored: Sequence[Callable]) -> Route:
        """``plan``'s route over these graphs, built on first use."""
        route = plan.route
        if route is None or route.segments is not segments or route.scored is not scored:
            route = plan.route = cls._build(plan, model, segments, scored)
        return route

    @classmethod
    def _build(cls, plan: Plan, model: nn.Module, segments: Sequence[Callable],
               scored: Sequence[Callable]) -> Route:
        steps, spent = [], 0
        for k, on in enumerate(plan.active):
            spent += model.segment_flops[k] + (model.branch_flops[k] if on else 0)
            u = plan.uniform[k]
            steps.append((direct(segments[k]), direct(scored[k]) if on else None,
                          plan.table[k].tolist() if u is None else u, spent))
        return cls(segments, scored, steps, direct(segments[-1]),
                   spent + model.segment_flops[-1])

    def run(self, x: torch.Tensor) -> EarlyExitResult:
        """One image down the cascade: the first exit whose score reaches its threshold for the
        predicted class answers (float32 values compared as Python floats: the same test)."""
        h = x
        for k, (segment, branch, threshold, spent) in enumerate(self.steps):
            h = segment(h)
            if branch is None:
                continue
            out = branch(h)  # (logits, score) or (logits, confidence logit, score)
            logits, score = out[0], out[-1]
            if float(score) >= (threshold if isinstance(threshold, float)
                                else threshold[int(logits.argmax())]):
                return answered(logits, k, spent)
        return answered(self.last(h).float(), len(self.steps), self.total)


@dataclass
class Answers:
    """The answers of samples that have left, once some but not all of a batch have."""

    out: torch.Tensor  # [N, K]
    exit_index: torch.Tensor  # [N]
    flops: torch.Tensor  # [N] float64
    alive: torch.Tensor  # input positions of the samples still running

    @classmethod
    def start(cls, n: int, num_classes: int, num_branches: int, dev: torch.device) -> Answers:
        return cls(torch.empty(n, num_classes, device=dev),
                   torch.full((n,), num_branches, dtype=torch.long, device=dev),
                   torch.empty(n, dtype=torch.float64, device=dev), torch.arange(n, device=dev))

    def record(self, leave: torch.Tensor, logits: torch.Tensor, k: int, spent: float,
               cheap_checks: bool) -> torch.Tensor | None:
        """Store the leavers' answers; the positions (in the current batch) of those who stay,
        ``None`` when nobody stays, ``...`` when nobody left (nothing to compact)."""
        if cheap_checks and bool(leave.all()):
            self._store(self.alive, logits, k, spent)
            return None
        gone = leave.nonzero().squeeze(1)
        if not gone.numel():
            return ...
        self._store(self.alive.index_select(0, gone), logits.index_select(0, gone), k, spent)
        stay = (~leave).nonzero().squeeze(1)
        if stay.numel() == 0:
            return None
        self.alive = self.alive.index_select(0, stay)
        return stay

    def finish(self, logits: torch.Tensor, spent: float) -> None:
        self.out.index_copy_(0, self.alive, logits)
        self.flops.index_fill_(0, self.alive, spent)

    def _store(self, where: torch.Tensor, logits: torch.Tensor, k: int, spent: float) -> None:
        self.out.index_copy_(0, where, logits.float())
        self.exit_index.index_fill_(0, where, k)
        self.flops.index_fill_(0, where, spent)

    def result(self) -> EarlyExitResult:
        return EarlyExitResult(self.out, self.exit_index, self.flops)
