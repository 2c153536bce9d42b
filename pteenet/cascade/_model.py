"""The early-exit model: a frozen backbone cut into segments, with a branch after each cut.

It wraps the backbone's pieces and never edits them (like timm's feature wrapper). Two modes:

* training (``model.train()``): :meth:`EarlyExitModel.forward` runs every segment without grad and
  returns every branch's logits and confidence and the backbone's logits;
* inference (``model.eval()``): true early exit. After each segment the branch runs on the samples
  still in flight; those whose score passes their threshold leave, and only the rest go on (batch
  compaction with index ops; no per-sample Python loop, no ``.item()`` per exit).

Thresholds are a ``[branches, classes]`` table: a sample predicted ``c`` at branch ``k`` leaves
when its score is at least ``thresholds[k, c]``. One global value or one per branch is broadcast.
Scores (``score``) are the top softmax probability (``softmax``), the confidence head's sigmoid
(``head``, EENets/PTEEnet), or -- what calibration writes by default -- the ``gate``: the top
softmax probability raised to a per-exit power ``gamma[k]`` chosen so that the calibrated
threshold sits at exactly 0.5. On the gate scale the global knob means the same on every exit
and every model: 0.5 is the calibrated operating point, higher exits later (safer), lower
earlier; an exit that calibration switched off (``gamma = inf``) stays off at any knob.

An exit whose every threshold is above 1 can never fire, so it is *off*: its branch is not run
and its FLOPs are not spent. With every exit off the model is the backbone, at exactly its cost.

With a ZTW ensemble (``ensemble``, :mod:`pteenet.cascade`; Wołczyk et al. 2021) exit k answers
with a weighted sum of the log-softmaxes of exits 0..k: its score and prediction come from those
ensembled logits, each sample in flight carries its earlier log-softmaxes through the batch
compaction, and every branch up to the last exit that may fire runs (:func:`reach`), an off exit
among them included, since the later exits read it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from pteenet.cascade._branches import branch_flops, make_branch
from pteenet.cascade._ensemble import ZTWEnsemble
from pteenet.cascade._frozen import direct, freeze_all, frozen_applies, trace_exact
from pteenet.cascade._profile import PROBE_BATCH, TimeProfile, profile_cascade
from pteenet.choices import COSTS, DEFAULT_BRANCH, DEFAULT_BUDGET, SCORES
from pteenet.errors import OptionError
from pteenet.graph._tracing import Cut, Trace, split_at
from pteenet.thresholds import as_table

__all__ = [
    "EarlyExitModel",
    "EarlyExitResult",
    "TrainOutputs",
    "build_early_exit",
    "cascade_cost",
    "gate",
    "gate_power",
    "reach",
]



def reach(active: torch.Tensor, chained: bool) -> torch.Tensor:
    """Which branches run when ``active`` exits may fire: those exits alone, or, ``chained``
    (an ensemble reads every exit before it), every exit up to the last active one."""
    active = torch.as_tensor(active, dtype=torch.bool)
    if not chained or not len(active):
        return active
    return active.flip(0).to(torch.uint8).cummax(0).values.flip(0).bool()


def _keep_rows(h: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``h.index_select(0, rows)``, channels-last where ``h`` is. ``index_select`` writes a
    standard-layout copy: a channels-last map from the frozen graphs would be gathered
    stride by stride and then turned back by the next graph. Selecting on its NHWC view copies
    whole images instead: a 256x32x16x16 map, half of it kept, 0.30 -> 0.05 ms on 2 cores."""
    if h.dim() == 4 and not h.is_contiguous() and h.is_contiguous(
            memory_format=torch.channels_last):
        return h.permute(0, 2, 3, 1).index_select(0, rows).permute(0, 3, 1, 2)
    return h.index_select(0, rows)


def cascade_cost(segment_costs: Sequence[float], branch_costs: Sequence[float],
                 active: torch.Tensor, chained: bool = False) -> torch.Tensor:
    """Relative cost of leaving at each exit (last: the backbone) with only ``active`` branches.

    ``segment_costs[k]`` is the backbone's cumulative cost up to cut ``k`` (``B + 1`` entries,
    the last 1.0) and ``branch_costs[k]`` branch ``k``'s own, both relative to the backbone.
    ``chained``: the exits form a ZTW ensemble, so every branch up to the last active exit runs.
    """
    seg = torch.as_tensor(segment_costs, dtype=torch.float64)
    ran = reach(active, chained)
    br = torch.as_tensor(branch_costs, dtype=torch.float64) * ran.to(torch.float64)
    spent = torch.cumsum(br, 0)
    return seg + torch.cat([spent, spent[-1:]]) if len(br) else seg


def gate(top: torch.Tensor, gamma: float) -> torch.Tensor:
    """The gate score ``top ** gamma``; 0 where ``gamma`` is inf (an exit switched off).

    ``gamma`` is a Python number: one op instead of six, which at batch 1 halved the cost of
    each exit's decision (about 30 us of 65 on a 2-core CPU)."""
    return torch.zeros_like(top) if math.isinf(gamma) else top.clamp_min(0) ** gamma


def gate_power(threshold: float) -> float:
    """The power that maps a top-softmax threshold to exactly 0.5 (inf: the exit is off)."""
    if not threshold <= 1:
        return math.inf
    if threshold <= 0:
        return 0.0
    return math.log(0.5) / math.log(min(threshold, 1 - 1e-7))


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
    the backbone's own cost, against which relative FLOPs are reported. ``cost`` says what the
    cost model (calibration's search, L_v2's cost term) counts: ``"flops"``, or ``"latency"``,
    the measured times of ``latency`` (a :class:`~pteenet.cascade.TimeProfile`). ``info`` is
    the metadata of the bundle the model was loaded from (None for a model built here).
    ``ensemble`` (None: each exit answers alone) combines the exits so far (ZTW).
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
        score: str = "softmax",
        gamma: Sequence[float] | None = None,
        whole: nn.Module | None = None,
        ensemble: ZTWEnsemble | None = None,
    ) -> None:
        super().__init__()
        if len(segments) != len(branches) + 1:
            raise ValueError("need exactly one more segment than branches")
        self.segments = nn.ModuleList(segments).requires_grad_(False)
        # the backbone in one piece (the eager model traced): what runs when every exit is off,
        # so that the model then costs exactly the backbone's time, not its segments' dispatch
        self.whole = whole.requires_grad_(False) if whole is not None else None
        self.branches = nn.ModuleList(branches)
        self.segment_flops = [int(f) for f in segment_flops]
        self.branch_flops = [int(f) for f in branch_flops]
        self.num_classes = num_classes
        self.score = score
        self.cost = "flops"
        self.latency: TimeProfile | None = None
        # run the segments as frozen graphs in CPU inference (pteenet.cascade), one set per shape
        self.frozen = True
        self._graphs = _Graphs()
        self._exit_plan: _Plan | None = None
        self.register_buffer("thresholds", torch.empty(0), persistent=False)
        self.register_buffer("gamma", torch.ones(len(branches)), persistent=False)
        self.set_thresholds(thresholds, gamma=gamma)
        self.ensemble: ZTWEnsemble | None = None
        self.set_ensemble(ensemble)

    # -- configuration --------------------------------------------------------------------
    @property
    def num_branches(self) -> int:
        return len(self.branches)

    @property
    def backbone_flops(self) -> int:
        return sum(self.segment_flops)

    @property
    def active(self) -> list[bool]:
        """Per exit: can it fire under the current thresholds? Off exits are never evaluated.

        On the gate score an exit calibration switched off (``gamma`` inf) stays off whatever
        the thresholds, so a global knob never brings back a branch that does not pay."""
        on = self.thresholds.amin(1) <= 1
        if self.score == "gate":
            on &= ~torch.isinf(self.gamma.to(on.device))
        return on.tolist()

    @property
    def evaluated(self) -> list[bool]:
        """Per exit: does its branch run? The active exits', and with an ensemble every branch
        up to the last active exit (the ensemble reads them)."""
        return self._evaluated(self.active)

    def _evaluated(self, active: list[bool]) -> list[bool]:
        return active if self.ensemble is None else reach(torch.tensor(active), True).tolist()

    def set_ensemble(self, ensemble: ZTWEnsemble | None) -> None:
        """Use ``ensemble`` (ZTW weights for these exits and classes), or none."""
        if ensemble is not None and (ensemble.num_branches, ensemble.num_classes) != \
                (self.num_branches, self.num_classes):
            raise OptionError(f"`ensemble` is for {ensemble.num_branches} exits x "
                              f"{ensemble.num_classes} classes, the model has "
                              f"{self.num_branches} x {self.num_classes}")
        self.ensemble = None if ensemble is None else ensemble.to(self.gamma.device)

    def exit_costs(self, active: Sequence[bool] | None = None, kind: str | None = None
                   ) -> list[float]:
        """Relative cost of a sample leaving at exit k (k = B: the backbone).

        Only the branches that run are counted (:attr:`evaluated`; ``active``, default: the
        exits the thresholds leave on); pass all True for the cost with every branch evaluated.
        ``kind`` is ``"flops"`` or ``"latency"`` (default: the model's ``cost``).
        """
        on = torch.tensor(self.active if active is None else list(active), dtype=torch.bool)
        return cascade_cost(*self.costs(kind), on, self.ensemble is not None).tolist()

    def costs(self, kind: str | None = None) -> tuple[list[float], list[float]]:
        """(the backbone's cumulative cost up to each cut, last 1.0; each branch's own cost),
        relative to the backbone, in FLOPs or in measured batch-1 time."""
        kind = kind or self.cost
        if kind == "latency":
            if self.latency is None:
                raise OptionError("no time profile: measure one with use_latency(profile(...))")
            return self.latency.costs()
        spent = torch.tensor(self.segment_flops, dtype=torch.float64).cumsum(0)
        return ((spent / self.backbone_flops).tolist(),
                [f / self.backbone_flops for f in self.branch_flops])

    @property
    def segment_costs(self) -> list[float]:
        """The backbone's cumulative cost up to each cut (last: 1.0) in the model's cost."""
        return self.costs()[0]

    @property
    def branch_costs(self) -> list[float]:
        """Each branch's own cost, relative to the backbone, in the model's cost."""
        return self.costs()[1]

    def use_cost(self, kind: str, latency: TimeProfile | None = None) -> None:
        """Count ``kind`` in the cost model; ``latency`` is required (or kept) for latency."""
        if kind not in COSTS:
            raise OptionError(f"unknown cost '{kind}': use one of {', '.join(COSTS)}")
        if latency is not None:
            n = self.num_branches
            if len(latency.segment_ms) != n + 1 or len(latency.branch_ms) != n:
                raise OptionError(f"the time profile has {len(latency.branch_ms)} branches, "
                                  f"the model {n}")
            self.latency = latency
        if kind == "latency" and self.latency is None:
            raise OptionError("cost latency needs a time profile")
        self.cost = kind

    def profile(self, images: torch.Tensor, batch_size: int = PROBE_BATCH) -> TimeProfile:
        """Measure every segment's and branch's time on ``images``' device (see
        :mod:`pteenet.cascade._profile`)."""
        was = self.training
        self.eval()
        try:  # each piece timed as inference runs it (a branch without the head the score
            with torch.inference_mode():  # ignores)
                segments, side = self.pieces(images), self.answers(images)
            return profile_cascade(segments, side, images, batch_size)
        finally:
            self.train(was)

    def set_thresholds(self, value: object, score: str | None = None,
                       gamma: Sequence[float] | None = None) -> None:
        """Set the exit thresholds (float, per branch, or per branch and class), optionally the
        score they apply to and the gate's per-exit powers."""
        if score is not None:
            if score not in SCORES:
                raise OptionError(f"unknown score '{score}': use one of {', '.join(SCORES)}")
            self.score = score
        t = as_table(value, self.num_branches, self.num_classes).float()
        self.thresholds = t.to(self.thresholds.device if self.thresholds.numel() else "cpu")
        if gamma is not None:
            g = torch.as_tensor(list(gamma), dtype=torch.float32)
            if g.shape != (self.num_branches,) or torch.isnan(g).any() or (g < 0).any():
                raise OptionError(f"gamma needs {self.num_branches} values >= 0")
            self.gamma = g.to(self.thresholds.device)

    def _plan(self, dev: torch.device) -> _Plan:
        """The exit loop's view of the thresholds on ``dev``, kept until the table, the gate's
        powers, the score, the ensemble or the device change."""
        t, g = self.thresholds, self.gamma
        source = (t, _version(t), g, _version(g), self.score, self.ensemble, dev)
        plan = self._exit_plan
        if plan is None or not all(a is b or (not isinstance(a, torch.Tensor) and a == b)
                                   for a, b in zip(plan.source, source)):
            active = self.active
            table = t.to(dev)
            plan = _Plan(source, active, self._evaluated(active), g.tolist(),
                         [float(r[0]) if len(r) and bool((r == r[0]).all()) else None
                          for r in t], table)
            self._exit_plan = plan
        return plan

    def pieces(self, x: torch.Tensor) -> Sequence[Callable[[torch.Tensor], torch.Tensor]]:
        """The segments as they run on ``x``: frozen graphs on a CPU in float32 without grad
        (built on the first input of each image shape, see :mod:`pteenet.cascade`), else eager."""
        if not (self.frozen and frozen_applies(x)):
            return self.segments
        key = (("segments",), tuple(x.shape[1:]))
        if key not in self._graphs:
            self._graphs[key] = freeze_all(self.segments, x)
        return self._graphs[key]

    def answers(self, x: torch.Tensor) -> Sequence[Callable[[torch.Tensor], tuple]]:
        """Each branch's :meth:`answer` as inference runs it on the maps of input ``x``: where
        frozen segments serve ``x``, traced graphs that compute exactly the same (built on the
        first input of each image shape, :func:`pteenet.cascade.trace_exact`), else eager."""
        if not (self.frozen and frozen_applies(x)):
            return [functools.partial(self.answer, k) for k in range(self.num_branches)]
        head = self.score == "head"
        return self._traced(x, ("answers", head), lambda k, b: _Answer(b, head),
                            lambda run: run if head else lambda h: (run(h), None))

    def _scored(self, x: torch.Tensor, plan: _Plan) -> Sequence[Callable] | None:
        """Each exit's logits, confidence logit (only where the score reads it) and score from
        one traced graph, equal bit for bit to the eager exit's: what the exit loop runs where
        frozen segments serve ``x`` (three to five fewer ops dispatched from Python per exit).
        None with an ensemble, whose score reads the exits before."""
        if self.ensemble is not None or not (self.frozen and frozen_applies(x)):
            return None
        head = self.score == "head"
        powers = tuple(plan.gamma) if self.score == "gate" else ()
        return self._traced(
            x, ("scored", self.score, powers),
            lambda k, b: _Scored(_Answer(b, head), functools.partial(self._score,
                                                                     gamma=plan.gamma[k])),
            lambda run: run)

    def _traced(self, x: torch.Tensor, what: tuple, make: Callable[[int, nn.Module], nn.Module],
                unpack: Callable[[Callable], Callable]) -> list[Callable]:
        """``make(k, branch)`` traced exactly on cut k's map, per image shape (cached; a new
        set of one kind replaces the old ones, so new gate powers do not pile up graphs)."""
        key = (what, tuple(x.shape[1:]), self.training, tuple(map(id, self.branches)))
        if key not in self._graphs:
            for old in [k for k in self._graphs if k[0][0] == what[0]]:
                del self._graphs[old]
            maps, h = [], x[:1]
            for seg in self.pieces(x)[:-1]:
                h = seg(h)
                maps.append(h)
            self._graphs[key] = [unpack(trace_exact(make(k, b), m))
                                 for k, (b, m) in enumerate(zip(self.branches, maps))]
        return self._graphs[key]

    def _apply(self, fn, *args, **kwargs):  # noqa: ANN001, ANN202 - nn.Module's signature
        """Moving or casting the model (``to``, ``double``...) drops its frozen graphs."""
        self._graphs.clear()
        return super()._apply(fn, *args, **kwargs)

    def train(self, mode: bool = True) -> EarlyExitModel:
        """Only branches ever train: the backbone's segments stay in eval mode."""
        super().train(mode)
        self.segments.eval()
        if self.whole is not None:
            self.whole.eval()
        return self

    # -- computation ----------------------------------------------------------------------
    def exit_score(self, logits: torch.Tensor, confidence: torch.Tensor | None, k: int
                   ) -> torch.Tensor:
        """Exit ``k``'s score of each sample (see the module docstring for the three kinds)."""
        return self._score(logits, confidence, float(self.gamma[k]))

    def _score(self, logits: torch.Tensor, confidence: torch.Tensor | None, gamma: float
               ) -> torch.Tensor:
        if self.score == "head":
            return torch.sigmoid(confidence)
        top = torch.softmax(logits.float(), dim=1).amax(1)
        return top if self.score == "softmax" else gate(top, gamma)

    def exit_logits(self, logits: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each exit's answer from the branches' own logits: those logits, or the ensemble's."""
        return list(logits) if self.ensemble is None else self.ensemble.exit_logits(logits)

    def exit_outputs(self, logits: Sequence[torch.Tensor], conf: Sequence[torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every exit's score and prediction from the branches' outputs, two [N, B] tensors
        (what calibration and bench record), from the ensembled logits when there is one."""
        z = self.exit_logits(logits)
        scores = torch.stack([self.exit_score(lg, c, k)
                              for k, (lg, c) in enumerate(zip(z, conf))], 1)
        return scores, torch.stack([lg.argmax(1) for lg in z], 1)

    def answer(self, k: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Branch ``k``'s logits on its cut's map, and its confidence logit when the score reads
        it (None otherwise: inference leaves the head out, a third of a CIFAR branch's batch-1
        time). What inference, the time profile and the exported graphs all run."""
        branch = self.branches[k]
        return branch(h) if self.score == "head" else (branch.classify(h), None)

    def branch_step(self, k: int, h: torch.Tensor, history: torch.Tensor | None,
                    answer: Callable[[torch.Tensor], tuple] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Branch ``k`` on cut ``k``'s map ``h``: exit ``k``'s logits, the confidence logit (None
        when the score does not read it: it is not computed) and the log-softmaxes of exits
        0..k (``history`` holds 0..k-1; None without an ensemble). ``answer``: what computes
        :meth:`answer` (one of :meth:`answers`; default: the eager branch)."""
        logits, conf = answer(h) if answer is not None else self.answer(k, h)
        if self.ensemble is None:
            return logits, conf, None
        history = self.ensemble.extend(history, logits)
        return self.ensemble.combine(history, k), conf, history

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The frozen backbone's feature maps at every cut, and its final logits."""
        feats, segments = [], self.pieces(x)
        for seg in segments[:-1]:
            x = seg(x)
            feats.append(x)
        return feats, segments[-1](x)

    @torch.no_grad()
    def reduced_features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Each branch's fixed reduction of its cut's map (what training caches), and the logits.

        The reductions are small (a 4x4 grid at most), so caching them costs a fraction of
        caching whole maps, and every epoch runs only the branches' learned parts.
        """
        feats, final = self.features(x)
        return [b.reduce(f) for b, f in zip(self.branches, feats)], final

    def branch_outputs(self, reduced: Sequence[torch.Tensor]) -> tuple[list, list]:
        """Every branch's logits and confidence logit from its reduced map."""
        outs = [b.head(r) for b, r in zip(self.branches, reduced)]
        return [o[0] for o in outs], [o[1] for o in outs]

    def forward(self, x: torch.Tensor) -> TrainOutputs | EarlyExitResult:
        if self.training:
            reduced, final = self.reduced_features(x)
            logits, conf = self.branch_outputs(reduced)
            return TrainOutputs(logits, conf, final)
        return self.early_exit(x)

    @torch.inference_mode()
    def early_exit(self, x: torch.Tensor) -> EarlyExitResult:
        """True early exit with batch compaction: later segments only see samples still running.

        On CPU a branch whose samples all stay, or all leave, skips the index work (checking
        costs nothing there), and at batch 1 the exit test compares two Python numbers: the two
        tensor ops it replaces were 8 % of ResNet-44's early-exit time per image against the
        same pieces run without decisions, 3.5 % after. At batch 1 with frozen graphs the loop
        is a :class:`_Route` worked out once per graphs and thresholds. On GPUs no per-exit host
        sync is added beyond the compaction's.
        With an ensemble each sample's earlier log-softmaxes (``history``) are compacted with it.
        """
        n, dev = x.shape[0], x.device
        plan = self._plan(dev)
        if self.whole is not None and not any(plan.active):
            return EarlyExitResult(self.whole(x).float(),
                                   torch.full((n,), self.num_branches, device=dev),
                                   torch.full((n,), float(self.backbone_flops),
                                              dtype=torch.float64, device=dev))
        segments, scored = self.pieces(x), self._scored(x, plan)
        if n == 1 and scored is not None:  # batch 1 on a CPU: the route, every lookup done
            return _Route.of(plan, self, segments, scored).run(x)
        answers = self.answers(x) if scored is None else None
        cheap_checks = dev.type == "cpu"
        single = cheap_checks and n == 1  # one number against another: no tensor ops to test
        spent = 0
        h, history, state = x, None, None
        for k, (on, run) in enumerate(zip(plan.active, plan.runs)):
            h = segments[k](h)
            spent += self.segment_flops[k]
            if not run:
                continue
            spent += self.branch_flops[k]
            if scored is not None:
                out = scored[k](h)
                logits, score = out[0], out[-1]
            else:
                logits, conf, history = self.branch_step(k, h, history, answers[k])
                score = self._score(logits, conf, plan.gamma[k]) if on else None
            if not on:
                continue
            if single:
                if float(score) >= float(plan.threshold(k, logits)):
                    return self._answered(logits, k, spent)
                continue
            leave = score >= plan.threshold(k, logits)
            if cheap_checks and not leave.any():
                continue
            if cheap_checks and state is None and leave.all():
                return self._answered(logits, k, spent)
            state = state or _Answers.start(h.shape[0], self.num_classes, self.num_branches, dev)
            stay = state.record(leave, logits, k, spent, cheap_checks)
            if stay is None:
                return state.result()
            if stay is not ...:
                h = _keep_rows(h, stay)
                if history is not None:
                    history = history.index_select(0, stay)
        final = segments[-1](h).float()
        if state is None:
            return self._answered(final, self.num_branches, spent + self.segment_flops[-1])
        state.finish(final, spent + self.segment_flops[-1])
        return state.result()

    @staticmethod
    def _answered(logits: torch.Tensor, k: int, spent: float) -> EarlyExitResult:
        """Every sample answered at ``k``: the result without any index work (at batch 1, the
        four buffers and three index ops this skips were a tenth of the exit loop's overhead)."""
        n, dev = logits.shape[0], logits.device
        return EarlyExitResult(logits.float(), torch.full((n,), k, device=dev),
                               torch.full((n,), float(spent), dtype=torch.float64, device=dev))


class _Answer(nn.Module):
    """A branch's answer as a module to trace: the whole branch (logits, confidence logit) when
    the score reads the head, the classifier path alone otherwise (see EarlyExitModel.answer)."""

    def __init__(self, branch: nn.Module, head: bool) -> None:
        super().__init__()
        self.branch, self.head = branch, head

    def forward(self, h: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return self.branch(h) if self.head else self.branch.classify(h)


class _Scored(nn.Module):
    """A branch's answer and its exit score, as a module to trace: (logits, confidence logit,
    score) when the score reads the head, (logits, score) otherwise."""

    def __init__(self, answer: _Answer, score: Callable) -> None:
        super().__init__()
        self.answer, self.score = answer, score

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.answer(h)
        logits, conf = out if self.answer.head else (out, None)
        score = self.score(logits, conf)
        return (logits, score) if conf is None else (logits, conf, score)


class _Graphs(dict):
    """Frozen segments per image shape: derived, so a copy or a pickle of the model starts
    without them (TorchScript graphs neither deep-copy nor pickle)."""

    def __reduce__(self) -> tuple:
        return _Graphs, ()


@dataclass
class _Plan:
    """What the exit loop reads of the thresholds, worked out once per table: the loop runs on
    the batch-1 hot path, where each tensor op on the table costs as much as a small layer."""

    source: tuple  # the tensors it was made from, and their versions (in-place edits count)
    active: list[bool]
    runs: list[bool]
    gamma: list[float]
    uniform: list[float | None]  # exit k's one threshold when every class has the same
    table: torch.Tensor
    route: _Route | None = None  # the batch-1 loop over these thresholds (see _Route)

    def threshold(self, k: int, logits: torch.Tensor) -> torch.Tensor | float:
        """Exit k's threshold for each sample's predicted class (a number when they agree:
        the float32 table's value, so the comparison is the same)."""
        u = self.uniform[k]
        return self.table[k].gather(0, logits.argmax(1)) if u is None else u


@dataclass
class _Route:
    """The batch-1 exit loop on a CPU with every lookup done: per exit its segment, its scored
    branch (None where the exit is off), its threshold (one number, or one per class) and the
    FLOPs spent by then, with the graphs called directly (:func:`pteenet.cascade._frozen.direct`).

    Kept on the thresholds' plan and rebuilt when the model's cached graphs are (other lists:
    a new shape, branches replaced, the model moved); identity of the lists says so, and they
    stay alive with the route, so an id cannot be reused. It answers exactly as the general
    loop does, which a test checks; on 2 cores it ran ResNet-44's stream of CIFAR images 4-6 %
    faster than that loop's batch-1 path (the Python around ten small graphs a call).
    """

    segments: Sequence[Callable]
    scored: Sequence[Callable]
    steps: list[tuple[Callable, Callable | None, float | list[float], int]]
    last: Callable
    total: int

    @classmethod
    def of(cls, plan: _Plan, model: EarlyExitModel, segments: Sequence[Callable],
           scored: Sequence[Callable]) -> _Route:
        """``plan``'s route over these graphs, built on first use."""
        route = plan.route
        if route is None or route.segments is not segments or route.scored is not scored:
            route = plan.route = cls._build(plan, model, segments, scored)
        return route

    @classmethod
    def _build(cls, plan: _Plan, model: EarlyExitModel, segments: Sequence[Callable],
               scored: Sequence[Callable]) -> _Route:
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
                return EarlyExitModel._answered(logits, k, spent)
        return EarlyExitModel._answered(self.last(h).float(), len(self.steps), self.total)


@dataclass
class _Answers:
    """The answers of samples that have left, once some but not all of a batch have."""

    out: torch.Tensor  # [N, K]
    exit_index: torch.Tensor  # [N]
    flops: torch.Tensor  # [N] float64
    alive: torch.Tensor  # input positions of the samples still running

    @classmethod
    def start(cls, n: int, num_classes: int, num_branches: int, dev: torch.device) -> _Answers:
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


def build_early_exit(
    trace: Trace,
    cut_names: Sequence[str],
    num_classes: int,
    branch: str | Sequence[str] = DEFAULT_BRANCH,
    *,
    budget: float | None = DEFAULT_BUDGET,
    widths: Sequence[int | None] | None = None,
    thresholds: object = 0.5,
    score: str = "softmax",
    gamma: Sequence[float] | None = None,
    flops: tuple[Sequence[int], Sequence[int]] | None = None,
) -> EarlyExitModel:
    """Split the traced backbone at ``cut_names`` and attach a fresh branch after each cut.

    ``budget`` caps each branch's FLOPs as a share of the backbone's (``None``: no cap);
    ``widths`` (from a bundle) rebuilds branches at the widths they were trained with, and
    ``flops`` (each segment's and each branch's, from a bundle) is taken as recorded instead
    of counted again.
    """
    kinds = [branch] * len(cut_names) if isinstance(branch, str) else list(branch)
    if len(kinds) != len(cut_names):
        raise OptionError(f"{len(kinds)} branch types given for {len(cut_names)} cuts")
    if budget is not None and not 0 < budget <= 1:
        raise OptionError(f"`branch_budget` must lie in (0, 1], got {budget}")
    segments = split_at(trace, cut_names)
    cuts = [trace.cut(c) for c in cut_names]
    cap = None if budget is None else budget * trace.total_flops
    widths = list(widths) if widths is not None else [None] * len(cuts)
    branches = [make_branch(k, c.shape, num_classes, cap, width=w)
                for k, c, w in zip(kinds, cuts, widths)]
    seg_flops, br_flops = flops or (_segment_flops(trace, cuts),
                                    [branch_flops(b, c.shape) for b, c in zip(branches, cuts)])
    return EarlyExitModel(
        segments, branches, segment_flops=seg_flops, branch_flops=br_flops,
        num_classes=num_classes, thresholds=thresholds, score=score, gamma=gamma,
        whole=trace.model,
    )


def _version(t: torch.Tensor) -> int:
    """How often ``t`` was edited in place (-1 for an inference tensor, which keeps no count:
    such a table can only be edited inside ``torch.inference_mode``)."""
    return -1 if t.is_inference() else t._version


def _segment_flops(trace: Trace, cuts: Sequence[Cut]) -> list[int]:
    """Each segment's own FLOPs, from the cumulative counts at its ends."""
    ends = [c.flops for c in cuts] + [trace.total_flops]
    return [b - a for a, b in zip([0, *ends[:-1]], ends)]
