"""Latency: what each piece of a cascade costs in wall-clock time on the device at hand.

FLOPs are a poor proxy for time on a CPU: the first stage of a CIFAR ResNet (16 channels at
32x32) takes more time per FLOP than the last, and a tiny exit head costs a dispatch whatever
its FLOPs. A :class:`TimeProfile` holds each backbone segment's and each branch's measured time
per image, at batch 1 and batched; ``--cost latency`` uses it in place of FLOPs for placement,
EENets' L_v2 cost term and the threshold search, and ``bench`` compares the speedup it implies
with the one achieved.

Each piece is timed on its real input (the previous segments' output for the same images), in
passes down the chain as the cascade runs them, after warm-up passes: the median over passes,
under ``torch.inference_mode``.
"""

from __future__ import annotations

import ctypes
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from pteenet.cascade._frozen import freeze_all, frozen_applies
from pteenet.errors import OptionError
from pteenet.graph._split import split_at
from pteenet.graph._tracing import Trace

__all__ = ["TimeProfile", "batched_repeats", "chain_times", "cut_time_fractions",
           "device_name", "exit_times", "probe_batch", "probe_images", "profile_cascade",
           "relative_costs", "steady_allocator"]

WARMUP = 3
REPEATS = 15
PROBE_BATCH = 64  # images per timed batch
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
_STEADY_BYTES = 1 << 30


@dataclass
class TimeProfile:
    """Milliseconds per image of each segment (``B + 1``) and branch (``B``) on one device."""

    device: str
    threads: int
    batch_size: int
    segment_ms: list[float]  # batch 1
    branch_ms: list[float]
    segment_ms_batched: list[float]  # per image, at batch_size
    branch_ms_batched: list[float]

    def costs(self, batched: bool = False) -> tuple[list[float], list[float]]:
        """(cumulative segment costs, branch costs), relative to the backbone's own time."""
        if batched:
            return relative_costs(self.segment_ms_batched, self.branch_ms_batched)
        return relative_costs(self.segment_ms, self.branch_ms)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TimeProfile:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


def relative_costs(segment: Sequence[float], branch: Sequence[float]
                   ) -> tuple[list[float], list[float]]:
    """Cumulative segment times and branch times, as shares of the segments' total."""
    total = sum(segment)
    if total <= 0:
        raise OptionError("the time profile has no positive segment time")
    spent = torch.tensor(list(segment), dtype=torch.float64).cumsum(0) / total
    return spent.tolist(), [b / total for b in branch]


def device_name(device: torch.device | str = "cpu") -> str:
    """What the times were measured on: the CPU model (or GPU name) and the thread count."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(dev)}"
    return f"cpu: {_cpu_model()} x{torch.get_num_threads()} threads"


def probe_images(input_size: tuple[int, int], device: torch.device | str = "cpu",
                 n: int = PROBE_BATCH) -> Tensor:
    """Seeded random images to time a model on: a CNN's time does not depend on pixel values."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, *input_size, generator=g).to(device)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[Tensor], Any], x: Tensor) -> tuple[Any, float]:
    _sync(x.device)
    t0 = time.perf_counter()
    out = fn(x)
    _sync(x.device)
    return out, time.perf_counter() - t0


def _walk(segments: Sequence[Callable[[Tensor], Tensor]], x: Tensor,
          side: Sequence[Callable[[Tensor], Any] | None]) -> tuple[list[float], list[float]]:
    """One pass down the chain, in the cascade's order, timing every piece once."""
    seg_s, side_s = [], []
    for k, seg in enumerate(segments):
        x, t = _timed(seg, x)
        seg_s.append(t)
        if k < len(side) and side[k] is not None:
            side_s.append(_timed(side[k], x)[1])
    return seg_s, side_s


@torch.inference_mode()
def chain_times(segments: Sequence[Callable[[Tensor], Tensor]], x: Tensor,
                side: Sequence[Callable[[Tensor], Any] | None] = (), repeats: int = REPEATS
                ) -> tuple[list[float], list[float]]:
    """Seconds per call of each segment on its real input, and of ``side[k]`` on segment k's
    output (a branch): the median over ``repeats`` passes down the chain.

    Each piece is timed where the cascade runs it, after the piece before it: timed in a loop
    of its own, a branch kept its weights in cache (a CIFAR ResNet-44 branch holds up to 2 MB,
    as much as the backbone's last stage) and looked cheaper than it is in a real pass.
    """
    for _ in range(WARMUP):
        _walk(segments, x, side)
    walks = [_walk(segments, x, side) for _ in range(repeats)]
    return ([statistics.median(w[0][k] for w in walks) for k in range(len(walks[0][0]))],
            [statistics.median(w[1][k] for w in walks) for k in range(len(walks[0][1]))])


def profile_cascade(segments: Sequence[Callable[[Tensor], Tensor]],
                    branches: Sequence[Callable[[Tensor], Any]], images: Tensor,
                    batch_size: int = PROBE_BATCH, repeats: int = REPEATS
                    ) -> TimeProfile:
    """Time every segment and branch at batch 1 and at ``batch_size`` (per image)."""
    if images.shape[0] < 1:
        raise OptionError("profiling needs at least one image")
    s1, b1 = chain_times(segments, images[:1], branches, repeats)
    sb, bb = chain_times(segments, probe_batch(images, batch_size), branches,
                         batched_repeats(repeats))
    ms = 1000.0
    return TimeProfile(
        device=device_name(images.device), threads=torch.get_num_threads(),
        batch_size=batch_size, segment_ms=[t * ms for t in s1], branch_ms=[t * ms for t in b1],
        segment_ms_batched=[t * ms / batch_size for t in sb],
        branch_ms_batched=[t * ms / batch_size for t in bb])



def probe_batch(images: Tensor, batch_size: int) -> Tensor:
    """``batch_size`` of ``images`` (cycled when there are fewer): the batched probe."""
    big = images[:batch_size]
    if big.shape[0] < batch_size:
        big = big.repeat((batch_size + big.shape[0] - 1) // big.shape[0], 1, 1, 1)[:batch_size]
    return big


def batched_repeats(repeats: int) -> int:
    """Passes for a batched probe: a third of batch 1's (each is a batch long), at least 3."""
    return max(3, repeats // 3)


@torch.inference_mode()
def exit_times(segments: Sequence[Callable[[Tensor], Tensor]],
               branches: Sequence[Callable[[Tensor], Any] | None], x: Tensor,
               repeats: int = REPEATS, per_image: int | None = None
               ) -> tuple[float, list[float]]:
    """Seconds for the segments in a row, and for a pass that leaves at each exit (the last:
    the end) when the branches that are not None run: what an ideal speedup is made of.

    Both are timed alike, in passes down the chain, alternating: the cascade with only the
    branches that run (a branch that never runs would still evict the next segment's weights),
    the row with none, over ``repeats`` pairs of passes, so drift hits both alike. Each time is
    summed up as the speedup it is held against: the median over all passes (batched: the
    median throughput), or with ``per_image`` the mean over groups of that many passes of each
    group's median (batch 1: the mean over images of each image's median over its sweeps), so
    stalls count alike in the ideal and in what is held against it (a plain mean runs above
    the median by the stalls, ``design-timings.md``)."""
    for _ in range(WARMUP):
        _walk(segments, x, ())
        _walk(segments, x, branches)
    rows, walks = [], []
    for _ in range(repeats):
        rows.append(sum(_walk(segments, x, ())[0]))
        walks.append(_walk(segments, x, branches))

    def summary(values: Sequence[float]) -> float:
        if per_image is None:
            return statistics.median(values)
        groups = [values[i:i + per_image] for i in range(0, len(values), per_image)]
        return statistics.fmean(statistics.median(g) for g in groups)

    ran = iter(summary([w[1][j] for w in walks]) for j in range(len(walks[0][1])))
    spent, leave = 0.0, []
    for k in range(len(segments)):
        spent += summary([w[0][k] for w in walks])
        if k < len(branches) and branches[k] is not None:
            spent += next(ran)
        leave.append(spent)
    return summary(rows), leave


def cut_time_fractions(trace: Trace, names: Sequence[str], images: Tensor,
                       repeats: int = REPEATS) -> dict[str, float]:
    """Share of the backbone's batch-1 time spent before each of ``names`` (placement's
    ``--cost latency`` axis in place of the FLOP fraction)."""
    segments = [s.eval() for s in split_at(trace, names)]
    with torch.inference_mode():  # timed as inference runs them: frozen graphs on a CPU
        segments = freeze_all(segments, images) if frozen_applies(images) else segments
    seg_s, _ = chain_times(segments, images[:1], (), repeats)
    spent, _ = relative_costs(seg_s, [])
    return dict(zip(names, spent))


def steady_allocator() -> bool:
    """Keep freed activation buffers in the process instead of returning them to the OS.

    glibc's malloc serves large blocks (a batch of CIFAR activations is 16 MB) with fresh
    ``mmap`` pages and adapts its threshold to the order in which blocks are freed, so the same
    convolutions ran at different speeds depending on the allocation order: page faults, not
    arithmetic (see design-timings.md). Fixing the thresholds (``mallopt``, the knob behind
    ``MALLOC_MMAP_THRESHOLD_``)
    makes both run at their arithmetic's speed. Process-wide; a no-op (False) off glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _STEADY_BYTES)) and \
            bool(libc.mallopt(_M_TRIM_THRESHOLD, 2 * _STEADY_BYTES))
    except (OSError, AttributeError):
        return False
