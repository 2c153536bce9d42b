"""Benchmark suite on the real pretrained CIFAR ResNets in ../shared (not run in CI).

Branches are trained on ``train/`` with the backbone's pseudo-labels, calibrated on a held-out part
of ``train/``, and scored on ``test/``. The backbone's features are computed once per backbone at
the union of every configuration's cuts, so each configuration costs only its branch training.

For every configuration and calibration family (global T, CPM margins, risk control) the operating
point is chosen on the held-out split for accuracy drops of 0.5, 1 and 2 points (against the
held-out labels) and then scored on ``test/``. The best configuration at <= 1 point is timed for
real (backbone and early-exit model interleaved, same process).

    python benchmarks/cifar_resnet.py --models resnet44 --max-train 20000 --epochs 8

writes ``benchmarks/results/cifar-resnet.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

from pteenet.backbones import create_backbone
from pteenet.benchmarking import wall_clock
from pteenet.calibration import DEFAULT_MARGIN
from pteenet.data import make_loader, open_data
from pteenet.early_exit import build_early_exit
from pteenet.placement import choose_cuts
from pteenet.thresholds import (
    as_table,
    class_precision,
    cpm_thresholds,
    global_candidates,
    losses_for,
    risk_control,
    scaled_candidates,
    summarize,
)
from pteenet.tracing import trace_backbone
from pteenet.training import (
    FeatureSet,
    TrainConfig,
    branch_scores,
    compute_features,
    split_indices,
    train_branches,
)

SHARED = Path(__file__).resolve().parents[2] / "shared"
CHECKPOINTS = {"resnet20": "resnet20-12fca82f.th", "resnet32": "resnet32-d509ac18.th",
               "resnet44": "resnet44-014dd654.th"}
DROPS = (0.005, 0.01, 0.02)
SDN_AT = (0.15, 0.3, 0.45, 0.6, 0.75, 0.9)

# (name, mode, branch type, placement, n, target, score)
CONFIGS = [
    ("joint-sdn-at6", None, "sdn", SDN_AT, 6, "hard", "head"),
    ("boosted-sdn-at6", "hard", "sdn", SDN_AT, 6, "hard", "head"),
    ("joint-sdn-linear4", None, "sdn", "linear", 4, "hard", "head"),
    ("boosted-sdn-linear4", "hard", "sdn", "linear", 4, "hard", "head"),
    ("joint-sdn-quadratic4", None, "sdn", "quadratic", 4, "hard", "head"),
    ("joint-conv2-linear4", None, "conv2", "linear", 4, "hard", "head"),
    ("joint-conv2-pareto4", None, "conv2", "pareto", 4, "hard", "head"),
    ("boosted-conv2-linear4", "hard", "conv2", "linear", 4, "hard", "head"),
    ("joint-conv1d-linear4", None, "conv1d", "linear", 4, "hard", "head"),
    ("boosted-conv1d-golden3", "hard", "conv1d", "golden", 3, "hard", "head"),
    ("joint-conv2-fine4", None, "conv2", "fine", 4, "hard", "head"),
    ("joint-sdn-at6-softmax", None, "sdn", SDN_AT, 6, "hard", "softmax"),
    ("joint-sdn-at6-head", None, "sdn", SDN_AT, 6, "hard", "head"),
    ("joint-sdn-at6-soft-softmax", None, "sdn", SDN_AT, 6, "soft", "softmax"),
    ("boosted-sdn-at6-softmax", "hard", "sdn", SDN_AT, 6, "hard", "softmax"),
    ("sdn-baseline", None, "sdn", SDN_AT, 6, "labels", "softmax"),
]


def extract(tmp: Path) -> Path:
    for split in ("train", "test"):
        with tarfile.open(SHARED / "data" / "cifar10-jpeg" / f"{split}.tar.gz") as tf:
            tf.extractall(tmp, filter="data")
    return tmp


def cuts_of(trace, cfg) -> list[str]:
    placement, n = cfg[3], cfg[4]
    if isinstance(placement, tuple):
        return choose_cuts(trace, at=placement)
    return choose_cuts(trace, n, placement)


def subset(fs: FeatureSet, sel: list[int]) -> FeatureSet:
    return FeatureSet([fs.feats[i] for i in sel], fs.final, fs.labels, fs.indices)


def operating_points(held, test, costs, k, drops):
    """For each calibration family: per target drop, thresholds chosen on held-out, test scores."""
    hs, hp, hf, hl = held
    ts, tp, tf, tl = test
    b = hs.shape[1]
    fams = {"global": global_candidates(b, k, steps=201)}
    prec = class_precision(hf, hl, k)
    for m in (0.0, 0.01, 0.02, 0.05, 0.1, 0.2):
        tab = cpm_thresholds(hs, hp, hl, k, m, 20, prec).float()
        fams.setdefault("cpm", []).extend(scaled_candidates(tab, steps=41))
    out = {}
    for fam, cands in fams.items():
        pts = [summarize(hs, hp, hf, t, costs, hl) for t in cands]
        for d in drops:
            ok = [(p["mean_relative_flops"], i) for i, p in enumerate(pts)
                  if p["backbone_accuracy"] - p["accuracy"] <= d]
            if not ok:
                continue
            i = min(ok)[1]
            out[(fam, d)] = (cands[i], summarize(ts, tp, tf, cands[i], costs, tl))
    for d in drops:  # risk control: certified on held-out (labels), delta 0.1
        cands = [as_table(None, b, k), *global_candidates(b, k, steps=201)]
        losses = torch.stack([losses_for(hs, hp, hf, t, hl) for t in cands])
        res = risk_control(losses, d, 0.1, "hb")
        if res.index is not None:
            out[("risk", d)] = (cands[res.index], summarize(ts, tp, tf, cands[res.index], costs,
                                                             tl))
    return out


def cached_features(probe, data, idx, union, tag, cache_dir) -> FeatureSet:
    """Backbone features at the union of cuts, kept on disk between runs of this script."""
    if cache_dir is None:
        return compute_features(probe, data, idx)
    from safetensors.torch import load_file, save_file

    key = hashlib.sha256(repr(union).encode()).hexdigest()[:10]
    path = Path(cache_dir) / f"{tag}-{key}.safetensors"
    if path.is_file():
        t = load_file(str(path))
        return FeatureSet([t[f"f{i}"] for i in range(len(union))], t["final"], t["labels"],
                          t["indices"])
    fs = compute_features(probe, data, idx)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({**{f"f{i}": f.contiguous() for i, f in enumerate(fs.feats)}, "final": fs.final,
               "labels": fs.labels, "indices": fs.indices}, str(path))
    return fs


def run_backbone(name: str, root: Path, args) -> tuple[list[dict], dict]:
    t0 = time.perf_counter()
    bb = create_backbone(name, checkpoint=SHARED / "weights" / "cifar-resnet" / CHECKPOINTS[name])
    trace = trace_backbone(bb.model, (32, 32))
    configs = [c for c in CONFIGS if not args.only or c[0] in args.only]
    if args.only:
        configs.sort(key=lambda c: args.only.index(c[0]))
    cut_sets = {c[0]: cuts_of(trace, c) for c in configs}
    union = sorted({x for cs in cut_sets.values() for x in cs},
                   key=lambda c: trace.cut(c).flops)
    probe = build_early_exit(trace, union, bb.num_classes, "pool")
    train_data = open_data(root, bb.preprocess, split="train")
    test_data = open_data(root, bb.preprocess, split="test")
    g = torch.Generator().manual_seed(0)
    pool = sorted(torch.randperm(len(train_data), generator=g)[:args.max_train].tolist())
    tr_pos, held_pos = split_indices(len(pool), 0.1, 0)
    feats = {}
    for key, data, idx in (("train", train_data, [pool[i] for i in tr_pos]),
                           ("held", train_data, [pool[i] for i in held_pos]),
                           ("test", test_data, list(range(len(test_data))))):
        t = time.perf_counter()
        feats[key] = cached_features(probe, data, idx, union, f"{name}-{key}-{args.max_train}",
                                     args.feature_cache)
        print(f"[{name}] features {key}: {len(idx)} images in {time.perf_counter() - t:.0f}s",
              flush=True)
    feature_s = time.perf_counter() - t0
    bb_test_acc = float((feats["test"].final.argmax(1) == feats["test"].labels).float().mean())
    rows, models = [], {}
    for cfg in configs:
        cname, mode, btype, _, _, target, score = cfg
        cuts = cut_sets[cname]
        sel = [union.index(c) for c in cuts]
        torch.manual_seed(0)
        model = build_early_exit(trace, cuts, bb.num_classes, btype, score=score)
        conf = TrainConfig(epochs=args.epochs, boosted=mode, target=target,
                           margin=DEFAULT_MARGIN)
        t = time.perf_counter()
        train_branches(model, subset(feats["train"], sel), subset(feats["held"], sel), conf)
        train_s = time.perf_counter() - t
        model.eval()
        costs = model.exit_costs()
        sides = []
        for key in ("held", "test"):
            fs = subset(feats[key], sel)
            s, p = branch_scores(model, fs)
            sides.append((s, p, fs.final.argmax(1), fs.labels))
        oracle = oracle_flops(sides[1], costs)
        for (fam, d), (thr, summ) in operating_points(sides[0], sides[1], costs,
                                                      bb.num_classes, DROPS).items():
            rows.append({"backbone": name, "config": cname, "calibration": fam,
                         "target_drop": d, "backbone_top1": bb_test_acc,
                         "ee_top1": summ["accuracy"], "drop": bb_test_acc - summ["accuracy"],
                         "relative_flops": summ["mean_relative_flops"], "oracle_flops": oracle,
                         "exit_shares": [e["share"] for e in summ["exits"]],
                         "train_s": round(train_s, 1), "feature_s": round(feature_s, 1)})
            models[(cname, fam, d)] = (model, thr)
        print(f"[{name}] {cname}: trained in {train_s:.0f}s", flush=True)
        write_report(rows, [], args)  # partial results survive an interrupted run
    timing = time_best(rows, models, bb, feats, test_data, args)
    return rows, timing


def oracle_flops(side, costs) -> float:
    s, p, f, _ = side
    agree = torch.cat([p == f[:, None], torch.ones(len(f), 1, dtype=torch.bool)], 1)
    first = agree.float().argmax(1)
    return float(torch.tensor(costs, dtype=torch.float64)[first].mean())


def time_best(rows, models, bb, feats, test_data, args) -> dict:
    ok = [r for r in rows if r["drop"] <= 0.01 and r["config"] != "sdn-baseline"]
    if not ok:
        return {}
    best = min(ok, key=lambda r: r["relative_flops"])
    model, thr = models[(best["config"], best["calibration"], best["target_drop"])]
    model.set_thresholds(thr)
    loader = make_loader(test_data, batch_size=args.batch_size)
    images = torch.cat([b.images for _, b in zip(range(args.timing_batches), loader)])
    t = wall_clock(bb.model, model, images, latency_samples=args.latency_samples,
                   batch_size=args.batch_size, repeats=3, device=torch.device("cpu"))
    lat, tput = t["latency"], t["throughput"]
    return {"backbone": best["backbone"], "config": best["config"],
            "calibration": best["calibration"], "target_drop": best["target_drop"],
            "relative_flops": best["relative_flops"], "drop": best["drop"],
            "latency_ms": {k: v["median_ms"] for k, v in lat.items()},
            "latency_p90_ms": {k: v["p90_ms"] for k, v in lat.items()},
            "throughput": tput,
            "speedup_batch1": lat["backbone"]["median_ms"] / lat["early_exit"]["median_ms"],
            "speedup_batched": tput["early_exit"] / tput["backbone"],
            "batch_size": t["batch_size"], "load_average": t["load_average"]}


def write_report(rows, timings, args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cifar-resnet.json").write_text(json.dumps(
        {"settings": vars(args), "rows": rows, "timings": timings}, indent=1, default=str))
    lines = ["# CIFAR ResNets: early exits vs the backbone (scored on shared test/)", "",
             f"Command: `python benchmarks/cifar_resnet.py {' '.join(sys.argv[1:])}`", "",
             "| backbone | config | calibration | target drop | backbone top-1 | EE top-1 | "
             "drop | rel. FLOPs | oracle FLOPs | exit shares | train s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["backbone"], r["target_drop"], r["relative_flops"])):
        lines.append(
            f"| {r['backbone']} | {r['config']} | {r['calibration']} | {r['target_drop']:.3f} | "
            f"{100 * r['backbone_top1']:.2f} | {100 * r['ee_top1']:.2f} | "
            f"{100 * r['drop']:.2f} | {r['relative_flops']:.3f} | {r['oracle_flops']:.3f} | "
            f"{' '.join(f'{s:.2f}' for s in r['exit_shares'])} | {r['train_s']} |")
    lines += ["", "## Wall clock (best configuration at <= 1 point drop on test)", ""]
    for t in timings:
        if t:
            lines.append(
                f"- {t['backbone']} {t['config']} ({t['calibration']}): rel. FLOPs "
                f"{t['relative_flops']:.3f}, drop {100 * t['drop']:.2f} pt; batch 1: backbone "
                f"{t['latency_ms']['backbone']:.2f} ms vs early exit "
                f"{t['latency_ms']['early_exit']:.2f} ms (x{t['speedup_batch1']:.2f}); batch "
                f"{t['batch_size']}: {t['throughput']['backbone']:.0f} vs "
                f"{t['throughput']['early_exit']:.0f} img/s (x{t['speedup_batched']:.2f}); "
                f"load average {t['load_average']}")
    (out / "cifar-resnet.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet44"], choices=sorted(CHECKPOINTS))
    ap.add_argument("--only", nargs="*", help="configuration names to run (default: all)")
    ap.add_argument("--max-train", type=int, default=50000)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--timing-batches", type=int, default=4)
    ap.add_argument("--latency-samples", type=int, default=300)
    ap.add_argument("--feature-cache", default=None,
                    help="folder to keep backbone features in between runs")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    if not SHARED.is_dir():
        sys.exit(f"../shared not found at {SHARED}: this benchmark needs the shared data")
    with tempfile.TemporaryDirectory() as tmp:
        root = extract(Path(tmp))
        rows, timings = [], []
        for m in args.models:
            r, t = run_backbone(m, root, args)
            rows += r
            timings.append(t)
    write_report(rows, timings, args)


if __name__ == "__main__":
    main()
