"""Benchmark on the real pretrained CIFAR ResNets in ../shared (not run in CI).

For each backbone, in one run:

* ``default`` -- ``pteenet.attach(model, data)`` with every default (what the README tells a user
  to run), timed end to end; then ``pteenet.calibrate`` at 0.5, 1 and 2 points of allowed drop,
  certified (``risk``) at 1 point, and CPM at its default margin; each table scored on ``test/``
  by ``pteenet.bench`` (the real early-exit model, every evaluated branch counted). The default
  table is also benched with ``--threshold 0.5`` and timed against the backbone.
* ``sdn-baseline`` -- the SDN recipe (Kaya et al. 2019) on the same cuts: ``sdn`` branches
  trained on the labels (one view of each image), one global softmax threshold chosen on the
  held-out split for each drop; and the same branches under pteenet's default calibration,
  to separate what the branches and the calibration each bring.

Branches train on ``train/`` (a seeded 45,000-image subset, 20 % of it held out for
calibration); nothing is chosen on ``test/``, which is only scored.

    python benchmarks/cifar_resnet.py --models resnet20 resnet32 resnet44

writes ``benchmarks/results/cifar-resnet.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

import pteenet
from pteenet.calibration import collect
from pteenet.thresholds import as_table, summarize

SHARED = Path(__file__).resolve().parents[2] / "shared"
CHECKPOINTS = {"resnet20": "resnet20-12fca82f.th", "resnet32": "resnet32-d509ac18.th",
               "resnet44": "resnet44-014dd654.th"}
DROPS = (0.005, 0.01, 0.02)


def extract(tmp: Path) -> Path:
    for split in ("train", "test"):
        with tarfile.open(SHARED / "data" / "cifar10-jpeg" / f"{split}.tar.gz") as tf:
            tf.extractall(tmp, filter="data")
    return tmp


def scored(bundle: Path, root: Path, args, timed: bool = False, **kw) -> dict:
    """bench on test/: quality always, wall clock only when ``timed``."""
    r = pteenet.bench(bundle, data=root, split="test", out_json=False, batch_size=256,
                      latency_samples=args.latency_samples if timed else 0,
                      repeats=args.repeats if timed else 1, **kw)
    ee, bb = r.early_exit, r.backbone
    row = {"top1": ee.top1, "backbone_top1": bb.top1, "drop": bb.top1 - ee.top1,
           "relative_flops": ee.relative_flops, "oracle_flops": r.oracle.relative_flops,
           "exit_shares": [e["share"] for e in r.exits],
           "active_exits": sum(1 for e in r.exits[:-1] if e["on"])}
    if timed:
        row["timing"] = {"latency": r.timing["latency"], "throughput": r.timing["throughput"],
                         "speedup": r.speedup, "threads": r.timing["cpu_threads"],
                         "load_average": r.timing["load_average"]}
    return row


def calibrated(bundle: Path, **kw) -> dict:
    res = pteenet.calibrate(bundle, **kw)
    s = res.summary
    return {"held_drop": None if s["accuracy"] is None else s["backbone_accuracy"] - s["accuracy"],
            "held_relative_flops": s["mean_relative_flops"], "method": res.table.method,
            "params": {k: v for k, v in res.table.params.items() if k != "softmax_thresholds"}}


def global_for_drop(bundle: Path, drop: float) -> float:
    """SDN's rule: the lowest global softmax threshold within ``drop`` on the held-out split."""
    model = pteenet.load(bundle)
    model.set_thresholds(1.0, score="softmax")
    out = collect(model, bundle)
    b, k = out.scores.shape[1], model.num_classes
    best = 1.0
    for t in torch.linspace(1.0, 0.0, 201).tolist():
        thr = as_table(t, b, k)
        s = summarize(out.scores, out.preds, out.final_pred, thr, out.exit_costs(thr), out.labels)
        if s["backbone_accuracy"] - s["accuracy"] <= drop:
            best = t
    return best


def run_backbone(name: str, root: Path, work: Path, args) -> list[dict]:
    ckpt = SHARED / "weights" / "cifar-resnet" / CHECKPOINTS[name]
    rows: list[dict] = []

    def add(config: str, rule: str, target: float | None, cal: dict, test: dict) -> None:
        rows.append({"backbone": name, "config": config, "rule": rule, "target_drop": target,
                     **cal, **test})
        print(json.dumps(rows[-1]), flush=True)

    out = work / f"{name}-default"
    t = time.perf_counter()
    res = pteenet.attach(name, root, checkpoint=ckpt, out=out, max_samples=args.max_train,
                         progress=args.progress)
    attach_s = time.perf_counter() - t
    print(f"[{name}] default attach: {attach_s:.0f}s", flush=True)
    if args.keep:  # as attach left it, before the other rules recalibrate it
        shutil.copytree(out, Path(args.keep) / out.name, dirs_exist_ok=True)
    first = res.table.summary
    add("default", "attach (mincost, 1 pt)", 0.01,
        {"held_drop": first["backbone_accuracy"] - first["accuracy"],
         "held_relative_flops": first["mean_relative_flops"], "attach_s": round(attach_s, 1),
         "branch_costs": [b["flops"] / res.model.backbone_flops for b in res.info.branches],
         "cuts": res.info.cuts},
        scored(out, root, args, timed=True))
    add("default", "bench --threshold 0.5", None, {}, scored(out, root, args, threshold=0.5))
    for d in DROPS:
        add("default", "mincost", d, calibrated(out, max_drop=d), scored(out, root, args))
    add("default", "risk (wsr, delta 0.1)", 0.01, calibrated(out, max_drop=0.01, risk=True),
        scored(out, root, args))
    add("default", "cpm (margin 0.02)", None, calibrated(out, cpm=True), scored(out, root, args))

    sdn = work / f"{name}-sdn"
    t = time.perf_counter()
    pteenet.attach(name, root, checkpoint=ckpt, out=sdn, max_samples=args.max_train,
                   branch="sdn", config=pteenet.TrainConfig(target="labels", views=1),
                   progress=args.progress)
    sdn_s = time.perf_counter() - t
    for d in DROPS:
        thr = global_for_drop(sdn, d)
        cal = calibrated(sdn, threshold=thr)
        add("sdn-baseline", "global softmax", d, {**cal, "attach_s": round(sdn_s, 1)},
            scored(sdn, root, args))
    add("sdn-baseline", "mincost", 0.01, calibrated(sdn, max_drop=0.01), scored(sdn, root, args))
    return rows


def write_report(rows: list[dict], args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = f"python benchmarks/cifar_resnet.py {' '.join(sys.argv[1:])}"
    (out / "cifar-resnet.json").write_text(json.dumps(
        {"command": cmd, "settings": vars(args), "rows": rows}, indent=1, default=str))
    lines = ["# CIFAR ResNets: early exits vs the backbone (scored on shared test/)", "",
             f"Command: `{cmd}`", "",
             "| backbone | config | rule | target drop | held-out drop | test top-1 (backbone) "
             "| test drop | rel. FLOPs | oracle | exit shares |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        target = "" if r["target_drop"] is None else f"{100 * r['target_drop']:.1f} pt"
        held = "" if r.get("held_drop") is None else f"{100 * r['held_drop']:.2f}"
        lines.append(
            f"| {r['backbone']} | {r['config']} | {r['rule']} | {target} | {held} | "
            f"{100 * r['top1']:.2f} ({100 * r['backbone_top1']:.2f}) | {100 * r['drop']:.2f} | "
            f"{r['relative_flops']:.3f} | {r['oracle_flops']:.3f} | "
            f"{' '.join(f'{s:.2f}' for s in r['exit_shares'])} |")
    lines += ["", "## Wall clock (default bundle, backbone and early exit interleaved)", ""]
    for r in rows:
        if "timing" in r:
            t = r["timing"]
            lat, sp = t["latency"], t["speedup"]
            lines.append(
                f"- {r['backbone']}: batch 1 (mean) {lat['backbone']['mean_ms']:.2f} ms vs "
                f"{lat['early_exit']['mean_ms']:.2f} ms (x{t['speedup']['latency']:.2f}); "
                f"batched {t['throughput']['backbone']:.0f} vs "
                f"{t['throughput']['early_exit']:.0f} img/s (x{t['speedup']['throughput']:.2f}); "
                f"FLOPs x{t['speedup']['flops']:.2f}; **against the fastest plain runtime** "
                f"({sp.get('fastest_latency_runtime')} / {sp.get('fastest_throughput_runtime')}) "
                f"x{sp.get('latency_vs_fastest') or 0:.2f} / "
                f"x{sp.get('throughput_vs_fastest') or 0:.2f}; over the segments in a row "
                f"(the early exits' own gain) x{t['speedup']['latency_vs_segments']:.2f} / "
                f"x{t['speedup']['throughput_vs_segments']:.2f}, "
                f"{t['speedup']['latency_of_ideal']:.2f} / "
                f"{t['speedup']['throughput_of_ideal']:.2f} of the ideal; "
                f"{t['threads']} threads, load average "
                f"{t['load_average']}; default attach took {r['attach_s']:.0f} s")
    (out / "cifar-resnet.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet44"], choices=sorted(CHECKPOINTS))
    ap.add_argument("--max-train", type=int, default=45000)
    ap.add_argument("--latency-samples", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--progress", action="store_true", help="show attach's progress bars")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--keep", help="copy each default bundle here (e.g. for wall_clock.py)")
    args = ap.parse_args()
    if not SHARED.is_dir():
        sys.exit(f"../shared not found at {SHARED}: this benchmark needs the shared data")
    with tempfile.TemporaryDirectory() as tmp:
        root = extract(Path(tmp) / "data")
        rows: list[dict] = []
        for m in args.models:
            rows += run_backbone(m, root, Path(tmp), args)
            write_report(rows, args)  # partial results survive an interrupted run


if __name__ == "__main__":
    main()
