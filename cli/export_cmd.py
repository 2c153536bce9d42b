"""``pteenet export``: the cascade as standalone ONNX or TorchScript graphs plus a manifest."""

from __future__ import annotations

import json as jsonlib
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from pteenet.runtime import MANIFEST

from . import _choices
from ._choices import value
from ._options import Bundle, BundleCheckpoint, Force, Json
from ._output import Output, human, pct


def _size(n: int) -> str:
    for unit, div in (("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


def _thresholds(row: list[float | None]) -> str:
    """One exit's thresholds: a single value when every class shares it, else the range."""
    vals = {"never" if v is None else f"{v:.4g}" for v in row}
    if len(vals) == 1:
        return vals.pop()
    nums = [v for v in row if v is not None]
    never = f", {row.count(None)} never" if None in row else ""
    return f"{min(nums):.4g}..{max(nums):.4g} per class{never}" if nums else "never"


def file_rows(folder: Path, manifest: dict[str, Any]) -> list[list[Any]]:
    files, rows = manifest["files"], []
    for kind, group in (("segment", "segments"), ("branch", "branches")):
        for k, name in enumerate(files[group]):
            flops = human(manifest[f"{kind}_flops"][k])
            rows.append([name, f"{kind} {k}", flops, _size((folder / name).stat().st_size)])
    rows += [[name, "batch-1 cascade (one graph)", "", _size((folder / name).stat().st_size)]
             for name in files.get("single", [])]
    size = _size((folder / MANIFEST).stat().st_size)
    return rows + [[MANIFEST, "order, thresholds, FLOPs", "", size]]


def exit_rows(manifest: dict[str, Any]) -> list[list[Any]]:
    rows = [[f"branch {k}", pct(cost), _thresholds(row)]
            for k, (cost, row) in enumerate(zip(manifest["exit_costs"], manifest["thresholds"]))]
    return rows + [["backbone", pct(manifest["exit_costs"][-1]), "always"]]


def export(
    bundle: Bundle = Path("pteenet-out"),
    format: Annotated[_choices.Format, typer.Option(
        "--format", "-f", help="onnx (run with onnxruntime; needs pip install pteenet\\[onnx]) or "
        "torchscript (run with torch).")] = _choices.Format("onnx"),
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Folder to write. Default: <bundle>/export-<format>.")] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset version.")] = 17,
    checkpoint: BundleCheckpoint = None,
    force: Force = False,
    json: Json = False,
) -> None:
    """Export the cascade: each backbone segment and each exit branch as its own graph, plus
    manifest.json (order, thresholds, FLOPs, preprocessing).

    Separate graphs let a runtime stop after any branch and send only the samples still in
    flight on to the next segment. Branch graphs return (logits, exit score), the score already
    computed, and the thresholds are the bundle's current table (run calibrate first). Every
    graph takes any batch size; each is checked against the model after writing. ONNX exports
    also hold cascade_1.onnx: the same graphs in one, for single images (one session instead of
    one per piece; the runtime uses it by itself).

    Run it without pteenet's model code (ONNX needs only numpy and onnxruntime):

    from pteenet.runtime import Cascade

    cascade = Cascade.open("pteenet-out/export-onnx")

    preds, exits = cascade(cascade.preprocess(["img.png"]))

    preds and exits are int64 arrays (exit B = the backbone); cascade.run(x) also gives the
    logits and FLOPs per sample. Input: float32 [N, 3, H, W], normalised as the manifest says.
    """
    from pteenet.exporter._export import export as run_export  # torch: only when run

    output = Output(json)
    folder = run_export(bundle, format=value(format), out=out, opset=opset, checkpoint=checkpoint,
                        force=force)
    manifest = jsonlib.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    output.table(f"{value(format)} export", ["file", "graph", "FLOPs", "size"],
                 file_rows(folder, manifest))
    output.table("exits", ["exit", "FLOPs at exit", "thresholds"], exit_rows(manifest))
    output.note(escape(f"{manifest['backbone']}: {manifest['num_branches']} exits, "
                       f"{manifest['num_classes']} classes, input {manifest['input_size'][0]}x"
                       f"{manifest['input_size'][1]}, score {manifest['score']}"))
    output.note(escape(f"written to {folder}; run it with "
                       f"pteenet.runtime.Cascade.open('{folder}')"))
    sizes = {f: (folder / f).stat().st_size
             for f in [*(f for group in manifest["files"].values() for f in group), MANIFEST]}
    output.result({"folder": str(folder), "files": sizes, "manifest": manifest})
