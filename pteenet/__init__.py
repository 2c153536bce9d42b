"""pteenet: retrofit early exits onto pretrained image classifiers.

The public API is the handful of names below; each step of the pipeline
(backbone -> trace -> placement -> branches -> training -> calibration -> bench) is also usable
on its own from its module. Names are imported on first use, so ``pteenet.runtime._cascade`` (the
deployment runner for exported cascades) works with numpy and onnxruntime alone, without torch.
"""

from __future__ import annotations

from pteenet._face import lazy_face

__version__ = "0.1.0"

_LAZY = {
    "Backbone": "backbone._registry",
    "create_backbone": "backbone._registry",
    "trace_backbone": "graph._tracing",
    "split_at": "graph._tracing",
    "choose_cuts": "graph._placement",
    "make_branch": "cascade._branches",
    "EarlyExitModel": "cascade._model",
    "EarlyExitResult": "cascade._model",
    "build_early_exit": "cascade._model",
    "load": "bundle._bundle",
    "TrainConfig": "training._config",
    "attach": "jobs._attach",
    "predict": "jobs._predict",
    "PredictResult": "jobs._predict",
    "calibrate": "calibration._calibrate",
    "bench": "benchmark._bench",
    "run_demo": "demo.run",
    "PteenetError": "errors",
}

__all__ = sorted([*_LAZY, "thresholds"])
__getattr__, __dir__ = lazy_face(__name__, {**_LAZY, "thresholds": "thresholds"})
