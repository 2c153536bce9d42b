"""Benchmark a bundle: what the early exits save against the untouched backbone, measured.

:func:`bench` is what ``pteenet bench`` runs. It answers two separate questions, because FLOPs
and wall clock disagree often enough that reporting one alone misleads:

* **Quality and work**, from one pass over held-out data: top-1 (when labels exist), agreement
  with the backbone, the share of samples leaving at each exit and the mean relative FLOPs per
  sample, counted by the real early-exit run (segments run plus every branch evaluated, per
  sample, after batch compaction). The same pass records every branch's score and prediction, so
  the *oracle* (every sample leaves at the earliest exit whose branch already agrees with the
  backbone: the floor for these branches) and the optional threshold sweep are computed by
  simulation with the exact exit rule the model applies, without running anything again.
* **Wall clock**: the untouched backbone and the early-exit model, timed in the same process and
  interleaved (so drift in clock speed or background load hits both alike), after warm-up, under
  ``torch.inference_mode``: batch-1 latency (median and p90) over real images and throughput at a
  batch size over real batches (median of repeats). CUDA is timed with CUDA events.

Data defaults to the bundle's own data: its test split when there is one, else the held-out
calibration samples of its train split, never the samples the branches were trained on.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .atomic import atomic_path, write_text, writes_into
from .bundle import BundleInfo, ThresholdTable, load, read_bundle
from .data import DATASET_NAMES, ImageData, available_splits, make_loader, open_data
from .derived import BUNDLE_HASH_KEY
from .devices import check_device, threads
from .early_exit import EarlyExitModel, cascade_cost
from .errors import BundleError, DataError, OptionError
from .latency import device_name, steady_allocator
from .progress import single_bar
from .thresholds import exit_index, global_candidates, scaled_candidates, summarize

__all__ = [
    "BENCH_FILE",
    "SWEEP_CSV",
    "SWEEP_PNG",
    "Clock",
    "EvalSet",
    "Pass",
    "bench",
    "measure_pass",
    "oracle_flops",
    "plot_sweep",
    "quality",
    "select_data",
    "sweep_points",
    "time_profile",
    "wall_clock",
]

BENCH_FILE = "bench.json"
SWEEP_PNG = "sweep.png"
SWEEP_CSV = "sweep.csv"
SWEEP_STEPS = 51
WARMUP = 3
THROUGHPUT_BATCHES = 3
TIMING_BYTES = 1 << 30  # real images kept in memory for timing, at most


# -- data -------------------------------------------------------------------------------------
@dataclass
class EvalSet:
    """The samples benchmarked: a dataset, the indices used, and how they were chosen."""

    data: ImageData
    indices: list[int]
    spec: str
    split: str
    subset: str  # "all" or "held-out calibration"
    labels_usable: bool
    notes: list[str] = field(default_factory=list)


def _is_name(spec: str) -> bool:
    return spec.strip().lower().replace("_", "-") in DATASET_NAMES


def _same_data(a: str, b: str) -> bool:
    """Whether two data specs name the same data (so the bundle's split indices apply)."""
    if _is_name(a) or _is_name(b):
        return a.strip().lower().replace("_", "-") == b.strip().lower().replace("_", "-")
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def _labels_usable(info: BundleInfo, data: ImageData) -> bool:
    """Labels only count when they index the backbone's classes in the same order."""
    if data.classes is None or len(data.classes) != info.num_classes:
        return False
    return info.classes is None or list(info.classes) == list(data.classes)


def select_data(info: BundleInfo, data: str | os.PathLike | None = None,
                split: str | None = None, max_samples: int | None = None) -> EvalSet:
    """Pick the benchmark samples: the test split, else the bundle's held-out calibration set."""
    spec = str(data) if data is not None else info.data.get("spec")
    if not spec:
        raise BundleError(f"{info.path}: the bundle does not record its data; pass --data")
    if split is None:
        split = "test" if "test" in available_splits(spec) else "train"
    dataset = open_data(spec, info.preprocess, split=split)
    key = "test" if str(split).lower() in ("test", "val") else "train"
    own = _same_data(spec, str(info.data.get("spec", ""))) and info.data.get("split") == key
    notes: list[str] = []
    if own:
        indices, subset = _held_out(info, dataset), "held-out calibration"
        notes.append("measured on the bundle's held-out calibration samples of its train split "
                     "(never those trained on): thresholds calibrated on them look optimistic")
    else:
        indices, subset = list(range(len(dataset))), "all"
    indices = _subsample(indices, max_samples)
    usable = _labels_usable(info, dataset)
    if dataset.has_labels and not usable:
        notes.append("the data's classes do not match the backbone's: top-1 is not reported")
    return EvalSet(dataset, indices, spec, key, subset, usable, notes)


def _held_out(info: BundleInfo, dataset: ImageData) -> list[int]:
    idx = list(info.calibration_indices)
    if not idx:
        raise BundleError(f"{info.path}: no held-out samples recorded and no test split; "
                          f"pass --data with a test/ folder")
    if max(idx) >= len(dataset):
        raise DataError(f"{dataset.name} has {len(dataset)} images but the bundle's held-out "
                        f"indices go up to {max(idx)}: the data changed since attach")
    return idx


def _subsample(indices: list[int], max_samples: int | None) -> list[int]:
    """A seeded subset, so quick runs are repeatable."""
    if max_samples is None or max_samples >= len(indices):
        return indices
    pick = torch.randperm(len(indices), generator=torch.Generator().manual_seed(0))[:max_samples]
    return [indices[i] for i in sorted(pick.tolist())]


# -- the measuring pass -----------------------------------------------------------------------
@dataclass
class Pass:
    """Everything one pass over the samples recorded (CPU tensors, input order)."""

    scores: Tensor  # [N, B] every branch's exit score
    preds: Tensor  # [N, B] every branch's argmax
    final: Tensor  # [N] the backbone's argmax
    labels: Tensor | None  # [N] or None
    ee_preds: Tensor  # [N] the real early-exit run's answer
    ee_exit: Tensor  # [N] the exit it took
    ee_flops: Tensor  # [N] float64 FLOPs it spent
    images: Tensor  # [M, 3, H, W] the first real images, kept for timing
    skipped: int = 0

    def __len__(self) -> int:
        return int(self.final.numel())


def _run_batch(model: EarlyExitModel, x: Tensor) -> list[Tensor]:
    """Branch scores and predictions at every exit, plus the real early-exit run, on one batch."""
    feats, final = model.reduced_features(x)
    logits, conf = model.branch_outputs(feats)
    scores = model.all_scores(logits, conf)
    preds = torch.stack([lg.argmax(1) for lg in logits], 1)
    res = model(x)
    return [t.cpu() for t in (scores, preds, final.argmax(1), res.preds, res.exit_index,
                              res.flops)]


def measure_pass(model: EarlyExitModel, ev: EvalSet, *, batch_size: int, device: torch.device,
                 keep: int, progress: Callable[[int], None] | None = None) -> Pass:
    """One pass: per batch, the backbone's features (for branch scores) and the real EE run."""
    loader = make_loader(ev.data, batch_size=batch_size, indices=ev.indices)
    cols: list[list[Tensor]] = [[] for _ in range(7)]
    kept: list[Tensor] = []
    n_kept, skipped = 0, 0
    with torch.inference_mode():
        for batch in loader:
            skipped += batch.skipped
            if batch.images is not None:
                for col, t in zip(cols, [*_run_batch(model, batch.images.to(device)),
                                         batch.labels]):
                    col.append(t)
                if n_kept < keep:
                    kept.append(batch.images[:keep - n_kept].clone())
                    n_kept += len(kept[-1])
            if progress:
                progress(len(batch) + batch.skipped)
    if not cols[0]:
        raise DataError(f"none of the {len(ev.indices)} images in {ev.data.name} could be read")
    s, p, f, ep, ee, fl, lab = (torch.cat(c) for c in cols)
    return Pass(s.float(), p, f, lab if ev.labels_usable else None, ep, ee, fl.double(),
                torch.cat(kept), skipped)


def _images_to_keep(info: BundleInfo, latency_samples: int, batch_size: int) -> int:
    """Enough real images for timing, within TIMING_BYTES (at least one batch)."""
    h, w = info.preprocess.input_size
    cap = max(batch_size, TIMING_BYTES // (3 * h * w * 4))
    return min(max(latency_samples, THROUGHPUT_BATCHES * batch_size), cap)


# -- quality and work -------------------------------------------------------------------------
def _rate(flags: Tensor) -> float:
    return float(flags.double().mean())


def oracle_flops(preds: Tensor, final: Tensor, costs: Sequence[float]) -> tuple[float, list[int]]:
    """Mean relative FLOPs if every sample left at the earliest branch agreeing with the backbone.

    Samples no branch gets right pay ``costs[-1]`` (every branch evaluated, then the backbone's
    head), as they would under any threshold table that keeps them; so no table for these
    branches reaches 100 % agreement for less. Returns the mean and the count per exit.
    """
    b = preds.shape[1]
    agree = torch.cat([preds == final[:, None], torch.ones_like(final, dtype=torch.bool)[:, None]],
                      dim=1)
    first = agree.to(torch.uint8).argmax(1)
    cost = torch.tensor(list(costs), dtype=torch.float64)
    return float(cost[first].mean()), torch.bincount(first, minlength=b + 1).tolist()


def _exit_rows(p: Pass, costs: Sequence[float], oracle_counts: list[int],
               model: EarlyExitModel) -> list[dict]:
    n, rows = len(p), []
    on = [*model.active, True]
    own = [f / model.backbone_flops for f in model.branch_flops] + [None]
    agree = p.ee_preds == p.final
    right = None if p.labels is None else p.ee_preds == p.labels
    for k, cost in enumerate(costs):
        taken = p.ee_exit == k
        count = int(taken.sum())
        rows.append({
            "exit": k, "name": "backbone" if k == len(costs) - 1 else f"branch {k}",
            "relative_flops": float(cost), "count": count, "share": count / n,
            "agreement": _rate(agree[taken]) if count else None,
            "top1": _rate(right[taken]) if count and right is not None else None,
            "oracle_share": oracle_counts[k] / n, "on": on[k], "branch_cost": own[k],
        })
    return rows


def quality(p: Pass, model: EarlyExitModel) -> dict[str, Any]:
    """Top-1, agreement, real mean relative FLOPs and exit shares; the oracle's FLOPs."""
    costs = model.exit_costs(kind="flops")
    oracle, counts = oracle_flops(p.preds, p.final, costs)
    top1 = (lambda pred: None) if p.labels is None else (lambda pred: _rate(pred == p.labels))
    return {
        "early_exit": {"top1": top1(p.ee_preds), "agreement": _rate(p.ee_preds == p.final),
                       "relative_flops": float((p.ee_flops / model.backbone_flops).mean()),
                       "exits": _exit_rows(p, costs, counts, model)},
        "backbone": {"top1": top1(p.final), "agreement": 1.0, "relative_flops": 1.0},
        "oracle": {"relative_flops": oracle, "agreement": 1.0, "top1": top1(p.final),
                   "shares": [c / len(p) for c in counts]},
    }


def _simulation_check(p: Pass, model: EarlyExitModel) -> dict[str, Any]:
    """How often the simulated exit rule (used by the sweep) matches the real run's exits."""
    s = summarize(p.scores, p.preds, p.final, model.thresholds.cpu(),
                  model.exit_costs(kind="flops"), p.labels)
    same = exit_index(p.scores, p.preds, model.thresholds.cpu()) == p.ee_exit
    return {"exit_match": _rate(same), "relative_flops": s["mean_relative_flops"],
            "agreement": s["agreement"]}


# -- wall clock -------------------------------------------------------------------------------
class Clock:
    """Times one call: CUDA events on CUDA (GPU time, synchronised), perf_counter elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self, fn: Callable[[Tensor], Any], x: Tensor) -> float:
        """Seconds one ``fn(x)`` takes, with all earlier queued work finished first."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            fn(x)
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000.0
        self._sync()
        t0 = time.perf_counter()
        fn(x)
        self._sync()
        return time.perf_counter() - t0

    def _sync(self) -> None:
        if self.device.type == "mps":
            torch.mps.synchronize()


def _interleaved(models: dict[str, Callable], rounds: int) -> Iterator[tuple[int, str, Callable]]:
    """Yield (round, name, fn), alternating which model goes first, so neither is favoured."""
    pairs = list(models.items())
    for r in range(rounds):
        for name, fn in pairs if r % 2 == 0 else pairs[::-1]:
            yield r, name, fn


def _latency(models: dict[str, Callable], images: Tensor, samples: int,
            clock: Clock) -> dict[str, dict[str, float]]:
    """Batch-1 latency over ``samples`` real images (cycled if fewer): median and p90, in ms."""
    times: dict[str, list[float]] = {k: [] for k in models}
    for _, fn in models.items():
        for i in range(min(WARMUP, len(images))):
            fn(images[i:i + 1])
    for r, name, fn in _interleaved(models, samples):
        i = r % len(images)
        times[name].append(clock(fn, images[i:i + 1]) * 1000.0)
    return {k: {"median_ms": statistics.median(v), "p10_ms": float(np.percentile(v, 10)),
                "p90_ms": float(np.percentile(v, 90))} for k, v in times.items()}


def _throughput(models: dict[str, Callable], batches: list[Tensor], repeats: int,
               clock: Clock) -> dict[str, list[float]]:
    """Images per second over real batches: each repeat runs every batch; every repeat's rate."""
    n = sum(len(b) for b in batches)
    for fn in models.values():
        fn(batches[0])
    rates: dict[str, list[float]] = {k: [] for k in models}
    for _, name, fn in _interleaved(models, repeats):
        rates[name].append(n / sum(clock(fn, b) for b in batches))
    return rates


def _timing_batches(images: Tensor, batch_size: int) -> list[Tensor]:
    """Up to THROUGHPUT_BATCHES full batches (one smaller batch when there are too few images)."""
    full = min(THROUGHPUT_BATCHES, len(images) // batch_size)
    if full == 0:
        return [images]
    return list(images[:full * batch_size].split(batch_size))


def wall_clock(backbone: nn.Module, model: EarlyExitModel, images: Tensor, *,
               latency_samples: int, batch_size: int, repeats: int,
               device: torch.device) -> dict[str, Any]:
    """Time the untouched backbone and the early-exit model side by side on the same images."""
    images = images.to(device)
    models = {"backbone": backbone, "early_exit": model}
    clock = Clock(device)
    batches = _timing_batches(images, batch_size)
    with torch.inference_mode():
        lat = _latency(models, images, latency_samples, clock) if latency_samples else None
        rates = _throughput(models, batches, repeats, clock)
    return {"latency": lat, "throughput": {k: statistics.median(v) for k, v in rates.items()},
            "throughput_range": {k: [min(v), max(v)] for k, v in rates.items()},
            "batch_size": len(batches[0]),
            "batches": len(batches), "repeats": repeats, "latency_samples": latency_samples,
            "distinct_latency_images": min(latency_samples, len(images)),
            "clock": "cuda events" if device.type == "cuda" else "perf_counter",
            "cpu_threads": torch.get_num_threads(), "load_average": _load_average()}


def _load_average() -> float | None:
    """The 1-minute load average (None where the OS has none), to judge the timings by."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return None


def _busy_note(timing: dict[str, Any]) -> str | None:
    """Other work competing for the cores skews wall clock (OpenMP threads wait on each other)."""
    load, cores = timing["load_average"], os.cpu_count() or 1
    if load is None or load <= cores:
        return None
    return (f"the machine was busy while timing (load {load:.1f} on {cores} cores): wall-clock "
            f"numbers are unreliable; FLOPs and quality are not affected")


def _speedups(timing: dict[str, Any], flops: float) -> dict[str, float | None]:
    lat, tput = timing["latency"], timing["throughput"]
    return {
        "flops": 1.0 / flops,
        "latency": None if lat is None else
        lat["backbone"]["median_ms"] / lat["early_exit"]["median_ms"],
        "throughput": tput["early_exit"] / tput["backbone"],
    }


# -- time profile -----------------------------------------------------------------------------
def time_profile(model: EarlyExitModel, images: Tensor, batch_size: int,
                 shares: Sequence[float]) -> dict[str, Any]:
    """Each segment's and branch's measured time beside its FLOPs, and the *ideal* speedups the
    exit shares imply with those times (no bookkeeping, perfect batching), to hold the
    achieved ones against."""
    prof = model.profile(images, batch_size=batch_size)
    total = model.backbone_flops
    pieces = [{"piece": f"segment {k}", "flops_share": f / total, "ms": m, "ms_batched": mb}
              for k, (f, m, mb) in enumerate(zip(model.segment_flops, prof.segment_ms,
                                                  prof.segment_ms_batched))]
    pieces += [{"piece": f"branch {k}", "flops_share": f / total, "ms": m, "ms_batched": mb,
                "on": on}
               for k, (f, m, mb, on) in enumerate(zip(model.branch_flops, prof.branch_ms,
                                                       prof.branch_ms_batched, model.active))]
    active = torch.tensor(model.active)
    share = torch.tensor(list(shares), dtype=torch.float64)
    ideal = {}
    for key, batched in (("latency", False), ("throughput", True)):
        exit_time = cascade_cost(*prof.costs(batched), active)
        ideal[key] = 1.0 / float((share * exit_time).sum())
    return {"device": prof.device, "threads": prof.threads, "batch_size": prof.batch_size,
            "pieces": pieces, "ideal_speedup": ideal}


def _profile_note(info: BundleInfo, device: str) -> str | None:
    """Latency-cost bundles rank exits by times from one machine; say when this is another."""
    if info.cost != "latency" or info.latency is None or info.latency.device == device:
        return None
    return (f"the bundle's costs are times measured on {info.latency.device}; this run is on "
            f"{device}: run `pteenet calibrate --cost latency` here to re-rank the exits")


def _efficiency(speedup: dict[str, float | None], prof: dict[str, Any]) -> dict[str, Any]:
    """Ideal speedups from measured times and exit shares, and achieved / ideal."""
    ideal = prof["ideal_speedup"]
    out: dict[str, Any] = {"ideal_latency": ideal["latency"],
                           "ideal_throughput": ideal["throughput"]}
    for key in ("latency", "throughput"):
        got = speedup.get(key)
        out[f"{key}_of_ideal"] = None if got is None else got / ideal[key]
    return out


# -- sweep ------------------------------------------------------------------------------------
def _is_global(table: Tensor) -> bool:
    return bool((table == table.flatten()[0]).all())


def sweep_points(p: Pass, table: Tensor, costs: Sequence[float],
                 steps: int = SWEEP_STEPS) -> dict[str, Any]:
    """Quality vs mean relative FLOPs as thresholds go from conservative to permissive.

    A global table sweeps one threshold from 1 to 0; a per-class table is scaled from all ones
    (s = 0) to itself (s = 1) by :func:`~pteenet.thresholds.scaled_candidates`, keeping its shape.
    Simulated from the recorded scores with the model's own exit rule.
    """
    if _is_global(table):
        name, values = "threshold", torch.linspace(1.0, 0.0, steps).tolist()
        tables = global_candidates(table.shape[0], table.shape[1], steps)
    else:
        name, values = "scale", torch.linspace(0.0, 1.0, steps).tolist()
        tables = scaled_candidates(table.cpu(), steps)
    points = []
    for v, t in zip(values, tables):
        s = summarize(p.scores, p.preds, p.final, t, costs, p.labels)
        points.append({name: round(float(v), 6), "relative_flops": s["mean_relative_flops"],
                       "agreement": s["agreement"], "top1": s["accuracy"],
                       "shares": [e["share"] for e in s["exits"]]})
    return {"parameter": name, "metric": "agreement" if p.labels is None else "top1",
            "points": points}


def _write_sweep_csv(path: Path, sweep: dict[str, Any]) -> None:
    """One row per sweep point: the parameter, FLOPs, quality and every exit's share."""
    buf = io.StringIO()
    w = csv.writer(buf)
    b = len(sweep["points"][0]["shares"])
    w.writerow([sweep["parameter"], "relative_flops", "agreement", "top1",
                *[f"share_exit_{k}" for k in range(b)]])
    for pt in sweep["points"]:
        w.writerow([pt[sweep["parameter"]], f"{pt['relative_flops']:.6f}",
                    f"{pt['agreement']:.6f}", "" if pt["top1"] is None else f"{pt['top1']:.6f}",
                    *[f"{s:.6f}" for s in pt["shares"]]])
    write_text(path, buf.getvalue())


def plot_sweep(path: Path, sweep: dict[str, Any], result: dict[str, Any]) -> None:
    """The trade-off curve with the backbone, the oracle and the measured operating point."""
    from matplotlib.figure import Figure  # Agg via savefig; never touches pyplot's state

    metric = sweep["metric"]
    label = "top-1 (%)" if metric == "top1" else "agreement with backbone (%)"
    fig = Figure(figsize=(6, 4.2), dpi=120)
    ax = fig.add_subplot()
    pts = sweep["points"]
    ax.plot([q["relative_flops"] for q in pts], [100 * q[metric] for q in pts], "-o",
            ms=3, label=_sweep_rule(sweep, result["thresholds"]))
    th = result["thresholds"]
    now = f"--threshold {th['value']}" if th["source"] == "--threshold" else \
        f"the bundle's {th['method']} table"
    for key, marker, text in (("backbone", "*", "backbone (no exits)"),
                              ("oracle", "D", "oracle: first agreeing exit (floor)"),
                              ("early_exit", "s", f"current thresholds: {now} (measured)")):
        r = result[key]
        ax.plot([r["relative_flops"]], [100 * r[metric]], marker, ms=10, label=text)
    ax.set_xlabel("mean FLOPs per sample (relative to the backbone)")
    ax.set_ylabel(label)
    b, d = result["bundle"], result["data"]
    ax.set_title(f"{b['backbone']}, {b['branches']} exits: {d['num_samples']} images "
                 f"({d['split']})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={  # which bundle it shows (pteenet.derived)
            "Description": f"pteenet sweep; {BUNDLE_HASH_KEY} {result['bundle']['sha256']}"})


def _sweep_rule(sweep: dict[str, Any], thresholds: dict[str, Any]) -> str:
    """The curve's legend entry: which thresholds it moves, and how."""
    if sweep["parameter"] == "threshold":
        return f"one global threshold on the {thresholds['score']} score, 1 to 0"
    return f"the {thresholds['method']} table scaled from never (0) to itself (1)"


# -- checks -----------------------------------------------------------------------------------
def _check_options(threshold: float | None, batch_size: int, latency_samples: int, repeats: int,
                  max_samples: int | None) -> None:
    """Refuse bad values before anything heavy is loaded, one line each."""
    if threshold is not None and (math.isnan(threshold) or threshold < 0):
        raise OptionError(f"--threshold must be >= 0 (0 = always exit, above 1 = never), "
                          f"got {threshold}")
    if batch_size < 1:
        raise OptionError(f"--batch-size must be at least 1, got {batch_size}")
    if latency_samples < 0:
        raise OptionError(f"--latency-samples must be >= 0 (0 skips it), got {latency_samples}")
    if repeats < 1:
        raise OptionError(f"repeats must be at least 1, got {repeats}")
    if max_samples is not None and max_samples < 1:
        raise OptionError(f"--max-samples must be at least 1, got {max_samples}")


# -- the whole job ----------------------------------------------------------------------------
def _json_table(t: Tensor) -> list[list[float | None]]:
    return [[None if math.isinf(v) else float(v) for v in row] for row in t.tolist()]


def _write_outputs(folder: Path, result: dict[str, Any], sweep: bool, out_json: bool) -> None:
    """bench.json (and the sweep's files) beside the bundle, each written atomically."""
    files: dict[str, str] = {}
    try:
        if sweep:
            _write_sweep_csv(folder / SWEEP_CSV, result["sweep"])
            plot_sweep(folder / SWEEP_PNG, result["sweep"], result)
            files.update(sweep_csv=str(folder / SWEEP_CSV), sweep_png=str(folder / SWEEP_PNG))
        if out_json:
            files["bench_json"] = str(folder / BENCH_FILE)
        result["files"] = files
        if out_json:
            write_text(folder / BENCH_FILE, json.dumps(result, indent=1, allow_nan=False) + "\n")
    except OSError as e:
        raise BundleError(f"cannot write results into {folder} ({e.strerror or e}); "
                          f"check the folder's permissions and free space") from e


@writes_into("bundle", when="out_json")  # bench.json: one writer at a time, writability first
def bench(
    bundle: str | os.PathLike = "pteenet-out",
    *,
    data: str | os.PathLike | None = None,
    split: str | None = None,
    threshold: float | None = None,
    batch_size: int = 256,
    latency_samples: int = 200,
    repeats: int = 5,
    sweep: bool = False,
    device: str = "cpu",
    checkpoint: str | os.PathLike | None = None,
    force: bool = False,
    out_json: bool = True,
    progress: bool = False,
    max_samples: int | None = None,
    num_threads: int | None = None,
    profile: bool = True,
) -> dict[str, Any]:
    """Measure a bundle's early exits against its untouched backbone (see the module docstring).

    ``threshold`` replaces the bundle's table with one global value (0 = every sample leaves at
    the first exit; above 1 or inf = none leaves early). ``out_json`` writes ``bench.json`` into
    the bundle folder; ``sweep`` also writes ``sweep.png`` and ``sweep.csv`` there.
    ``num_threads`` sets the CPU threads for the whole run; ``profile`` times every segment and
    branch (:func:`time_profile`). Returns the same JSON-serialisable dict.
    """
    _check_options(threshold, batch_size, latency_samples, repeats, max_samples)
    with threads(num_threads):
        return _bench(bundle, data, split, threshold, batch_size, latency_samples, repeats,
                      sweep, device, checkpoint, force, out_json, progress, max_samples, profile)


def _bench(bundle, data, split, threshold, batch_size, latency_samples, repeats, sweep, device,
           checkpoint, force, out_json, progress, max_samples, profile) -> dict[str, Any]:
    dev = check_device(device)
    b = read_bundle(bundle)  # read once: the model, the table and the info agree
    info, table = b.info, b.table
    ev = select_data(info, data, split, max_samples)
    model = load(b, checkpoint=checkpoint, force=force, device=dev)
    if threshold is not None:
        model.set_thresholds(float(threshold))
    backbone = model.whole  # the eager backbone the segments were traced from (built once)
    keep = _images_to_keep(info, latency_samples, batch_size)
    with single_bar(progress, "measuring", len(ev.indices)) as tick:
        p = measure_pass(model, ev, batch_size=batch_size, device=dev, keep=keep, progress=tick)
    result = _assemble(info, ev, table, threshold, model, p, b.sha256)
    if threshold is None and table.method == "none":
        result["warnings"].append("the bundle's thresholds were never calibrated (no "
                                  "thresholds.json): every exit is off and this measures the "
                                  "backbone; run `pteenet calibrate` or pass --threshold")
    steady = dev.type == "cpu" and steady_allocator()  # both models alike: see its docstring
    result["timing"] = wall_clock(backbone, model, p.images, latency_samples=latency_samples,
                                  batch_size=batch_size, repeats=repeats, device=dev)
    result["timing"]["allocator"] = "steady (mallopt)" if steady else "default"
    result["speedup"] = _speedups(result["timing"], result["early_exit"]["relative_flops"])
    result["profile"] = time_profile(model, p.images.to(dev), result["timing"]["batch_size"],
                                     [e["share"] for e in result["early_exit"]["exits"]]) \
        if profile else None
    if result["profile"]:
        result["speedup"].update(_efficiency(result["speedup"], result["profile"]))
    for note in (_busy_note(result["timing"]), _profile_note(info, device_name(dev))):
        if note:
            result["notes"].append(note)
    result["sweep"] = sweep_points(p, model.thresholds.cpu(), model.exit_costs(kind="flops")) \
        if sweep else None
    _write_outputs(info.path, result, sweep, out_json)
    return result


def _assemble(info: BundleInfo, ev: EvalSet, table: ThresholdTable, threshold: float | None,
              model: EarlyExitModel, p: Pass, sha256: str | None) -> dict[str, Any]:
    """The result dict's description of what was measured, plus the quality numbers."""
    return {
        "bundle": {"path": str(info.path), "backbone": f"{info.backbone['source']}:"
                   f"{info.backbone['name']}", "branches": info.num_branches,
                   "num_classes": info.num_classes, "backbone_flops": model.backbone_flops,
                   "sha256": sha256},
        "data": {"spec": ev.spec, "split": ev.split, "subset": ev.subset,
                 "num_samples": len(p), "skipped": p.skipped, "labels": p.labels is not None},
        "thresholds": {"source": "bundle" if threshold is None else "--threshold",
                       "method": table.method if threshold is None else "global",
                       "score": model.score,
                       "value": None if threshold is None or math.isinf(threshold)
                       else float(threshold),
                       "table": _json_table(model.thresholds.cpu())},
        "exit_costs": [float(c) for c in model.exit_costs(kind="flops")],
        **quality(p, model),
        "simulation": _simulation_check(p, model),
        "notes": list(ev.notes),
        "warnings": [],
    }
