"""The proof: accuracy, FLOPs and wall-clock time of the early-exit model beside the backbone."""

from pteenet._face import lazy_face

_NAMES = {
    "bench": "_bench",
    "BenchResult": "_result",
    "Quality": "_result",
    "TOP_CLASSES": "_by_class",
    "by_class": "_by_class",
    "drift_warning": "_drift",
    "promise_warning": "_drift",
    "onnx_backbone": "_onnx_runs",
    "onnx_cascade": "_onnx_runs",
    "EvalSet": "_eval_set",
    "select_data": "_eval_set",
    "Pass": "_quality",
    "measure_pass": "_quality",
    "oracle_flops": "_quality",
    "quality": "_quality",
    "simulation_check": "_quality",
    "timing_positions": "_quality",
    "SWEEP_STEPS": "_sweep",
    "plot_sweep": "_sweep",
    "sweep_points": "_sweep",
    "write_sweep_csv": "_sweep",
    "Clock": "_wall_clock",
    "busy_note": "_wall_clock",
    "efficiency": "_wall_clock",
    "images_to_keep": "_wall_clock",
    "profile_note": "_wall_clock",
    "segments_in_a_row": "_wall_clock",
    "speedups": "_wall_clock",
    "time_profile": "_wall_clock",
    "wall_clock": "_wall_clock",
}
__all__ = sorted(_NAMES)
__getattr__, __dir__ = lazy_face(__name__, _NAMES)
