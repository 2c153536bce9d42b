"""Exit thresholds for an early-exit cascade: the exit rule, its summary, and two calibrators.

A cascade has ``B`` early-exit branches followed by the backbone (the final exit, index ``B``).
For ``N`` calibration samples we hold, per branch ``k``, a confidence ``scores[n, k]`` in [0, 1]
and a predicted class ``preds[n, k]``, plus the backbone's prediction ``final_pred[n]``.
Thresholds are always a float table ``thr[B, K]`` (per branch and per predicted class) so that one
exit rule serves global, per-branch and per-class calibration alike:

    sample ``n`` leaves at the first branch ``k`` with ``scores[n, k] >= thr[k, preds[n, k]]``,
    otherwise at the backbone.

``inf`` (or any value above 1) therefore means "never exits" and 0 means "always exits".

One concept a module, all public here:

* :mod:`~pteenet.thresholds.table` -- the table itself, the exit rule and its summary;
* :mod:`~pteenet.thresholds.cpm` -- Class Precision Margin from BTS-EE (Aperstein & Apartsin):
  per branch and class, the loosest threshold whose exits stay within a precision margin of the
  backbone;
* :mod:`~pteenet.thresholds.risk` -- fixed-sequence testing over candidate tables with a
  distribution-free upper confidence bound on the risk, after Jazbec et al. 2024, "Fast yet Safe:
  Early-Exiting with Risk Control" (Hoeffding-Bentkus or Waudby-Smith-Ramdas bounds).

Everything is pure tensor math on whatever device the inputs live on; nothing here reads files or
runs models.
"""

from __future__ import annotations

from pteenet.thresholds.cpm import check_cpm_options, class_precision, cpm_thresholds
from pteenet.thresholds.risk import (
    RiskResult,
    hoeffding_bentkus_ucb,
    losses_for,
    risk_control,
    wsr_ucb,
)
from pteenet.thresholds.table import (
    as_table,
    cascade_predictions,
    exit_index,
    global_candidates,
    json_rows,
    scaled_candidates,
    summarize,
)

__all__ = [
    "RiskResult",
    "as_table",
    "cascade_predictions",
    "check_cpm_options",
    "class_precision",
    "cpm_thresholds",
    "exit_index",
    "global_candidates",
    "hoeffding_bentkus_ucb",
    "json_rows",
    "losses_for",
    "risk_control",
    "scaled_candidates",
    "summarize",
    "wsr_ucb",
]
