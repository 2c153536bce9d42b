"""Stages 3-5, what pteenet itself does: attach, calibrate and bench on the demo's bundle, exactly
as the commands would, after the cached data and backbone."""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pteenet.backbone._registry import create_backbone
from pteenet.benchmark._bench import bench
from pteenet.benchmark._result import BenchResult
from pteenet.calibration._calibrate import calibrate
from pteenet.choices import DEFAULT_BRANCH, DEFAULT_POLICY
from pteenet.demo.backbone import MODEL, train_backbone
from pteenet.demo.digits import prepare_digits
from pteenet.demo.settings import DemoSettings, Log, default_workdir, to_stderr
from pteenet.errors import need_extra
from pteenet.jobs._attach import attach
from pteenet.machine import threads as threads_for
from pteenet.training._config import TrainConfig

__all__ = ["run_demo"]

STAGES = 5



def _attach(root: str, ckpt: str, out: Path, settings: DemoSettings, progress: bool) -> Any:
    bb = create_backbone(MODEL, checkpoint=ckpt, num_classes=10,
                         input_size=settings.input_size)
    config = TrainConfig(epochs=settings.attach_epochs, batch_size=settings.attach_batch_size,
                         seed=settings.seed, views=1)  # digits: a mirror is not a digit
    return attach(bb, root, val_fraction=settings.val_fraction, out=out, config=config,
                  max_samples=settings.attach_samples, progress=progress)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _times(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def run_demo(out: str | os.PathLike = "pteenet-demo", *,
             workdir: str | os.PathLike | None = None, quick: bool = False,
             progress: bool = True, log: Log | None = None,
             threads: int | None = 1) -> dict[str, Any]:
    """Run the whole retrofit on real, offline data and return a JSON-serialisable summary.

    Stages: digits -> backbone (both cached in ``workdir``) -> attach -> calibrate ->
    bench, the last three writing the bundle to ``out``, exactly as the commands would.
    ``quick`` is a reduced run for tests; ``threads`` bounds torch's threads
    (:func:`pteenet.machine.threads`): the demo's tensors are tiny (16x16 images, batches of
    32-64), where a second thread gains little, while OpenMP threads that wait on each other on a
    busy machine cost 5-15x (attach took 7 s on one thread and 104 s on two under a load of 5 on
    2 cores); ``log`` gets one line per step (default: stderr) and ``progress``
    shows attach's progress bars.
    """
    need_extra("sklearn", "scikit-learn", "demo", "the demo (its digits)")
    need_extra("matplotlib", "matplotlib", "demo", "the demo (its sweep plot)")
    log = log or to_stderr
    settings = DemoSettings.for_mode(quick)
    workdir = Path(workdir).expanduser() if workdir is not None else default_workdir()
    out = Path(out).expanduser()
    start = time.perf_counter()
    with threads_for(threads):
        data = _stage_data(workdir, settings, log)
        backbone = _stage_backbone(workdir, data, settings, quick, log)
        res = _stage_attach(data, backbone, out, settings, progress, log)
        cal = _stage_calibrate(out, settings, log)
        result = _stage_bench(out, settings, log)
    summary = _summary(out, workdir, data, backbone, res, cal, result, settings, quick)
    summary["threads"] = threads
    summary["seconds"] = time.perf_counter() - start
    log(f"done in {summary['seconds']:.0f}s; the bundle is in {out}/ "
        f"(next: pteenet bench --bundle {out} --sweep, or attach your own model)")
    return summary


def _stage_data(workdir: Path, settings: DemoSettings, log: Log) -> dict:
    log(f"[1/{STAGES}] data: scikit-learn's handwritten digits (offline, ships with the package)")
    data = prepare_digits(workdir, settings)
    how = "reused" if data["cached"] else "wrote"
    log(f"      {how} {data['train']} train + {data['test']} test images, "
        f"{settings.image_size}x{settings.image_size} PNG, in {data['root']}")
    return data


def _stage_backbone(workdir: Path, data: dict, settings: DemoSettings, quick: bool,
                    log: Log) -> dict:
    log(f"[2/{STAGES}] backbone: {MODEL} trained on the train split, standing in for your "
        "pretrained model")
    bb = train_backbone(workdir, data, settings, quick=quick, log=log)
    how = "reused cached" if bb["cached"] else f"trained in {bb['seconds']:.0f}s,"
    log(f"      {how} checkpoint {bb['checkpoint']}: test top-1 {_pct(bb['test_accuracy'])}")
    return bb


def _stage_attach(data: dict, backbone: dict, out: Path, settings: DemoSettings, progress: bool,
                  log: Log) -> Any:
    log(f"[3/{STAGES}] attach: exits with pteenet's defaults ({DEFAULT_BRANCH} branches, "
        f"{DEFAULT_POLICY} placement) trained on the backbone's predictions and the labels")
    res = _attach(data["root"], backbone["checkpoint"], out, settings, progress)
    cuts = ", ".join(f"{r['cut']} ({_pct(r['exit_flops'])} FLOPs, agrees "
                     f"{_pct(r['agreement'])})" for r in res.rows())
    log(f"      exits at {cuts}; trained in {res.seconds:.0f}s")
    return res


def _stage_calibrate(out: Path, settings: DemoSettings, log: Log) -> Any:
    log(f"[4/{STAGES}] calibrate: least FLOPs within one point of the backbone's accuracy on "
        f"the held-out split (exits that do not pay are switched off)")
    cal = calibrate(out)
    s = cal.summary
    log(f"      expected: top-1 {_pct(s['accuracy'])} (backbone {_pct(s['backbone_accuracy'])}), "
        f"relative FLOPs {s['mean_relative_flops']:.2f}; wrote {out}/thresholds.json")
    return cal


def _stage_bench(out: Path, settings: DemoSettings, log: Log) -> BenchResult:
    log(f"[5/{STAGES}] bench: early exits vs the untouched backbone on the test split")
    result = bench(out, latency_samples=settings.latency_samples, repeats=settings.repeats,
                   max_samples=settings.bench_samples, sweep=True, progress=False)
    ee, bb, sp = result.early_exit, result.backbone, result.speedup
    log(f"      top-1 {_pct(ee.top1)} vs backbone {_pct(bb.top1)}, agreement "
        f"{_pct(ee.agreement)}, relative FLOPs {ee.relative_flops:.2f} "
        f"(oracle {result.oracle.relative_flops:.2f}); speedup: FLOPs "
        f"{_times(sp['flops'])}, latency {_times(sp['latency'])}, throughput "
        f"{_times(sp['throughput'])}")
    for note in result.notes:
        log(f"      note: {note}")
    files = ", ".join(Path(f).name for f in result.files.values())
    log(f"      wrote {files} in {out}/")
    return result


def _summary(out: Path, workdir: Path, data: dict, backbone: dict, res: Any, cal: Any,
             result: BenchResult, settings: DemoSettings, quick: bool) -> dict[str, Any]:
    """Everything worth keeping from the run; ``headline`` holds the numbers the demo is about."""
    ee, sp = result.early_exit, result.speedup
    return {
        "out": str(out), "workdir": str(workdir), "quick": quick, "settings": asdict(settings),
        "data": {k: data[k] for k in ("root", "train", "test", "cached")},
        "backbone": {"model": MODEL, "checkpoint": backbone["checkpoint"],
                     "test_accuracy": backbone["test_accuracy"], "cached": backbone["cached"]},
        "attach": {"cuts": res.info.cuts, "exits": res.rows(), "seconds": res.seconds},
        "calibration": cal.summary,
        "bench": result.to_json(),
        "headline": {"backbone_top1": result.backbone.top1, "early_exit_top1": ee.top1,
                     "agreement": ee.agreement, "relative_flops": ee.relative_flops,
                     "oracle_relative_flops": result.oracle.relative_flops,
                     "flops_speedup": sp["flops"], "latency_speedup": sp["latency"],
                     "throughput_speedup": sp["throughput"],
                     "exit_shares": [r["share"] for r in result.exits]},
        "files": {"bundle": str(out), **result.files},
    }
