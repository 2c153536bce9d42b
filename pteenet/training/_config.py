"""What branch training takes and gives back: :class:`TrainConfig` (the settings ``pteenet
attach`` passes) and :class:`TrainReport` (losses, held-out agreement, boosted survivors)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pteenet.choices import AUTO_VIEWS, BOOSTED, DISTILL_MIN_CLASSES, LOSSES, MAX_SEED, TARGETS
from pteenet.errors import OptionError

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["TrainConfig", "TrainReport"]


@dataclass
class TrainConfig:
    """Training settings; the defaults are the ones ``pteenet attach`` uses."""

    epochs: int = 10
    batch_size: int = 256
    lr: float = 3e-3
    lam: float = 0.05
    target: str = "auto"
    temperature: float = 4.0
    loss: str = "distill"
    boosted: str | None = None
    margin: float = 0.02
    min_support: int = 20
    seed: int = 0
    device: str = "cpu"
    cache: bool = True
    cache_limit: int = 4 << 30
    num_workers: int | None = None  # loader processes for the caching pass; None: default_workers
    amp: bool = False  # bf16 autocast for the branches (CUDA, or CPUs with bf16 support)
    # views of each training image in the feature cache, each target the backbone's answer on
    # that view: 1 the image, 2 also its mirror, each more one random shift (pad-and-crop, at
    # random mirrored); for photos, not digits or text (benchmarks/results/training-views.md);
    # None: auto (:meth:`resolved_views`)
    views: int | None = None

    def validate(self, has_labels: bool) -> None:
        # Imported here, so the config (and the CLI's --help built from it) needs no torch.
        from pteenet.machine import check_device
        from pteenet.thresholds import check_cpm_options

        check_device(self.device)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or \
                not 0 <= self.seed <= MAX_SEED:
            raise OptionError(f"`seed` must be an integer in 0..{MAX_SEED} (64-bit), got "
                              f"{str(self.seed)[:24]}")
        if self.epochs < 1:
            raise OptionError(f"`epochs` must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise OptionError(f"`batch_size` must be at least 1, got {self.batch_size}")
        if not self.lr > 0 or math.isinf(self.lr):
            raise OptionError(f"`lr` must be a positive number, got {self.lr}")
        if not self.lam >= 0 or math.isinf(self.lam):
            raise OptionError(f"`lam` must be >= 0, got {self.lam}")
        if not self.temperature > 0:
            raise OptionError(f"`temperature` must be positive, got {self.temperature}")
        check_cpm_options(self.margin, self.min_support)
        if self.target not in TARGETS:
            raise OptionError(f"`target` must be one of {', '.join(TARGETS)}, got {self.target}")
        if self.loss not in LOSSES:
            raise OptionError(f"`loss` must be one of {', '.join(LOSSES)}, got {self.loss}")
        if self.boosted and not self.cache:
            raise OptionError("`boosted` needs the feature cache (`cache`)")
        if self.views is not None:
            self._check_views()
        if self.boosted not in BOOSTED:
            raise OptionError(f"`boosted` must be hard or soft, got {self.boosted}")
        if self.target in ("labels", "mixed") and not has_labels:
            raise OptionError(f"`target` {self.target} needs labeled data (class subfolders)")

    def _check_views(self) -> None:
        if isinstance(self.views, bool) or not isinstance(self.views, int) or self.views < 1:
            raise OptionError(f"`views` must be a whole number >= 1, got {self.views}")
        if self.views > 1 and not self.cache:
            raise OptionError("`views` above 1 needs the feature cache (`cache`)")

    def resolved_target(self, has_labels: bool) -> str:
        """``auto`` made concrete: mixed targets with labels, the backbone's softmax without."""
        if self.target != "auto":
            return self.target
        return "mixed" if has_labels else "soft"

    def resolved_views(self, num_classes: int) -> int:
        """``views`` made concrete: ``AUTO_VIEWS`` with the cache on a backbone of fewer than
        ``DISTILL_MIN_CLASSES`` classes, where they moved the CIFAR ResNets' exits from 0.45 to
        0.39 of the FLOPs; 1 on ImageNet-size heads, where they cost attach time and won
        nothing (both in :mod:`pteenet.choices`)."""
        if self.views is not None:
            return self.views
        return AUTO_VIEWS if self.cache and num_classes < DISTILL_MIN_CLASSES else 1


@dataclass
class TrainReport:
    """What training did: per-epoch loss, held-out agreement per branch, boosted survivors."""

    losses: list[float] = field(default_factory=list)
    agreement: list[float] = field(default_factory=list)
    survivors: list[dict[str, int]] = field(default_factory=list)
    thresholds: Tensor | None = None
    skipped: int = 0
