"""pteenet: retrofit early exits onto pretrained image classifiers.

The public API is the handful of names below; each step of the pipeline
(backbone -> trace -> placement -> branches -> training -> calibration -> bench) is also usable
on its own from its module.
"""

__version__ = "0.1.0"

from . import thresholds  # noqa: E402
from .backbones import Backbone, create_backbone  # noqa: E402
from .branches import make_branch  # noqa: E402
from .bundle import load  # noqa: E402
from .calibration import calibrate  # noqa: E402
from .early_exit import EarlyExitModel, EarlyExitResult, build_early_exit  # noqa: E402
from .errors import PteenetError  # noqa: E402
from .placement import choose_cuts  # noqa: E402
from .retrofit import attach  # noqa: E402
from .tracing import split_at, trace_backbone  # noqa: E402
from .training import TrainConfig  # noqa: E402

__all__ = [
    "Backbone",
    "EarlyExitModel",
    "EarlyExitResult",
    "PteenetError",
    "TrainConfig",
    "attach",
    "bench",
    "build_early_exit",
    "calibrate",
    "choose_cuts",
    "create_backbone",
    "load",
    "make_branch",
    "split_at",
    "thresholds",
    "trace_backbone",
]


def __getattr__(name: str):
    # bench pulls in timing and plotting helpers; import it only when asked for.
    if name == "bench":
        from .benchmarking import bench

        return bench
    raise AttributeError(f"module 'pteenet' has no attribute {name!r}")
