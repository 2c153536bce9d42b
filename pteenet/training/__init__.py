"""Training the branches on the frozen backbone: the feature cache, losses, boosted
training, resume and distributed runs."""

from pteenet._face import lazy_face

_NAMES = {
    "train_boosted": "_boosted",
    "TrainConfig": "_config",
    "TrainReport": "_config",
    "Shard": "_distributed",
    "all_sum": "_distributed",
    "init_from_env": "_distributed",
    "is_main": "_distributed",
    "launched_as_main": "_distributed",
    "rank_world": "_distributed",
    "FeatureSet": "_features",
    "LiveFeatures": "_features",
    "agreement": "_features",
    "branch_logits": "_features",
    "branch_scores": "_features",
    "compute_features": "_features",
    "scores_and_preds": "_features",
    "branch_per_sample": "_losses",
    "distill_per_sample": "_losses",
    "eenet_loss": "_losses",
    "eenet_per_sample": "_losses",
    "make_targets": "_losses",
    "Resume": "_resume",
    "Guard": "_steps",
    "adam": "_steps",
    "autocast": "_steps",
    "batches": "_steps",
    "lr_at": "_steps",
    "set_lr": "_steps",
    "step": "_steps",
    "train_branches": "_train",
}
__all__ = sorted(_NAMES)
__getattr__, __dir__ = lazy_face(__name__, _NAMES)
