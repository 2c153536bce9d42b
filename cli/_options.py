"""Option types shared by every command (``Annotated`` aliases, as in the ``hf`` CLI)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer

from . import _choices

Checkpoint = Annotated[Path | None, typer.Option(
    "--checkpoint", "-c", help="Weights file (.pt/.pth/.th/.bin/.safetensors). Without it the "
    "registry's pretrained weights are downloaded.")]
Pretrained = Annotated[bool, typer.Option(
    "--pretrained/--no-pretrained", help="Without --checkpoint: download the registry's "
    "pretrained weights, or use random ones (seeded, so the same backbone every time).")]
NumClasses = Annotated[int | None, typer.Option(
    "--num-classes", help="Classes of the backbone's head. Default: read from the checkpoint's "
    "classifier, else the model's own.", min=1)]
Branches = Annotated[int, typer.Option("--branches", "-n", help="Number of exit branches.", min=1)]
Placement = Annotated[_choices.Placement, typer.Option(
    "--placement", "-p", help="pareto (20/80 splits), golden (61.8/38.2), fine (5/95), linear "
    "(equal FLOPs between exits) or quadratic (gaps grow quadratically).")]
At = Annotated[str | None, typer.Option(
    "--at", help="Explicit FLOP fractions for the exits, e.g. 0.15,0.3,0.5 (overrides "
    "--placement).")]
Cuts = Annotated[str | None, typer.Option(
    "--cuts", help="Module names to split at, e.g. layer1,layer2 (for models torch.fx cannot "
    "trace whole).")]
Mean = Annotated[str | None, typer.Option(
    "--mean", help="Per-channel normalisation mean, e.g. 0.485,0.456,0.406 (default: the "
    "backbone's own).")]
Std = Annotated[str | None, typer.Option(
    "--std", help="Per-channel normalisation std, e.g. 0.229,0.224,0.225.")]
InputSize = Annotated[str | None, typer.Option(
    "--input-size", help="Input height,width (or one number), e.g. 224 (default: the "
    "backbone's own).")]
BundleCheckpoint = Annotated[Path | None, typer.Option(
    "--checkpoint", "-c", help="Backbone weights, when the file the bundle records has moved.")]
Force = Annotated[bool, typer.Option(
    "--force", help="Use --checkpoint even if it is not the one the branches were trained on.")]
Json = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]
Bundle = Annotated[Path, typer.Option("--bundle", "-b", help="Bundle folder written by attach.")]
Device = Annotated[str, typer.Option("--device", help="cpu or cuda.")]
Labels = Annotated[_choices.Labels | None, typer.Option(
    "--labels", help="auto: class folders named as the backbone's classes (ImageNet wnids or "
    "names) get its indices, other folders their sorted position; none: ignore the folders' "
    "labels (every image unlabeled, which pseudo-labels need no more than). Default: auto, or "
    "what attach recorded.")]
Quiet = Annotated[bool, typer.Option(
    "--quiet", "-q", help="No progress (bars on a terminal, a line every 10 % or 30 s in a "
    "log).")]


def floats(text: str | None, what: str) -> list[float] | None:
    """Parse ``0.1,0.2`` into floats, or raise one clear line."""
    from pteenet.errors import OptionError

    if text is None:
        return None
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError as e:
        raise OptionError(f"{what} takes comma-separated numbers, got '{text}'") from e


def triple(text: str | None, what: str) -> tuple[float, float, float] | None:
    """Three comma-separated numbers (a per-channel mean or std), or one clear line."""
    from pteenet.errors import OptionError

    values = floats(text, what)
    if values is None:
        return None
    if len(values) != 3 or not all(math.isfinite(v) for v in values) or \
            (what == "--std" and min(values) <= 0):
        rule = ", all > 0" if what == "--std" else ""
        raise OptionError(f"{what} takes three finite numbers (R,G,B){rule}, got '{text}'")
    return (values[0], values[1], values[2])


def size(text: str | None) -> tuple[int, int] | None:
    """``224`` or ``224,192`` as (height, width), or one clear line."""
    from pteenet.errors import OptionError

    values = floats(text, "--input-size")
    if values is None:
        return None
    if len(values) not in (1, 2) or min(values) < 1 or any(v != int(v) for v in values):
        raise OptionError(f"--input-size takes one or two positive integers, got '{text}'")
    return (int(values[0]), int(values[-1]))


def preprocess_options(input_size: str | None, mean: str | None, std: str | None
                       ) -> dict[str, tuple | None]:
    """``--input-size``, ``--mean`` and ``--std`` as the backbone's keyword arguments (attach and
    inspect build the backbone alike)."""
    return {"input_size": size(input_size), "mean": triple(mean, "--mean"),
            "std": triple(std, "--std")}


def names(text: str | None) -> list[str] | None:
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]
Cost = Annotated[_choices.Cost | None, typer.Option(
    "--cost", help="What exits must save: flops, or latency (each segment's and branch's time "
    "measured on this machine replaces FLOPs in placement, the loss and the threshold search).")]
