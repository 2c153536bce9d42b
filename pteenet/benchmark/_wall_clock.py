"""Wall clock: the untouched backbone and the early-exit model timed side by side.

Both run in the same process and take turns (so drift in clock speed or background load hits
both alike), after warm-up, under ``torch.inference_mode``: batch-1 latency over real images
and throughput at a batch size over real batches (median of repeats). The batch-1 speedup is
the ratio of *mean* latencies, the time per image of a stream served one at a time: early exit
makes latency bimodal (most images leave early, the rest pay every branch on the way), so the
median flatters it and cannot be held against the ideal, which is an expectation too. The median
and p10/p90/p95/p99 are reported beside it. CUDA is timed with CUDA events.

A third model is timed with them: the backbone as the early-exit model runs it, every segment
in a row with no branch (on a CPU, frozen graphs: :mod:`pteenet.cascade`). The speedup over the
untouched backbone is what a user gets; the speedup over the segments in a row is what the
early exits alone earn, and that one is held against the ideal. :func:`time_profile` times each
segment and branch, and the speedups those times and the exit shares imply.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pteenet.benchmark._onnx_runs import PLAIN_RUNTIMES
from pteenet.bundle._schema import BundleInfo
from pteenet.cascade._frozen import direct
from pteenet.cascade._model import EarlyExitModel
from pteenet.cascade._profile import REPEATS, batched_repeats, exit_times, probe_batch
from pteenet.progress import single_bar

__all__ = ["Clock", "busy_note", "efficiency", "images_to_keep", "profile_note",
           "segments_in_a_row", "speedups", "time_profile", "wall_clock"]

WARMUP = 3
LATENCY_REPEATS = 3  # batch-1 calls per image; its median is its time
LATENCY_BLOCK = 50  # images one model runs in a row before the next takes its turn
THROUGHPUT_BATCHES = 3
SETTLE_S = 0.05  # pause before each model's turn: the last runtime's spinning threads go idle
TIMING_BYTES = 1 << 30  # real images kept in memory for timing, at most


def images_to_keep(info: BundleInfo, latency_samples: int, batch_size: int) -> int:
    """Enough real images for timing, within TIMING_BYTES (at least one batch)."""
    h, w = info.preprocess.input_size
    cap = max(batch_size, TIMING_BYTES // (3 * h * w * 4))
    return min(max(latency_samples, THROUGHPUT_BATCHES * batch_size), cap)


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


def batch1_latency(models: dict[str, Callable], images: Tensor, samples: int,
             clock: Callable[[Callable, Tensor], float],
             tick: Callable[[int], None] | None = None) -> dict[str, dict[str, float]]:
    """Batch-1 latency over ``samples`` real images (cycled if fewer): mean, median, p10, p90,
    p95 and p99 over images, in ms (the tail a serving engineer sizes for: early exit makes
    latency bimodal, so the p99 is a sample that ran the whole cascade).

    The models take turns in blocks of LATENCY_BLOCK images, the order rotating from block to
    block, so drift hits them alike while each runs as a one-by-one stream does, on caches
    holding its own weights (each block starts with one untimed call); alternated call by call,
    every call found the caches full of another model's weights. Each image is timed
    LATENCY_REPEATS times, in separate sweeps, and its median is its time: a call the OS
    preempted is an outlier of that call, not a slow image, and one 20 ms stall among a few
    hundred 3 ms calls would otherwise move the mean by several percent. Each turn starts
    after a pause of SETTLE_S: the workers of the runtime that ran before (onnxruntime's
    spinning sessions, OpenMP's) spin on after their call and would take the cores from the
    next (the exported cascade timed beside four other runtimes: 1.36x the ONNX backbone's
    batch-1 speed without the pause, 1.65x with; 1.69x timed against it alone).
    """
    for _, fn in models.items():
        for i in range(min(WARMUP, len(images))):
            fn(images[i:i + 1])
    calls: dict[str, list[list[float]]] = {k: [[] for _ in range(samples)] for k in models}
    order = list(models.items())
    for sweep in range(LATENCY_REPEATS):
        for b, start in enumerate(range(0, samples, LATENCY_BLOCK)):
            turn = (b + sweep) % len(order)
            for name, fn in order[turn:] + order[:turn]:
                time.sleep(SETTLE_S)
                fn(images[start % len(images)][None])  # untimed: the stream is under way
                for i in range(start, min(start + LATENCY_BLOCK, samples)):
                    j = i % len(images)
                    calls[name][i].append(clock(fn, images[j:j + 1]) * 1000.0)
                if tick:
                    tick(min(start + LATENCY_BLOCK, samples) - start)
    per_image = {k: [statistics.median(c) for c in v] for k, v in calls.items()}
    return {k: {"mean_ms": statistics.fmean(v), "median_ms": statistics.median(v),
                **{f"p{q}_ms": float(np.percentile(v, q)) for q in (10, 90, 95, 99)}}
            for k, v in per_image.items()}


def _throughput(models: dict[str, Callable], batches: list[Tensor], repeats: int,
                clock: Clock, tick: Callable[[int], None] | None = None
                ) -> dict[str, list[float]]:
    """Images per second over real batches: each repeat runs every batch, after a pause of
    SETTLE_S (see :func:`batch1_latency`); every repeat's rate."""
    n = sum(len(b) for b in batches)
    for fn in models.values():
        fn(batches[0])
    rates: dict[str, list[float]] = {k: [] for k in models}
    for _, name, fn in _interleaved(models, repeats):
        time.sleep(SETTLE_S)
        rates[name].append(n / sum(clock(fn, b) for b in batches))
        if tick:
            tick(n)
    return rates


def _timing_batches(images: Tensor, batch_size: int) -> list[Tensor]:
    """Up to THROUGHPUT_BATCHES full batches (one smaller batch when there are too few images)."""
    full = min(THROUGHPUT_BATCHES, len(images) // batch_size)
    if full == 0:
        return [images]
    return list(images[:full * batch_size].split(batch_size))


def segments_in_a_row(model: EarlyExitModel) -> Callable[[Tensor], Tensor]:
    """The backbone as ``model`` runs it: every segment in a row, no branch, no exit test."""

    def run(x: Tensor) -> Tensor:
        for seg in model.pieces(x):
            x = direct(seg)(x)  # called as the early-exit model's batch-1 route calls it
        return x

    return run


def wall_clock(backbone: nn.Module, model: EarlyExitModel, images: Tensor, *,
               latency_samples: int, batch_size: int, repeats: int,
               device: torch.device, extra: dict[str, Callable] | None = None,
               progress: bool = False) -> dict[str, Any]:
    """Time the untouched backbone, the early-exit model and its segments in a row side by
    side on the same images, with ``extra`` models by name (the backbone on onnxruntime);
    ``progress`` shows a bar of the timed images (a plain line in a log)."""
    images = images.to(device)
    models = {"backbone": backbone, "early_exit": model, "segments": segments_in_a_row(model),
              **(extra or {})}
    clock = Clock(device)
    batches = _timing_batches(images, batch_size)
    total = len(models) * (LATENCY_REPEATS * latency_samples
                           + repeats * sum(len(b) for b in batches))
    with torch.inference_mode(), single_bar(progress, "timing", total) as tick:
        lat = batch1_latency(models, images, latency_samples, clock, tick) if latency_samples \
            else None
        rates = _throughput(models, batches, repeats, clock, tick)
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


def busy_note(timing: dict[str, Any]) -> str | None:
    """Other work competing for the cores skews wall clock (OpenMP threads wait on each other)."""
    load, cores = timing["load_average"], os.cpu_count() or 1
    if load is None or load <= cores:
        return None
    return (f"the machine was busy while timing (load {load:.1f} on {cores} cores): wall-clock "
            f"numbers are unreliable; FLOPs and quality are not affected")


def speedups(timing: dict[str, Any], flops: float) -> dict[str, float | None]:
    """Backbone over early exit: FLOPs, mean batch-1 latency (``latency``), median batch-1
    latency (``latency_median``) and batched throughput; and the early exits' own share, the
    segments in a row over early exit (``latency_vs_segments``, ``throughput_vs_segments``:
    what is held against the ideal); and early exit against the fastest plain runtime timed
    (``fastest_latency`` / ``fastest_throughput`` name it, :data:`PLAIN_RUNTIMES`), the bar a
    user who wants speed compares with; and where the exported cascade was timed
    (``early_exit_onnx``), the same for it (``onnx_cascade_*``), with the share of the FLOPs
    ideal it reaches against that bar (``onnx_cascade_*_of_flops_ideal``)."""
    lat, tput = timing["latency"], timing["throughput"]

    def ratio(key: str, base: str = "backbone", model: str = "early_exit") -> float | None:
        return None if lat is None else lat[base][key] / lat[model][key]

    plain = [k for k in PLAIN_RUNTIMES if k in tput]
    quick = None if lat is None else min(plain, key=lambda k: lat[k]["mean_ms"])
    most = max(plain, key=lambda k: tput[k])
    out = {"flops": 1.0 / flops, "latency": ratio("mean_ms"),
           "latency_median": ratio("median_ms"),
           "throughput": tput["early_exit"] / tput["backbone"],
           "latency_vs_segments": ratio("mean_ms", "segments"),
           "throughput_vs_segments": tput["early_exit"] / tput["segments"],
           "fastest_latency": quick, "fastest_throughput": most,
           "fastest_latency_runtime": PLAIN_RUNTIMES.get(quick),
           "fastest_throughput_runtime": PLAIN_RUNTIMES[most],
           "latency_vs_fastest": None if quick is None else ratio("mean_ms", quick),
           "throughput_vs_fastest": tput["early_exit"] / tput[most]}
    if "early_exit_onnx" in tput:
        on_lat = None if quick is None else ratio("mean_ms", quick, "early_exit_onnx")
        on_tput = tput["early_exit_onnx"] / tput[most]
        out.update(onnx_cascade_latency_vs_fastest=on_lat,
                   onnx_cascade_throughput_vs_fastest=on_tput,
                   onnx_cascade_latency_of_flops_ideal=None if on_lat is None else on_lat * flops,
                   onnx_cascade_throughput_of_flops_ideal=on_tput * flops)
    return out


def time_profile(model: EarlyExitModel, images: Tensor, batch_size: int,
                 shares: dict[str, Sequence[float]]) -> dict[str, Any]:
    """Each segment's and branch's measured time beside its FLOPs, and the *ideal* speedups the
    exit shares imply with those times (no bookkeeping, perfect batching), to hold the
    achieved ones against. ``shares["latency"]`` and ``shares["throughput"]``: where the
    images each timing ran on left."""
    prof = model.profile(images, batch_size=batch_size)
    total = model.backbone_flops
    pieces = [{"piece": f"segment {k}", "flops_share": f / total, "ms": m, "ms_batched": mb}
              for k, (f, m, mb) in enumerate(zip(model.segment_flops, prof.segment_ms,
                                                  prof.segment_ms_batched))]
    pieces += [{"piece": f"branch {k}", "flops_share": f / total, "ms": m, "ms_batched": mb,
                "on": on}
               for k, (f, m, mb, on) in enumerate(zip(model.branch_flops, prof.branch_ms,
                                                       prof.branch_ms_batched, model.evaluated))]
    return {"device": prof.device, "threads": prof.threads, "batch_size": prof.batch_size,
            "pieces": pieces, "ideal_speedup": _ideal(model, images, batch_size, shares)}


def _ideal(model: EarlyExitModel, images: Tensor, batch_size: int,
           shares: dict[str, Sequence[float]]) -> dict[str, float]:
    """The segments in a row over the expected time of a pass that leaves where the images
    left, with only the branches that run (a ZTW ensemble reads more than the active exits'),
    each timed in passes down the chain as inference runs it: the speedup with no bookkeeping
    and perfect batching."""
    with torch.inference_mode():
        segments = [direct(s) for s in model.pieces(images)]
        answers = [direct(a) for a in model.answers(images)]
    side = [a if run else None for a, run in zip(answers, model.evaluated)]
    ideal = {}
    for key, x, repeats, per_image in (
            ("latency", images[:1], LATENCY_REPEATS * REPEATS, LATENCY_REPEATS),
            ("throughput", probe_batch(images, batch_size), batched_repeats(REPEATS), None)):
        row, leave = exit_times(segments, side, x, repeats, per_image)
        ideal[key] = row / sum(s * t for s, t in zip(shares[key], leave))
    return ideal


def profile_note(info: BundleInfo, device: str) -> str | None:
    """Latency-cost bundles rank exits by times from one machine; say when this is another."""
    if info.cost != "latency" or info.latency is None or info.latency.device == device:
        return None
    return (f"the bundle's costs are times measured on {info.latency.device}; this run is on "
            f"{device}: run `pteenet calibrate --cost latency` here to re-rank the exits")


def efficiency(speedup: dict[str, float | None], prof: dict[str, Any]) -> dict[str, Any]:
    """Ideal speedups from measured times and exit shares, and achieved / ideal: both over the
    segments in a row, the time the profile's pieces add up to."""
    ideal = prof["ideal_speedup"]
    out: dict[str, Any] = {"ideal_latency": ideal["latency"],
                           "ideal_throughput": ideal["throughput"]}
    for key in ("latency", "throughput"):
        got = speedup.get(f"{key}_vs_segments")
        out[f"{key}_of_ideal"] = None if got is None else got / ideal[key]
    return out
