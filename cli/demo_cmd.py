"""``pteenet demo``: the whole retrofit on real data, offline, in well under a minute."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from ._options import Json
from ._output import Output, pct
from .bench_cmd import EXIT_COLUMNS, comparison_rows, exit_rows


def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Bundle folder to write.")]
    = Path("pteenet-demo"),
    workdir: Annotated[Path | None, typer.Option(
        "--workdir", help="Cache for the digits and the trained backbone. Default: "
        "$PTEENET_CACHE/demo, else ~/.cache/pteenet/demo.")] = None,
    quick: Annotated[bool, typer.Option(
        "--quick", help="A reduced run (fewer epochs and images) for smoke "
        "tests; its numbers are not representative.")] = False,
    threads: Annotated[int, typer.Option(
        "--threads", min=1, help="Torch CPU threads. One is fastest for these tiny models, "
        "and by far on a busy machine.")] = 1,
    json: Json = False,
) -> None:
    """Show the whole job on real data, offline: what early exits save on a classifier you own.

    1. data: scikit-learn's bundled handwritten digits (1797 images, 10 classes) are written as
    an image folder with a seeded 80/20 train/test split. 2. backbone: a CIFAR ResNet-20 is
    trained on the train split (about 99 % test top-1) and saved as a checkpoint; it stands in
    for your pretrained model. Both are cached in --workdir, so later runs skip them.

    Then pteenet does to it what it would do to yours. 3. attach: three exit branches are placed
    on the frozen backbone and trained on its own predictions. 4. calibrate: Class Precision
    Margin picks, per exit and class, the lowest softmax confidence that keeps precision within
    2 points of the backbone's. 5. bench: early exits against the untouched backbone on the test
    split: top-1, agreement, mean FLOPs per sample (and the oracle's floor), latency and
    throughput.

    The bundle (branches.safetensors, thresholds.json/csv, bench.json, sweep.png/csv) goes to
    --out; inspect it with the other commands, e.g. pteenet bench --bundle pteenet-demo.
    """
    from pteenet.demo import run_demo  # torch: only when run

    o = Output(json)
    res = run_demo(out, workdir=workdir, quick=quick, progress=not json, threads=threads,
                   log=lambda line: o.note(escape(line)))
    _report(o, res)
    o.result(res)


def _report(o: Output, res: dict[str, Any]) -> None:
    """The bench tables and a one-line verdict, the numbers the demo exists to show."""
    from pteenet.benchmark import BenchResult  # plain dataclasses: no torch

    bench = BenchResult.from_json(res["bench"])
    o.table("early exit vs backbone (test split)", ["metric", "early exit", "backbone",
                                                    "speedup"], comparison_rows(bench))
    o.table("where samples left", EXIT_COLUMNS, exit_rows(bench))
    h = res["headline"]
    o.note(escape(f"backbone top-1 {pct(h['backbone_top1'])} -> with early exits "
                  f"{pct(h['early_exit_top1'])} at {pct(h['relative_flops'])} of its FLOPs "
                  f"({h['flops_speedup']:.2f}x fewer); files in {res['out']}/"))
