"""How a backbone wants its images: input size and per-channel normalisation."""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "MAX_INPUT_SIDE", "Preprocess"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Largest input side pteenet builds a model for: four times the largest common evaluation size
# (512). A bundle's recorded size is checked against it before an input is allocated, since a
# tracing pass at an edited 8192x8192 would take gigabytes.
MAX_INPUT_SIDE = 2048


@dataclass(frozen=True)
class Preprocess:
    """Resize to ``input_size`` (height, width), scale to [0, 1], then normalise per channel."""

    input_size: tuple[int, int]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def to_dict(self) -> dict:
        return {k: list(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        return cls(
            input_size=tuple(int(v) for v in d["input_size"]),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
        )
