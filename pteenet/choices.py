"""Every option's accepted values and the library's defaults, in one torch-free module.

Why one place: the library checks its arguments against these, and the CLI builds ``--help``
(choices and defaults) from them without importing torch, so the two can never disagree and
``pteenet --help`` stays instant.
"""

from __future__ import annotations

__all__ = [
    "BOOSTED", "BOUNDS", "BRANCH_TYPES", "COSTS", "DEFAULT_BRANCH", "DEFAULT_BRANCHES",
    "DEFAULT_BUDGET", "DEFAULT_MARGIN", "DEFAULT_MAX_DROP", "DEFAULT_POLICY", "DISTILL_MIN_CLASSES",
    "ENSEMBLES", "FORMATS", "IMAGE_EXTENSIONS", "LABELS", "LOSSES", "MAX_SEED", "MAX_THREADS",
    "METHODS", "POLICIES", "PREDICT_SUFFIXES", "SCORES", "SPLITS", "TARGETS",
]

# -- branches and placement (EENets placement policies; PTEEnet ConvX; BTS-EE conv1d) --------
# mlp is the default by measurement: on tf_efficientnet_lite0 (benchmarks/results/imagenet-real.md)
# it alone kept <= 1 pt on ImageNet val below the backbone's FLOPs (0.85 pt at 0.995; distill:
# 0.62 pt at 1.003, 2.23 pt at 0.990 before its hidden layer). auto: distill where the backbone
# ends in a linear classifier over at least DISTILL_MIN_CLASSES classes, mlp elsewhere
BRANCH_TYPES = ("auto", "mlp", "conv1", "conv2", "conv3", "conv1d", "pool", "sdn", "distill")
DEFAULT_BRANCH = "mlp"
DISTILL_MIN_CLASSES = 100
# training views (TrainConfig.views) when not given: AUTO_VIEWS below DISTILL_MIN_CLASSES classes,
# 1 at or above. Measured (benchmarks/results/training-views.md): CIFAR ResNet-44/32/20 reach
# 0.401/0.383/0.386 of the FLOPs with 4 views against 0.452/0.422/0.464 with 1, within 1 pt on
# test; on tf_efficientnet_lite0 (1,000 classes) 2 and 4 views lost 1.46 and 1.23 pt at 0.990
# and 0.994 against 0.85 at 0.995 with 1, for 2.1x and 2.8x the attach time
AUTO_VIEWS = 4
DEFAULT_BUDGET = 0.01  # each branch costs at most 1 % of the backbone by default
POLICIES = ("pareto", "golden", "fine", "linear", "quadratic")
DEFAULT_POLICY = "linear"
DEFAULT_BRANCHES = 10
ENSEMBLES = ("ztw",)

# -- training ---------------------------------------------------------------------------------
TARGETS = ("auto", "mixed", "hard", "soft", "labels")
BOOSTED = (None, "hard", "soft")
LOSSES = ("distill", "eenet")

# -- inference, calibration and cost ----------------------------------------------------------
SCORES = ("gate", "softmax", "head")
COSTS = ("flops", "latency")
METHODS = ("mincost", "budget", "global", "cpm", "risk")
BOUNDS = ("wsr", "hb")
DEFAULT_MARGIN = 0.02
DEFAULT_MAX_DROP = 0.01

# -- data and export --------------------------------------------------------------------------
LABELS = ("auto", "none")  # auto: class folders' labels (by the backbone's names); none: ignored
SPLITS = ("train", "test", "val")  # "val" is an alias of "test"
FORMATS = ("onnx", "torchscript")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
PREDICT_SUFFIXES = (".csv", ".jsonl")  # what `pteenet predict --out` writes

# -- bounds of numeric options ----------------------------------------------------------------
MAX_THREADS = 1024  # more CPU threads than any machine has: OpenMP segfaulted at 100,000
MAX_SEED = (1 << 63) - 1  # torch's generators take a 64-bit seed; larger ints overflow
