"""The early-exit model: branches, the frozen segments, ensembles, cost profiles and true
early-exit inference."""

from pteenet._face import lazy_face

_NAMES = {
    "Branch": "_branches",
    "MAX_VALUES": "_branches",
    "Reduce": "_branches",
    "branch_flops": "_branches",
    "cache_bytes": "_branches",
    "make_branch": "_branches",
    "reduction": "_branches",
    "softmax_stats": "_branches",
    "FIT_ITERATIONS": "_ensemble",
    "ZTWEnsemble": "_ensemble",
    "fit_split": "_ensemble",
    "fit_ztw": "_ensemble",
    "direct": "_frozen",
    "freeze": "_frozen",
    "freeze_all": "_frozen",
    "frozen_applies": "_frozen",
    "trace_exact": "_frozen",
    "EarlyExitModel": "_model",
    "TrainOutputs": "_exit_loop",
    "EarlyExitResult": "_exit_loop",
    "build_early_exit": "_build",
    "Cost": "_cost",
    "cascade_cost": "_cost",
    "reach": "_cost",
    "exit_score": "_score",
    "gate": "_score",
    "gate_power": "_score",
    "TimeProfile": "_profile",
    "batched_repeats": "_profile",
    "chain_times": "_profile",
    "cut_time_fractions": "_profile",
    "device_name": "_profile",
    "exit_times": "_profile",
    "probe_batch": "_profile",
    "probe_images": "_profile",
    "profile_cascade": "_profile",
    "relative_costs": "_profile",
    "steady_allocator": "_profile",
}
__all__ = sorted(_NAMES)
__getattr__, __dir__ = lazy_face(__name__, _NAMES)
