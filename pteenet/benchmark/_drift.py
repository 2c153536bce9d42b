"""Whether the images a bench scores look unlike the split the thresholds were calibrated on.

Agreement with the backbone needs no labels, and it is what calibration bounds: the table was
chosen so that the early exits' answers agree with the backbone's within ``max_drop`` on the
calibration split. When the exits agree markedly less on the scored images, those images are
not like that split (another camera, another pool), and the promise made there does not carry
over: on tf_efficientnet_lite0 a pool of Imagenette and Tiny ImageNet images calibrated at
90 % agreement while ImageNet val images got 82 %, a 7.9 point drop in top-1 (issue 27). The
remedy is label-free too: ``pteenet calibrate --data IMAGES`` on images from the deployment
domain.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["SLACK", "drift_warning", "promise_warning"]

SLACK = 0.01  # agreement may fall this much (plus sampling noise) before bench warns


def drift_warning(summary: dict[str, Any], agreement: float, n: int) -> str | None:
    """One line when the scored images' early-exit agreement with the backbone (``agreement``
    over ``n`` images) falls below the calibration split's (``summary``, the table's) by more
    than ``SLACK`` plus three standard errors of the difference; None otherwise."""
    cal, m = summary.get("agreement"), summary.get("num_samples")
    if not isinstance(cal, (int, float)) or not isinstance(m, int) or m < 1 or n < 1:
        return None
    c = min(max(cal, 0.5 / m), 1 - 0.5 / m)  # a small split that agreed everywhere is not sure
    noise = 3 * math.sqrt(c * (1 - c) / m + agreement * (1 - agreement) / n)
    if cal - agreement <= SLACK + noise:
        return None
    return (f"these images look unlike the calibration split: the exits agree with the "
            f"backbone on {agreement:.1%} of them against {cal:.1%} there, so the calibrated "
            f"accuracy does not carry over; recalibrate on images like them (labels not "
            f"needed): `pteenet calibrate --data IMAGES`")


def promise_warning(params: dict[str, Any], agreement: float, drop: float | None, n: int
                    ) -> str | None:
    """One line when the scored images break the table's own promise: its ``max_drop`` (the
    most top-1, or without labels agreement, it may lose) exceeded beyond two standard errors.
    Calibration made on a pool unlike the scored images can agree well there and still lose more
    than promised here (tf_efficientnet_lite0: 0.73 pt promised on the pool, 2.23 pt on ImageNet
    val, agreement 97.5 % -- within :func:`drift_warning`'s slack)."""
    bound = params.get("max_drop")
    if not isinstance(bound, (int, float)) or n < 1:
        return None
    lost, what = (drop, "top-1") if drop is not None else (1 - agreement, "agreement")
    spread = max(1 - agreement, 0.5 / n)  # samples whose answer changed: the loss's own spread
    if lost <= bound + 2 * math.sqrt(spread * (1 - spread) / n):
        return None
    return (f"the early exits lose {lost:.1%} {what} here, more than the {bound:.1%} the "
            f"thresholds were calibrated for (max drop): these images are unlike the calibration "
            f"split; recalibrate on images like them (labels not needed): `pteenet calibrate "
            f"--data IMAGES`")

