"""Where the FLOPs go: the torch.fx trace of a backbone, its cut points, and exit placement."""

from pteenet.graph._placement import (
    DEFAULT_BRANCHES,
    DEFAULT_POLICY,
    POLICIES,
    TAIL,
    choose_cuts,
    target_fractions,
    useful_cuts,
)
from pteenet.graph._tracing import (
    Cut,
    Trace,
    count_flops,
    split_at,
    thop_macs,
    trace_backbone,
)

__all__ = [
    "Cut",
    "DEFAULT_BRANCHES",
    "DEFAULT_POLICY",
    "POLICIES",
    "TAIL",
    "Trace",
    "choose_cuts",
    "count_flops",
    "split_at",
    "target_fractions",
    "thop_macs",
    "trace_backbone",
    "useful_cuts",
]
