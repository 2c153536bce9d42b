"""Which device to run on: checked once, with one clear line when it does not exist here; and
how many CPU threads a step runs with."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from pteenet.choices import MAX_THREADS
from pteenet.errors import OptionError

__all__ = ["check_device", "threads"]


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
    intra-op threads that wait on each other on a busy machine make each op far slower, while
    such ops are too small to split anyway (see design-timings.md)."""
    if n is None:
        yield
        return
    if not 1 <= n <= MAX_THREADS:
        raise OptionError(f"`threads` must lie in 1..{MAX_THREADS}, got {str(n)[:24]}")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
