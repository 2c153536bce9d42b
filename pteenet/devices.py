"""Which device to run on: checked once, with one clear line when it does not exist here."""

from __future__ import annotations

import torch

from .errors import OptionError

__all__ = ["check_device"]


def check_device(device: str | torch.device) -> torch.device:
    """A torch device that exists on this machine, or :class:`OptionError`."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise OptionError(f"unknown --device '{device}': use cpu or cuda") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OptionError("--device cuda: no CUDA GPU is available here; use --device cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise OptionError("--device mps: MPS is not available here; use --device cpu")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise OptionError(f"unsupported --device '{device}': use cpu or cuda")
    return dev
