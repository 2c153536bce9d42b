"""Boosted training (BTS-EE, Aperstein & Apartsin): one branch at a time, shallow to deep.

Each branch is trained, calibrated on the held-out split with Class Precision Margin, and the
samples it would take are removed (``hard``) or down-weighted by their probability of having left
(``soft``, as in CalexNet) before the next branch trains, so every branch learns the
distribution it will see at inference.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from pteenet.thresholds import class_precision, cpm_thresholds, exit_index
from pteenet.training._config import TrainConfig, TrainReport
from pteenet.training._distributed import Shard
from pteenet.training._features import FeatureSet, agreement, branch_scores
from pteenet.training._losses import branch_per_sample, make_targets
from pteenet.training._resume import Resume
from pteenet.training._steps import Guard, adam, autocast, batches, lr_at, set_lr, step

__all__ = ["train_boosted"]


def train_boosted(model, train, held, config, on_epoch, resume: Resume | None,
                  on_batch: Callable[[int], None] | None) -> TrainReport:
    """BTS-EE: train branch k on the survivors of branches < k, calibrate it, remove its exits.
    With ``resume`` the state is saved after every branch but the last."""
    report = TrainReport()
    b, k_cls = model.num_branches, model.num_classes
    thr = torch.full((b, k_cls), math.inf)
    w_train = torch.ones(len(train))
    w_held = torch.ones(len(held))
    gen = torch.Generator().manual_seed(config.seed)
    labeled = config.target in ("labels", "mixed")
    ref = held.labels if labeled else held.final.argmax(1)
    precision = class_precision(held.final.argmax(1), ref, k_cls) \
        if labeled else None
    shard = Shard(train.indices)
    start = 0
    saved = resume.load_stage(model, gen, report) if resume else None
    if saved is not None:
        start, thr, w_global, w_held = saved
        w_train = shard.to_local(w_global)
        if on_epoch:
            on_epoch(start * config.epochs - 1, report.losses[-1], [])
    for k in range(start, b):
        w_global = shard.to_global(w_train)
        report.survivors.append({"train": int((w_global > 0.5).sum()),
                                 "held_out": int((w_held > 0.5).sum())})
        _train_one(model, k, train, w_global, shard, config, gen, on_epoch, report, on_batch)
        s_held, p_held = branch_scores(model, held, config.device)
        alive = w_held > 0.5
        table = cpm_thresholds(s_held[alive, k:k + 1], p_held[alive, k:k + 1], ref[alive],
                               k_cls, config.margin, config.min_support, precision)
        thr[k] = table[0]
        if k == b - 1:
            break
        w_train = w_train * _survival(model, train, k, thr, config)
        w_held = w_held * _survival(model, held, k, thr, config)
        if resume:
            resume.save_stage(k, model, gen, report, thr, shard.to_global(w_train), w_held)
    report.agreement = agreement(model, held, config.device)
    report.thresholds = thr
    return report


def _survival(model, data: FeatureSet, k: int, thr: Tensor, config: TrainConfig) -> Tensor:
    """Probability of going on past branch k: 0/1 (hard) or a smooth step of score - threshold."""
    scores, preds = branch_scores(model, data, config.device)
    t = thr[k].gather(0, preds[:, k])
    if config.boosted == "hard":
        return (exit_index(scores[:, k:k + 1], preds[:, k:k + 1], thr[k:k + 1]) == 1).float()
    return torch.where(torch.isinf(t), torch.ones_like(t),
                       torch.sigmoid((t - scores[:, k]) / 0.05))


def _train_one(model, k, train, weight: Tensor, shard: Shard, config, gen, on_epoch,
               report, on_batch: Callable[[int], None] | None) -> None:
    """Train branch k on the survivors; ``weight`` is the global survival vector (all ranks)."""
    soft = config.boosted == "soft"
    keep = (weight > (1e-3 if soft else 0.5)).nonzero().squeeze(1)
    if keep.numel() == 0:
        return
    branch = model.branches[k]
    params = list(branch.parameters())
    opt = adam(params, config.lr)
    guard = Guard(model)
    local_w = shard.to_local(weight)
    steps = math.ceil(keep.numel() / config.batch_size)
    for epoch in range(config.epochs):
        total = 0.0
        for i, pos in enumerate(batches(keep.numel(), config.batch_size, gen)):
            set_lr(opt, lr_at(epoch * steps + i, config.epochs * steps, config.lr))
            glob = keep[pos]
            sel = shard.select(glob)
            part = train.take(sel, config.device)
            target = make_targets(part.final, part.labels, config.target, config.temperature)
            with autocast(config):
                logits, conf = branch.head(part.feats[k])
            per_sample = branch_per_sample(logits.float(), conf.float(), target)
            w = local_w[sel].to(config.device) if soft else None
            denom = float(weight[glob].sum()) if soft else len(glob)
            total += step(opt, per_sample, w, denom, shard, params, guard, epoch)
            if on_batch:
                on_batch(len(glob))
        shard.average_buffers(branch)
        guard.commit()
        report.losses.append(total / keep.numel())
        if on_epoch:
            on_epoch(k * config.epochs + epoch, report.losses[-1], [])
