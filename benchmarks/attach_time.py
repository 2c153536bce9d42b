"""How long attach takes on 2 CPU cores, with and without the feature cache (not run in CI).

On the shared ResNet-44 and CIFAR-10 ``train/`` JPEGs: the one backbone pass that fills the cache,
one training epoch from the cache, one epoch without it (features recomputed per batch), and the
whole ``attach`` (5 conv2 branches, pareto placement). ``--max-samples`` trades fidelity for time;
per-image rates are printed so the full 50,000-image figures can be extrapolated honestly.

    python benchmarks/attach_time.py --max-samples 10000 --epochs 10

writes ``benchmarks/results/attach-time.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

from pteenet.backbones import create_backbone
from pteenet.data import open_data
from pteenet.early_exit import build_early_exit
from pteenet.placement import choose_cuts
from pteenet.retrofit import attach
from pteenet.tracing import trace_backbone
from pteenet.training import LiveFeatures, TrainConfig, compute_features, train_branches

SHARED = Path(__file__).resolve().parents[2] / "shared"
CKPT = SHARED / "weights" / "cifar-resnet" / "resnet44-014dd654.th"


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-samples", type=int, default=50000)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--branch", default="conv2")
    ap.add_argument("--branches", type=int, default=5)
    ap.add_argument("--no-cache-samples", type=int, default=2000)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "attach-time.json"))
    args = ap.parse_args()
    if not SHARED.is_dir():
        sys.exit(f"../shared not found at {SHARED}")
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(SHARED / "data" / "cifar10-jpeg" / "train.tar.gz") as tf:
            tf.extractall(tmp, filter="data")
        bb = create_backbone("resnet44", checkpoint=CKPT)
        trace = trace_backbone(bb.model, (32, 32))
        cuts = choose_cuts(trace, args.branches, "pareto")
        model = build_early_exit(trace, cuts, 10, args.branch)
        data = open_data(tmp, bb.preprocess)
        idx = list(range(min(args.max_samples, len(data))))
        feats, t_feat = timed(lambda: compute_features(model, data, idx))
        one = TrainConfig(epochs=1)
        _, t_epoch = timed(lambda: train_branches(model, feats, feats, one))
        live_idx = idx[:args.no_cache_samples]
        live = LiveFeatures(model, data, live_idx)
        _, t_live = timed(lambda: train_branches(model, live, feats, one))
        res, t_attach = timed(lambda: attach(
            "resnet44", tmp, backbone=bb, branches=args.branches, branch=args.branch,
            out=Path(tmp) / "bundle", max_samples=args.max_samples, progress=False,
            config=TrainConfig(epochs=args.epochs)))
    n = len(idx)
    report = {
        "samples": n, "epochs": args.epochs, "branch": args.branch, "branches": args.branches,
        "cpu_threads": torch.get_num_threads(), "load_average": os.getloadavg()[0],
        "feature_pass_s": t_feat, "epoch_cached_s": t_epoch,
        "epoch_no_cache_s_per_1k": 1000 * t_live / len(live_idx),
        "epoch_cached_s_per_1k": 1000 * t_epoch / n, "attach_s": t_attach,
        "attach_s_extrapolated_50k": t_attach * 50000 / n,
        "held_out_agreement": res.report.agreement,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
