"""``pteenet predict``: classify images with the early-exit model or an exported cascade."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from ._options import Bundle, BundleCheckpoint, Device, Force, Json, Quiet
from ._output import Output, human, pct

SHOWN = 20  # rows printed when the table goes to a file


def predict(
    images: Annotated[list[str], typer.Argument(
        help="Image files, folders (searched recursively) or glob patterns (quote them).",
        show_default=False)],
    bundle: Bundle = Path("pteenet-out"),
    export: Annotated[Path | None, typer.Option(
        "--export", "-e", help="Run this exported folder (pteenet export) with onnxruntime "
        "instead of the bundle: no torch is imported.")] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Write one row per image to preds.csv or preds.jsonl.")] = None,
    top_k: Annotated[int, typer.Option(
        "--top-k", "-k", help="Classes per image, best first (CSV: class_2, score_2, ...).")]
    = 1,
    threshold: Annotated[float | None, typer.Option(
        "--threshold", "-t", help="One global exit threshold instead of the bundle's table (on "
        "the gate score 0.5 is the calibrated point, higher exits later).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per batch.")] = 32,
    device: Device = "cpu",
    checkpoint: BundleCheckpoint = None,
    force: Force = False,
    json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Classify images with true early exit: per image its class (by name), the class's
    probability, the exit that answered and the FLOPs spent; then one summary line (images/s,
    mean FLOPs relative to the backbone, where the images left).

    Unreadable images are skipped and counted. With --out the rows go to the file and the first
    20 are shown; --json prints every row.
    """
    from pteenet.jobs._predict import predict as run_predict  # torch only for a bundle

    output = Output(json)
    res = run_predict(images, bundle, export=export, out=out, top_k=top_k, threshold=threshold,
                      batch_size=batch_size, device=device, checkpoint=checkpoint, force=force,
                      progress=not (quiet or json))
    rows = res.predictions if out is None else res.predictions[:SHOWN]
    output.table("predictions", ["path", "class", "score", "exit", "FLOPs", "of backbone"],
                 [[p.path, p.label, f"{p.score:.3f}", p.exit_name, human(p.flops),
                   pct(p.relative_flops)] for p in rows])
    if out is not None:
        more = len(res.predictions) - len(rows)
        output.note(escape(f"{len(res.predictions)} rows -> {out}" +
                           (f" ({more} not shown)" if more > 0 else "")))
    for path in res.skipped[:3]:
        output.warn(escape(f"skipped {path}: not a readable image"))
    output.note(escape(res.summary()))
    output.result({"summary": res.summary(), "engine": res.engine, "seconds": res.seconds,
                   "images_per_second": res.images_per_second,
                   "mean_relative_flops": res.mean_relative_flops,
                   "exit_names": res.exit_names, "exit_shares": res.exit_shares,
                   "skipped": res.skipped, "out": None if out is None else str(out),
                   "predictions": [p.as_dict() for p in res.predictions]})
