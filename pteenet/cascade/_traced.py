"""The modules inference traces per exit, and the cache that holds the frozen graphs.

A branch is traced as what inference asks of it (its answer, or its answer and exit score in one
graph), so the traced graph computes exactly what the eager branch does (see
:func:`pteenet.cascade._frozen.trace_exact`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["Answer", "Graphs", "Scored"]


class Answer(nn.Module):
    """A branch's answer as a module to trace: the whole branch (logits, confidence logit) when
    the score reads the head, the classifier path alone otherwise (see EarlyExitModel.answers)."""

    def __init__(self, branch: nn.Module, head: bool) -> None:
        super().__init__()
        self.branch, self.head = branch, head

    def forward(self, h: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return self.branch(h) if self.head else self.branch.classify(h)


class Scored(nn.Module):
    """A branch's answer and its exit score, as a module to trace: (logits, confidence logit,
    score) when the score reads the head, (logits, score) otherwise."""

    def __init__(self, answer: Answer, score: Callable) -> None:
        super().__init__()
        self.answer, self.score = answer, score

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.answer(h)
        logits, conf = out if self.answer.head else (out, None)
        score = self.score(logits, conf)
        return (logits, score) if conf is None else (logits, conf, score)


class Graphs(dict):
    """Frozen segments per image shape: derived, so a copy or a pickle of the model starts
    without them (TorchScript graphs neither deep-copy nor pickle)."""

    def __reduce__(self) -> tuple:
        return Graphs, ()
