"""How a backbone wants its images: resize, centre crop, interpolation, per-channel normalisation.

ImageNet models are evaluated on a centre crop: the shorter side is resized to ``resize_size``
(256 for a 224 crop in torchvision, ``floor(224 / crop_pct)`` in timm) with the model's own
interpolation, then the centre ``input_size`` is cut out. Feeding a squashed, uncropped image
instead shifts a pretrained model's accuracy, and pseudo-labels are only as good as the
backbone's predictions, so the recipe is taken from the model's own data config and recorded in
the bundle. ``resize_size=None`` resizes straight to ``input_size`` (CIFAR-style data that
already has the model's size).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

from pteenet.errors import OptionError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "INTERPOLATIONS", "MAX_INPUT_SIDE", "Preprocess",
           "check_normalisation"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
# Largest input side pteenet builds a model for: four times the largest common evaluation size
# (512). A bundle's recorded size is checked against it before an input is allocated, since a
# tracing pass at an edited 8192x8192 would take gigabytes.
MAX_INPUT_SIDE = 2048


@dataclass(frozen=True)
class Preprocess:
    """Resize (the shorter side to ``resize_size``, then centre-crop ``input_size``; or straight
    to ``input_size`` when ``resize_size`` is None), scale to [0, 1], normalise per channel."""

    input_size: tuple[int, int]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize_size: int | None = None
    interpolation: str = "bilinear"

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        resize = d.get("resize_size")
        return cls(
            input_size=tuple(int(v) for v in d["input_size"]),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
            resize_size=None if resize is None else int(resize),
            interpolation=str(d.get("interpolation", "bilinear")),
        )

    def resized(self, input_size: tuple[int, int]) -> Preprocess:
        """The same recipe at another input size: the resize keeps its ratio to the crop."""
        if self.resize_size is None or tuple(input_size) == tuple(self.input_size):
            return replace(self, input_size=tuple(input_size))
        scale = min(input_size) / min(self.input_size)
        return replace(self, input_size=tuple(input_size),
                       resize_size=math.floor(self.resize_size * scale))


def check_normalisation(mean: Sequence[float] | None, std: Sequence[float] | None) -> None:
    """A per-channel ``mean`` and ``std`` given by the user: three finite numbers each, every
    std above 0. A NaN mean would otherwise surface epochs later as a training error ("the loss
    became nan"), far from its cause."""
    for key, values in (("mean", mean), ("std", std)):
        if values is None:
            continue
        ok = len(values) == 3 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                      and math.isfinite(v) for v in values)
        if not ok or (key == "std" and min(values) <= 0):
            rule = ", each above 0" if key == "std" else ""
            raise OptionError(f"`{key}` takes three finite numbers (R,G,B){rule}, got "
                              f"{str(list(values))[:60]}")
