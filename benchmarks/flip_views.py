"""Mirrored training views (``TrainConfig(flip=True)``) against the defaults on a CIFAR ResNet,
scored on the shared test images (issue 28; not run in CI).

Per seed: ``pteenet.attach`` with every default, and the same with ``flip=True`` (each training
image and its mirror, the mirror's target the backbone's answer on it); each calibrated by
attach itself (mincost, 1 pt, on the unmirrored held-out split) and benched on ``test/``.

    python benchmarks/flip_views.py --model resnet44 --seeds 0 1

writes ``benchmarks/results/flip-views.md`` and ``.json``.
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


def arm(model: str, root: Path, out: Path, seed: int, flip: bool) -> dict:
    ckpt = SHARED / "weights" / "cifar-resnet" / CHECKPOINTS[model]
    t0 = time.perf_counter()
    pteenet.attach(model, root, checkpoint=ckpt, out=out, max_samples=45000, progress=False,
                   config=TrainConfig(seed=seed, flip=flip))
    seconds = time.perf_counter() - t0
    r = pteenet.bench(out, data=root, split="test", out_json=False, latency_samples=0,
                      repeats=1, profile=False, onnx_baseline=False)
    return {"seed": seed, "flip": flip, "attach_s": round(seconds, 1),
            "test_drop_pt": round(100 * (r.backbone.top1 - r.early_exit.top1), 2),
            "relative_flops": round(r.early_exit.relative_flops, 3),
            "oracle": round(r.oracle.relative_flops, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet44", choices=sorted(CHECKPOINTS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = extract(Path(tmp) / "data")
        for seed in args.seeds:
            for flip in (False, True):
                rows.append(arm(args.model, root, Path(tmp) / f"b-{seed}-{flip}", seed, flip))
                print(json.dumps(rows[-1]), flush=True)
    cmd = "python benchmarks/flip_views.py " + " ".join(sys.argv[1:])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "flip-views.json").write_text(json.dumps({"command": cmd, "model": args.model,
                                                    "rows": rows}, indent=1))
    lines = [f"# Mirrored training views on {args.model} (scored on shared test/)", "",
             f"Command: `{cmd}`", "",
             "| seed | flip | test drop (pt) | rel. FLOPs | oracle | attach s |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['seed']} | {'yes' if r['flip'] else 'no'} | {r['test_drop_pt']:.2f} | "
              f"{r['relative_flops']:.3f} | {r['oracle']:.3f} | {r['attach_s']:.0f} |"
              for r in rows]
    (out / "flip-views.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
