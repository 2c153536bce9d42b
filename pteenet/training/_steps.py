"""The optimiser loop's pieces every training mode shares: shuffled batches, the one-cycle rate,
bf16 autocast, a guard against NaN losses, and one step that sums gradients over processes."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor

from pteenet.cascade._model import EarlyExitModel
from pteenet.errors import TrainingError
from pteenet.training._config import TrainConfig
from pteenet.training._distributed import Shard, all_sum

__all__ = ["Guard", "adam", "autocast", "batches", "lr_at", "set_lr", "step"]

FUSED_ADAM_DEVICES = ("cpu", "cuda")  # where torch has Adam's update as one kernel


def step(opt: torch.optim.Optimizer, per_sample: Tensor, weight: Tensor | None, denom: float,
          shard: Shard, params, guard: Guard, epoch: int) -> float:
    """One optimiser step on this rank's part of a global batch; returns the batch's loss sum.

    The local weighted sum is divided by the *global* denominator (batch size, or weight sum),
    so the gradients summed over ranks equal the single-process mean's.
    """
    local = (per_sample * weight).sum() if weight is not None else per_sample.sum()
    total = all_sum(local.detach().clone())
    guard.check(total, epoch)
    opt.zero_grad(set_to_none=True)
    (local / denom).backward()
    shard.reduce_grads(params)
    opt.step()
    return float(total)


def autocast(config: TrainConfig) -> contextlib.AbstractContextManager:
    """bf16 mixed precision for branch forward passes when ``--amp`` is set (loss stays fp32)."""
    device_type = torch.device(config.device).type
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=config.amp)


def batches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[Tensor]:
    """Shuffled batches; a last batch of one sample joins the one before it (batch norm needs
    two samples to train)."""
    parts = list(torch.randperm(n, generator=gen).split(batch_size))
    if len(parts) > 1 and len(parts[-1]) == 1:
        parts[-2:] = [torch.cat(parts[-2:])]
    yield from parts


class Guard:
    """Keeps the last good branch weights so a NaN loss stops training without losing them."""

    def __init__(self, model: EarlyExitModel) -> None:
        self.model = model
        self.good = {k: v.detach().clone() for k, v in model.branches.state_dict().items()}

    def commit(self) -> None:
        """Copy the weights into the kept ones in place: a deep copy allocated anew each epoch
        was a visible share of an epoch from the cache (see design-timings.md)."""
        for k, v in self.model.branches.state_dict().items():
            self.good[k].copy_(v)

    def check(self, loss: Tensor, epoch: int) -> None:
        if not torch.isfinite(loss):
            self.model.branches.load_state_dict(self.good)
            raise TrainingError(
                f"the loss became {loss.item()} in epoch {epoch + 1}; training stopped and the "
                f"branches were reset to the last good epoch (try a lower `lr`)"
            )


def adam(params: Iterable[Tensor], lr: float) -> torch.optim.Adam:
    """Adam, its update fused into one kernel where torch has one: the per-parameter update
    loop was a quarter of an epoch from the cache (see design-timings.md)."""
    params = list(params)
    fused = bool(params) and all(p.device.type in FUSED_ADAM_DEVICES for p in params)
    return torch.optim.Adam(params, lr=lr, fused=fused or None)


def lr_at(step: int, total: int, peak: float) -> float:
    """One-cycle rate: linear warm-up over the first 30 % of steps, then cosine decay to ~0."""
    warm = max(1, int(0.3 * total))
    if step < warm:
        return peak * (0.04 + 0.96 * step / warm)
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr
