"""Benchmark a bundle: what the early exits save against the untouched backbone, measured.

:func:`bench` is what ``pteenet bench`` runs. It answers two separate questions, because FLOPs
and wall clock disagree often enough that reporting one alone misleads:

* **Quality and work** (:mod:`pteenet.benchmark._quality`), from one pass over held-out data: top-1,
  agreement with the backbone, exit shares and the mean relative FLOPs per sample counted by the
  real early-exit run, and the oracle floor; the optional threshold sweep (:mod:`pteenet.benchmark`)
  is simulated from the same pass with the exact exit rule the model applies.
* **Wall clock** (:mod:`pteenet.benchmark`): the untouched backbone and the early-exit model timed
  interleaved in the same process: batch-1 latency and batched throughput, and each segment's
  and branch's time beside its FLOPs.

The samples (:mod:`pteenet.benchmark`) default to the bundle's own data: its test split when there
is one, else the held-out calibration samples of its train split, never those trained on. This
module checks the options, runs the steps and writes ``bench.json`` (and the sweep's files).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pteenet.benchmark._by_class import by_class
from pteenet.benchmark._drift import drift_warning, promise_warning
from pteenet.benchmark._eval_set import EvalSet, select_data
from pteenet.benchmark._onnx_runs import onnx_backbone, onnx_cascade
from pteenet.benchmark._quality import Pass, measure_pass, quality, simulation_check
from pteenet.benchmark._result import BenchResult
from pteenet.benchmark._sweep import plot_sweep, sweep_points, write_sweep_csv
from pteenet.benchmark._wall_clock import (
    busy_note,
    efficiency,
    images_to_keep,
    profile_note,
    speedups,
    time_profile,
    wall_clock,
)
from pteenet.bundle._derived import BENCH_FILE, SWEEP_CSV, SWEEP_PNG
from pteenet.bundle._load import load
from pteenet.bundle._read import read_bundle
from pteenet.bundle._schema import Bundle, BundleInfo, ThresholdTable
from pteenet.cascade._model import EarlyExitModel
from pteenet.cascade._profile import device_name, steady_allocator
from pteenet.errors import BundleError, OptionError, need_extra
from pteenet.machine import check_device
from pteenet.machine import threads as cpu_threads
from pteenet.progress import single_bar
from pteenet.storage import write_text, writes_into
from pteenet.thresholds import json_rows

__all__ = ["bench"]


def _check_options(threshold: float | None, batch_size: int, latency_samples: int, repeats: int,
                  max_samples: int | None) -> None:
    """Refuse bad values before anything heavy is loaded, one line each."""
    if threshold is not None and (math.isnan(threshold) or threshold < 0):
        raise OptionError(f"`threshold` must be >= 0 (0 = always exit, above 1 = never), "
                          f"got {threshold}")
    if batch_size < 1:
        raise OptionError(f"`batch_size` must be at least 1, got {batch_size}")
    if latency_samples < 0:
        raise OptionError(f"`latency_samples` must be >= 0 (0 skips it), got {latency_samples}")
    if repeats < 1:
        raise OptionError(f"`repeats` must be at least 1, got {repeats}")
    if max_samples is not None and max_samples < 1:
        raise OptionError(f"`max_samples` must be at least 1, got {max_samples}")


def _write_outputs(folder: Path, result: dict[str, Any], sweep: bool, out_json: bool) -> None:
    """bench.json (and the sweep's files) beside the bundle, each written atomically."""
    files: dict[str, str] = {}
    try:
        if sweep:
            write_sweep_csv(folder / SWEEP_CSV, result["sweep"])
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
    threads: int | None = None,
    profile: bool = True,
    model: nn.Module | Callable[[], nn.Module] | None = None,
    labels: str | None = None,
    onnx_baseline: bool = True,
) -> BenchResult:
    """Measure a bundle's early exits against its untouched backbone (see the module docstring).

    ``threshold`` replaces the bundle's table with one global value (0 = every sample leaves at
    the first exit; above 1 or inf = none leaves early). ``out_json`` writes ``bench.json`` into
    the bundle folder; ``sweep`` also writes ``sweep.png`` and ``sweep.csv`` there.
    ``threads`` sets the CPU threads for the whole run; ``profile`` times every segment and
    branch (:func:`time_profile`). ``model``: the backbone module of a bundle attached to the
    user's own (see :func:`pteenet.load`); ``labels`` "none" ignores the data's labels (default:
    as the bundle was attached). ``onnx_baseline`` (a CPU, onnxruntime installed) also times
    the plain backbone and the exported cascade on onnxruntime. Returns a
    :class:`BenchResult` (``to_json()`` is bench.json).
    """
    _check_options(threshold, batch_size, latency_samples, repeats, max_samples)
    if sweep:
        need_extra("matplotlib", "matplotlib", "plot", "the sweep plot (`sweep`)")
    with cpu_threads(threads):
        return _bench(bundle, data, split, threshold, batch_size, latency_samples, repeats,
                      sweep, device, checkpoint, force, out_json, progress, max_samples, profile,
                      model, labels, onnx_baseline)


def _timed_shares(p: Pass, timing: dict[str, Any], branches: int) -> dict[str, list[float]]:
    """Where the images each timing ran on left: the ideal speedups are for those images."""
    exits = p.ee_exit[p.kept]
    counts = {"latency": timing["distinct_latency_images"] or len(exits),
              "throughput": timing["batch_size"] * timing["batches"]}
    return {k: (torch.bincount(exits[:n], minlength=branches + 1).double() / n).tolist()
            for k, n in counts.items()}


def _bench(bundle, data, split, threshold, batch_size, latency_samples, repeats, sweep, device,
           checkpoint, force, out_json, progress, max_samples, profile, module, labels,
           onnx_baseline
           ) -> BenchResult:
    dev = check_device(device)
    b = read_bundle(bundle)  # read once: the model, the table and the info agree
    info, table = b.info, b.table
    ev = select_data(info, data, split, max_samples, labels)
    model = load(b, checkpoint=checkpoint, force=force, device=dev, model=module)
    if threshold is not None:
        model.set_thresholds(float(threshold))
    keep = images_to_keep(info, latency_samples, batch_size)
    with single_bar(progress, "measuring", len(ev.indices)) as tick:
        p = measure_pass(model, ev, batch_size=batch_size, device=dev, keep=keep, progress=tick)
    result = _assemble(info, ev, table, threshold, model, p, b.sha256)
    line = _table_warning(result, table, threshold, len(p))
    if line:
        result["warnings"].append(line)
    _time(result, model, b, p, dev, latency_samples, batch_size, repeats, progress,
          onnx_baseline, profile)
    costs = model.cost_in("flops").exits(model.active)
    result["sweep"] = sweep_points(p, model.thresholds.cpu(), costs) if sweep else None
    _write_outputs(info.path, result, sweep, out_json)
    return BenchResult.from_json(result)


def _table_warning(result: dict[str, Any], table: ThresholdTable, threshold: float | None,
                   n: int) -> str | None:
    """The one line a table in use deserves: never calibrated, or not holding on these images
    (their exits moved from the calibration split's, or they lose more than it allows)."""
    if threshold is not None:
        return None
    if table.method == "none":
        return ("the bundle's thresholds were never calibrated (no thresholds.json): every exit "
                "is off and this measures the backbone; run `pteenet calibrate` or pass "
                "`threshold`")
    ee, bb = result["early_exit"], result["backbone"]
    drop = None if ee.get("top1") is None else bb["top1"] - ee["top1"]
    return drift_warning(table.summary, ee["agreement"], n) or \
        promise_warning(table.params, ee["agreement"], drop, n)


def _time(result: dict[str, Any], model: EarlyExitModel, b: Bundle, p: Pass,
          dev: torch.device, latency_samples: int, batch_size: int, repeats: int,
          progress: bool, onnx_baseline: bool, profile: bool) -> None:
    """Wall clock into ``result``: every runtime timed taking turns (on a CPU with
    onnxruntime also the plain backbone and the exported cascade on it), the speedups, and
    each piece's time beside its FLOPs with the ideal they imply (``profile``)."""
    backbone = model.whole  # the eager backbone the segments were traced from (built once)
    steady = dev.type == "cpu" and steady_allocator()  # both models alike: see its docstring
    extra, tmp = {}, None
    if onnx_baseline and dev.type == "cpu":  # on a CPU, often the fastest runtimes of both
        threads = torch.get_num_threads()
        run, note = onnx_backbone(backbone, b.info.preprocess.input_size, threads)
        cascade, tmp, cascade_note = onnx_cascade(model, b, threads)
        extra.update({k: v for k, v in (("backbone_onnx", run), ("early_exit_onnx", cascade))
                      if v is not None})
        result["notes"] += [n for n in (note, cascade_note) if n]
    try:
        timing = wall_clock(backbone, model, p.images, latency_samples=latency_samples,
                            batch_size=batch_size, repeats=repeats, device=dev, extra=extra,
                            progress=progress)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    timing["allocator"] = "steady (mallopt)" if steady else "default"
    result["timing"] = timing
    result["speedup"] = speedups(timing, result["early_exit"]["relative_flops"])
    result["profile"] = time_profile(model, p.images.to(dev), timing["batch_size"],
                                     _timed_shares(p, timing, model.num_branches)) \
        if profile else None
    if result["profile"]:
        result["speedup"].update(efficiency(result["speedup"], result["profile"]))
    for note in (busy_note(timing), profile_note(b.info, device_name(dev))):
        if note:
            result["notes"].append(note)


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
                       "table": json_rows(model.thresholds.cpu())},
        "exit_costs": [float(c) for c in model.cost_in("flops").exits(model.active)],
        **quality(p, model),
        "simulation": simulation_check(p, model),
        "by_class": by_class(p.ee_exit, p.final if p.labels is None else p.labels,
                             model.num_branches, info.classes,
                             "backbone prediction" if p.labels is None else "label"),
        "notes": list(ev.notes),
        "warnings": [],
    }
