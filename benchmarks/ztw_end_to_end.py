"""ZTW ensembling end to end on a real CIFAR ResNet: what ``attach --ensemble ztw`` gives a user.

``exit_variants.py`` compares ZTW's geometric ensemble with the plain exits on one set of cached
features; this runs the shipped path instead: ``pteenet.attach(model, data, ensemble="ztw")``
with every other default (the ensemble's weights fitted on half of the held-out split, the
default rule calibrating on the other half), then ``pteenet.bench`` on ``test/``, with the
bundle's own thresholds and with ``--threshold 0.5``. Compare with the ``default`` rows of
``cifar_resnet.py``. Not run in CI.

    python benchmarks/ztw_end_to_end.py --model resnet44

writes ``benchmarks/results/ztw-end-to-end.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

import pteenet

sys.path.insert(0, str(Path(__file__).parent))
from cifar_resnet import CHECKPOINTS, SHARED, extract  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet44", choices=sorted(CHECKPOINTS))
    ap.add_argument("--max-train", type=int, default=45000)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = extract(Path(tmp) / "data")
        bundle = Path(tmp) / "bundle"
        t = time.perf_counter()
        pteenet.attach(args.model, root, checkpoint=SHARED / "weights" / "cifar-resnet" /
                       CHECKPOINTS[args.model], out=bundle, max_samples=args.max_train,
                       ensemble="ztw", progress=False)
        attach_s = time.perf_counter() - t
        for rule, kw in (("attach (mincost, 1 pt)", {}), ("bench --threshold 0.5",
                                                          {"threshold": 0.5})):
            r = pteenet.bench(bundle, data=root, split="test", out_json=False, batch_size=256,
                              latency_samples=0, repeats=1, **kw)
            ee, bb = r.early_exit, r.backbone
            rows.append({"rule": rule, "test_drop_pt": round(100 * (bb.top1 - ee.top1), 2),
                         "relative_flops": round(ee.relative_flops, 3)})
            print(json.dumps(rows[-1]), flush=True)
    doc = {"model": args.model, "ensemble": "ztw", "attach_s": round(attach_s, 1), "rows": rows,
           "command": "python benchmarks/ztw_end_to_end.py " + " ".join(sys.argv[1:])}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ztw-end-to-end.json").write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
