"""``pteenet attach``: place and train exit branches, write the bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pteenet.choices import (
    AUTO_VIEWS,
    DEFAULT_BRANCH,
    DEFAULT_BRANCHES,
    DEFAULT_BUDGET,
    DEFAULT_POLICY,
    DISTILL_MIN_CLASSES,
)
from pteenet.training._config import TrainConfig

from . import _choices
from ._choices import value
from ._errors import as_shown
from ._options import (
    At,
    Checkpoint,
    Cost,
    Cuts,
    Device,
    InputSize,
    Labels,
    Mean,
    NumClasses,
    Placement,
    Pretrained,
    Quiet,
    Std,
    floats,
    names,
    preprocess_options,
)
from ._output import Output, human, kb, pct

_CONFIG = TrainConfig()  # the library's defaults, shown and used as the CLI's


def attach(
    model: Annotated[str, typer.Argument(help="Backbone name, e.g. resnet44 or timm:resnet18.")],
    data: Annotated[str, typer.Option(
        "--data", "-d", help="Image folder (<class>/<image>, or train/ + test/ inside) or a "
        "dataset name: cifar10, cifar100, svhn, mnist, fashion-mnist. Labels are optional.")],
    checkpoint: Checkpoint = None,
    pretrained: Pretrained = True,
    num_classes: NumClasses = None,
    input_size: InputSize = None,
    mean: Mean = None,
    std: Std = None,
    branches: Annotated[int | None, typer.Option(
        "--branches", "-n", min=1, help=f"Number of exit branches (default: {DEFAULT_BRANCHES}, "
        "or one per useful cut point where there are fewer).")] = None,
    placement: Placement = _choices.Placement(DEFAULT_POLICY),
    at: At = None,
    cuts: Cuts = None,
    branch: Annotated[_choices.Branch, typer.Option(
        "--branch", help="Branch type: mlp (the default: pooled map, 4x4 or smaller for wide "
        "maps, one hidden layer), distill (2x2 cell averages mapped through a hidden layer into "
        "the backbone's pre-logits, answered by its own frozen classifier), auto (distill on a "
        "linear classifier over 100 or more classes, else mlp), "
        "conv1/conv2/conv3 (PTEEnet ConvX on the pooled map), conv1d (BTS-EE, lightweight), "
        "pool (EENets Bnpool) or sdn.")] = _choices.Branch(DEFAULT_BRANCH),
    branch_budget: Annotated[float, typer.Option(
        "--branch-budget", help="Most FLOPs one branch may cost, as a share of the backbone's "
        "(0.01 = 1 %); mlp and ConvX widths shrink to fit.")] = DEFAULT_BUDGET,
    epochs: Annotated[int, typer.Option(
        help="Training epochs (per branch when boosted).")] = _CONFIG.epochs,
    loss: Annotated[_choices.Loss, typer.Option(
        help="distill (each branch learns the targets on its own; the default) or eenet "
        "(EENets' cost-aware L_v2 over the whole cascade, weighted by --lam).")]
    = _choices.Loss(_CONFIG.loss),
    lam: Annotated[float, typer.Option(
        help="EENets cost weight lambda in the L_v2 loss.")] = _CONFIG.lam,
    target: Annotated[_choices.Target, typer.Option(
        help="auto (mixed with labels, soft without), mixed (half labels, half the backbone's "
        "softmax), hard (backbone argmax), soft (its softmax at --temperature) or labels.")]
    = _choices.Target(_CONFIG.target),
    temperature: Annotated[float, typer.Option(
        help="Distillation temperature of soft and mixed targets.")]
    = _CONFIG.temperature,
    boosted: Annotated[_choices.Boost | None, typer.Option(
        help="BTS-EE sequential training, one branch at a time; the value is required: hard "
        "(drop the samples earlier exits take) or soft (down-weight them).")] = None,
    margin: Annotated[float, typer.Option(
        help="CPM margin used between boosted stages.")] = _CONFIG.margin,
    val_fraction: Annotated[float, typer.Option(
        help="Share of the data held out for calibration (never trained on); risk control "
        "certifies on two thirds of it, and its bound tightens with every sample.")] = 0.2,
    out: Annotated[Path, typer.Option("--out", "-o", help="Bundle folder.")] = Path("pteenet-out"),
    seed: Annotated[int, typer.Option(
        help="Random seed (split, init, order).")] = _CONFIG.seed,
    device: Device = "cpu",
    batch_size: Annotated[int, typer.Option(
        help="Training batch size.")] = _CONFIG.batch_size,
    lr: Annotated[float, typer.Option(help="Peak Adam learning rate (one-cycle schedule).")]
    = _CONFIG.lr,
    no_cache: Annotated[bool, typer.Option(
        "--no-cache", help="Recompute backbone features every epoch instead of caching them.")]
    = False,
    max_samples: Annotated[int | None, typer.Option(
        help="Use a seeded subset of this many images (quick runs).", min=3)] = None,
    amp: Annotated[bool, typer.Option(
        help="bf16 mixed precision for branch training (CUDA, or CPUs with bf16).")]
    = _CONFIG.amp,
    views: Annotated[int | None, typer.Option(
        help="Views of each training image the branches learn from, each with the backbone's "
        "answer on it as the target: 1 the image, 2 also its mirror, each more a random shift "
        "(pad-and-crop). Each view is one more caching pass; photos only (not digits or text). "
        f"Default: {AUTO_VIEWS} on backbones of fewer than {DISTILL_MIN_CLASSES} classes (CIFAR "
        "ResNet-44: 0.45 -> 0.40 of the FLOPs), 1 on ImageNet-size ones (no gain measured).",
        min=1, show_default=False)] = _CONFIG.views,
    resume: Annotated[bool, typer.Option(
        help="Save training state every epoch (every branch when boosted) and continue an "
        "interrupted attach from it; Ctrl-C prints the command that does.")] = False,
    cost: Cost = None,
    ensemble: Annotated[_choices.Ensemble | None, typer.Option(
        help="Opt-in: ztw makes each exit answer with a weighted geometric ensemble of the exits "
        "so far (Zero Time Waste), fitted on half of the held-out split (the other half "
        "calibrates); every branch up to the last exit on then runs. Default: each exit alone.")]
    = None,
    labels: Labels = None,
    quiet: Quiet = False,
) -> None:
    """Attach N exit branches to MODEL and train them on the backbone's own predictions.

    The backbone stays frozen; its features at the exits are computed once and cached. The
    held-out split then calibrates the exits (least FLOPs within one point of accuracy; exits
    that do not pay are switched off), and the bundle (branches.safetensors +
    thresholds.json/csv) is written atomically to --out, ready for bench or pteenet.load.
    """
    from pteenet.jobs._attach import attach as run_attach  # torch: only when run

    out_ = Output()
    config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, lam=lam,
                         target=value(target), temperature=temperature, loss=value(loss),
                         boosted=value(boosted), margin=margin,
                         seed=seed, device=device, cache=not no_cache, amp=amp, views=views)
    res = run_attach(model, data, checkpoint=checkpoint, branches=branches,
                     placement=value(placement), at=floats(at, "--at"), cuts=names(cuts),
                     branch=value(branch),
                     branch_budget=branch_budget,
                     val_fraction=val_fraction, out=out, config=config, num_classes=num_classes,
                     **preprocess_options(input_size, mean, std),
                     max_samples=max_samples, progress=not quiet, resume=resume,
                     pretrained=pretrained, cost=value(cost) or "flops",
                     ensemble=value(ensemble), labels=value(labels) or "auto")
    if not res.reports:  # another rank of a torchrun launch: rank 0 reports
        return
    for line in res.said:
        out_.note(as_shown(line))
    for note in res.notes:
        out_.warn(as_shown(note))
    on, runs = res.model.active, res.model.evaluated
    state = ["on" if o else "runs (ensemble)" if r else "off" for o, r in zip(on, runs)]
    rows = [[r["branch"], r["cut"], r["type"], pct(r["exit_flops"]), pct(r["branch_flops"], 2),
             kb(r["cache_bytes"]), pct(r["agreement"]), state[r["branch"]]]
            for r in res.rows()]
    out_.table(f"{res.info.backbone['source']}:{res.info.backbone['name']}: "
               f"{len(rows)} exits ({res.info.training['mode']})",
               ["branch", "cut", "type", "FLOPs at exit", "branch cost", "cache/image",
                "agrees (held-out)", "calibrated"], rows)
    out_.note(f"feature cache: {kb(sum(r['cache_bytes'] for r in res.rows()))} per image")
    if res.table is not None and res.table.summary:
        s = res.table.summary
        out_.note(f"calibrated ({res.table.method}) on the held-out split: relative FLOPs "
                  f"{s['mean_relative_flops']:.3f}, "
                  + (f"top-1 {pct(s['accuracy'])} vs backbone {pct(s['backbone_accuracy'])}"
                     if s["accuracy"] is not None else f"agreement {pct(s['agreement'])}"))
    if res.report.skipped:
        out_.note(f"skipped {res.report.skipped} unreadable images")
    out_.note(f"backbone {human(res.model.backbone_flops)}FLOPs; trained in {res.seconds:.1f}s; "
              f"bundle written to {out}/ (next: pteenet calibrate --bundle {out})")
