"""``pteenet calibrate``: choose when each exit may answer and write the threshold table."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from pteenet.choices import DEFAULT_MARGIN

from . import _choices
from ._choices import value
from ._options import Bundle, Checkpoint, Cost, Device, Json, Labels, Quiet
from ._output import Output, pct

if TYPE_CHECKING:
    from pteenet.calibration import CalibrationResult


def calibrate(
    bundle: Bundle = Path("pteenet-out"),
    max_drop: Annotated[float | None, typer.Option(
        "--max-drop", help="Most accuracy drop allowed on the calibration split (disagreement "
        "with the backbone without labels). The default method finds the per-exit thresholds, "
        "and the exits to keep, that cost least within it.  [default: 0.01]")] = None,
    budget: Annotated[float | None, typer.Option(
        "--budget", help="Instead: the best accuracy at this relative cost, e.g. 0.5.")] = None,
    risk: Annotated[bool, typer.Option(
        "--risk", help="Certify --max-drop with probability 1-delta (risk control, Jazbec et al. "
        "2024): cost-search optima found on a third of the split are certified, in order, on "
        "the other two thirds.")] = False,
    threshold: Annotated[float | None, typer.Option(
        "--threshold", "-t", help="One global threshold T in [0, 1] on every exit score.")] = None,
    cpm: Annotated[bool, typer.Option(
        "--cpm", help="Class Precision Margin (BTS-EE): per branch and class, keep each class's "
        "precision within --margin of the backbone's.")] = False,
    margin: Annotated[float, typer.Option(help="CPM precision margin m.")] = DEFAULT_MARGIN,
    min_support: Annotated[int, typer.Option(
        help="CPM: fewest calibration samples a (branch, class) exit must take.")] = 20,
    delta: Annotated[float, typer.Option(help="Risk control: the bound holds w.p. 1-delta.")]
    = 0.1,
    bound: Annotated[_choices.Bound, typer.Option(
        help="Risk control bound: wsr (Waudby-Smith-Ramdas) or hb (Hoeffding-Bentkus).")]
    = _choices.Bound("wsr"),
    score: Annotated[_choices.Score, typer.Option(
        help="Exit score for --threshold and --cpm: softmax (top probability) or head (the "
        "learned confidence head). The default method always writes the gate score.")]
    = _choices.Score("softmax"),
    data: Annotated[str | None, typer.Option(
        "--data", "-d", help="Calibrate on other data (labels used if present) instead of the "
        "bundle's held-out split.")] = None,
    checkpoint: Checkpoint = None,
    force: Annotated[bool, typer.Option(
        help="Use a checkpoint whose hash differs from the bundle's.")] = False,
    device: Device = "cpu",
    cost: Cost = None,
    verbose: Annotated[bool, typer.Option(
        "--verbose", "-v", help="Show every (exit, class) row, with class names, instead of "
        "one row per exit.")]
    = False,
    labels: Labels = None,
    json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Calibrate exit thresholds on the bundle's held-out split and write thresholds.json/.csv.

    By default: the thresholds that cost least within --max-drop (one point) of the backbone's
    accuracy; exits that do not pay for their branch are switched off and never run. The
    table shows, per exit, its threshold, the share of calibration samples it takes, how often
    it agrees with the backbone on them and what leaving there costs (relative FLOPs); then the
    whole cascade's expected accuracy and relative FLOPs. --verbose shows every exit and class
    (by name) with the precision there.
    """
    from pteenet.calibration._calibrate import calibrate as run_calibrate  # torch: only when run

    out = Output(json)
    res = run_calibrate(bundle, threshold=threshold, cpm=cpm, margin=margin,
                        min_support=min_support, max_drop=max_drop, budget=budget, risk=risk,
                        delta=delta, bound=value(bound), score=value(score), data=data,
                        checkpoint=checkpoint, force=force, device=device, cost=value(cost),
                        progress=not (json or quiet), labels=value(labels))
    t = res.table
    if verbose:
        out.table(f"thresholds per exit and class ({t.method}, score={t.score})",
                  ["exit", "class", "threshold", "takes", "precision", "support"],
                  class_rows(res))
    else:
        out.table(f"exits ({t.method}, score={t.score}; --verbose: per class)",
                  ["exit", "threshold", "takes", "agrees", "FLOPs at exit"], exit_rows(res))
    s = res.summary
    exits = " ".join(pct(e["share"], 0) for e in s["exits"])
    acc = f"accuracy {pct(s['accuracy'])} (backbone {pct(s['backbone_accuracy'])}), " \
        if s["accuracy"] is not None else ""
    unit = "relative time" if t.params.get("cost") == "latency" else "relative FLOPs"
    out.note(f"expected on {s['num_samples']} calibration samples: {acc}agreement "
             f"{pct(s['agreement'])}, {unit} {s['mean_relative_flops']:.3f}; exits {exits}")
    if t.method == "risk":
        p = t.params
        out.note(f"risk control: {p['bound']} bound {p['ucb']:.4f} <= {p['max_drop']} "
                 f"(empirical {p['empirical']:.4f}) with probability {1 - p['delta']:.2f}")
    out.note(f"wrote {bundle}/thresholds.json and thresholds.csv")
    out.result({"method": t.method, "score": t.score, "params": t.params, "summary": s,
                "rows": res.named_rows()})


def exit_rows(res: CalibrationResult) -> list[list[str]]:
    """The library's per-exit rows (:meth:`CalibrationResult.exit_rows`), as text."""
    return [["backbone" if r["branch"] is None else f"branch {r['branch']}",
             "always" if r["branch"] is None else _thr(r["threshold"]), pct(r["share"]),
             pct(r["agreement"]), pct(r["cost"])] for r in res.exit_rows()]


def class_rows(res: CalibrationResult) -> list[list[str]]:
    return [[f"branch {r['branch']}", r["class_name"], _thr(r["threshold"]), pct(r["share"]),
             pct(r["precision"]), str(r["support"])] for r in res.named_rows()]


def _thr(v: float | None) -> str:
    return "per class" if v is None else "never" if v > 1 else f"{v:.3f}"
