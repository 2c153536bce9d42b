"""The bundle on disk: safetensors weights, bundle.json, the threshold table, and the files
derived from it."""

from pteenet.bundle._bundle import (
    BRANCHES_FILE,
    FORMAT_VERSION,
    MANIFEST,
    MEMBERS,
    THRESHOLDS_FILE,
    Bundle,
    BundleInfo,
    ThresholdTable,
    calibration_digest,
    load,
    load_backbone,
    read_bundle,
    read_info,
    read_thresholds,
    save_bundle,
    write_thresholds,
)
from pteenet.bundle._derived import (
    BENCH_FILE,
    BUNDLE_HASH_KEY,
    SWEEP_CSV,
    SWEEP_PNG,
    bundle_hash,
    remove_stale,
)

__all__ = [
    "BENCH_FILE",
    "BRANCHES_FILE",
    "BUNDLE_HASH_KEY",
    "Bundle",
    "BundleInfo",
    "FORMAT_VERSION",
    "MANIFEST",
    "MEMBERS",
    "SWEEP_CSV",
    "SWEEP_PNG",
    "THRESHOLDS_FILE",
    "ThresholdTable",
    "bundle_hash",
    "calibration_digest",
    "load",
    "load_backbone",
    "read_bundle",
    "read_info",
    "read_thresholds",
    "remove_stale",
    "save_bundle",
    "write_thresholds",
]
