"""The proof: accuracy, FLOPs and wall-clock time of the early-exit model beside the backbone."""

from pteenet.benchmark._bench import (
    bench,
)
from pteenet.benchmark._eval_set import (
    EvalSet,
    select_data,
)
from pteenet.benchmark._quality import (
    Pass,
    measure_pass,
    oracle_flops,
    quality,
    simulation_check,
    timing_positions,
)
from pteenet.benchmark._sweep import (
    SWEEP_STEPS,
    plot_sweep,
    sweep_points,
    write_sweep_csv,
)
from pteenet.benchmark._wall_clock import (
    Clock,
    busy_note,
    efficiency,
    images_to_keep,
    profile_note,
    segments_in_a_row,
    speedups,
    time_profile,
    wall_clock,
)

__all__ = [
    "Clock",
    "EvalSet",
    "Pass",
    "SWEEP_STEPS",
    "bench",
    "busy_note",
    "efficiency",
    "images_to_keep",
    "measure_pass",
    "oracle_flops",
    "plot_sweep",
    "profile_note",
    "quality",
    "segments_in_a_row",
    "select_data",
    "simulation_check",
    "speedups",
    "sweep_points",
    "time_profile",
    "timing_positions",
    "wall_clock",
    "write_sweep_csv",
]
