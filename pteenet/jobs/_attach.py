"""The whole attach job: backbone -> trace -> placement -> branches -> training -> bundle.

:func:`attach` is what ``pteenet attach`` runs; every step is also public on its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from pteenet import __version__
from pteenet.backbone._custom import wrap_module
from pteenet.backbone._registry import Backbone, create_backbone, label_names
from pteenet.bundle._derived import bundle_hash, remove_stale
from pteenet.bundle._schema import BundleInfo, ThresholdTable, calibration_digest
from pteenet.bundle._write import save_bundle
from pteenet.calibration._calibrate import choose_table
from pteenet.calibration._collect import outputs_from_features
from pteenet.cascade._branches import cache_bytes, resolve_kind
from pteenet.cascade._build import build_early_exit
from pteenet.cascade._ensemble import fit_split, fit_ztw
from pteenet.cascade._model import EarlyExitModel
from pteenet.cascade._profile import cut_time_fractions, probe_images
from pteenet.choices import COSTS, DEFAULT_BRANCH, DEFAULT_BUDGET, DEFAULT_POLICY, ENSEMBLES
from pteenet.data._datasets import available_splits, open_data
from pteenet.data._items import Mirrored, Shifted
from pteenet.data._loading import split_indices
from pteenet.errors import Interrupted, OptionError
from pteenet.graph._head import find_head
from pteenet.graph._placement import choose_cuts, spread_note, useful_cuts
from pteenet.graph._tracing import Trace, trace_backbone
from pteenet.progress import bar as progress_bar
from pteenet.storage import writes_into
from pteenet.training._config import TrainConfig, TrainReport
from pteenet.training._distributed import (
    all_sum,
    init_from_env,
    is_main,
    launched_as_main,
    rank_world,
)
from pteenet.training._features import FeatureSet, LiveFeatures, branch_logits, compute_features
from pteenet.training._resume import Resume
from pteenet.training._train import train_branches

__all__ = ["STATE_FILE", "WARN_SHARE", "AttachResult", "attach"]

STATE_FILE = ".attach-state.pt"
WARN_SHARE = 0.25  # attach warns when all branches together cost more than this


@dataclass
class AttachResult:
    """What :func:`attach` produced: the trained model, where it went, and how training went."""

    model: EarlyExitModel
    info: BundleInfo
    trace: Trace
    report: TrainReport
    seconds: float
    table: ThresholdTable | None = None
    notes: list[str] = field(default_factory=list)  # warnings
    said: list[str] = field(default_factory=list)  # what was inferred or tidied, not warnings
    reports: bool = True  # False on every torchrun rank but the first: one process reports

    def rows(self) -> list[dict]:
        """Per branch: cut, FLOPs fraction at the exit, bytes per image in the feature cache,
        and held-out agreement with the backbone."""
        costs = self.model.cost_in("flops").exits(self.model.active)
        return [{"branch": i, "cut": c, "type": b["type"], "exit_flops": costs[i],
                 "branch_flops": b["flops"] / self.model.backbone_flops,
                 "cache_bytes": b["cache_bytes"],
                 "agreement": self.report.agreement[i] if self.report.agreement else None}
                for i, (c, b) in enumerate(zip(self.info.cuts, self.info.branches))]


@writes_into("out", create=True, when=launched_as_main)  # lock + writability, before any work
def attach(
    model: str | nn.Module | Backbone,
    data: str | os.PathLike,
    *,
    checkpoint: str | os.PathLike | None = None,
    branches: int | None = None,
    placement: str = DEFAULT_POLICY,
    at: Sequence[float] | None = None,
    cuts: Sequence[str] | None = None,
    branch: str = DEFAULT_BRANCH,
    branch_budget: float | None = DEFAULT_BUDGET,
    val_fraction: float = 0.2,
    out: str | os.PathLike = "pteenet-out",
    config: TrainConfig | None = None,
    num_classes: int | None = None,
    input_size: tuple[int, int] | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
    max_samples: int | None = None,
    progress: bool = True,
    resume: bool = False,
    cost: str = "flops",
    pretrained: bool = True,
    ensemble: str | None = None,
    labels: str = "auto",
) -> AttachResult:
    """Place exits on a frozen backbone, train them on its pseudo-labels and write the bundle.

    ``model`` is a registry name (``resnet20``, ``timm:resnet50``), a :class:`Backbone` already
    built, or the user's own ``nn.Module`` (frozen, its weights never changed; ``input_size``,
    ``mean`` and ``std`` describe its inputs, ImageNet's at 224x224 by default): its bundle
    records the weights' hash and loads with ``pteenet.load(path, model=the_module)``.

    ``cuts`` names modules to split at (for models fx cannot trace whole); otherwise ``at`` or
    ``placement`` with ``branches`` (default: 10, or one per useful cut point where there are
    fewer) choose among the traced cut points. Each branch costs at most
    ``branch_budget`` of the backbone's FLOPs. ``max_samples`` trains on a seeded subset (quick
    runs). After training, the held-out split calibrates the bundle with the default rule
    (:func:`pteenet.calibration.choose_table`: least cost within one point of accuracy), so the
    bundle is ready to use. The bundle is written only when training has finished; with
    ``resume`` the training state is saved after every epoch (every branch when boosted) in
    ``out/.attach-state.pt`` and an interrupted run with the same settings continues from there;
    Ctrl-C raises :class:`~pteenet.errors.Interrupted`, saying what was kept. After writing,
    derived files of the bundle it replaced are removed (:func:`pteenet.bundle.remove_stale`).
    ``pretrained=False`` without a checkpoint starts from seeded random weights.
    ``labels="none"`` ignores the data's class folders (pseudo-labels only); the bundle records
    it, so calibrate and bench read the data alike.
    ``cost="latency"`` measures each piece's time on this machine and uses it instead of FLOPs
    for placement, L_v2's cost term and calibration (:mod:`pteenet.cascade._profile`).
    ``ensemble="ztw"`` makes each exit answer with a geometric ensemble of the exits so far
    (ZTW, Wołczyk et al. 2021; :func:`_fit_ensemble` says where its weights are fitted).
    """
    config = config or TrainConfig()
    config.validate(has_labels=True)  # options first: fail before any download or trace
    _check_cost(cost)
    _check_ensemble(ensemble, config)
    init_from_env(config.device)
    available_splits(data)  # the data must exist before the backbone is fetched
    if Path(out).exists() and not Path(out).is_dir():
        raise OptionError(f"`out` {out} is a file; the bundle needs a folder")
    start = time.perf_counter()
    if isinstance(model, Backbone):
        bb = model
    elif isinstance(model, nn.Module):
        bb = wrap_module(model, num_classes=num_classes, input_size=input_size, mean=mean,
                         std=std)
    else:
        bb = create_backbone(model, checkpoint=checkpoint, pretrained=pretrained,
                             num_classes=num_classes, input_size=input_size, mean=mean, std=std)
    dataset = open_data(data, bb.preprocess, split="train", label_names=label_names(bb),
                        labels=labels)
    config.validate(dataset.has_labels)
    labeled = dataset.has_labels and len(dataset.classes or []) == bb.num_classes
    if dataset.has_labels and not labeled and config.target in ("labels", "mixed"):
        raise OptionError(f"the data has {len(dataset.classes or [])} classes but the backbone "
                          f"predicts {bb.num_classes}; `target` {config.target} needs them to "
                          f"match")
    # labels whose classes are not the backbone's cannot be targets: auto falls back to soft
    config = replace(config, target=config.resolved_target(labeled),
                     views=config.resolved_views(bb.num_classes))
    trace = trace_backbone(bb.model, bb.preprocess.input_size, cuts=cuts)
    probe = probe_images(bb.preprocess.input_size, config.device) if cost == "latency" else None
    fractions = None
    if probe is not None and not cuts:
        fractions = cut_time_fractions(trace, [c.name for c in useful_cuts(trace)], probe)
    names = list(cuts) if cuts else choose_cuts(trace, branches, placement, at, fractions)
    head = find_head(trace)
    branch = resolve_kind(branch, None if head is None else (head.weight, head.bias),
                          None if branch_budget is None else branch_budget * trace.total_flops)
    torch.manual_seed(config.seed)
    ee = build_early_exit(trace, names, bb.num_classes, branch,
                          budget=branch_budget).to(config.device)
    if probe is not None:
        ee.use_cost("latency", ee.profile(probe))
    notes, said = _cost_notes(ee), list(bb.notes)
    if dataset.has_labels and not labeled:  # not silently: the user may expect them used
        said.append(f"the data has {len(dataset.classes or [])} class folders but the backbone "
                    f"predicts {bb.num_classes} classes: the folders' labels are not used, the "
                    f"branches learn the backbone's own predictions")
    spread = None if cuts or fractions else spread_note(trace, names, placement, at)
    notes += [spread] if spread else []
    n = len(dataset)
    pool = list(range(n))
    if max_samples is not None and max_samples < n:
        g = torch.Generator().manual_seed(config.seed)
        pool = sorted(torch.randperm(n, generator=g)[:max_samples].tolist())
    train_pos, held_pos = split_indices(len(pool), val_fraction, config.seed)
    train_idx, held_idx = [pool[i] for i in train_pos], [pool[i] for i in held_pos]
    state = Resume(Path(out) / STATE_FILE, _fingerprint(bb, names, branch, config, data,
                                                        pool, cost)) if resume else None
    with _on_interrupt(out, state):
        report, held, table, fitted = _train(ee, dataset, train_idx, held_idx, config, out,
                                             state, labeled, progress, ensemble)
        ee.set_thresholds(table.thresholds, score=table.score, gamma=table.gamma)
        info = _bundle_info(bb, ee, trace, names, bool(cuts), branch, dataset, config, report,
                            held, val_fraction, len(pool), data)
        info.ensemble, info.data["labels"] = fitted, labels
        if is_main():  # one writer; the other ranks hold the same branches
            replaced = bundle_hash(out)
            save_bundle(out, ee, info, table)
            (Path(out) / STATE_FILE).unlink(missing_ok=True)
            stale = remove_stale(out, replaced)
            if stale:
                said.append(f"removed {', '.join(stale)} from {out}: derived from the bundle "
                            f"this one replaced")
    return AttachResult(ee, info, trace, report, time.perf_counter() - start, table, notes,
                        said, is_main())


def _train(ee: EarlyExitModel, dataset, train_idx: list[int], held_idx: list[int],
           config: TrainConfig, out, state: Resume | None, labeled: bool, progress: bool,
           ensemble: str | None = None
           ) -> tuple[TrainReport, FeatureSet, ThresholdTable, dict | None]:
    """Cache the backbone's features, train the branches, fit the ensemble if asked, choose the
    first table; each rank caches and trains its own shard of ``train_idx``. Rank 0 shows the
    bars: images, per batch, so each has a rate and an ETA. Returns the held-out samples the
    table was calibrated on and the ensemble's record for the bundle."""
    rank, world = rank_world()
    rounds = config.epochs * (ee.num_branches if config.boosted else 1)
    views = config.views
    with contextlib.ExitStack() as stack, progress_bar(progress and rank == 0) as bar:
        mine = train_idx[rank::world]
        task = bar.add_task("backbone features", total=(views * len(mine) if config.cache
                                                         else 0) + len(held_idx))
        kw = dict(batch_size=256, device=config.device, num_workers=config.num_workers,
                  cache_limit=config.cache_limit, stack=stack, cache_dir=out,
                  progress=lambda m: bar.advance(task, m))
        train = compute_features(ee, dataset, mine, **kw) if config.cache else \
            LiveFeatures(ee, dataset, mine, config.device)
        for view in _views(dataset, views, config.seed):
            train = train.joined(compute_features(ee, view, mine, **kw))
        held = compute_features(ee, dataset, held_idx, **kw)
        etask = bar.add_task("training", total=rounds * views * len(train_idx))

        def on_epoch(epoch: int, loss: float, agree: list[float]) -> None:
            shown = " ".join(f"{a:.0%}" for a in agree)
            bar.update(etask, completed=(epoch + 1) * views * len(train_idx),  # boosted: + rest
                       info=f"loss {loss:.3f}" + (f"  agree {shown}" if shown else ""))

        report = train_branches(ee, train, held, config, on_epoch, state,
                                on_batch=lambda m: bar.advance(etask, m))
        report.skipped = int(all_sum(torch.tensor(train.skipped, device=config.device))) + \
            held.skipped
        ee.eval()
        fitted = None
        if ensemble is not None:
            held, fitted = _fit_ensemble(ee, held, labeled, config)
        return report, held, _first_table(ee, held, report, config, labeled), fitted


def _views(dataset, views: int, seed: int) -> list:
    """The extra training views beyond the image itself: its mirror, then random shifts, each
    drawn from its own seed (``TrainConfig.views``)."""
    shifts = [Shifted(dataset, (seed * 1009 + v) % (1 << 64)) for v in range(2, views)]
    extra = [Mirrored(dataset), *shifts]
    return extra[:views - 1]


def _fit_ensemble(ee: EarlyExitModel, held: FeatureSet, labeled: bool, config: TrainConfig
                  ) -> tuple[FeatureSet, dict]:
    """Fit ZTW's weights (Wołczyk et al. 2021) on a seeded half of the held-out split and set
    them on ``ee``; return the other half, the only one calibration then sees (the bundle
    records it as its calibration split), and the record of the fit.

    Not on the training split: the branches fit it more closely than new data, so weights
    fitted there would trust the later exits' overconfident answers. Not on the samples that
    calibrate: thresholds chosen where the weights were fitted would look better than they
    are. Targets: labels where the data's classes are the backbone's, else its predictions."""
    fit_pos, cal_pos = fit_split(len(held), config.seed)
    part = held.subset(fit_pos)
    usable = labeled and bool((part.labels >= 0).all())
    targets = part.labels if usable else part.final.argmax(1)
    ee.set_ensemble(fit_ztw(branch_logits(ee, part, config.device), targets))
    fit_idx = sorted(part.indices.tolist())
    return held.subset(cal_pos), {"kind": "ztw", "fit_samples": len(fit_idx),
                                  "fit_sha256": calibration_digest(fit_idx),
                                  "fit_targets": "labels" if usable else "backbone"}


@contextlib.contextmanager
def _on_interrupt(out: str | os.PathLike, state: Resume | None) -> Iterator[None]:
    """Ctrl-C becomes :class:`Interrupted` saying what was kept: the training state, which the
    same command with ``--resume`` continues, or nothing (earlier files are intact either
    way: the bundle is written only at the end, with one commit point)."""
    try:
        yield
    except KeyboardInterrupt as e:
        if state is not None and state.done and state.path.is_file():
            raise Interrupted(f"the training state after {state.done} is kept in {state.path}; "
                              f"no bundle was written (earlier files in {out} are intact)",
                              resumable=True) from e
        hint = "" if state is not None else "; with `resume` attach keeps its training state " \
            "after every epoch"
        raise Interrupted(f"nothing was written (earlier files in {out} are intact){hint}") \
            from e


def _check_ensemble(ensemble: str | None, config: TrainConfig) -> None:
    if ensemble is not None and ensemble not in ENSEMBLES:
        raise OptionError(f"`ensemble` must be one of {', '.join(ENSEMBLES)} or None, got "
                          f"{ensemble}")
    if ensemble is not None and config.boosted:
        raise OptionError("`ensemble` cannot be combined with `boosted`: boosted training "
                          "chooses its thresholds on each branch's own answers")


def _check_cost(cost: str) -> None:
    if cost not in COSTS:
        raise OptionError(f"unknown cost '{cost}': use one of {', '.join(COSTS)}")
    if cost == "latency" and rank_world()[1] > 1:
        raise OptionError("`cost` latency measures one process's time: run attach without "
                          "torchrun, or with `cost` flops")


def _first_table(ee: EarlyExitModel, held, report: TrainReport, config: TrainConfig,
                 labeled: bool) -> ThresholdTable:
    """The table the bundle leaves attach with: boosted training's own CPM table, else the
    default calibration on the held-out features already in memory (no second backbone pass)."""
    if report.thresholds is not None:
        return ThresholdTable(report.thresholds, ee.score, "cpm",
                              {"margin": config.margin, "boosted": True})
    ee.set_thresholds(1.0, score="softmax")  # the cost search ranks by top softmax
    return choose_table(outputs_from_features(ee, held, labeled, config.device), ee.num_classes)


def _cost_notes(ee: EarlyExitModel) -> list[str]:
    share = sum(ee.branch_flops) / ee.backbone_flops
    if share <= WARN_SHARE:
        return []
    return [f"the branches together cost {share:.0%} of the backbone (above {WARN_SHARE:.0%}); "
            f"calibration switches off the ones that do not pay, but fewer or cheaper branches "
            f"(`branches`, `branch_budget`) train faster"]


def _fingerprint(bb: Backbone, names, branch, config: TrainConfig, data, pool, cost) -> str:
    parts = [bb.full_name, bb.checkpoint_sha256, bb.weights_sha256, names, branch,
             asdict(config), str(data), cost,
             len(pool), hashlib.sha256(str(pool).encode()).hexdigest()]
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def _bundle_info(bb: Backbone, ee: EarlyExitModel, trace: Trace, names, module_cuts, branch,
                 dataset, config, report, held, val_fraction, n_pool, data) -> BundleInfo:
    ckpt = bb.checkpoint
    held_idx = sorted(held.indices.tolist())
    digest = hashlib.sha256(",".join(map(str, held_idx)).encode()).hexdigest()
    return BundleInfo(
        path=Path("."),
        backbone={"name": bb.name, "source": bb.source, "num_classes": bb.num_classes,
                  "checkpoint": Path(ckpt).name if ckpt else None,
                  "checkpoint_path": str(Path(ckpt).resolve()) if ckpt else None,
                  "checkpoint_sha256": bb.checkpoint_sha256, "pretrained": bb.pretrained,
                  **({"weights_sha256": bb.weights_sha256} if bb.weights_sha256 else {})},
        preprocess=bb.preprocess, cuts=list(names), module_cuts=module_cuts,
        branches=[{"type": branch, "flops": f, "width": _recorded_width(b),
                   "reduce": {"grid": b.reduce.size, "channel_group": b.reduce.group,
                              "layout": b.reduce.layout},
                   "cache_bytes": cache_bytes(b.reduce, trace.cut(c).shape)}
                  for b, f, c in zip(ee.branches, ee.branch_flops, names)],
        segment_flops=ee.segment_flops,
        classes=bb.classes or (list(dataset.classes) if dataset.classes and
                               len(dataset.classes) == bb.num_classes else None),
        training={**asdict(config), "mode": f"boosted-{config.boosted}" if config.boosted
                  else config.loss, "losses": report.losses, "agreement": report.agreement,
                  "survivors": report.survivors, "skipped_images": report.skipped,
                  "pteenet_version": __version__},
        data={"spec": str(Path(data).resolve()) if Path(str(data)).exists() else str(data),
              "split": "train", "num_samples": n_pool, "val_fraction": val_fraction,
              "has_labels": dataset.has_labels},
        calibration_indices=held_idx,
        extra={"calibration_sha256": digest},
        cost=ee.cost.kind, latency=ee.latency,
    )


def _recorded_width(b: nn.Module) -> int:
    """What rebuilds a branch at its trained size: the hidden width (a distill branch's body
    records it; its classifier is the backbone's), else the classifier's input width."""
    hidden = getattr(b.body, "hidden", None)
    return int(hidden) if hidden is not None else int(b.classifier.in_features)

