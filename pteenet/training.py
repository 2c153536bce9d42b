"""Training exit branches on a frozen backbone, from its own predictions.

Targets are the backbone's pseudo-labels (PTEEnet, Lahiany & Aperstein): its argmax (``hard``),
its tempered softmax (``soft``, knowledge distillation), ground-truth ``labels`` (the SDN recipe),
or ``mixed``: half the labels, half the backbone's softmax at temperature 4. ``auto`` (the
default) is ``mixed`` when the data has labels and ``soft`` when it has none. On CIFAR ResNet-44
mixed targets raised every exit's test accuracy by 1-3 points over hard pseudo-labels (the last
exits beat the backbone itself), which is what lets more samples leave early. Three modes:

* distill (default): every branch at once, each with its own cross-entropy to the targets (and
  its confidence head trained to predict whether it is right); branches are independent, so the
  loss never trades one exit against another (the SDN "IC-only" recipe, Kaya et al. 2019);
* joint: every branch at once with EENets' L_v2 loss on the frozen cascade (Demir &
  Akbas, eq. 5-8): with branch outputs y_i, confidences h_i and cumulative cost c_i,
  Y_i = h_i*y_i + (1-h_i)*Y_{i+1}, C_i = h_i*c_i + (1-h_i)*C_{i+1}, L = sum_i CE(t, Y_i) + lam*C_i,
  computed in log space so it cannot produce NaN;
* boosted (BTS-EE, Aperstein & Apartsin): one branch at a time, shallow to deep; each is trained,
  calibrated on the held-out split, and the samples it would take are removed (``hard``) or
  down-weighted by their probability of having left (``soft``, as in CalexNet) before the next
  branch trains, so every branch learns the distribution it will see at inference.

The backbone is frozen and deterministic, so its features at the cuts -- reduced by each branch's
fixed pooling -- are computed once and cached (fp16; memory-mapped to a temp file beyond
``cache_limit``) and every epoch trains only the branches' learned parts from the cache. The
learning rate follows one cycle (warm-up, then cosine decay to zero), which trained better
branches in 10 epochs than a constant rate.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .atomic import CACHE_PREFIX, atomic_path
from .data import ImageData, collate_skip, default_workers, make_loader
from .devices import check_device, threads
from .distributed import Shard, all_sum, is_main
from .early_exit import EarlyExitModel
from .errors import DataError, OptionError, TrainingError
from .thresholds import class_precision, cpm_thresholds, exit_index

__all__ = [
    "FeatureSet",
    "LiveFeatures",
    "Resume",
    "TrainConfig",
    "TrainReport",
    "compute_features",
    "distill_per_sample",
    "eenet_loss",
    "make_targets",
    "split_indices",
    "train_branches",
]

TARGETS = ("auto", "mixed", "hard", "soft", "labels")
BOOSTED = (None, "hard", "soft")
LOSSES = ("distill", "eenet")
MIX = 0.5  # the labels' share of a mixed target


@dataclass
class TrainConfig:
    """Training settings; the defaults are the ones ``pteenet attach`` uses."""

    epochs: int = 10
    batch_size: int = 256
    lr: float = 3e-3
    lam: float = 0.05
    target: str = "auto"
    temperature: float = 4.0
    loss: str = "distill"
    boosted: str | None = None
    margin: float = 0.02
    min_support: int = 20
    seed: int = 0
    device: str = "cpu"
    cache: bool = True
    cache_limit: int = 4 << 30
    num_workers: int | None = None  # loader processes for the caching pass; None: default_workers
    amp: bool = False  # bf16 autocast for the branches (CUDA, or CPUs with bf16 support)

    def validate(self, has_labels: bool) -> None:
        check_device(self.device)
        if self.epochs < 1:
            raise OptionError(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise OptionError(f"--batch-size must be at least 1, got {self.batch_size}")
        if not self.lr > 0 or math.isinf(self.lr):
            raise OptionError(f"--lr must be a positive number, got {self.lr}")
        if not self.lam >= 0 or math.isinf(self.lam):
            raise OptionError(f"--lam must be >= 0, got {self.lam}")
        if not self.temperature > 0:
            raise OptionError(f"--temperature must be positive, got {self.temperature}")
        if not 0 <= self.margin <= 1:
            raise OptionError(f"--margin must lie in [0, 1], got {self.margin}")
        if self.target not in TARGETS:
            raise OptionError(f"--target must be one of {', '.join(TARGETS)}, got {self.target}")
        if self.loss not in LOSSES:
            raise OptionError(f"--loss must be one of {', '.join(LOSSES)}, got {self.loss}")
        if self.boosted and not self.cache:
            raise OptionError("--boosted needs the feature cache; drop --no-cache")
        if self.boosted not in BOOSTED:
            raise OptionError(f"--boosted must be hard or soft, got {self.boosted}")
        if self.target in ("labels", "mixed") and not has_labels:
            raise OptionError(f"--target {self.target} needs labeled data (class subfolders)")

    def resolved_target(self, has_labels: bool) -> str:
        """``auto`` made concrete: mixed targets with labels, the backbone's softmax without."""
        if self.target != "auto":
            return self.target
        return "mixed" if has_labels else "soft"


@dataclass
class FeatureSet:
    """The frozen backbone's outputs on a set of samples, in a fixed order."""

    feats: list[Tensor]  # per cut, the branch's reduced map [N, 2C, h, w] (fp16 in the cache)
    final: Tensor  # backbone logits, [N, K]
    labels: Tensor  # [N], -1 when unlabeled
    indices: Tensor  # [N] dataset indices
    skipped: int = 0

    def __len__(self) -> int:
        return int(self.indices.numel())

    def take(self, pos: Tensor, device: str | torch.device = "cpu") -> FeatureSet:
        return FeatureSet([f.index_select(0, pos).to(device, torch.float32) for f in self.feats],
                          self.final.index_select(0, pos).to(device), self.labels[pos].to(device),
                          self.indices[pos])


class LiveFeatures:
    """The no-cache source: recomputes backbone features for every batch it is asked for.

    Same interface as :class:`FeatureSet` (``len`` and ``take``), so training code does not know
    which one it has. Features are rounded to fp16 exactly like the cache, so both train the same.
    """

    def __init__(self, model: EarlyExitModel, data: ImageData, indices: Sequence[int],
                 device: str = "cpu") -> None:
        self.model, self.data, self.device = model, data, device
        self.indices = torch.as_tensor(list(indices), dtype=torch.long)
        self._unreadable: set[int] = set()

    def __len__(self) -> int:
        return int(self.indices.numel())

    @property
    def skipped(self) -> int:
        """Unreadable images met so far (each counted once, however many epochs)."""
        return len(self._unreadable)

    def take(self, pos: Tensor, device: str | torch.device = "cpu") -> FeatureSet:
        wanted = [int(i) for i in self.indices[pos]]
        batch = collate_skip([self.data[i] for i in wanted])
        if batch.skipped:
            self._unreadable |= set(wanted) - set(batch.indices.tolist())
        if batch.images is None:
            raise DataError(f"a whole batch of images in {self.data.name} could not be read")
        feats, final = self.model.reduced_features(batch.images.to(self.device))
        return FeatureSet([f.half().to(device, torch.float32) for f in feats], final.to(device),
                          batch.labels.to(device), batch.indices)


@dataclass
class TrainReport:
    """What training did: per-epoch loss, held-out agreement per branch, boosted survivors."""

    losses: list[float] = field(default_factory=list)
    agreement: list[float] = field(default_factory=list)
    survivors: list[dict[str, int]] = field(default_factory=list)
    thresholds: Tensor | None = None
    skipped: int = 0


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded split into (train, held-out calibration) dataset indices, both sorted."""
    if not 0 < val_fraction < 1:
        raise OptionError(f"--val-fraction must lie strictly between 0 and 1, got {val_fraction}")
    n_val = max(1, round(n * val_fraction))
    if n - n_val < 1:
        raise DataError(f"only {n} samples: too few to hold out a calibration split")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[n_val:]), sorted(perm[:n_val])


def _storage(shape: tuple[int, ...], dtype: torch.dtype, on_disk: bool,
             stack: contextlib.ExitStack, folder: str | os.PathLike | None = None) -> Tensor:
    if not on_disk:
        return torch.empty(shape, dtype=dtype)
    if folder is not None:  # named with our pid: the folder's next writer removes it if we die
        Path(folder).mkdir(parents=True, exist_ok=True)
    fd, path = tempfile.mkstemp(prefix=f"{CACHE_PREFIX}{os.getpid()}-", suffix=".bin",
                                dir=folder)
    os.close(fd)
    stack.callback(lambda: os.path.exists(path) and os.unlink(path))
    numel = math.prod(shape)
    return torch.from_file(path, shared=True, size=numel, dtype=dtype).view(shape)


def compute_features(model: EarlyExitModel, data: ImageData, indices: Sequence[int], *,
                     batch_size: int = 256, device: str = "cpu", num_workers: int | None = None,
                     cache_limit: int = 4 << 30, progress: Callable[[int], None] | None = None,
                     stack: contextlib.ExitStack | None = None,
                     cache_dir: str | os.PathLike | None = None) -> FeatureSet:
    """Run the frozen backbone once over ``indices``; keep each branch's reduced map (fp16).

    Images are decoded and resized once, here (in ``num_workers`` loader processes; ``None``:
    :func:`~pteenet.data.default_workers`); every epoch then reads the cache, not the files.
    Unreadable images are skipped and counted. Beyond ``cache_limit`` bytes the features go to a
    memory-mapped temp file in ``cache_dir`` (default: the system's temp folder), removed when
    ``stack`` closes, or by the next writer of ``cache_dir`` after a kill.
    """
    workers = default_workers(data) if num_workers is None else num_workers
    loader = make_loader(data, batch_size=batch_size, indices=indices, num_workers=workers,
                         pin_memory=str(device).startswith("cuda"))
    n = len(indices)
    shapes = [tuple(s) for s in _cut_shapes(model, data)]
    per_sample = sum(math.prod(s) for s in shapes) * 2
    on_disk = per_sample * n > cache_limit and stack is not None
    store = [_storage((n, *s), torch.float16, on_disk, stack, cache_dir)  # type: ignore[arg-type]
             for s in shapes]
    final = torch.empty(n, model.num_classes)
    labels = torch.empty(n, dtype=torch.long)
    idx = torch.empty(n, dtype=torch.long)
    pos, skipped = 0, 0
    for batch in loader:
        skipped += batch.skipped
        if batch.images is not None:
            with torch.inference_mode():  # no autograd bookkeeping: the backbone's own speed
                feats, logits = model.reduced_features(batch.images.to(device, non_blocking=True))
            m = len(batch)
            for s, f in zip(store, feats):
                s[pos:pos + m] = f.to("cpu", torch.float16)
            final[pos:pos + m] = logits.float().cpu()
            labels[pos:pos + m] = batch.labels
            idx[pos:pos + m] = batch.indices
            pos += m
        if progress:
            progress(len(batch) + batch.skipped)
    if pos == 0:
        raise DataError(f"none of the {n} images in {data.name} could be read")
    return FeatureSet([s[:pos] for s in store], final[:pos], labels[:pos], idx[:pos], skipped)


def _cut_shapes(model: EarlyExitModel, data: ImageData) -> list[torch.Size]:
    h, w = data.preprocess.input_size
    feats, _ = model.reduced_features(torch.zeros(1, 3, h, w, device=_device_of(model)))
    return [f.shape[1:] for f in feats]


def _device_of(model: EarlyExitModel) -> torch.device:
    return next(iter(model.parameters()), torch.zeros(0)).device


def make_targets(final: Tensor, labels: Tensor, target: str, temperature: float = 4.0) -> Tensor:
    """Target distributions [N, K]: the backbone's argmax, its tempered softmax, the labels, or
    the labels mixed half and half with the tempered softmax (``auto`` must be resolved first)."""
    k = final.shape[1]
    soft = torch.softmax(final.float() / temperature, dim=1)
    if target == "soft":
        return soft
    hard = labels if target in ("labels", "mixed") else final.argmax(1)
    one_hot = F.one_hot(hard.clamp_min(0), k).float()
    return MIX * one_hot + (1 - MIX) * soft if target == "mixed" else one_hot


def eenet_loss(logits: Sequence[Tensor], conf: Sequence[Tensor], final: Tensor, target: Tensor,
               costs: Sequence[float], lam: float, weight: Tensor | None = None) -> Tensor:
    """The mean over samples of :func:`eenet_per_sample`."""
    return _mean(eenet_per_sample(logits, conf, final, target, costs, lam), weight)


def eenet_per_sample(logits: Sequence[Tensor], conf: Sequence[Tensor], final: Tensor,
                     target: Tensor, costs: Sequence[float], lam: float) -> Tensor:
    """EENets' L_v2 on the frozen cascade, in log space (Demir & Akbas, eq. 5-8), plus each
    branch's own cross-entropy and a confidence target.

    ``costs[i]`` is the relative cost of leaving at branch i, ``costs[-1]`` of reaching the end
    (branches evaluated on the way included). The extra per-branch term matters on a *frozen*
    cascade: its last exit is the backbone, which matches pseudo-label targets almost perfectly,
    so L_v2 alone is minimised by every confidence collapsing to 0, after which no classifier
    receives gradient (we measured 13 % agreement, chance level, on CIFAR ResNet-20). For the
    same reason the confidences sink towards 0 (we measured heads around 1e-7) and stop ranking
    samples, so each head is also trained, by binary cross-entropy, to predict whether its branch
    agrees with the target: that is what thresholds act on.
    """
    log_y = F.log_softmax(final.float(), dim=1)  # log Y_N
    big_c = torch.full_like(log_y[:, 0], float(costs[-1]))  # C_N
    total = torch.zeros_like(big_c)
    for i in range(len(logits) - 1, -1, -1):
        log_h = F.logsigmoid(conf[i]).unsqueeze(1)
        log_1mh = F.logsigmoid(-conf[i]).unsqueeze(1)
        log_y = torch.logsumexp(torch.stack([log_h + F.log_softmax(logits[i], 1),
                                             log_1mh + log_y]), dim=0)
        h = torch.sigmoid(conf[i])
        big_c = h * costs[i] + (1 - h) * big_c
        own = -(target * F.log_softmax(logits[i], 1)).sum(1)
        right = (logits[i].argmax(1) == target.argmax(1)).float()
        conf_target = F.binary_cross_entropy_with_logits(conf[i], right, reduction="none")
        total = total + (-(target * log_y).sum(1) + lam * big_c + own + conf_target)
    return total


def _mean(x: Tensor, weight: Tensor | None) -> Tensor:
    if weight is None:
        return x.mean()
    return (x * weight).sum() / weight.sum().clamp_min(1e-12)


def distill_per_sample(logits: Sequence[Tensor], conf: Sequence[Tensor], target: Tensor
                       ) -> Tensor:
    """The default loss: every branch's own cross-entropy to the targets plus its confidence
    head's, summed over branches; branches never trade off against each other (SDN's IC-only
    training, Kaya et al. 2019, on a frozen backbone)."""
    return sum(_branch_per_sample(lg, c, target) for lg, c in zip(logits, conf))


def _branch_per_sample(logits: Tensor, conf: Tensor, target: Tensor) -> Tensor:
    """Boosted mode: the branch's own classification loss, plus its confidence head trained to
    predict whether the branch agrees with the target (its exit score)."""
    ce = -(target * F.log_softmax(logits, 1)).sum(1)
    right = (logits.argmax(1) == target.argmax(1)).float()
    return ce + F.binary_cross_entropy_with_logits(conf, right, reduction="none")


def _step(opt: torch.optim.Optimizer, per_sample: Tensor, weight: Tensor | None, denom: float,
          shard: Shard, params, guard: _Guard, epoch: int) -> float:
    """One optimiser step on this rank's part of a global batch; returns the batch's loss sum.

    The local weighted sum is divided by the *global* denominator (batch size, or weight sum),
    so the gradients summed over ranks equal the single-process mean's.
    """
    local = (per_sample * weight).sum() if weight is not None else per_sample.sum()
    total = all_sum(local.detach().clone())
    guard.check(total, epoch)
    opt.zero_grad(set_to_none=True)
    (local / denom).backward()
    shard.reduce_grads(params)
    opt.step()
    return float(total)


def _autocast(config: TrainConfig) -> contextlib.AbstractContextManager:
    """bf16 mixed precision for branch forward passes when ``--amp`` is set (loss stays fp32)."""
    device_type = torch.device(config.device).type
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=config.amp)


def _batches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[Tensor]:
    """Shuffled batches; a last batch of one sample joins the one before it (batch norm needs
    two samples to train)."""
    parts = list(torch.randperm(n, generator=gen).split(batch_size))
    if len(parts) > 1 and len(parts[-1]) == 1:
        parts[-2:] = [torch.cat(parts[-2:])]
    yield from parts


@torch.no_grad()
def agreement(model: EarlyExitModel, held: FeatureSet, device: str = "cpu") -> list[float]:
    """Per branch: the share of held-out samples whose branch argmax equals the backbone's."""
    was = model.branches.training
    model.branches.eval()
    hits = torch.zeros(model.num_branches)
    for pos in torch.arange(len(held)).split(512):
        part = held.take(pos, device)
        logits, _ = model.branch_outputs(part.feats)
        ref = part.final.argmax(1)
        hits += torch.stack([(lg.argmax(1) == ref).sum().cpu() for lg in logits])
    model.branches.train(was)
    return (hits / max(len(held), 1)).tolist()


@torch.no_grad()
def branch_scores(model: EarlyExitModel, held: FeatureSet, device: str = "cpu"
                  ) -> tuple[Tensor, Tensor]:
    """Scores and predictions of every branch on every sample: two [N, B] tensors."""
    was = model.branches.training
    model.branches.eval()
    scores, preds = [], []
    for pos in torch.arange(len(held)).split(512):
        part = held.take(pos, device)
        logits, conf = model.branch_outputs(part.feats)
        scores.append(model.all_scores(logits, conf))
        preds.append(torch.stack([lg.argmax(1) for lg in logits], 1))
    model.branches.train(was)
    return torch.cat(scores).cpu(), torch.cat(preds).cpu()


class _Guard:
    """Keeps the last good branch weights so a NaN loss stops training without losing them."""

    def __init__(self, model: EarlyExitModel) -> None:
        self.model = model
        self.good = copy.deepcopy(model.branches.state_dict())

    def commit(self) -> None:
        self.good = copy.deepcopy(self.model.branches.state_dict())

    def check(self, loss: Tensor, epoch: int) -> None:
        if not torch.isfinite(loss):
            self.model.branches.load_state_dict(self.good)
            raise TrainingError(
                f"the loss became {loss.item()} in epoch {epoch + 1}; training stopped and the "
                f"branches were reset to the last good epoch (try a lower --lr)"
            )


def train_branches(model: EarlyExitModel, train: FeatureSet, held: FeatureSet,
                   config: TrainConfig, on_epoch: Callable[[int, float, list[float]], None]
                   | None = None, resume: Resume | None = None,
                   on_batch: Callable[[int], None] | None = None) -> TrainReport:
    """Train the branches (joint or boosted) from cached features; the backbone never moves.

    With ``resume``, state is saved after every epoch (after every branch when boosted) and a
    saved state is continued. ``on_batch`` is told each global batch's size (progress bars).
    """
    torch.manual_seed(config.seed)
    config = replace(config, target=config.resolved_target(_has_labels(train)))
    model.train()
    model.branches.to(config.device)
    # heads are a few small matrices: two CPU threads made an epoch from the cache 100x slower
    # than one (5.8 s against 0.06 s, ResNet-18's eight heads); streaming keeps every thread
    one = torch.device(config.device).type == "cpu" and not isinstance(train, LiveFeatures)
    with threads(1 if one else None):
        if config.boosted:
            return _train_boosted(model, train, held, config, on_epoch, resume, on_batch)
        return _train_joint(model, train, held, config, on_epoch, resume, on_batch)


def _has_labels(train: FeatureSet | LiveFeatures) -> bool:
    if isinstance(train, LiveFeatures):
        return train.data.has_labels
    return bool(len(train)) and bool((train.labels >= 0).all())


def _lr_at(step: int, total: int, peak: float) -> float:
    """One-cycle rate: linear warm-up over the first 30 % of steps, then cosine decay to ~0."""
    warm = max(1, int(0.3 * total))
    if step < warm:
        return peak * (0.04 + 0.96 * step / warm)
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


class Resume:
    """Training state saved after every epoch (every branch when boosted), so an interrupted
    attach can continue.

    The file holds only tensors and plain values (loaded with ``weights_only=True``) and is
    written atomically; ``key`` fingerprints the run so a state is never applied to another one.
    Under several processes rank 0 writes it and every rank reads it: all ranks hold the same
    branches, optimiser and sample order, and boosted survivors are saved in the global order.
    ``done`` says what the file holds (``epoch 3``), for the message of an interrupted run.
    """

    def __init__(self, path: str | os.PathLike, key: str) -> None:
        self.path, self.key = Path(path), key
        self.done: str | None = None

    def _read(self) -> dict | None:
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise TrainingError(f"resume state {self.path} is unreadable ({e}); delete it and "
                                f"start again without --resume") from e
        if not isinstance(state, dict) or state.get("key") != self.key:
            raise OptionError(f"resume state {self.path} belongs to a different attach (other "
                              f"model, data or settings); delete it or drop --resume")
        return state

    def _write(self, state: dict, done: str) -> None:
        if is_main():
            with atomic_path(self.path) as tmp:
                torch.save({"key": self.key, **state}, tmp)
        self.done = done

    def load(self, model: EarlyExitModel, opt: torch.optim.Optimizer, gen: torch.Generator,
             report: TrainReport) -> int:
        """Restore the last finished epoch; return the epoch to start from."""
        state = self._read()
        if state is None:
            return 0
        model.branches.load_state_dict(state["branches"])
        opt.load_state_dict(state["optim"])
        gen.set_state(state["gen"])
        report.losses = list(state["losses"])
        self.done = f"epoch {int(state['epoch']) + 1}"
        return int(state["epoch"]) + 1

    def save(self, epoch: int, model: EarlyExitModel, opt: torch.optim.Optimizer,
             gen: torch.Generator, report: TrainReport) -> None:
        self._write({"epoch": epoch, "branches": model.branches.state_dict(),
                     "optim": opt.state_dict(), "gen": gen.get_state(),
                     "losses": report.losses}, f"epoch {epoch + 1}")

    def load_stage(self, model: EarlyExitModel, gen: torch.Generator, report: TrainReport
                   ) -> tuple[int, Tensor, Tensor, Tensor] | None:
        """Boosted mode: restore the branches finished so far; return the next branch, the
        thresholds so far and the survivors' weights (train in the global order, held-out)."""
        state = self._read()
        if state is None:
            return None
        if "stage" not in state:
            raise OptionError(f"resume state {self.path} belongs to a different attach (other "
                              f"model, data or settings); delete it or drop --resume")
        model.branches.load_state_dict(state["branches"])
        gen.set_state(state["gen"])
        report.losses, report.survivors = list(state["losses"]), list(state["survivors"])
        self.done = f"branch {int(state['stage']) + 1}"
        return int(state["stage"]) + 1, state["thr"], state["w_train"], state["w_held"]

    def save_stage(self, stage: int, model: EarlyExitModel, gen: torch.Generator,
                   report: TrainReport, thr: Tensor, w_train: Tensor, w_held: Tensor) -> None:
        self._write({"stage": stage, "branches": model.branches.state_dict(),
                     "gen": gen.get_state(), "losses": report.losses,
                     "survivors": report.survivors, "thr": thr, "w_train": w_train,
                     "w_held": w_held}, f"branch {stage + 1}")


def _train_joint(model, train, held, config, on_epoch, resume: Resume | None,
                 on_batch: Callable[[int], None] | None) -> TrainReport:
    opt = torch.optim.Adam(model.branches.parameters(), lr=config.lr)
    gen = torch.Generator().manual_seed(config.seed)
    costs = model.exit_costs()
    report, guard = TrainReport(), _Guard(model)
    start = resume.load(model, opt, gen, report) if resume else 0
    guard.commit()
    if start and on_epoch:
        on_epoch(start - 1, report.losses[-1], agreement(model, held, config.device))
    shard = Shard(train.indices)
    params = list(model.branches.parameters())
    steps = math.ceil(len(shard) / config.batch_size)
    for epoch in range(start, config.epochs):
        total = 0.0
        for i, pos in enumerate(_batches(len(shard), config.batch_size, gen)):
            _set_lr(opt, _lr_at(epoch * steps + i, config.epochs * steps, config.lr))
            part = train.take(shard.select(pos), config.device)
            target = make_targets(part.final, part.labels, config.target, config.temperature)
            with _autocast(config):
                logits, conf = model.branch_outputs(part.feats)
            logits, conf = [lg.float() for lg in logits], [c.float() for c in conf]
            if config.loss == "eenet":
                per_sample = eenet_per_sample(logits, conf, part.final, target, costs, config.lam)
            else:
                per_sample = distill_per_sample(logits, conf, target)
            total += _step(opt, per_sample, None, len(pos), shard, params, guard, epoch)
            if on_batch:
                on_batch(len(pos))
        shard.average_buffers(model.branches)
        guard.commit()
        report.losses.append(total / len(shard))
        if resume:
            resume.save(epoch, model, opt, gen, report)
        if on_epoch:
            report.agreement = agreement(model, held, config.device)
            on_epoch(epoch, report.losses[-1], report.agreement)
    if not on_epoch or not report.agreement:
        report.agreement = agreement(model, held, config.device)
    return report


def _train_boosted(model, train, held, config, on_epoch, resume: Resume | None,
                   on_batch: Callable[[int], None] | None) -> TrainReport:
    """BTS-EE: train branch k on the survivors of branches < k, calibrate it, remove its exits.
    With ``resume`` the state is saved after every branch but the last."""
    report = TrainReport()
    b, k_cls = model.num_branches, model.num_classes
    thr = torch.full((b, k_cls), math.inf)
    w_train = torch.ones(len(train))
    w_held = torch.ones(len(held))
    gen = torch.Generator().manual_seed(config.seed)
    labeled = config.target in ("labels", "mixed")
    ref = held.labels if labeled else held.final.argmax(1)
    precision = class_precision(held.final.argmax(1), ref, k_cls) \
        if labeled else None
    shard = Shard(train.indices)
    start = 0
    saved = resume.load_stage(model, gen, report) if resume else None
    if saved is not None:
        start, thr, w_global, w_held = saved
        w_train = shard.to_local(w_global)
        if on_epoch:
            on_epoch(start * config.epochs - 1, report.losses[-1], [])
    for k in range(start, b):
        w_global = shard.to_global(w_train)
        report.survivors.append({"train": int((w_global > 0.5).sum()),
                                 "held_out": int((w_held > 0.5).sum())})
        _train_one(model, k, train, w_global, shard, config, gen, on_epoch, report, on_batch)
        s_held, p_held = branch_scores(model, held, config.device)
        alive = w_held > 0.5
        table = cpm_thresholds(s_held[alive, k:k + 1], p_held[alive, k:k + 1], ref[alive],
                               k_cls, config.margin, config.min_support, precision)
        thr[k] = table[0]
        if k == b - 1:
            break
        w_train = w_train * _survival(model, train, k, thr, config)
        w_held = w_held * _survival(model, held, k, thr, config)
        if resume:
            resume.save_stage(k, model, gen, report, thr, shard.to_global(w_train), w_held)
    report.agreement = agreement(model, held, config.device)
    report.thresholds = thr
    return report


def _survival(model, data: FeatureSet, k: int, thr: Tensor, config: TrainConfig) -> Tensor:
    """Probability of going on past branch k: 0/1 (hard) or a smooth step of score - threshold."""
    scores, preds = branch_scores(model, data, config.device)
    t = thr[k].gather(0, preds[:, k])
    if config.boosted == "hard":
        return (exit_index(scores[:, k:k + 1], preds[:, k:k + 1], thr[k:k + 1]) == 1).float()
    return torch.where(torch.isinf(t), torch.ones_like(t),
                       torch.sigmoid((t - scores[:, k]) / 0.05))


def _train_one(model, k, train, weight: Tensor, shard: Shard, config, gen, on_epoch,
               report, on_batch: Callable[[int], None] | None) -> None:
    """Train branch k on the survivors; ``weight`` is the global survival vector (all ranks)."""
    soft = config.boosted == "soft"
    keep = (weight > (1e-3 if soft else 0.5)).nonzero().squeeze(1)
    if keep.numel() == 0:
        return
    branch = model.branches[k]
    params = list(branch.parameters())
    opt = torch.optim.Adam(params, lr=config.lr)
    guard = _Guard(model)
    local_w = shard.to_local(weight)
    steps = math.ceil(keep.numel() / config.batch_size)
    for epoch in range(config.epochs):
        total = 0.0
        for i, pos in enumerate(_batches(keep.numel(), config.batch_size, gen)):
            _set_lr(opt, _lr_at(epoch * steps + i, config.epochs * steps, config.lr))
            glob = keep[pos]
            sel = shard.select(glob)
            part = train.take(sel, config.device)
            target = make_targets(part.final, part.labels, config.target, config.temperature)
            with _autocast(config):
                logits, conf = branch.head(part.feats[k])
            per_sample = _branch_per_sample(logits.float(), conf.float(), target)
            w = local_w[sel].to(config.device) if soft else None
            denom = float(weight[glob].sum()) if soft else len(glob)
            total += _step(opt, per_sample, w, denom, shard, params, guard, epoch)
            if on_batch:
                on_batch(len(glob))
        shard.average_buffers(branch)
        guard.commit()
        report.losses.append(total / keep.numel())
        if on_epoch:
            on_epoch(k * config.epochs + epoch, report.losses[-1], [])
