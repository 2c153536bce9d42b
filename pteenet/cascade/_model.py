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

import torch
import torch.nn.functional as F
from torch import nn

from pteenet.cascade._cost import Cost, reach
from pteenet.cascade._ensemble import ZTWEnsemble
from pteenet.cascade._exit_loop import (
    EarlyExitResult,
    Plan,
    TrainOutputs,
    early_exit,
    tensor_version,
)
from pteenet.cascade._frozen import freeze_all, frozen_applies, trace_exact
from pteenet.cascade._profile import PROBE_BATCH, TimeProfile, profile_cascade
from pteenet.cascade._score import exit_score
from pteenet.cascade._traced import Answer, Graphs, Scored
from pteenet.choices import COSTS, SCORES
from pteenet.errors import OptionError
from pteenet.graph._head import LinearHead
from pteenet.thresholds import as_table

__all__ = ["EarlyExitModel"]


class EarlyExitModel(nn.Module):
    """Segments of a frozen backbone interleaved with trainable exit branches.

    ``segment_flops[k]`` and ``branch_flops[k]`` are per-image FLOPs; their sum over segments is
    the backbone's own cost, against which relative FLOPs are reported. ``cost`` is the cost model
    (calibration's search, L_v2's cost term): FLOPs, or the measured times of ``latency`` (a
    :class:`~pteenet.cascade.TimeProfile`).
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
        self._cost_kind = "flops"
        self.latency: TimeProfile | None = None
        # run the segments as frozen graphs in CPU inference (pteenet.cascade), one set per shape
        self.frozen = True
        self._graphs = Graphs()
        self._exit_plan: Plan | None = None
        self.register_buffer("thresholds", torch.empty(0), persistent=False)
        self.register_buffer("gamma", torch.ones(len(branches)), persistent=False)
        self.set_thresholds(thresholds, gamma=gamma)
        self.ensemble: ZTWEnsemble | None = None
        self.set_ensemble(ensemble)
        # (the last cut's map -> pre-logits, the classifier): distill branches' targets. Kept
        # out of the module tree: it shares the segments' modules, which are registered there
        self.__dict__["_pre"] = None

    def use_pre_logits(self, tail: nn.Module, head: LinearHead) -> None:
        """Compute the backbone's pre-logits while caching features (``tail`` runs from the last
        cut's map to them, ``head`` is its classifier): the targets of ``distill`` branches."""
        self.__dict__["_pre"] = (tail.requires_grad_(False).eval(), head)

    @property
    def pre_logits(self) -> bool:
        """Whether :meth:`features` can yield the pre-logits (some branch distills them)."""
        return self._pre is not None

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

    @property
    def cost(self) -> Cost:
        """The cost model in use (:meth:`use_cost` picks it): ``model.cost.exits(model.active)``
        is the relative cost of leaving at each exit under the current thresholds."""
        return self.cost_in(self._cost_kind)

    def cost_in(self, kind: str) -> Cost:
        """The cost model counting ``kind``: ``"flops"`` or ``"latency"`` (measured time)."""
        if kind == "latency":
            if self.latency is None:
                raise OptionError("no time profile: measure one with use_cost('latency', "
                                  "model.profile(images))")
            segment, branch = self.latency.costs()
        else:
            spent = torch.tensor(self.segment_flops, dtype=torch.float64).cumsum(0)
            segment = (spent / self.backbone_flops).tolist()
            branch = [f / self.backbone_flops for f in self.branch_flops]
        return Cost(kind, tuple(segment), tuple(branch), self.ensemble is not None)

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
        self._cost_kind = kind

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
        score they apply to and the gate's per-exit powers. Scores lie in [0, 1]: a threshold
        above 1 never fires and is kept as inf (never); negative or NaN ones are refused."""
        if score is not None:
            if score not in SCORES:
                raise OptionError(f"unknown score '{score}': use one of {', '.join(SCORES)}")
            self.score = score
        t = as_table(value, self.num_branches, self.num_classes).float()
        t = t.masked_fill(t > 1, math.inf)  # no score reaches it: stored as what it means, so
        # the bundle and the export (which record [0, 1] or null = never) can write the table
        self.thresholds = t.to(self.thresholds.device if self.thresholds.numel() else "cpu")
        if gamma is not None:
            g = torch.as_tensor(list(gamma), dtype=torch.float32)
            if g.shape != (self.num_branches,) or torch.isnan(g).any() or (g < 0).any():
                raise OptionError(f"gamma needs {self.num_branches} values >= 0")
            self.gamma = g.to(self.thresholds.device)

    def plan(self, dev: torch.device) -> Plan:
        """The exit loop's view of the thresholds on ``dev``, kept until the table, the gate's
        powers, the score, the ensemble or the device change."""
        t, g = self.thresholds, self.gamma
        source = (t, tensor_version(t), g, tensor_version(g), self.score, self.ensemble, dev)
        plan = self._exit_plan
        if plan is None or not all(a is b or (not isinstance(a, torch.Tensor) and a == b)
                                   for a, b in zip(plan.source, source)):
            active = self.active
            table = t.to(dev)
            plan = Plan(source, active, self._evaluated(active), g.tolist(),
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
        """Each branch as inference runs it on its cut's map of input ``x``: ``(logits,
        confidence logit)``, the confidence None where the score does not read it (inference
        leaves the head out). Where frozen segments serve ``x``, traced graphs that compute
        exactly what the eager branches do (built on the first input of each image shape,
        :func:`pteenet.cascade.trace_exact`). The one way inference, the time profile and the
        exported graphs get a branch's answer."""
        head = self.score == "head"
        if not (self.frozen and frozen_applies(x)):  # eager: nothing built per call
            return list(self.branches) if head else \
                [lambda h, b=b: (b.classify(h), None) for b in self.branches]
        return self._traced(x, ("answers", head), lambda k, b: Answer(b, head),
                            (lambda run: run) if head else lambda run: lambda h: (run(h), None))

    def _scored(self, x: torch.Tensor, plan: Plan) -> Sequence[Callable] | None:
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
            lambda k, b: Scored(Answer(b, head), functools.partial(
                exit_score, self.score, gamma=plan.gamma[k])),
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
    def exit_outputs(self, logits: Sequence[torch.Tensor], conf: Sequence[torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every exit's score and prediction from the branches' outputs, two [N, B] tensors
        (what calibration and bench record), from the ensembled logits when there is one."""
        z = list(logits) if self.ensemble is None else self.ensemble.exit_logits(logits)
        scores = torch.stack([exit_score(self.score, lg, c, float(self.gamma[k]))
                              for k, (lg, c) in enumerate(zip(z, conf))], 1)
        return scores, torch.stack([lg.argmax(1) for lg in z], 1)

    @torch.no_grad()
    def features(self, x: torch.Tensor, pre_logits: bool = False) -> tuple[torch.Tensor, ...]:
        """The frozen backbone's feature maps at every cut, and its final logits; with
        ``pre_logits`` also its pre-logits (what ``distill`` branches learn to reproduce), the
        logits then being its classifier on them, so nothing runs twice."""
        feats, segments = [], self.pieces(x)
        for seg in segments[:-1]:
            x = seg(x)
            feats.append(x)
        if not pre_logits:
            return feats, segments[-1](x)
        tail, head = self._pre
        pre = tail(x).float()
        bias = None if head.bias is None else head.bias.float()
        return feats, F.linear(pre, head.weight.float(), bias), pre

    @torch.no_grad()
    def reduced_features(self, x: torch.Tensor, pre_logits: bool = False
                         ) -> tuple[torch.Tensor, ...]:
        """:meth:`features` with each map replaced by its branch's fixed reduction (what
        training caches: a 4x4 grid at most, so every epoch runs only the learned parts)."""
        feats, *rest = self.features(x, pre_logits)
        return [b.reduce(f) for b, f in zip(self.branches, feats)], *rest

    def branch_outputs(self, reduced: Sequence[torch.Tensor]) -> tuple[list, list]:
        """Every branch's logits and confidence logit from its reduced map."""
        outs = [b.head(r) for b, r in zip(self.branches, reduced)]
        return [o[0] for o in outs], [o[1] for o in outs]

    def check_input(self, x: object) -> None:
        """A batch the model can run: a 4-D ``[N, 3, H, W]`` floating tensor of the model's own
        dtype on its device; anything else (a numpy array, uint8 pixels, a 3-D image, a meta
        tensor) is one :class:`OptionError` line instead of torch's error from deep inside."""
        p = next(self.parameters(), None)
        want = f"a [N, 3, H, W] {str(p.dtype).removeprefix('torch.') if p is not None else ''}" \
            f" tensor of normalised images"
        if not isinstance(x, torch.Tensor):
            raise OptionError(f"the model takes {want}, not a {type(x).__name__} (use "
                              f"torch.from_numpy and the bundle's preprocess)")
        if x.ndim != 4 or x.shape[1] != 3:
            hint = " (add the batch dimension with x.unsqueeze(0) for one image)" \
                if x.ndim == 3 else ""
            raise OptionError(f"the model takes {want}, got shape {list(x.shape)}{hint}")
        if p is not None and (x.dtype != p.dtype or x.device != p.device):
            raise OptionError(f"the model takes {want} on {p.device}, got {x.dtype} on "
                              f"{x.device} (use x.to(device, dtype); pixels scaled to [0, 1] "
                              f"and normalised)")

    def forward(self, x: torch.Tensor) -> TrainOutputs | EarlyExitResult:
        if self.training:
            self.check_input(x)
            reduced, final = self.reduced_features(x)
            logits, conf = self.branch_outputs(reduced)
            return TrainOutputs(logits, conf, final)
        return self.early_exit(x)

    def early_exit(self, x: torch.Tensor) -> EarlyExitResult:
        """True early exit with batch compaction (:func:`pteenet.cascade._exit_loop.early_exit`)."""
        self.check_input(x)
        return early_exit(self, x)
