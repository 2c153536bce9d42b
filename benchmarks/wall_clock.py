"""Wall clock on this CPU: does the default early-exit ResNet-44 pay in time, not only FLOPs?

One run, on the real weights and the shared CIFAR-10 test images (not run in CI):

1. the default bundle: ``pteenet.attach(model, data)`` with every default (or ``--bundle``);
2. ``pteenet.bench`` on ``test/``: backbone and early-exit model interleaved, batch 1 and
   batched, with the time profile of every segment and branch and the *ideal* speedups those
   measured times and the exit shares imply (achieved / ideal shows the exit loop's overhead);
3. the same bundle with every threshold above 1 (every exit off): its time against the
   backbone's, which should be equal;
4. the exported ONNX cascade (``pteenet.runtime.Cascade``) against the backbone exported to
   ONNX, both on onnxruntime, interleaved, batch 1 and batched.

    python benchmarks/wall_clock.py --model resnet44 --threads 2

writes ``benchmarks/results/wall-clock.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import pteenet
from pteenet.benchmark._quality import timing_positions
from pteenet.bundle import load_backbone, read_info
from pteenet.cascade._onnx import save_onnx
from pteenet.data import make_loader, open_data
from pteenet.exporter._export import export

sys.path.insert(0, str(Path(__file__).parent))
from cifar_resnet import CHECKPOINTS, SHARED, extract  # noqa: E402


def bench_row(bundle: Path, root: Path, args, **kw) -> dict:
    r = pteenet.bench(bundle, data=root, split="test", out_json=False, batch_size=args.batch,
                      latency_samples=args.latency_samples, repeats=args.repeats,
                      threads=args.threads, **kw)
    lat, t = r.timing["latency"], r.timing
    return {"top1": r.early_exit.top1, "backbone_top1": r.backbone.top1,
            "relative_flops": r.early_exit.relative_flops,
            "batch1_ms": {k: v["mean_ms"] for k, v in lat.items()},
            "batch1_median_ms": {k: v["median_ms"] for k, v in lat.items()},
            "batch1_p10_p90_ms": {k: [v["p10_ms"], v["p90_ms"]] for k, v in lat.items()},
            "throughput": t["throughput"], "throughput_range": t["throughput_range"],
            "speedup": r.speedup, "profile": r.profile, "threads": t["cpu_threads"],
            "load_average": t["load_average"], "notes": r.notes}


SETTLE_S = 0.05  # pause before each timed block: spinning workers of the last session go idle


def onnx_row(bundle: Path, root: Path, args) -> dict:
    """Exported cascade vs exported backbone on onnxruntime, in alternating blocks.

    The backbone runs at its best, onnxruntime's defaults (idle workers spin, twice as fast at
    batch 1 as without); so does the cascade's one-graph batch-1 session, while its per-piece
    sessions (batches) do not spin. A spinning session's workers slow any other session's next
    call (a batched cascade call right after one ran 20 % slower), so the two alternate in
    blocks, each after a pause, not call by call. Batch 1 is the mean over images of each
    image's median of three sweeps."""
    import onnxruntime as ort

    from pteenet.runtime import Cascade, session_options
    info = read_info(bundle)
    folder = export(bundle, format="onnx")
    cascade = Cascade.open(folder, threads=args.threads)
    backbone = load_backbone(info, None, False).model.eval()
    h, w = info.preprocess.input_size
    path = folder / "backbone.onnx"
    save_onnx(backbone, (torch.zeros(1, 3, h, w),), path, ["input"], ["output"])
    sess = ort.InferenceSession(str(path), session_options(args.threads, spin=True),
                                providers=["CPUExecutionProvider"])
    images = test_images(root, info, args.batch)
    runs = {"backbone": lambda x: sess.run(None, {"input": x}), "early_exit": cascade.run}
    for fn in runs.values():
        fn(images[:1])
        fn(images)
    n, block = args.latency_samples, 50
    one = {k: [[] for _ in range(n)] for k in runs}
    for sweep in range(3):
        for b, start in enumerate(range(0, n, block)):
            order = list(runs.items()) if (b + sweep) % 2 == 0 else list(runs.items())[::-1]
            for name, fn in order:
                time.sleep(SETTLE_S)
                fn(images[:1])
                for i in range(start, min(start + block, n)):
                    x = images[i % len(images)][None]
                    t0 = time.perf_counter()
                    fn(x)
                    one[name][i].append(time.perf_counter() - t0)
    per_image = {k: [statistics.median(t) for t in v] for k, v in one.items()}
    many = {k: [] for k in runs}
    for i in range(args.repeats):
        for name, fn in (runs.items() if i % 2 == 0 else reversed(runs.items())):
            time.sleep(SETTLE_S)
            t0 = time.perf_counter()
            fn(images)
            many[name].append(len(images) / (time.perf_counter() - t0))
    b1 = {k: 1000 * statistics.fmean(v) for k, v in per_image.items()}
    med = {k: 1000 * statistics.median(v) for k, v in per_image.items()}
    tp = {k: statistics.median(v) for k, v in many.items()}
    return {"batch1_ms": b1, "batch1_median_ms": med, "throughput": tp,
            "speedup": {"latency": b1["backbone"] / b1["early_exit"],
                        "latency_median": med["backbone"] / med["early_exit"],
                        "throughput": tp["early_exit"] / tp["backbone"]}}


def test_images(root: Path, info, n: int) -> np.ndarray:
    """``n`` test images drawn as bench draws them (seeded, over every class: the folder lists
    its files class by class)."""
    data = open_data(root, info.preprocess, split="test")
    indices = timing_positions(len(data), n).tolist()
    loader = make_loader(data, batch_size=n, indices=indices)
    return next(iter(loader)).images.numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="resnet44", choices=sorted(CHECKPOINTS))
    ap.add_argument("--bundle", help="an existing bundle (default: attach with the defaults)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--latency-samples", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = extract(Path(tmp) / "data")
        bundle = Path(args.bundle) if args.bundle else Path(tmp) / "bundle"
        if not args.bundle:
            ckpt = SHARED / "weights" / "cifar-resnet" / CHECKPOINTS[args.model]
            pteenet.attach(args.model, root, checkpoint=ckpt, out=bundle, progress=False)
        rows = {"default": bench_row(bundle, root, args),
                "all exits off": bench_row(bundle, root, args, threshold=math.inf,
                                           profile=False),
                "onnx": onnx_row(bundle, root, args)}
    write(rows, args)


def write(rows: dict, args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "wall-clock.json").write_text(json.dumps({"model": args.model, "threads": args.threads,
                                                    "batch": args.batch, "rows": rows}, indent=1))
    d, off, onnx = rows["default"], rows["all exits off"], rows["onnx"]
    sp = d["speedup"]
    lines = [f"# Wall clock: {args.model}, default bundle, {args.threads} threads, "
             f"batch 1 and {args.batch}", "",
             "| run | batch-1 speedup (mean) | batch-1 (median) | batched speedup | "
             "ideal (batch 1 / batched) | achieved / ideal | relative FLOPs |",
             "|---|---|---|---|---|---|---|",
             f"| **ONNX cascade vs the fastest plain runtime** ({sp['fastest_latency_runtime']} / "
             f"{sp['fastest_throughput_runtime']}; bench, taking turns) | "
             f"{sp['onnx_cascade_latency_vs_fastest']:.2f}x | | "
             f"{sp['onnx_cascade_throughput_vs_fastest']:.2f}x | FLOPs {sp['flops']:.2f}x | "
             f"{sp['onnx_cascade_latency_of_flops_ideal']:.2f} / "
             f"{sp['onnx_cascade_throughput_of_flops_ideal']:.2f} of the FLOPs ideal | "
             f"{d['relative_flops']:.3f} |",
             f"| early exit (torch) vs the fastest plain runtime | {sp['latency_vs_fastest']:.2f}x "
             f"| | {sp['throughput_vs_fastest']:.2f}x | FLOPs {sp['flops']:.2f}x | "
             f"{sp['latency_vs_fastest'] / sp['flops']:.2f} / "
             f"{sp['throughput_vs_fastest'] / sp['flops']:.2f} of the FLOPs ideal | |",
             f"| ONNX cascade vs ONNX backbone (blocks, each after a pause) | "
             f"{onnx['speedup']['latency']:.2f}x | {onnx['speedup']['latency_median']:.2f}x | "
             f"{onnx['speedup']['throughput']:.2f}x | FLOPs {sp['flops']:.2f}x | "
             f"{onnx['speedup']['latency'] / sp['flops']:.2f} / "
             f"{onnx['speedup']['throughput'] / sp['flops']:.2f} of the FLOPs ideal | |",
             f"| early exit (torch) vs the untouched backbone | {sp['latency']:.2f}x | "
             f"{sp['latency_median']:.2f}x | {sp['throughput']:.2f}x | | | "
             f"{d['relative_flops']:.3f} |",
             f"| early exit (torch) vs its segments in a row | "
             f"{sp['latency_vs_segments']:.2f}x | | {sp['throughput_vs_segments']:.2f}x | "
             f"{sp['ideal_latency']:.2f}x / {sp['ideal_throughput']:.2f}x | "
             f"{sp['latency_of_ideal']:.2f} / {sp['throughput_of_ideal']:.2f} | |",
             f"| segments in a row (frozen graphs) vs the untouched backbone | "
             f"{d['batch1_ms']['backbone'] / d['batch1_ms']['segments']:.2f}x | | "
             f"{d['throughput']['segments'] / d['throughput']['backbone']:.2f}x | | | 1.000 |",
             f"| every exit off (torch) | {off['speedup']['latency']:.3f}x | "
             f"{off['speedup']['latency_median']:.3f}x | "
             f"{off['speedup']['throughput']:.3f}x | 1.00x | | {off['relative_flops']:.3f} |", "",
             "Batch 1 is judged by the mean latency (the time per image of a one-by-one stream); "
             "early exit makes latency bimodal, so the median flatters it. The segments in a row "
             "are the backbone as the early-exit model runs it (frozen TorchScript graphs on a "
             "CPU, `pteenet.cascade`): the early exits' own gain is measured against them, and "
             "the ideal is for that gain.", "",
             f"Batch-1 mean ms (torch): backbone {d['batch1_ms']['backbone']:.2f}, segments in "
             f"a row {d['batch1_ms']['segments']:.2f}, early exit "
             f"{d['batch1_ms']['early_exit']:.2f}; (ONNX): backbone "
             f"{onnx['batch1_ms']['backbone']:.2f}, cascade {onnx['batch1_ms']['early_exit']:.2f}; "
             f"throughput (img/s): backbone "
             f"{d['throughput']['backbone']:.0f}, segments {d['throughput']['segments']:.0f}, "
             f"early exit {d['throughput']['early_exit']:.0f}; "
             f"load average {d['load_average']}."]
    (out / "wall-clock.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
