"""Data-parallel branch training on ``torch.distributed`` (launched with ``torchrun``).

Each rank reads its shard of the training images and runs the frozen backbone on it locally (so
the feature cache shards with the data); only branch gradients travel, summed across ranks after
every step. Ranks walk the *same* global batches, each taking the samples it holds, and every
rank's loss is scaled by ``world / global batch size``, so the summed gradient is exactly the
single-process gradient of that batch, whatever the shards' sizes (this is what
DistributedDataParallel's average does for equal shards; a plain sum keeps it exact for unequal
shards and for ranks that hold none of a batch). BatchNorm inside branches normalises with each
rank's own part of the batch on CPU (SyncBatchNorm needs GPUs); running statistics are averaged
after every epoch.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["Shard", "all_sum", "init_from_env", "is_main", "launched_as_main", "rank_world"]


def init_from_env(device: str = "cpu") -> None:
    """Join the process group ``torchrun`` describes (gloo on CPU, nccl on CUDA), if any."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        cuda = str(device).startswith("cuda")
        if cuda:  # one GPU per rank: torchrun's LOCAL_RANK picks it
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
        # left to the interpreter's exit, gloo's threads were sometimes torn down still joinable
        # and a rank died with "terminate called without an active exception" (SIGABRT)
        atexit.register(_leave)


def _leave() -> None:
    """Leave the process group at exit (if still in one)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launched_as_main() -> bool:
    """Rank 0 as torchrun launched us, known before :func:`init_from_env` (one process: yes)."""
    return os.environ.get("RANK", "0") == "0"


def is_main() -> bool:
    return rank_world()[0] == 0


def all_sum(x: Tensor) -> Tensor:
    """Sum a tensor over ranks, in place (a no-op in a single process)."""
    if rank_world()[1] > 1:
        dist.all_reduce(x)
    return x


class Shard:
    """Maps global sample positions (all ranks' samples, sorted by dataset index, exactly the
    single-process order) to the rank that holds each and its local position there."""

    def __init__(self, local_indices: Tensor) -> None:
        self.rank, self.world = rank_world()
        local_indices = local_indices.to(torch.long).cpu()
        if self.world == 1:
            self.owner = torch.zeros(len(local_indices), dtype=torch.long)
            self.local = torch.arange(len(local_indices))
            return
        parts: list[list[int]] = [[] for _ in range(self.world)]
        dist.all_gather_object(parts, local_indices.tolist())
        idx = torch.cat([torch.tensor(p, dtype=torch.long) for p in parts])
        owner = torch.cat([torch.full((len(p),), r, dtype=torch.long)
                           for r, p in enumerate(parts)])
        local = torch.cat([torch.arange(len(p)) for p in parts])
        order = idx.argsort()
        self.owner, self.local = owner[order], local[order]

    def __len__(self) -> int:
        return int(self.owner.numel())

    def select(self, pos: Tensor) -> Tensor:
        """Local positions of this rank's samples among the global positions ``pos``."""
        return self.local[pos[self.owner[pos] == self.rank]]

    def to_global(self, local_values: Tensor) -> Tensor:
        """Assemble a per-sample vector held in pieces on every rank into the global order."""
        if self.world == 1:
            return local_values
        parts: list[list[float]] = [[] for _ in range(self.world)]
        dist.all_gather_object(parts, local_values.tolist())
        out = torch.empty(len(self), dtype=local_values.dtype)
        for r, values in enumerate(parts):
            out[self.owner == r] = torch.tensor(values, dtype=local_values.dtype)[
                self.local[self.owner == r]]
        return out

    def to_local(self, global_values: Tensor) -> Tensor:
        """This rank's part of a vector in the global order, in its local order (the inverse
        of :meth:`to_global`)."""
        mine = self.owner == self.rank
        out = torch.empty(int(mine.sum()), dtype=global_values.dtype)
        out[self.local[mine]] = global_values[mine]
        return out

    def reduce_grads(self, params: Iterable[nn.Parameter]) -> None:
        """Sum branch gradients across ranks in one coalesced all-reduce."""
        if self.world == 1:
            return
        ps = [p for p in params if p.requires_grad]
        for p in ps:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in ps])
        dist.all_reduce(flat)
        offset = 0
        for p in ps:
            n = p.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p))
            offset += n

    def average_buffers(self, module: nn.Module) -> None:
        """Average floating buffers (BatchNorm running statistics) across ranks."""
        if self.world == 1:
            return
        for b in module.buffers():
            if b.is_floating_point():
                dist.all_reduce(b)
                b.div_(self.world)
