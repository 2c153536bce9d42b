"""``pteenet bench``: measured savings of a bundle's early exits against the untouched backbone."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape

from . import _choices
from ._choices import value
from ._errors import as_shown
from ._options import Bundle, BundleCheckpoint, Device, Force, Json, Labels, Quiet
from ._output import Output, pct

if TYPE_CHECKING:  # torch-free at import: --help stays instant
    from pteenet.benchmark import BenchResult

BAR_WIDTH = 24


def _num(x: float | None, fmt: str) -> str:
    return "" if x is None else format(x, fmt)


def _times(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}x"


def comparison_rows(res: BenchResult) -> list[list[Any]]:
    ee, bb, orc = res.early_exit, res.backbone, res.oracle
    t, sp = res.timing, res.speedup
    lat = t["latency"] or {"early_exit": {}, "backbone": {}, "segments": {}}
    rows = [
        ["top-1", pct(ee.top1), pct(bb.top1), ""],
        ["agreement with backbone", pct(ee.agreement), pct(bb.agreement), ""],
        ["mean FLOPs / sample", pct(ee.relative_flops), pct(bb.relative_flops),
         _times(sp["flops"])],
        ["oracle FLOPs (floor)", pct(orc.relative_flops), "", _times(1 / orc.relative_flops)],
    ]
    for key, label, ratio in (("mean_ms", "batch-1 mean (ms)", sp["latency"]),
                              ("median_ms", "batch-1 median (ms)", sp["latency_median"]),
                              ("p90_ms", "batch-1 p90 (ms)", None),
                              ("p95_ms", "batch-1 p95 (ms)", None),
                              ("p99_ms", "batch-1 p99 (ms)", None)):
        rows.append([label, _num(lat["early_exit"].get(key), ".2f"),
                     _num(lat["backbone"].get(key), ".2f"), _times(ratio)])
    rows.append([f"throughput @ {t['batch_size']} (img/s)",
                 _num(t["throughput"]["early_exit"], ".1f"),
                 _num(t["throughput"]["backbone"], ".1f"), _times(sp["throughput"])])
    rows += [["batch-1 mean vs segments in a row (ms)", _num(lat["early_exit"].get("mean_ms"),
              ".2f"), _num(lat["segments"].get("mean_ms"), ".2f"),
              _times(sp["latency_vs_segments"])],
             ["throughput vs segments in a row", _num(t["throughput"]["early_exit"], ".1f"),
              _num(t["throughput"]["segments"], ".1f"), _times(sp["throughput_vs_segments"])]]
    if sp.get("fastest_latency"):
        quick = sp["fastest_latency"]
        rows.append([f"batch-1 mean vs fastest plain: {sp['fastest_latency_runtime']} (ms)",
                     _num(lat["early_exit"].get("mean_ms"), ".2f"),
                     _num(lat[quick].get("mean_ms"), ".2f"), _times(sp["latency_vs_fastest"])])
    most = sp["fastest_throughput"]
    rows.append([f"throughput vs fastest plain: {sp['fastest_throughput_runtime']}",
                 _num(t["throughput"]["early_exit"], ".1f"), _num(t["throughput"][most], ".1f"),
                 _times(sp["throughput_vs_fastest"])])
    if "onnx_cascade_throughput_vs_fastest" in sp:  # the exported cascade, as deployed
        if sp.get("onnx_cascade_latency_vs_fastest"):
            rows.append([f"ONNX cascade, batch-1 mean vs fastest plain: "
                         f"{sp['fastest_latency_runtime']} (ms)",
                         _num(lat["early_exit_onnx"].get("mean_ms"), ".2f"),
                         _num(lat[sp["fastest_latency"]].get("mean_ms"), ".2f"),
                         _times(sp["onnx_cascade_latency_vs_fastest"])])
        rows.append([f"ONNX cascade, throughput vs fastest plain: "
                     f"{sp['fastest_throughput_runtime']}",
                     _num(t["throughput"]["early_exit_onnx"], ".1f"),
                     _num(t["throughput"][most], ".1f"),
                     _times(sp["onnx_cascade_throughput_vs_fastest"])])
    if "ideal_latency" in sp:
        for key, label in (("latency", "batch-1"), ("throughput", "batched")):
            got = sp[f"{key}_of_ideal"]
            rows.append([f"ideal {label} speedup vs segments", "", "",
                         _times(sp[f"ideal_{key}"]) + ("" if got is None else
                                                       f" ({got:.0%} reached)")])
    return rows


PROFILE_COLUMNS = ["piece", "FLOPs", "batch-1 ms", "batched ms / image"]


def profile_rows(res: BenchResult) -> list[list[Any]]:
    """Each segment and branch: FLOPs share beside measured time (off branches marked)."""
    return [[p["piece"] + ("" if p.get("on", True) else " (off)"), pct(p["flops_share"], 2),
             f"{p['ms']:.3f}", f"{p['ms_batched']:.4f}"] for p in res.profile["pieces"]]


def _bar(share: float) -> str:
    full = round(share * BAR_WIDTH)
    return "█" * full + "░" * (BAR_WIDTH - full)


EXIT_COLUMNS = ["exit", "branch cost", "FLOPs at exit", "share", "", "agrees", "top-1",
                "oracle share"]


def exit_rows(res: BenchResult) -> list[list[Any]]:
    return [[e["name"], "" if e["branch_cost"] is None else pct(e["branch_cost"], 2),
             pct(e["relative_flops"]) if e["on"] else "off", pct(e["share"]), _bar(e["share"]),
             pct(e["agreement"]), pct(e["top1"]), pct(e["oracle_share"])]
            for e in res.exits]


CLASS_COLUMNS = ["exit", "classes"]
NEVER_SHOWN = 8  # classes named in the "never leave early" line


def class_rows(res: BenchResult) -> list[list[Any]]:
    """Per exit that took any image, its top classes."""
    return [[e["name"], ", ".join(f"{c['class']} {c['count']} ({c['share_of_class']:.0%})"
                                  for c in e["top"])]
            for e in res.by_class["per_exit"] if e["top"]]


def never_early_line(res: BenchResult) -> str:
    bc = res.by_class
    never = bc["never_early"]
    if not never:
        return f"every one of the {bc['classes_seen']} classes seen leaves early at least once"
    named = ", ".join(f"{c['class']} ({c['count']})" for c in never[:NEVER_SHOWN])
    more = f", and {len(never) - NEVER_SHOWN} more" if len(never) > NEVER_SHOWN else ""
    return (f"{len(never)} of {bc['classes_seen']} classes never leave early: {named}{more} "
            f"(classes by {bc['by']}; all in bench.json)")


def _notes(out: Output, res: BenchResult) -> None:
    d, th = res.data, res.thresholds
    how = f"the bundle's table ({th['method']})" if th["source"] == "bundle" else \
        f"--threshold {'never' if th['value'] is None else th['value']}"
    skipped = f", {d['skipped']} unreadable skipped" if d["skipped"] else ""
    out.note(escape(f"{res.bundle['backbone']} on {d['spec']} ({d['split']} split, "
                    f"{d['subset']}: {d['num_samples']} images{skipped}); thresholds: {how}"))
    for n in res.notes:
        out.note(escape(f"note: {as_shown(n)}"))
    for w in res.warnings:
        out.warn(escape(as_shown(w)))
    for name, path in res.files.items():
        out.note(escape(f"{name.replace('_', '.', 1)} -> {path}"))


def bench(
    bundle: Bundle = Path("pteenet-out"),
    data: Annotated[str | None, typer.Option(
        "--data", "-d", help="Images to measure on (folder or dataset name). Default: the "
        "bundle's data, its test split, else its held-out calibration samples.")] = None,
    split: Annotated[_choices.Split | None, typer.Option(
        "--split", help="train or test (val = test). Default: test when there is one.")] = None,
    threshold: Annotated[float | None, typer.Option(
        "--threshold", "-t", help="One global exit threshold instead of the bundle's table, on "
        "the bundle's score. On the gate score that attach and calibrate write, 0.5 is the "
        "calibrated operating point, higher exits later (safer), lower earlier; exits "
        "calibration switched off stay off. Above 1 (or inf): none leaves early.")]
    = None,
    batch_size: Annotated[int, typer.Option(
        "--batch-size", help="Batch size of the measuring pass and of the throughput "
        "timing.")] = 256,
    latency_samples: Annotated[int, typer.Option(
        "--latency-samples", help="Images timed one by one for batch-1 latency, each three "
        "times (its median counts; 0 skips it).")] = 200,
    repeats: Annotated[int, typer.Option(
        "--repeats", help="Throughput repeats (the median is reported).")] = 5,
    sweep: Annotated[bool, typer.Option(
        "--sweep", help="Also trace quality vs FLOPs over thresholds from conservative to "
        "permissive: writes sweep.png and sweep.csv into the bundle.")] = False,
    device: Device = "cpu",
    checkpoint: BundleCheckpoint = None,
    force: Force = False,
    max_samples: Annotated[int | None, typer.Option(
        "--max-samples", help="Measure a seeded subset of this many images (quick runs).")]
    = None,
    threads: Annotated[int | None, typer.Option(
        "--threads", help="CPU threads for the whole run (default: torch's, usually the core "
        "count); recorded in bench.json.", min=1)] = None,
    profile: Annotated[bool, typer.Option(
        help="Time every segment and branch (batch 1 and batched) and report the ideal speedup "
        "those times and the exit shares imply, beside the achieved one.")] = True,
    onnx_baseline: Annotated[bool, typer.Option(
        help="Also time on onnxruntime (CPU; needs [onnx]) the plain backbone exported to "
        "ONNX, often the fastest way to run it, and the exported cascade, as `pteenet export` "
        "writes it; hold both early-exit runtimes against the fastest plain runtime timed.")]
    = True,
    json: Json = False,
    labels: Labels = None,
    quiet: Quiet = False,
) -> None:
    """Measure what the early exits save against the untouched backbone, and what they cost.

    Quality: top-1 (only with labels that match the backbone's classes) and agreement, the share
    of samples whose answer equals the backbone's.

    Work: mean FLOPs per sample relative to the backbone, counted by the real early-exit run:
    the segments each sample went through plus every branch it was tested at, so a sample that
    never leaves costs more than 100 % (exits switched off are never run and cost nothing).
    Oracle: the FLOPs if each sample left at the first branch
    that already agrees with the backbone, the floor no threshold table gets below at 100 %
    agreement with these branches. Exit shares: where samples left, with the oracle's beside;
    then which classes leave at each exit, and the classes that never leave early.

    Wall clock: backbone and early-exit model timed alternately in this process after warm-up,
    on real images: batch-1 latency (mean, median, p90, p95, p99) and throughput at
    --batch-size.
    Speedup = backbone time / early-exit time (above 1 is faster); the batch-1 speedup is that
    of the mean, the time per image of a one-by-one stream (early exit makes latency bimodal,
    so the median flatters it). FLOPs saved turn into time saved only
    when the skipped layers outweigh the branches and the bookkeeping: less so for small models
    and large GPU batches. On a CPU the plain backbone also runs on onnxruntime (the fastest
    plain runtime there, often), and the "vs fastest plain" rows hold early exit against
    whichever of eager torch, the frozen segments in a row and onnxruntime was fastest; the
    exported cascade (`pteenet export`, run by pteenet.runtime) is timed and held against it too.

    Data: the bundle's test split, else its held-out calibration samples (never the training
    ones). Results go to bench.json in the bundle; --sweep adds sweep.png and sweep.csv.
    """
    from pteenet.benchmark._bench import bench as run_bench  # torch: only when run

    out = Output(json)
    res = run_bench(bundle, data=data, split=value(split), threshold=threshold,
                    batch_size=batch_size,
                    latency_samples=latency_samples, repeats=repeats, sweep=sweep, device=device,
                    checkpoint=checkpoint, force=force, max_samples=max_samples,
                    progress=not (quiet or json), threads=threads, profile=profile,
                    labels=value(labels), onnx_baseline=onnx_baseline)
    out.table("early exit vs backbone", ["metric", "early exit", "backbone", "speedup"],
              comparison_rows(res))
    out.table("where samples left", EXIT_COLUMNS, exit_rows(res))
    out.table(f"which classes leave where (by {res.by_class['by']}): the most frequent, "
              f"images and share of the class", CLASS_COLUMNS, class_rows(res))
    out.note(escape(never_early_line(res)))
    if res.profile:
        out.table(f"time profile ({res.profile['device']}, batched at "
                  f"{res.profile['batch_size']})", PROFILE_COLUMNS, profile_rows(res))
    _notes(out, res)
    out.result(res.to_json())
