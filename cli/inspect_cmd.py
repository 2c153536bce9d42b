"""``pteenet inspect``: cut points, FLOPs and the placement's choice."""

from __future__ import annotations

from typing import Annotated

import typer

from pteenet.choices import DEFAULT_POLICY

from . import _choices
from ._choices import value
from ._errors import as_shown
from ._options import (
    At,
    Checkpoint,
    Cuts,
    InputSize,
    Json,
    Mean,
    NumClasses,
    Placement,
    Pretrained,
    Std,
    floats,
    names,
    preprocess_options,
)
from ._output import Output, human, kb, pct


def inspect(
    model: Annotated[str, typer.Argument(help="Backbone: NAME, cifar:NAME, timm:NAME or "
                                         "torchvision:NAME (e.g. resnet56).")],
    checkpoint: Checkpoint = None,
    pretrained: Pretrained = False,  # FLOPs do not depend on the weights
    num_classes: NumClasses = None,
    branches: Annotated[int | None, typer.Option("--branches", "-n", min=1,
                                                 help="Mark where N exits would go.")] = None,
    placement: Placement = _choices.Placement(DEFAULT_POLICY),
    at: At = None,
    cuts: Cuts = None,
    input_size: InputSize = None,
    mean: Mean = None,
    std: Std = None,
    json: Json = False,
) -> None:
    """Show where MODEL's FLOPs go: every cut point with its cumulative FLOPs and parameters."""
    from pteenet.jobs._inspect import inspect as inspect_model  # torch: only when run

    out = Output(json)
    info = inspect_model(model, checkpoint=checkpoint, num_classes=num_classes,
                            branches=branches, placement=value(placement), at=floats(at, "--at"),
                            cuts=names(cuts), **preprocess_options(input_size, mean, std),
                            pretrained=pretrained)
    for line in info.inferred:
        out.note(as_shown(line))
    out.note(f"[bold]{info.model}[/] (resolved from '{model}' via {info.source}), "
             f"input {info.input_size[0]}x{info.input_size[1]}, "
             f"{info.num_classes} classes")
    total = info.total_flops
    rows = [[c.name, "x".join(map(str, c.shape)) + _layout(c.layout), human(c.flops),
             pct(c.fraction),
             human(c.params), "" if c.useful else "no",
             f"<-- exit ({pct(c.branch_flops / total, 2)})" if c.chosen else ""]
            for c in info.cuts]
    out.table(f"{len(info.cuts)} cut points", ["cut", "shape", "FLOPs", "FLOPs %", "params",
                                                   "useful", "exit (branch cost)"], rows)
    thop = human(info.thop_macs) if info.thop_macs else "n/a"
    out.note(f"total: {human(info.total_flops)}FLOPs = {human(info.total_macs)}MACs "
             f"(aten-level FlopCounterMode), {human(info.total_params)} params; "
             f"thop: {thop}MACs (module hooks: adds BatchNorm and pooling, misses functional "
             f"ops and module subclasses such as timm's)")
    if info.chosen:
        out.note(f"placement {info.placement}: {', '.join(info.chosen)}")
        per_cut = ", ".join(kb(c.cache_bytes) for c in info.cuts if c.chosen)
        out.note(f"feature cache: {kb(info.cache_bytes)} per image ({per_cut} per cut)")
    for line in info.notes:
        out.warn(as_shown(line))
    out.result(info.to_json())


def _layout(layout: str) -> str:
    """A cut's layout beside its shape, where it is not the convolutional [C, H, W]."""
    return {"hwc": " (HWC)", "tc": " (tokens)"}.get(layout, "")
