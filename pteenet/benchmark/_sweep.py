"""The accuracy-vs-FLOPs curve: thresholds swept from conservative to permissive, simulated from
one pass's recorded scores, written as CSV and as a plot that marks the backbone, the oracle and
the current thresholds."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pteenet.benchmark._quality import Pass
from pteenet.bundle._derived import BUNDLE_HASH_KEY
from pteenet.storage import atomic_path, write_text
from pteenet.thresholds import global_candidates, scaled_candidates, summarize

__all__ = ["SWEEP_STEPS", "plot_sweep", "sweep_points", "write_sweep_csv"]

SWEEP_STEPS = 51


def _is_global(table: Tensor) -> bool:
    return bool((table == table.flatten()[0]).all())


def sweep_points(p: Pass, table: Tensor, costs: Sequence[float],
                 steps: int = SWEEP_STEPS) -> dict[str, Any]:
    """Quality vs mean relative FLOPs as thresholds go from conservative to permissive.

    A global table sweeps one threshold from 1 to 0; a per-class table is scaled from all ones
    (s = 0) to itself (s = 1) by :func:`~pteenet.thresholds.scaled_candidates`, keeping its shape.
    Simulated from the recorded scores with the model's own exit rule.
    """
    if _is_global(table):
        name, values = "threshold", torch.linspace(1.0, 0.0, steps).tolist()
        tables = global_candidates(table.shape[0], table.shape[1], steps)
    else:
        name, values = "scale", torch.linspace(0.0, 1.0, steps).tolist()
        tables = scaled_candidates(table.cpu(), steps)
    points = []
    for v, t in zip(values, tables):
        s = summarize(p.scores, p.preds, p.final, t, costs, p.labels)
        points.append({name: round(float(v), 6), "relative_flops": s["mean_relative_flops"],
                       "agreement": s["agreement"], "top1": s["accuracy"],
                       "shares": [e["share"] for e in s["exits"]]})
    return {"parameter": name, "metric": "agreement" if p.labels is None else "top1",
            "points": points}


def write_sweep_csv(path: Path, sweep: dict[str, Any]) -> None:
    """One row per sweep point: the parameter, FLOPs, quality and every exit's share."""
    buf = io.StringIO()
    w = csv.writer(buf)
    b = len(sweep["points"][0]["shares"])
    w.writerow([sweep["parameter"], "relative_flops", "agreement", "top1",
                *[f"share_exit_{k}" for k in range(b)]])
    for pt in sweep["points"]:
        w.writerow([pt[sweep["parameter"]], f"{pt['relative_flops']:.6f}",
                    f"{pt['agreement']:.6f}", "" if pt["top1"] is None else f"{pt['top1']:.6f}",
                    *[f"{s:.6f}" for s in pt["shares"]]])
    write_text(path, buf.getvalue())


def plot_sweep(path: Path, sweep: dict[str, Any], result: dict[str, Any]) -> None:
    """The trade-off curve with the backbone, the oracle and the measured operating point."""
    from matplotlib.figure import Figure  # Agg via savefig; never touches pyplot's state

    metric = sweep["metric"]
    label = "top-1 (%)" if metric == "top1" else "agreement with backbone (%)"
    panel = (result.get("by_class") or {}).get("exit_shares") or []
    fig = Figure(figsize=(11 if len(panel) > 1 else 6, 4.2), dpi=120)
    ax = fig.add_subplot(1, 2, 1) if len(panel) > 1 else fig.add_subplot()
    pts = sweep["points"]
    ax.plot([q["relative_flops"] for q in pts], [100 * q[metric] for q in pts], "-o",
            ms=3, label=_sweep_rule(sweep, result["thresholds"]))
    th = result["thresholds"]
    now = f"--threshold {th['value']}" if th["source"] == "--threshold" else \
        f"the bundle's {th['method']} table"
    for key, marker, text in (("backbone", "*", "backbone (no exits)"),
                              ("oracle", "D", "oracle: first agreeing exit (floor)"),
                              ("early_exit", "s", f"current thresholds: {now} (measured)")):
        r = result[key]
        ax.plot([r["relative_flops"]], [100 * r[metric]], marker, ms=10, label=text)
    ax.set_xlabel("mean FLOPs per sample (relative to the backbone)")
    ax.set_ylabel(label)
    b, d = result["bundle"], result["data"]
    ax.set_title(f"{b['backbone']}, {b['branches']} exits: {d['num_samples']} images "
                 f"({d['split']})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    if len(panel) > 1:  # for whom the exits save: one class hardly leaves early, another always
        _class_panel(fig.add_subplot(1, 2, 2), panel, result["by_class"]["by"])
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={  # which bundle it shows (pteenet.bundle._derived)
            "Description": f"pteenet sweep; {BUNDLE_HASH_KEY} {result['bundle']['sha256']}"})


def _class_panel(ax: Any, panel: list[dict[str, Any]], by: str) -> None:
    """Stacked bars: per class (the most frequent ones), the share of its images that leave at
    each exit, at the current thresholds."""
    exits = len(panel[0]["shares"])
    left = [0.0] * len(panel)
    for e in range(exits):
        widths = [100 * row["shares"][e] for row in panel]
        ax.barh(range(len(panel)), widths, left=left,
                label="backbone" if e == exits - 1 else f"branch {e}")
        left = [a + b for a, b in zip(left, widths)]
    ax.set_yticks(range(len(panel)), [f"{row['class']} ({row['count']})" for row in panel],
                  fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("images leaving at each exit (%)")
    ax.set_title(f"where each class leaves (by {by})", fontsize=10)
    ax.legend(loc="lower right", fontsize=6, ncol=2)


def _sweep_rule(sweep: dict[str, Any], thresholds: dict[str, Any]) -> str:
    """The curve's legend entry: which thresholds it moves, and how."""
    if sweep["parameter"] == "threshold":
        return f"one global threshold on the {thresholds['score']} score, 1 to 0"
    return f"the {thresholds['method']} table scaled from never (0) to itself (1)"
