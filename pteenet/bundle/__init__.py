"""The bundle on disk: safetensors weights, bundle.json, the threshold table, and the files
derived from it."""

from pteenet._face import lazy_face

_NAMES = {
    "BRANCHES_FILE": "_schema",
    "Bundle": "_schema",
    "BundleInfo": "_schema",
    "FORMAT_VERSION": "_schema",
    "MEMBERS": "_schema",
    "THRESHOLDS_FILE": "_schema",
    "ThresholdTable": "_schema",
    "calibration_digest": "_schema",
    "load": "_load",
    "load_backbone": "_load",
    "read_bundle": "_read",
    "read_info": "_read",
    "read_thresholds": "_read",
    "save_bundle": "_write",
    "write_thresholds": "_write",
    "BENCH_FILE": "_derived",
    "BUNDLE_HASH_KEY": "_derived",
    "SWEEP_CSV": "_derived",
    "SWEEP_PNG": "_derived",
    "bundle_hash": "_derived",
    "remove_stale": "_derived",
}
__all__ = sorted(_NAMES)
__getattr__, __dir__ = lazy_face(__name__, _NAMES)
