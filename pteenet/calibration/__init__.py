"""When each exit may answer: thresholds chosen on held-out images (cost search, CPM,
risk control)."""

from pteenet._face import lazy_face

_NAMES = {
    "CalibrationResult": "_calibrate",
    "Outputs": "_collect",
    "calibrate": "_calibrate",
    "choose_table": "_calibrate",
    "class_rows": "_calibrate",
    "collect": "_collect",
    "outputs_from_features": "_collect",
    "uses_gate": "_calibrate",
    "CostSearch": "_cost_search",
    "min_cost_thresholds": "_cost_search",
}
__all__ = sorted(_NAMES)
__getattr__, __dir__ = lazy_face(__name__, _NAMES)
