"""Where the FLOPs go: the torch.fx trace of a backbone, its cut points, and exit placement."""

from pteenet._face import lazy_face

_NAMES = {
    "LAYOUTS": "_layout",
    "layout_of": "_layout",
    "TAIL": "_placement",
    "choose_cuts": "_placement",
    "SPREAD": "_placement",
    "spread_note": "_placement",
    "target_fractions": "_placement",
    "useful_cuts": "_placement",
    "Cut": "_tracing",
    "Trace": "_tracing",
    "count_flops": "_tracing",
    "split_at": "_split",
    "thop_macs": "_tracing",
    "trace_backbone": "_tracing",
}
__all__ = sorted(_NAMES)
__getattr__, __dir__ = lazy_face(__name__, _NAMES)
