"""Which device to run on: checked once, with one clear line when it does not exist here; how
many CPU threads a step runs with; and how the process keeps the memory of freed tensors."""

from __future__ import annotations

import contextlib
import ctypes
import sys
from collections.abc import Iterator

import torch

from .errors import OptionError

__all__ = ["check_device", "reuse_freed_memory", "threads"]

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
KEEP_FREE_BYTES = 2**30  # free heap kept for the next batch (2**31 - 1 was ignored by glibc)


def check_device(device: str | torch.device) -> torch.device:
    """A torch device that exists on this machine, or :class:`OptionError`."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise OptionError(f"`device` {str(device)[:40]!r} is unknown: use cpu or cuda") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OptionError("`device` cuda: no CUDA GPU is available here; use cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise OptionError("`device` mps: MPS is not available here; use cpu")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise OptionError(f"`device` {str(device)[:40]!r} is not supported: use cpu or cuda")
    return dev


@contextlib.contextmanager
def threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` CPU threads (None: leave torch's setting), restoring it afterwards.

    Loops of tiny tensor ops (the cost search, training heads from the cache) run on one:
    intra-op threads that wait on each other on a busy 2-core machine made each op ~100x
    slower (measured), while such ops are too small to split anyway."""
    if n is None:
        yield
        return
    if n < 1:
        raise OptionError(f"`threads` must be at least 1, got {n}")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def reuse_freed_memory() -> bool:
    """Keep the memory of freed tensors in the process for the next batch (glibc only).

    glibc serves each allocation above its mmap threshold (32 MB at most) with a fresh mapping
    and unmaps it on free, and trims the heap's free top, so each batched forward pass on a CPU
    faults its activation maps in again, page by page. On 2 cores (measured) ResNet-50 at batch
    32 ran at 18 img/s and at 35 with this; frozen EfficientNet-B0 at 56 and 149; throughput fell
    with batch size instead of rising. With it every allocation comes from the heap and up to
    ``KEEP_FREE_BYTES`` of free heap stays mapped: the process holds its peak memory, as
    PyTorch's CUDA caching allocator does. Process-wide, so the CLI and the benchmarks call it
    and a Python program opts in. Returns whether it applied (False off glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # a C library without mallopt (musl)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_FREE_BYTES))
