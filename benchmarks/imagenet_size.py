"""ImageNet-size backbones on 2 CPU threads: placement, branch cost, cache size, attach speed.

For seven timm/torchvision models with random weights at their own 224x224 preprocessing, on a
synthetic folder of JPEGs (written to a temp folder; images directly inside, as an unlabeled
folder is):

* placement: the cuts a default attach chooses and their FLOP fractions;
* the default branch's cost per exit, as a share of the backbone's FLOPs;
* the feature cache's bytes per image, per cut and in all;
* the caching pass's throughput (``compute_features`` with its defaults: loader workers, or
  without them a thread decoding the next batch; decode and resize once, inference mode, frozen
  channels-last graphs) against the backbone's own eager batched forward pass in inference mode,
  on already decoded tensors ("forward") and fed from the same folder by the same loader ("from
  files");
* the input pipeline alone ("decode"): the images per second that same loader (same dataset,
  workers, batch size and preprocessing: JPEG decode, resize, centre crop, normalise, collate,
  hand-over from the worker; the worker's start too, as in the caching pass) delivers when
  nothing consumes its batches but iteration. A caching pass needs both the backbone's compute
  and the decoded images, and decodes while it computes (loader workers, or the prefetch
  thread), so the slower of the two bounds it: "ceiling" is min(forward, decode), optimistic
  where they share cores, and beaten where the frozen graphs outrun the eager forward.

  The four passes alternate, round after round, and each keeps its best round, so a
  neighbour's load hits them alike (five rounds: over three, on a 2-core VM whose eager
  MobileNetV3 forward ran at 210 img/s for minutes and then at 270, one pass could miss the
  fast spell the other caught). They run over 320 images (ten batches of 32), so that the
  pipeline's start (its first, small batches decoded before any forward pass) weighs about as
  little as in a real caching pass over thousands of images: over 96 it was a third of the
  decoding;
* the time of the first training epoch (caching pass included) against the best later one,
  which trains from the cache.

    nice -n 10 python benchmarks/imagenet_size.py

writes ``benchmarks/results/imagenet-size.md`` and ``.json``. No ``../shared`` needed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pteenet.backbone._registry import create_backbone
from pteenet.cascade import build_early_exit
from pteenet.cascade._profile import steady_allocator
from pteenet.data import default_workers, make_loader, open_data, split_indices
from pteenet.graph._placement import choose_cuts
from pteenet.graph._tracing import trace_backbone
from pteenet.training._config import TrainConfig
from pteenet.training._features import compute_features
from pteenet.training._train import train_branches

MODELS = ("timm:resnet18", "timm:resnet50", "timm:mobilenetv3_large_100", "timm:efficientnet_b0",
          "timm:convnext_tiny", "torchvision:resnet50", "torchvision:mobilenet_v3_large")
RESULTS = Path(__file__).parent / "results"
BATCH = 32


def write_images(folder: Path, n: int, seed: int = 0) -> None:
    """``n`` 500x375 JPEGs (ImageNet's typical size): smooth colour fields, a few shapes and mild
    noise, so they decode like photographs rather than like pure noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:375, 0:500] / 500.0
    for i in range(n):
        a, b, c = rng.uniform(-1, 1, (3, 3))
        img = 128 + 90 * np.sin(np.stack([a[k] * 7 * xx + b[k] * 5 * yy + c[k] * 3
                                          for k in range(3)], -1))
        for _ in range(4):
            x0, y0 = rng.integers(0, 400), rng.integers(0, 300)
            img[y0:y0 + 60, x0:x0 + 80] = rng.integers(0, 256, 3)
        img += rng.normal(0, 6, img.shape)
        Image.fromarray(img.clip(0, 255).astype("uint8")).save(folder / f"{i:04d}.jpg",
                                                               quality=90)


@torch.inference_mode()
def forward_pass(model: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    t = time.perf_counter()
    for x in batches:
        model(x)
    return time.perf_counter() - t


def decode_pass(data, idx: list[int]) -> float:
    """The input pipeline alone: the loader ``compute_features`` builds (same workers, batch
    size, preprocessing), iterated with nothing consuming its batches."""
    t = time.perf_counter()
    for _ in make_loader(data, batch_size=BATCH, indices=idx, num_workers=default_workers(data)):
        pass
    return time.perf_counter() - t


@torch.inference_mode()
def folder_pass(model: torch.nn.Module, data, idx: list[int]) -> float:
    t = time.perf_counter()
    for batch in make_loader(data, batch_size=BATCH, indices=idx,
                             num_workers=default_workers(data)):
        model(batch.images)
    return time.perf_counter() - t


def caching_pass(ee, data, idx: list[int]):
    t = time.perf_counter()
    feats = compute_features(ee, data, idx, batch_size=BATCH)
    return feats, time.perf_counter() - t


def epoch_times(ee, data, epochs: int) -> dict:
    """First epoch (caching pass + one epoch of training) against the best later one (cache
    only; each includes the held-out agreement check attach runs after every epoch), with
    attach's defaults (batch size, held-out share) on a folder of their own, large enough that
    an epoch is not merely the fixed cost of its few steps."""
    train_idx, held_idx = split_indices(len(data), 0.2, 0)  # attach's val_fraction
    cfg = TrainConfig(epochs=epochs)
    start = time.perf_counter()
    train = compute_features(ee, data, train_idx, batch_size=cfg.batch_size)
    held = compute_features(ee, data, held_idx, batch_size=cfg.batch_size)
    stamps = [time.perf_counter()]
    train_branches(ee, train, held, cfg, on_epoch=lambda *_: stamps.append(time.perf_counter()))
    first = stamps[1] - start
    later = float(np.min(np.diff(stamps[1:])))  # the best later epoch, like the best round
    return {"first_epoch_s": first, "later_epoch_s": later, "epoch_speedup": first / later}


def measure(name: str, data, epoch_data, rounds: int, epochs: int) -> dict:
    bb = create_backbone(name)
    trace = trace_backbone(bb.model, bb.preprocess.input_size, with_thop=False)
    cuts = choose_cuts(trace)
    torch.manual_seed(0)
    ee = build_early_exit(trace, cuts, bb.num_classes)
    idx = list(range(len(data)))
    batches = [torch.stack([data[i][0] for i in part]) for part in np.array_split(
        idx, max(1, len(idx) // BATCH))]
    best = {"forward": np.inf, "decode": np.inf, "files": np.inf, "caching": np.inf}
    for _ in range(rounds):  # alternate, so load from other processes hits every pass alike
        best["forward"] = min(best["forward"], forward_pass(bb.model, batches))
        best["decode"] = min(best["decode"], decode_pass(data, idx))
        best["files"] = min(best["files"], folder_pass(bb.model, data, idx))
        feats, t = caching_pass(ee, data, idx)
        best["caching"] = min(best["caching"], t)
    n = len(idx)
    rate = {k: n / v for k, v in best.items()}
    ceiling = min(rate["forward"], rate["decode"])  # decoding overlaps compute
    return {
        "model": name, "gflops": trace.total_flops / 1e9,
        "preprocess": bb.preprocess.to_dict(),
        "cuts": [{"name": c, "fraction": trace.cut(c).flops / trace.total_flops,
                  "shape": list(trace.cut(c).shape), "branch_cost": cost,
                  "cache_bytes": 2 * f[0].numel()}
                 for c, cost, f in zip(cuts, ee.cost.branch, feats.feats)],
        "cache_bytes": sum(2 * f[0].numel() for f in feats.feats),
        "max_branch_cost": max(ee.cost.branch),
        "forward_img_s": rate["forward"], "from_files_img_s": rate["files"],
        "caching_img_s": rate["caching"], "decode_img_s": rate["decode"],
        "caching_vs_forward": rate["caching"] / rate["forward"],
        "caching_vs_from_files": rate["caching"] / rate["files"],
        "ceiling_img_s": ceiling,
        "caching_vs_ceiling": rate["caching"] / ceiling,
        **epoch_times(ee, epoch_data, epochs),
    }


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [
        "# ImageNet-size backbones (random weights, 224x224)", "",
        f"{s['images']} synthetic 500x375 JPEGs, {s['threads']} CPU threads, loader workers "
        f"{s['workers']}, batch {BATCH}, best of {s['rounds']} alternating rounds; load average "
        f"{s['load_average']:.1f} at the start. Epoch times: {s['epoch_images']} more such "
        f"images, attach's defaults (batch {TrainConfig().batch_size}, a fifth held out). "
        f"Command: `{s['command']}`", "",
        "decode img/s: the same loader iterated with nothing consuming its batches (the input "
        "pipeline alone). ceiling: min(forward, decode), what a caching pass that decodes while "
        "it computes could reach with the eager forward (optimistic where the two share cores; "
        "the frozen graphs can beat it).", "",
        "| model | GFLOPs | exits | max branch cost | cache / image | forward img/s | "
        "decode img/s | from files img/s | caching img/s | caching / forward | "
        "caching / from files | caching / ceiling | "
        "first epoch s | later epoch s | speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["models"]:
        lines.append(
            f"| {r['model']} | {r['gflops']:.2f} | {len(r['cuts'])} | "
            f"{100 * r['max_branch_cost']:.2f} % | {r['cache_bytes'] / 1024:.1f} KB | "
            f"{r['forward_img_s']:.1f} | {r['decode_img_s']:.1f} | {r['from_files_img_s']:.1f} | "
            f"{r['caching_img_s']:.1f} | {r['caching_vs_forward']:.2f} | "
            f"{r['caching_vs_from_files']:.2f} | {r['caching_vs_ceiling']:.2f} | "
            f"{r['first_epoch_s']:.2f} | {r['later_epoch_s']:.3f} | {r['epoch_speedup']:.0f}x |")
    lines += ["", "## Placement (cut: FLOP fraction, branch cost, cache bytes per image)", ""]
    for r in report["models"]:
        cuts = "; ".join(f"`{c['name']}` {c['fraction']:.2f}, {100 * c['branch_cost']:.2f} %, "
                         f"{c['cache_bytes']} B" for c in r["cuts"])
        lines.append(f"- **{r['model']}**: {cuts}")
    return "\n".join(lines) + "\n"


def main() -> None:
    steady_allocator()  # as the caching pass runs: the forward baseline too, from round 1
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=320)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--epoch-images", type=int, default=512)
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory() as more:
        write_images(Path(tmp), args.images)
        write_images(Path(more), args.epoch_images, seed=1)
        load = os.getloadavg()[0]
        for name in args.models:
            pre = create_backbone(name).preprocess
            data, epoch_data = open_data(tmp, pre), open_data(more, pre)
            rows.append(measure(name, data, epoch_data, args.rounds, args.epochs))
            r = rows[-1]
            print(f"{name}: cache {r['cache_bytes'] / 1024:.1f} KB, max branch "
                  f"{100 * r['max_branch_cost']:.2f} %, caching/forward "
                  f"{r['caching_vs_forward']:.2f}, caching/from files "
                  f"{r['caching_vs_from_files']:.2f}, decode {r['decode_img_s']:.1f} img/s, "
                  f"caching/ceiling {r['caching_vs_ceiling']:.2f}, "
                  f"epochs {r['first_epoch_s']:.2f}s -> "
                  f"{r['later_epoch_s']:.3f}s", flush=True)
        workers = default_workers(data)
    report = {"settings": {"images": args.images, "epoch_images": args.epoch_images,
                           "threads": args.threads, "rounds": args.rounds,
                           "workers": workers, "load_average": load,
                           "command": "python benchmarks/imagenet_size.py "
                                      + " ".join(sys.argv[1:])},
              "models": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "imagenet-size.json").write_text(json.dumps(report, indent=1))
    md = markdown(report)
    (args.out / "imagenet-size.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
