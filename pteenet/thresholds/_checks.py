"""Input checks shared by the exit rule and the calibrators: one wording for one mistake."""

from __future__ import annotations

import torch
from torch import Tensor

from pteenet.errors import CalibrationError


def check_scores(scores: Tensor, preds: Tensor) -> tuple[int, int]:
    if not isinstance(scores, Tensor) or scores.dim() != 2:
        raise CalibrationError("scores must be an [N, B] tensor (one column per branch)")
    if not isinstance(preds, Tensor) or preds.shape != scores.shape:
        raise CalibrationError(
            f"preds must have the shape of scores {list(scores.shape)}, "
            f"got {list(getattr(preds, 'shape', []))}"
        )
    if preds.dtype.is_floating_point or preds.dtype == torch.bool:
        raise CalibrationError("preds must hold integer class indices")
    return int(scores.shape[0]), int(scores.shape[1])



def check_classes(labels: Tensor, num_classes: int, name: str) -> None:
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise CalibrationError(f"{name} must hold class indices in [0, {num_classes})")


def check_vector(values: Tensor, n: int, name: str) -> None:
    if not isinstance(values, Tensor) or values.dim() != 1 or values.shape[0] != n:
        raise CalibrationError(f"{name} must be a 1-D tensor of length {n}")



def float_dtype(scores: Tensor) -> torch.dtype:
    return scores.dtype if scores.dtype.is_floating_point else torch.float32
