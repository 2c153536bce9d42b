"""One backbone end to end: the compatibility check behind ``benchmarks/compat.py``.

Whether pteenet works on an architecture is only known by running every stage on it: trace it
(cuts spread over the FLOPs), attach exits (one epoch on a few images), load the bundle,
export it to ONNX, and run the torch-free cascade against the Python model. Random weights
suffice (no stage depends on them) and keep the check offline. A row records where a backbone
stopped and why, in one line, so a failure names its stage.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import torch

__all__ = ["compat_row"]

STAGES = ("inspect", "attach", "load", "export", "cascade")


def compat_row(model: str, data: str | os.PathLike, out: str | os.PathLike, *,
               branches: int = 4, input_size: tuple[int, int] | None = None,
               samples: int = 6) -> dict[str, Any]:
    """Run ``model`` (random weights) through every stage; the row says how far it got.

    Keys: ``model``, ``ok``, ``stage`` (the last stage reached, or the one that failed),
    ``error`` (one line), ``cuts`` (useful cut points), ``exits`` (their FLOP fractions),
    ``max_branch`` (the costliest branch as a share of the backbone), ``layouts`` (of the
    chosen cuts), ``gflops`` and ``seconds``."""
    from pteenet.bundle import load
    from pteenet.exporter import export
    from pteenet.graph import useful_cuts
    from pteenet.jobs._attach import attach
    from pteenet.runtime import Cascade
    from pteenet.training import TrainConfig

    row: dict[str, Any] = {"model": model, "ok": False, "stage": STAGES[0], "error": None}
    start = time.perf_counter()
    try:
        res = attach(model, data, pretrained=False, branches=branches, out=out,
                     input_size=input_size, config=TrainConfig(epochs=1, batch_size=8, views=1),
                     progress=False)
        trace, ee = res.trace, res.model
        row.update(stage="attach", cuts=len(useful_cuts(trace)), gflops=trace.total_flops / 1e9,
                   layouts=sorted({trace.cut(c).layout for c in res.info.cuts}),
                   exits=[round(trace.cut(c).flops / trace.total_flops, 3)
                          for c in res.info.cuts],
                   max_branch=max(ee.branch_flops) / ee.backbone_flops, notes=res.notes)
        row["stage"] = "load"
        model_ = load(out)
        row["stage"] = "export"
        cascade = Cascade.open(export(out))
        row["stage"] = "cascade"
        h, w = cascade.input_size
        x = torch.randn(samples, 3, h, w, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            want = model_(x)
        preds, exits = cascade(x.numpy())
        if not (np.array_equal(preds, want.preds.numpy())
                and np.array_equal(exits, want.exit_index.numpy())):
            raise AssertionError("the exported cascade answers otherwise than the model")
        row["ok"] = True
    except Exception as e:  # a row records any failure, in one line
        row["error"] = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row
