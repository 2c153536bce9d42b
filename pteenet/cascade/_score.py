"""Exit scores: the top softmax probability, the confidence head, and the gate.

The gate (what calibration writes by default) raises the top softmax probability to a per-exit
power ``gamma[k]`` chosen so that the calibrated threshold sits at exactly 0.5, so one global
knob means the same on every exit and every model (see :mod:`pteenet.cascade._model`).
"""

from __future__ import annotations

import math

import torch

__all__ = ["exit_score", "gate", "gate_power"]


def gate(top: torch.Tensor, gamma: float) -> torch.Tensor:
    """The gate score ``top ** gamma``; 0 where ``gamma`` is inf (an exit switched off).

    ``gamma`` is a Python number: one op instead of six, at batch 1 a large share of each
    exit's decision (see design-timings.md). The off case is ``top * 0``, not ``zeros_like``,
    which the ONNX exporter folds into a constant of the traced batch size (an exported branch
    of an exit switched off then failed on any other batch size). ``top`` is a softmax
    probability, never negative: no clamp (one op less per exit in every exported graph)."""
    return top * 0 if math.isinf(gamma) else top ** gamma


def gate_power(threshold: float) -> float:
    """The power that maps a top-softmax threshold to exactly 0.5 (inf: the exit is off)."""
    if not threshold <= 1:
        return math.inf
    if threshold <= 0:
        return 0.0
    return math.log(0.5) / math.log(min(threshold, 1 - 1e-7))


def exit_score(score: str, logits: torch.Tensor, confidence: torch.Tensor | None, gamma: float
               ) -> torch.Tensor:
    """Each sample's exit score of kind ``score`` (``head``, ``softmax`` or ``gate``)."""
    if score == "head":
        return torch.sigmoid(confidence)
    top = torch.softmax(logits.float(), dim=1).amax(1)
    return top if score == "softmax" else gate(top, gamma)
