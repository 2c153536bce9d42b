"""Training the branches on the frozen backbone: the feature cache, losses, boosted
training, resume and distributed runs."""

from pteenet.training._boosted import (
    train_boosted,
)
from pteenet.training._config import (
    BOOSTED,
    LOSSES,
    TARGETS,
    TrainConfig,
    TrainReport,
)
from pteenet.training._distributed import (
    Shard,
    all_sum,
    init_from_env,
    is_main,
    launched_as_main,
    rank_world,
)
from pteenet.training._features import (
    FeatureSet,
    LiveFeatures,
    agreement,
    branch_logits,
    branch_scores,
    compute_features,
    scores_and_preds,
)
from pteenet.training._losses import (
    branch_per_sample,
    distill_per_sample,
    eenet_loss,
    eenet_per_sample,
    make_targets,
)
from pteenet.training._resume import (
    Resume,
)
from pteenet.training._steps import (
    Guard,
    adam,
    autocast,
    batches,
    lr_at,
    set_lr,
    step,
)
from pteenet.training._train import (
    train_branches,
)

__all__ = [
    "BOOSTED",
    "FeatureSet",
    "Guard",
    "LOSSES",
    "LiveFeatures",
    "Resume",
    "Shard",
    "TARGETS",
    "TrainConfig",
    "TrainReport",
    "adam",
    "agreement",
    "all_sum",
    "autocast",
    "batches",
    "branch_logits",
    "branch_per_sample",
    "branch_scores",
    "compute_features",
    "distill_per_sample",
    "eenet_loss",
    "eenet_per_sample",
    "init_from_env",
    "is_main",
    "launched_as_main",
    "lr_at",
    "make_targets",
    "rank_world",
    "scores_and_preds",
    "set_lr",
    "step",
    "train_boosted",
    "train_branches",
]
