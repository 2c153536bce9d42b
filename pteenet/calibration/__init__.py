"""When each exit may answer: thresholds chosen on held-out images (cost search, CPM,
risk control)."""

from pteenet.calibration._calibrate import (
    DEFAULT_MARGIN,
    DEFAULT_MAX_DROP,
    METHODS,
    CalibrationResult,
    Outputs,
    calibrate,
    choose_table,
    class_rows,
    collect,
    outputs_from_features,
    uses_gate,
)
from pteenet.calibration._cost_search import (
    CostSearch,
    min_cost_thresholds,
)

__all__ = [
    "CalibrationResult",
    "CostSearch",
    "DEFAULT_MARGIN",
    "DEFAULT_MAX_DROP",
    "METHODS",
    "Outputs",
    "calibrate",
    "choose_table",
    "class_rows",
    "collect",
    "min_cost_thresholds",
    "outputs_from_features",
    "uses_gate",
]
