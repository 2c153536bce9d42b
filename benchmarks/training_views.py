"""Training views (``TrainConfig(views=K)``) on the CIFAR ResNets, scored on the shared test
images (issue 28; not run in CI).

Per model, seed and K: ``pteenet.attach`` with every other default and ``views=K`` (1: each
training image; 2: also its mirror; more: also random shifts, pad-and-crop, each view's target
the backbone's answer on it); each calibrated by attach itself (mincost, 1 pt, on the held-out
split as it is) and benched on ``test/``.

    python benchmarks/training_views.py --models resnet44 resnet20 resnet32 --views 1 2 4

writes ``benchmarks/results/training-views.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import pteenet
from pteenet.training import TrainConfig

sys.path.insert(0, str(Path(__file__).parent))
from cifar_resnet import CHECKPOINTS, SHARED, extract  # noqa: E402


def arm(model: str, root: Path, out: Path, seed: int, views: int) -> dict:
    ckpt = SHARED / "weights" / "cifar-resnet" / CHECKPOINTS[model]
    t0 = time.perf_counter()
    pteenet.attach(model, root, checkpoint=ckpt, out=out, max_samples=45000, progress=False,
                   config=TrainConfig(seed=seed, views=views))
    seconds = time.perf_counter() - t0
    r = pteenet.bench(out, data=root, split="test", out_json=False, latency_samples=0,
                      repeats=1, profile=False, onnx_baseline=False)
    return {"model": model, "seed": seed, "views": views, "attach_s": round(seconds, 1),
            "test_drop_pt": round(100 * (r.backbone.top1 - r.early_exit.top1), 2),
            "relative_flops": round(r.early_exit.relative_flops, 3),
            "oracle": round(r.oracle.relative_flops, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet44"], choices=sorted(CHECKPOINTS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--views", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = extract(Path(tmp) / "data")
        for model in args.models:
            for seed in args.seeds:
                for views in args.views:
                    bundle = Path(tmp) / f"{model}-{seed}-{views}"
                    rows.append(arm(model, root, bundle, seed, views))
                    print(json.dumps(rows[-1]), flush=True)
    cmd = "python benchmarks/training_views.py " + " ".join(sys.argv[1:])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "training-views.json").write_text(json.dumps({"command": cmd, "rows": rows}, indent=1))
    lines = ["# Training views on the CIFAR ResNets (scored on shared test/)", "",
             f"Command: `{cmd}`", "",
             "| model | seed | views | test drop (pt) | rel. FLOPs | oracle | attach s |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['seed']} | {r['views']} | {r['test_drop_pt']:.2f} | "
              f"{r['relative_flops']:.3f} | {r['oracle']:.3f} | {r['attach_s']:.0f} |"
              for r in rows]
    (out / "training-views.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
