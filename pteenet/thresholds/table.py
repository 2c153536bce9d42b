"""The threshold table ``thr[B, K]``: building one, candidate families, the exit rule, summaries.

See :mod:`pteenet.thresholds` for the rule. This module is what the model itself needs (the
deployed exit rule and the table format); the calibrators that choose a table build on it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

from pteenet.errors import CalibrationError, OptionError
from pteenet.thresholds._checks import check_classes, check_scores, check_vector, float_dtype

__all__ = [
    "as_table",
    "cascade_predictions",
    "exit_index",
    "global_candidates",
    "json_rows",
    "scaled_candidates",
    "summarize",
]


def as_table(value, num_branches: int, num_classes: int) -> Tensor:
    """Turn a global, per-branch or per-class threshold spec into a float ``[B, K]`` CPU table.

    One table shape for every granularity keeps a single exit rule (:func:`exit_index`) and a
    single on-disk format. Accepted: a number (global), a sequence of ``B`` numbers (per branch),
    a ``B x K`` nested sequence (per class; a row may also be a single number), or a tensor of
    shape ``[]``, ``[B]`` or ``[B, K]``. ``None`` anywhere means ``inf`` ("never exits").
    The table is float32, except that a floating tensor keeps its dtype (so thresholds picked
    from float64 scores stay exact).
    """
    if num_branches < 0 or num_classes < 1:
        raise OptionError(
            f"need num_branches >= 0 and num_classes >= 1, got {num_branches} and {num_classes}"
        )
    shape = (num_branches, num_classes)
    if isinstance(value, Tensor):
        dtype = value.dtype if value.dtype.is_floating_point else torch.float32
        table = _tensor_table(value.detach().to("cpu", dtype), shape)
    elif value is None or isinstance(value, numbers.Real):
        table = torch.full(shape, _number(value))
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        table = _nested_table(value, shape)
    else:
        raise OptionError(f"thresholds must be a number, a list or a tensor, not {type(value)!r}")
    _check_table_values(table)
    return table


def json_rows(table: Tensor) -> list[list[float | None]]:
    """The table as JSON rows, ``inf`` ("never exits") written as ``null``: JSON has no
    infinity, and :func:`as_table` reads ``None`` back as ``inf``."""
    return [[None if math.isinf(v) else float(v) for v in row] for row in table.tolist()]


def _number(value) -> float:
    """One threshold entry as a float; ``None`` is ``inf`` (never exits)."""
    if value is None:
        return math.inf
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise OptionError(f"a threshold must be a number or None, not {value!r}")
    return float(value)


def _tensor_table(value: Tensor, shape: tuple[int, int]) -> Tensor:
    """Broadcast a 0-d, ``[B]`` or ``[B, K]`` tensor to ``[B, K]``, refusing anything else."""
    b, k = shape
    if value.dim() == 0:
        return value.expand(shape).clone()
    if value.dim() == 1 and value.shape[0] == b:
        return value[:, None].expand(shape).clone()
    if value.dim() == 2 and tuple(value.shape) == shape:
        return value.clone()
    raise OptionError(
        f"threshold tensor has shape {list(value.shape)}; expected [], [{b}] or [{b}, {k}]"
    )


def _nested_table(value: Sequence, shape: tuple[int, int]) -> Tensor:
    """Build ``[B, K]`` from ``B`` rows, each a number/None or a sequence of ``K`` of them."""
    b, k = shape
    if len(value) != b:
        raise OptionError(f"got {len(value)} thresholds for {b} branches")
    rows = []
    for i, row in enumerate(value):
        if isinstance(row, Sequence) and not isinstance(row, (str, bytes)):
            if len(row) != k:
                raise OptionError(f"branch {i} has {len(row)} class thresholds, expected {k}")
            rows.append([_number(v) for v in row])
        else:
            rows.append([_number(row)] * k)
    return torch.tensor(rows, dtype=torch.float32).reshape(shape)


def _check_table_values(table: Tensor) -> None:
    if torch.isnan(table).any():
        raise OptionError("thresholds contain NaN; use inf (or None) for 'never exits'")
    if (table < 0).any():
        raise OptionError("thresholds must be >= 0 (0 = always exit, inf = never exit)")


def global_candidates(num_branches: int, num_classes: int, steps: int = 101) -> list[Tensor]:
    """Global tables from 1.0 down to 0.0: the conservative-to-permissive order risk control needs.

    Fixed-sequence testing (Jazbec et al. 2024) walks candidates from the safest one, so index 0
    is the strictest threshold and the last one lets every sample leave at branch 0.
    """
    _check_steps(steps)
    values = torch.linspace(1.0, 0.0, steps).tolist()
    return [as_table(v, num_branches, num_classes) for v in values]


def scaled_candidates(table: Tensor, steps: int = 101) -> list[Tensor]:
    """Shrink a per-class table towards 1.0: ``thr(s) = 1 - s * (1 - table)`` for s in [0, 1].

    This turns one calibrated table (e.g. from CPM) into a one-parameter, conservative-to-
    permissive family (s = 0: every finite entry is 1.0; s = 1: the table itself) that risk control
    or a benchmark sweep can walk. Entries above 1 (``inf`` included) never exit at any ``s`` and
    are kept as they are.
    """
    _check_steps(steps)
    base = as_table(table, *_table_shape(table))
    never = base > 1.0
    ones = torch.ones_like(base)
    out = []
    for s in torch.linspace(0.0, 1.0, steps).tolist():
        scaled = torch.lerp(ones, base, s)  # exact at both ends: s=1 returns the table itself
        out.append(torch.where(never, base, scaled))
    return out


def _table_shape(table) -> tuple[int, int]:
    if not isinstance(table, Tensor) or table.dim() != 2:
        raise OptionError("expected a [B, K] threshold tensor; build one with as_table()")
    return int(table.shape[0]), int(table.shape[1])


def _check_steps(steps: int) -> None:
    if int(steps) != steps or steps < 2:
        raise OptionError(f"steps must be an integer >= 2, got {steps}")


# --------------------------------------------------------------------------------------------
# The exit rule and its summary
# --------------------------------------------------------------------------------------------


def exit_index(scores: Tensor, preds: Tensor, thr: Tensor) -> Tensor:
    """Exit taken by each sample: the first ``k`` with ``scores[:, k] >= thr[k, preds[:, k]]``.

    Returns a LongTensor ``[N]`` with values in ``0..B`` (``B`` = the backbone). This is the same
    rule the deployed model applies, so calibration and inference cannot drift apart. Thresholds
    are compared in the scores' dtype, so a threshold picked from observed scores is exact.
    """
    n, b = check_scores(scores, preds)
    table = _check_thr(thr, b, preds)
    if b == 0:
        return torch.zeros(n, dtype=torch.long, device=scores.device)
    table = table.to(device=scores.device, dtype=float_dtype(scores))
    branch = torch.arange(b, device=scores.device)
    per_sample = table[branch[None, :], preds.long().to(scores.device)]  # [N, B]
    exits = scores >= per_sample
    first = exits.to(torch.uint8).argmax(dim=1)  # argmax returns the first maximum
    return torch.where(exits.any(dim=1), first, torch.full_like(first, b))


def cascade_predictions(
    scores: Tensor, preds: Tensor, final_pred: Tensor, thr: Tensor
) -> tuple[Tensor, Tensor]:
    """The cascade's prediction ``[N]`` and the exit ``[N]`` each sample took."""
    exits = exit_index(scores, preds, thr)
    check_vector(final_pred, scores.shape[0], "final_pred")
    every = torch.cat([preds.long(), final_pred.long().to(preds.device)[:, None]], dim=1)
    return every.gather(1, exits[:, None]).squeeze(1), exits


def summarize(
    scores: Tensor,
    preds: Tensor,
    final_pred: Tensor,
    thr: Tensor,
    exit_cost,
    labels: Tensor | None = None,
) -> dict:
    """What a threshold table does on a data set: where samples leave, what it costs, what it loses.

    ``exit_cost[k]`` (length ``B + 1``) is the FLOPs of leaving at exit ``k`` relative to the
    backbone. Returns plain ints/floats (JSON-serialisable)::

        {"num_samples", "exits": [{"exit", "count", "share", "agreement", "accuracy"}, ...],
         "agreement", "accuracy", "backbone_accuracy", "mean_relative_flops"}

    ``agreement`` is the fraction whose prediction matches the backbone's; the accuracy fields are
    ``None`` without ``labels``, and every per-exit rate is ``None`` for an exit nobody takes.
    """
    n, b = check_scores(scores, preds)
    if n == 0:
        raise CalibrationError("cannot summarize thresholds on zero samples")
    cost = _check_cost(exit_cost, b).to(scores.device)
    pred, exits = cascade_predictions(scores, preds, final_pred, thr)
    final = final_pred.long().to(pred.device)
    agree = pred == final
    right = backbone_right = None
    if labels is not None:
        check_vector(labels, n, "labels")
        labels = labels.long().to(pred.device)
        right, backbone_right = pred == labels, final == labels
    per_exit = [_exit_stats(k, exits == k, agree, right, n) for k in range(b + 1)]
    return {
        "num_samples": n,
        "exits": per_exit,
        "agreement": _mean(agree),
        "accuracy": None if right is None else _mean(right),
        "backbone_accuracy": None if backbone_right is None else _mean(backbone_right),
        "mean_relative_flops": float(cost[exits].double().mean()),
    }


def _exit_stats(k: int, taken: Tensor, agree: Tensor, right: Tensor | None, n: int) -> dict:
    count = int(taken.sum())
    return {
        "exit": k,
        "count": count,
        "share": count / n,
        "agreement": _mean(agree[taken]) if count else None,
        "accuracy": _mean(right[taken]) if (count and right is not None) else None,
    }


def _mean(flags: Tensor) -> float:
    return float(flags.double().mean())



def _check_thr(thr: Tensor, num_branches: int, preds: Tensor) -> Tensor:
    if not isinstance(thr, Tensor) or thr.dim() != 2 or thr.shape[0] != num_branches:
        raise OptionError(f"thresholds must be a [{num_branches}, K] tensor; use as_table()")
    check_classes(preds, int(thr.shape[1]), "preds")
    return thr



def _check_cost(exit_cost, num_branches: int) -> Tensor:
    cost = torch.as_tensor(exit_cost, dtype=torch.float64).detach().cpu().flatten()
    if cost.numel() != num_branches + 1:
        raise OptionError(f"exit_cost needs {num_branches + 1} entries, got {cost.numel()}")
    if not torch.isfinite(cost).all() or (cost < 0).any():
        raise OptionError("exit_cost entries must be finite and >= 0")
    return cost

