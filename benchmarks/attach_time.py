"""How long the default attach takes on 2 CPU cores (not run in CI).

On the shared ResNet-44 and a seeded 45,000-image subset of CIFAR-10 ``train/`` JPEGs: the whole
``pteenet.attach`` with every default (the backbone pass that fills the feature cache, training,
the first calibration, the bundle write), and separately the backbone's own forward pass over the
same images, so the cache pass can be judged against the backbone's speed.

    python benchmarks/attach_time.py

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

from pteenet.backbone._registry import create_backbone
from pteenet.data import make_loader, open_data
from pteenet.jobs._attach import attach

SHARED = Path(__file__).resolve().parents[2] / "shared"
CKPT = SHARED / "weights" / "cifar-resnet" / "resnet44-014dd654.th"


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


@torch.inference_mode()
def backbone_pass(bb, data, idx: list[int]) -> None:
    for batch in make_loader(data, batch_size=256, indices=idx):
        bb.model(batch.images)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-samples", type=int, default=45000)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "attach-time.json"))
    args = ap.parse_args()
    if not SHARED.is_dir():
        sys.exit(f"../shared not found at {SHARED}")
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(SHARED / "data" / "cifar10-jpeg" / "train.tar.gz") as tf:
            tf.extractall(tmp, filter="data")
        bb = create_backbone("resnet44", checkpoint=CKPT)
        data = open_data(tmp, bb.preprocess)
        idx = list(range(min(args.max_samples, len(data))))
        _, t_backbone = timed(lambda: backbone_pass(bb, data, idx))
        res, t_attach = timed(lambda: attach(
            bb, tmp, out=Path(tmp) / "bundle",
            max_samples=args.max_samples, progress=False))
    report = {
        "samples": len(idx), "branches": len(res.info.cuts), "branch": res.info.branches[0]["type"],
        "epochs": res.info.training["epochs"], "cpu_threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0], "attach_s": t_attach,
        "backbone_forward_s": t_backbone, "held_out_agreement": res.report.agreement,
        "command": "python benchmarks/attach_time.py " + " ".join(sys.argv[1:]),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
