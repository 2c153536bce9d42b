"""pteenet: retrofit early exits onto pretrained image classifiers.

The public API is the handful of names below; each step of the pipeline
(backbone -> trace -> placement -> branches -> training -> calibration -> bench) is also usable
on its own from its module. Names are imported on first use, so ``pteenet.runtime`` (the
deployment runner for exported cascades) works with numpy and onnxruntime alone, without torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "Backbone": "backbones",
    "create_backbone": "backbones",
    "trace_backbone": "tracing",
    "split_at": "tracing",
    "choose_cuts": "placement",
    "make_branch": "branches",
    "EarlyExitModel": "early_exit",
    "EarlyExitResult": "early_exit",
    "build_early_exit": "early_exit",
    "load": "bundle",
    "TrainConfig": "train_config",
    "attach": "attaching",
    "calibrate": "calibration",
    "bench": "benchmarking",
    "run_demo": "demo.run",
    "PteenetError": "errors",
}

__all__ = sorted([*_LAZY, "thresholds"])


def __getattr__(name: str):
    if name == "thresholds":
        return importlib.import_module(".thresholds", __name__)
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pteenet' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
