"""Benchmark on a real ImageNet model: tf_efficientnet_lite0 with its real weights (../shared).

In one run, nothing chosen on the images that are scored:

* ``default`` -- ``pteenet.attach("timm:tf_efficientnet_lite0", POOL, checkpoint=...)`` with every
  default, timed end to end. POOL is ``../shared``'s ``train-pool.tar`` (13,000 Imagenette and
  Tiny ImageNet images), plus every ``--extra-pool`` folder, laid out as one folder of loose
  files, so their labels are ignored (pteenet trains on the backbone's own answers); any pool
  image whose file name or SHA-256 is also among the scored val images is left out. Then
  ``pteenet.bench`` on the 1,300 labelled ILSVRC-2012 val images of ``val.tar`` (every evaluated
  branch counted), with the backbone beside it and the oracle, and its wall clock against the
  backbone in torch.
* ``calibrate --data`` -- the same bundle recalibrated, without labels, on a seeded half of the
  val images (``pteenet.calibrate(bundle, data=HALF_A)``), scored on the other half, beside the
  pool-calibrated bundle scored on that same half.
* ``--compare mlp`` (optional) -- the same attach with ``branch="mlp"`` (the default before
  ``auto``), scored the same way: what the feature-distillation exits win.
* ``--onnx`` (optional) -- the exported cascade against the exported backbone on onnxruntime
  (``wall_clock.onnx_row``).

    python benchmarks/imagenet_real.py [--extra-pool DIR ...] [--compare mlp] [--onnx]

writes ``benchmarks/results/imagenet-real.md`` and ``.json``. Without ``../shared`` it says so
and exits.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pteenet
from pteenet.data._datasets import IMAGE_EXTENSIONS

SHARED = Path(__file__).resolve().parents[2] / "shared"
WEIGHTS = SHARED / "weights" / "imagenet" / "tf_efficientnet_lite0-in1k.pth"
DATA = SHARED / "data" / "imagenet-real"
MODEL = "timm:tf_efficientnet_lite0"
TARGET = {"drop": 0.01, "relative_flops": 0.75}  # the target (stretch: 0.60)


def _images(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS
                  and p.is_file())


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def prepare(work: Path, extra: list[Path], seed: int = 0) -> dict:
    """Extract the shared tars; lay out the pool (loose, unlabeled, disjoint from val) and val
    (all, and two seeded halves: A loose for calibration, B in class folders for scoring)."""
    raw = work / "raw"
    for name in ("val.tar", "train-pool.tar"):
        with tarfile.open(DATA / name) as tf:
            tf.extractall(raw, filter="data")
    val = _images(raw / "val")
    names, hashes = {p.name for p in val}, {_sha(p) for p in val}
    pool, skipped = work / "pool", {"same_name": 0, "same_sha256": 0}
    pool.mkdir()
    sources = [("shared", p) for p in _images(raw / "train")]
    sources += [(f"extra{i}", p) for i, d in enumerate(extra) for p in _images(d)]
    counts: dict[str, int] = {}
    for i, (src, p) in enumerate(sources):
        if p.name in names:
            skipped["same_name"] += 1
            continue
        if _sha(p) in hashes:
            skipped["same_sha256"] += 1
            continue
        (pool / f"{i:06d}-{p.parent.name}-{p.name}").symlink_to(p.resolve())
        counts[src] = counts.get(src, 0) + 1
    order = list(range(len(val)))
    random.Random(seed).shuffle(order)
    half_a, half_b = work / "val-a", work / "val-b"
    half_a.mkdir()
    for k, i in enumerate(order):
        p = val[i]
        if k < len(val) // 2:
            (half_a / f"{p.parent.name}-{p.name}").symlink_to(p.resolve())
        else:
            (half_b / p.parent.name).mkdir(parents=True, exist_ok=True)
            (half_b / p.parent.name / p.name).symlink_to(p.resolve())
    return {"pool": pool, "val": raw / "val", "val_a": half_a, "val_b": half_b,
            "pool_counts": counts, "pool_skipped": skipped, "val_images": len(val)}


def scored(bundle: Path, data: Path, args, timed: bool = False) -> dict:
    r = pteenet.bench(bundle, data=data, out_json=False, batch_size=64,
                      latency_samples=args.latency_samples if timed else 0,
                      repeats=args.repeats if timed else 1, profile=False)
    ee, bb = r.early_exit, r.backbone
    row = {"images": r.data["num_samples"], "top1": ee.top1,
           "backbone_top1": bb.top1, "drop": bb.top1 - ee.top1,
           "agreement": ee.agreement, "relative_flops": ee.relative_flops,
           "oracle_flops": r.oracle.relative_flops,
           "exit_shares": [e["share"] for e in r.exits],
           "active_exits": sum(1 for e in r.exits[:-1] if e["on"]),
           "warnings": r.warnings}
    if timed:
        t = r.timing
        row["timing"] = {"batch1_ms": {k: v["mean_ms"] for k, v in t["latency"].items()},
                         "throughput": t["throughput"], "speedup": r.speedup,
                         "threads": t["cpu_threads"], "load_average": t["load_average"]}
    return row


def attach(pool: Path, out: Path, args, **kw) -> tuple[dict, float]:
    t = time.perf_counter()
    res = pteenet.attach(MODEL, pool, checkpoint=WEIGHTS, out=out, progress=args.progress,
                         max_samples=args.max_pool, **kw)
    s = time.perf_counter() - t
    first = res.table.summary
    return {"attach_s": round(s, 1), "cuts": res.info.cuts,
            "branch_types": sorted({b["type"] for b in res.info.branches}),
            "branch_costs": [b["flops"] / res.model.backbone_flops for b in res.info.branches],
            "held_agreement": res.report.agreement,
            "held_drop": first["backbone_accuracy"] - first["accuracy"]
            if first.get("accuracy") is not None else 1 - first["agreement"],
            "held_relative_flops": first["mean_relative_flops"]}, s


def run(args) -> dict:
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        d = prepare(work, [Path(p) for p in args.extra_pool])
        print(f"pool: {d['pool_counts']} (left out: {d['pool_skipped']}); "
              f"val: {d['val_images']}", flush=True)
        result = {"pool_counts": d["pool_counts"], "pool_skipped": d["pool_skipped"],
                  "val_images": d["val_images"], "rows": rows}
        configs = [("default", {})] + [(f"branch {b}", {"branch": b}) for b in args.compare]
        for name, kw in configs:
            bundle = work / name.replace(" ", "-")
            info, _ = attach(d["pool"], bundle, args, **kw)
            print(f"[{name}] attach {info['attach_s']:.0f}s", flush=True)
            row = {"config": name, "calibration": "pool (attach)", "scored_on": "val",
                   **info, **scored(bundle, d["val"], args, timed=name == "default")}
            rows.append(row)
            print(json.dumps(row, default=str), flush=True)
            rows.append({"config": name, "calibration": "pool (attach)", "scored_on": "val half B",
                         **scored(bundle, d["val_b"], args)})
            cal = work / f"{bundle.name}-cal"
            shutil.copytree(bundle, cal)
            t = time.perf_counter()
            res = pteenet.calibrate(cal, data=d["val_a"])
            s = res.summary
            rows.append({"config": name, "calibration": "calibrate --data val half A (no labels)",
                         "scored_on": "val half B",
                         "calibrate_s": round(time.perf_counter() - t, 1),
                         "held_drop": 1 - s["agreement"],
                         "held_relative_flops": s["mean_relative_flops"],
                         **scored(cal, d["val_b"], args)})
            print(json.dumps(rows[-1], default=str), flush=True)
            if args.onnx and name == "default":
                sys.path.insert(0, str(Path(__file__).parent))
                from wall_clock import onnx_row  # noqa: PLC0415
                root = work / "ort"
                (root).mkdir()
                for split in ("train", "test"):
                    (root / split).symlink_to(d["val"])
                args.batch, args.threads = 64, None
                try:
                    rows[0]["onnx"] = onnx_row(bundle, root, args)
                except Exception as e:  # noqa: BLE001 - the quality figures still count
                    rows[0]["onnx_error"] = f"{type(e).__name__}: {e}"
            write(result, args)  # partial results survive an interrupted run
        return result


def write(result: dict, args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = f"python benchmarks/imagenet_real.py {' '.join(sys.argv[1:])}"
    (out / "imagenet-real.json").write_text(json.dumps(
        {"command": cmd, "settings": vars(args), "target": TARGET, **result}, indent=1,
        default=str))
    lines = ["# tf_efficientnet_lite0 (real ImageNet weights): early exits vs the backbone", "",
             f"Command: `{cmd}`", "",
             f"Pool (unlabeled, disjoint from val by name and SHA-256): {result['pool_counts']}; "
             f"left out as val duplicates: {result['pool_skipped']}. Scored on "
             f"{result['val_images']} labelled ILSVRC-2012 val images (`val.tar`). Target: "
             f"<= {100 * TARGET['drop']:.1f} pt below the backbone at <= "
             f"{TARGET['relative_flops']} relative FLOPs.", "",
             "| config | calibration | scored on | images | held-out drop (rel. FLOPs) | top-1 "
             "(backbone) | drop | agreement | rel. FLOPs | oracle | exits on | bench warns |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        held = "" if r.get("held_drop") is None else \
            f"{100 * r['held_drop']:.2f} ({r['held_relative_flops']:.3f})"
        lines.append(
            f"| {r['config']} | {r['calibration']} | {r['scored_on']} | {r['images']} | {held} | "
            f"{100 * r['top1']:.2f} ({100 * r['backbone_top1']:.2f}) | {100 * r['drop']:.2f} | "
            f"{100 * r['agreement']:.1f} | {r['relative_flops']:.3f} | {r['oracle_flops']:.3f} "
            f"| {r['active_exits']} | {'yes' if r['warnings'] else 'no'} |")
    lines += [""]
    for r in result["rows"]:
        if "attach_s" in r:
            lines.append(f"- {r['config']}: attach {r['attach_s']:.0f} s "
                         f"({', '.join(r['branch_types'])} branches at {', '.join(r['cuts'])}; "
                         f"held-out agreement "
                         f"{' '.join(f'{a:.2f}' for a in r['held_agreement'])})")
        if "timing" in r:
            t = r["timing"]
            lines.append(f"- {r['config']}, torch wall clock: batch 1 "
                         f"{t['batch1_ms']['backbone']:.1f} ms (backbone) vs "
                         f"{t['batch1_ms']['early_exit']:.1f} ms; batched "
                         f"{t['throughput']['backbone']:.0f} vs "
                         f"{t['throughput']['early_exit']:.0f} img/s; {t['threads']} threads, "
                         f"load average {t['load_average']}")
        if "onnx" in r:
            o = r["onnx"]
            lines.append(f"- {r['config']}, onnxruntime: batch 1 "
                         f"{o['batch1_ms']['backbone']:.1f} vs {o['batch1_ms']['early_exit']:.1f}"
                         f" ms (x{o['speedup']['latency']:.2f}); batched "
                         f"x{o['speedup']['throughput']:.2f}")
        for w in r.get("warnings", []):
            lines.append(f"- {r['config']} / {r['calibration']} / {r['scored_on']}: bench warned: "
                         f"{w}")
    (out / "imagenet-real.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--extra-pool", nargs="*", default=[],
                    help="more unlabeled pool folders (images anywhere below), e.g. under /tmp")
    ap.add_argument("--compare", nargs="*", default=[], help="also attach these branch types")
    ap.add_argument("--onnx", action="store_true", help="time the exported cascade too")
    ap.add_argument("--max-pool", type=int, default=None, help="a seeded subset (smoke runs)")
    ap.add_argument("--latency-samples", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--progress", action="store_true", help="show attach's progress bars")
    ap.add_argument("--work", default=None, help="where the temp folder goes (default: system)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    if not (WEIGHTS.is_file() and (DATA / "val.tar").is_file()):
        sys.exit(f"../shared's ImageNet material not found under {SHARED}: this benchmark needs "
                 f"it (see ../shared/README.md)")
    run(args)


if __name__ == "__main__":
    main()
