"""pteenet: retrofit early exits onto pretrained image classifiers.

The public API is the handful of names below: the way in (``attach``, ``calibrate``, ``load``,
``bench``, ``export``, ``inspect``, ``list_backbones``) and the values they hand back. Each step
of the pipeline (backbone -> trace -> placement -> branches -> training -> calibration -> bench)
is also usable on its own from the package of its stage (``pteenet.graph``, ``pteenet.cascade``,
...). Names are imported on first use, so ``pteenet.runtime`` (the deployment runner for exported
cascades) works with numpy and onnxruntime alone, without torch.
"""

from __future__ import annotations

from pteenet._face import lazy_face

__version__ = "0.1.0"

_LAZY = {
    "attach": "jobs._attach",
    "predict": "jobs._predict",
    "PredictResult": "jobs._predict",
    "calibrate": "calibration._calibrate",
    "load": "bundle._load",
    "bench": "benchmark._bench",
    "BenchResult": "benchmark._result",
    "export": "exporter._export",
    "inspect": "jobs._inspect",
    "InspectResult": "jobs._inspect",
    "list_backbones": "backbone._registry",
    "create_backbone": "backbone._registry",
    "Backbone": "backbone._registry",
    "EarlyExitModel": "cascade._model",
    "EarlyExitResult": "cascade._exit_loop",
    "Cost": "cascade._cost",
    "TrainConfig": "training._config",
    "PteenetError": "errors",
}

__all__ = sorted([*_LAZY, "thresholds"])
__getattr__, __dir__ = lazy_face(__name__, {**_LAZY, "thresholds": "thresholds"})
