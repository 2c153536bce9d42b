"""The calibration samples' outputs: every exit's score and prediction, and the backbone's.

Collected once per calibration (one backbone pass over the held-out split, or over the user's
``data``), then searched as often as a method needs: the thresholds are chosen on these
tensors alone, never by running the model again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from torch import Tensor

from pteenet.bundle._read import read_bundle
from pteenet.bundle._schema import Bundle
from pteenet.cascade._cost import Cost
from pteenet.cascade._model import EarlyExitModel
from pteenet.data._datasets import open_data
from pteenet.errors import CalibrationError
from pteenet.progress import single_bar
from pteenet.training._features import FeatureSet, branch_scores, compute_features

__all__ = ["Outputs", "collect", "outputs_from_features"]


@dataclass
class Outputs:
    """Every exit's score and prediction on a set of samples, and the backbone's prediction."""

    scores: Tensor  # [N, B]
    preds: Tensor  # [N, B]
    final_pred: Tensor  # [N]
    labels: Tensor | None  # [N] or None when the data has no (matching) labels
    cost: Cost  # the model's cost model when these were collected

    def exit_costs(self, thr: Tensor) -> list[float]:
        """Relative cost of each exit when ``thr`` decides which exits are on."""
        return self.cost.exits(thr.amin(1) <= 1)



def collect(model: EarlyExitModel, bundle: Bundle | str | os.PathLike,
            data: str | os.PathLike | None = None, *, split: str = "train",
            device: str = "cpu", max_samples: int | None = None,
            progress: bool = False, labels: str | None = None) -> Outputs:
    """Run the model's branches and backbone on the calibration samples, once.

    ``bundle`` (read, or its folder) is where ``model`` was loaded from: it says how to
    preprocess and, without ``data``, which samples form its held-out split (exactly those
    recorded at attach). The model itself holds no bundle metadata, so data flows one way.
    """
    info = (bundle if isinstance(bundle, Bundle) else read_bundle(bundle, thresholds=False)).info
    spec = data if data is not None else info.data.get("spec")
    if spec is None:
        raise CalibrationError("the bundle records no data; pass `data`")
    if data is None:  # the recorded indices belong to the split attach trained on
        split = info.data.get("split", "train")
    dataset = open_data(spec, info.preprocess, split=split, label_names=info.classes,
                        labels=labels or info.data.get("labels", "auto"))
    indices = list(range(len(dataset))) if data is not None else list(info.calibration_indices)
    if not indices:
        raise CalibrationError("no calibration samples: the bundle records no held-out split")
    if max(indices) >= len(dataset):
        raise CalibrationError(f"{spec} has fewer images than when the bundle was made; the "
                               f"held-out split no longer exists: pass `data`")
    if max_samples is not None:
        indices = indices[:max_samples]
    with single_bar(progress, "calibration features", len(indices)) as tick:
        feats = compute_features(model, dataset, indices, device=device, progress=tick)
    usable = dataset.has_labels and len(dataset.classes or []) == model.num_classes
    return outputs_from_features(model, feats, usable, device)


def outputs_from_features(model, feats: FeatureSet, labels_usable: bool = True,
                          device: str = "cpu") -> Outputs:
    """Exit scores and predictions from already computed features (no backbone pass); with a
    ZTW ensemble they are the ensembled exits' and the costs count every branch it reads."""
    scores, preds = branch_scores(model, feats, device)
    labels = feats.labels
    usable = labels_usable and len(labels) > 0 and bool((labels >= 0).all())
    return Outputs(scores, preds, feats.final.argmax(1), labels if usable else None,
                   model.cost)
