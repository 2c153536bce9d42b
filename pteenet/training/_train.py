"""Training exit branches on a frozen backbone, from its own predictions.

Targets are the backbone's pseudo-labels (PTEEnet, Lahiany & Aperstein): its argmax (``hard``),
its tempered softmax (``soft``, knowledge distillation), ground-truth ``labels`` (the SDN recipe),
or ``mixed``: half the labels, half the backbone's softmax at temperature 4. ``auto`` (the
default) is ``mixed`` when the data has labels and ``soft`` when it has none. On CIFAR ResNet-44
mixed targets raised every exit's test accuracy by 1-3 points over hard pseudo-labels (the last
exits beat the backbone itself), which is what lets more samples leave early. Three modes:

* distill (default): every branch at once, each with its own cross-entropy to the targets (and
  its confidence head trained to predict whether it is right); branches are independent, so the
  loss never trades one exit against another (the SDN "IC-only" recipe, Kaya et al. 2019);
* joint: every branch at once with EENets' L_v2 loss on the frozen cascade (Demir &
  Akbas, eq. 5-8): with branch outputs y_i, confidences h_i and cumulative cost c_i,
  Y_i = h_i*y_i + (1-h_i)*Y_{i+1}, C_i = h_i*c_i + (1-h_i)*C_{i+1}, L = sum_i CE(t, Y_i) + lam*C_i,
  computed in log space so it cannot produce NaN;
* boosted (BTS-EE, Aperstein & Apartsin): one branch at a time, shallow to deep; each is trained,
  calibrated on the held-out split, and the samples it would take are removed (``hard``) or
  down-weighted by their probability of having left (``soft``, as in CalexNet) before the next
  branch trains, so every branch learns the distribution it will see at inference.

:func:`train_branches` runs distill and joint training here and hands boosted training to
:mod:`pteenet.training`. Around it, one concept a module: :mod:`pteenet.training` (settings and
report), :mod:`pteenet.training._features` (the backbone's features, computed once),
:mod:`pteenet.training` (targets and losses), :mod:`pteenet.training` (batches, the one-cycle
rate, one optimiser step) and :mod:`pteenet.training` (the state an interrupted attach continues).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import torch

from pteenet.cascade._model import EarlyExitModel
from pteenet.machine import threads
from pteenet.training._boosted import train_boosted
from pteenet.training._config import TrainConfig, TrainReport
from pteenet.training._distributed import Shard
from pteenet.training._features import FeatureSet, LiveFeatures, agreement
from pteenet.training._losses import (
    distill_per_sample,
    eenet_per_sample,
    feature_per_sample,
    make_targets,
)
from pteenet.training._resume import Resume
from pteenet.training._steps import Guard, adam, autocast, batches, lr_at, set_lr, step

__all__ = ["train_branches"]


def train_branches(model: EarlyExitModel, train: FeatureSet, held: FeatureSet,
                   config: TrainConfig, on_epoch: Callable[[int, float, list[float]], None]
                   | None = None, resume: Resume | None = None,
                   on_batch: Callable[[int], None] | None = None) -> TrainReport:
    """Train the branches (joint or boosted) from cached features; the backbone never moves.

    With ``resume``, state is saved after every epoch (after every branch when boosted) and a
    saved state is continued. ``on_batch`` is told each global batch's size (progress bars).
    """
    torch.manual_seed(config.seed)
    config = replace(config, target=config.resolved_target(_has_labels(train)))
    model.train()
    model.branches.to(config.device)
    # heads are a few small matrices: more CPU threads only wait on each other (timings:
    # benchmarks/results/design-timings.md); streaming keeps every thread
    one = torch.device(config.device).type == "cpu" and not isinstance(train, LiveFeatures)
    with threads(1 if one else None):
        if config.boosted:
            return train_boosted(model, train, held, config, on_epoch, resume, on_batch)
        return _train_joint(model, train, held, config, on_epoch, resume, on_batch)


def _has_labels(train: FeatureSet | LiveFeatures) -> bool:
    if isinstance(train, LiveFeatures):
        return train.data.has_labels
    return bool(len(train)) and bool((train.labels >= 0).all())


def _train_joint(model, train, held, config, on_epoch, resume: Resume | None,
                 on_batch: Callable[[int], None] | None) -> TrainReport:
    opt = adam(model.branches.parameters(), config.lr)
    gen = torch.Generator().manual_seed(config.seed)
    costs = model.cost.exits(model.active)
    report, guard = TrainReport(), Guard(model)
    start = resume.load(model, opt, gen, report) if resume else 0
    guard.commit()
    if start and on_epoch:
        on_epoch(start - 1, report.losses[-1], agreement(model, held, config.device))
    shard = Shard(train.indices)
    params = list(model.branches.parameters())
    steps = math.ceil(len(shard) / config.batch_size)
    for epoch in range(start, config.epochs):
        total = 0.0
        for i, pos in enumerate(batches(len(shard), config.batch_size, gen)):
            set_lr(opt, lr_at(epoch * steps + i, config.epochs * steps, config.lr))
            part = train.take(shard.select(pos), config.device)
            target = make_targets(part.final, part.labels, config.target, config.temperature)
            with autocast(config):
                logits, conf = model.branch_outputs(part.feats)
            logits, conf = [lg.float() for lg in logits], [c.float() for c in conf]
            if config.loss == "eenet":
                per_sample = eenet_per_sample(logits, conf, part.final, target, costs, config.lam)
            else:
                per_sample = distill_per_sample(logits, conf, target)
            with autocast(config):
                per_sample = per_sample + feature_per_sample(model.branches, part.feats, part.pre)
            total += step(opt, per_sample, None, len(pos), shard, params, guard, epoch)
            if on_batch:
                on_batch(len(pos))
        shard.average_buffers(model.branches)
        guard.commit()
        report.losses.append(total / len(shard))
        if resume:
            resume.save(epoch, model, opt, gen, report)
        if on_epoch:
            report.agreement = agreement(model, held, config.device)
            on_epoch(epoch, report.losses[-1], report.agreement)
    if not on_epoch or not report.agreement:
        report.agreement = agreement(model, held, config.device)
    return report
