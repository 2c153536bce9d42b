"""The demo's knobs, where it keeps its caches, and where it reports by default."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DemoSettings", "Log", "default_workdir", "to_stderr"]

Log = Callable[[str], None]


@dataclass(frozen=True)
class DemoSettings:
    """Every knob of one demo run; ``quick`` trades quality for a run short enough for tests."""

    image_size: int = 16  # 8x8 digits upscaled; the ResNet pools adaptively, so any size works
    test_fraction: float = 0.2
    seed: int = 0
    backbone_epochs: int = 8
    attach_epochs: int = 12  # pteenet's defaults otherwise (branches, placement, calibration)
    attach_batch_size: int = 32  # ~1,400 training images: small batches, more steps
    attach_samples: int | None = None
    val_fraction: float = 0.25  # ~350 held-out samples for the calibration's cost search
    bench_samples: int | None = None
    latency_samples: int = 100
    repeats: int = 5

    @classmethod
    def for_mode(cls, quick: bool) -> DemoSettings:
        if not quick:
            return cls()
        return cls(backbone_epochs=2, attach_epochs=4, attach_samples=600, bench_samples=150,
                   latency_samples=10, repeats=2)

    @property
    def input_size(self) -> tuple[int, int]:
        return (self.image_size, self.image_size)


def default_workdir() -> Path:
    """``$PTEENET_CACHE/demo``, else ``~/.cache/pteenet/demo``: survives between runs."""
    env = os.environ.get("PTEENET_CACHE")
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "pteenet"
    return base / "demo"



def to_stderr(text: str) -> None:
    """The default :data:`Log`: stdout stays free for ``--json``."""
    print(text, file=sys.stderr, flush=True)
