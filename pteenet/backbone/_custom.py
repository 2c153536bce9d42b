"""A user's own ``nn.Module`` as a backbone: what the registry would say about it, and a hash of
its weights so that a bundle attached to it is only ever loaded onto the same weights.

A custom module is not in any registry, so a bundle cannot rebuild it: the user hands it (or a
factory) back on :func:`pteenet.load`, and the recorded weights hash tells a different module
from the same one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch
from torch import nn

from pteenet.backbone._preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from pteenet.backbone._registry import Backbone, freeze, head_size
from pteenet.errors import OptionError

__all__ = ["CUSTOM", "module_of", "weights_sha256", "wrap_module"]

CUSTOM = "custom"  # the source a bundle records for a user's module


def weights_sha256(module: nn.Module) -> str:
    """SHA-256 over the module's state (names, dtypes, shapes and bytes, in key order): the
    same weights give the same hash in every process, any other weights another."""
    h = hashlib.sha256()
    for key, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def module_of(model: nn.Module | Callable[[], nn.Module]) -> nn.Module:
    """``model`` itself, or what the factory ``model`` builds."""
    module = model if isinstance(model, nn.Module) else model() if callable(model) else None
    if not isinstance(module, nn.Module):
        raise OptionError(f"`model` must be an nn.Module or a function returning one, got "
                          f"{type(model).__name__}")
    return module


def wrap_module(module: nn.Module, *, num_classes: int | None = None,
                input_size: tuple[int, int] | None = None,
                mean: tuple[float, float, float] | None = None,
                std: tuple[float, float, float] | None = None,
                preprocess: Preprocess | None = None, name: str | None = None,
                known_sha256: str | None = None) -> Backbone:
    """``module`` as a frozen backbone (eval mode, no gradients; its weights are never
    changed). Preprocessing is ``preprocess``, else ImageNet's statistics at ``input_size``
    (default 224x224) with images resized straight to it; the class count is read from the
    output when not given. ``known_sha256``: the weights' hash when the caller has just
    computed it, so a large module is hashed once."""
    pre = preprocess or Preprocess(tuple(input_size or (224, 224)),
                                   tuple(mean or IMAGENET_MEAN), tuple(std or IMAGENET_STD))
    freeze(module)
    return Backbone(model=module, name=name or type(module).__name__, source=CUSTOM,
                    num_classes=num_classes or head_size(module, pre), preprocess=pre,
                    weights_sha256=known_sha256 or weights_sha256(module))
