"""The bundle on disk: safetensors weights, bundle.json, the threshold table, and the files
derived from it."""

from pteenet._face import lazy_face

_NAMES = {
    "BRANCHES_FILE": "_bundle",
    "Bundle": "_bundle",
    "BundleInfo": "_bundle",
    "FORMAT_VERSION": "_bundle",
    "MANIFEST": "_bundle",
    "MEMBERS": "_bundle",
    "THRESHOLDS_FILE": "_bundle",
    "ThresholdTable": "_bundle",
    "calibration_digest": "_bundle",
    "load": "_bundle",
    "load_backbone": "_bundle",
    "read_bundle": "_bundle",
    "read_info": "_bundle",
    "read_thresholds": "_bundle",
    "save_bundle": "_bundle",
    "write_thresholds": "_bundle",
    "BENCH_FILE": "_derived",
    "BUNDLE_HASH_KEY": "_derived",
    "SWEEP_CSV": "_derived",
    "SWEEP_PNG": "_derived",
    "bundle_hash": "_derived",
    "remove_stale": "_derived",
}
__all__ = sorted(_NAMES)
__getattr__, __dir__ = lazy_face(__name__, _NAMES)
