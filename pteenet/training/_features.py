"""The frozen backbone's features, computed once: what every epoch of branch training reads.

The backbone is frozen and deterministic, so its features at the cuts -- reduced by each branch's
fixed pooling -- are computed once and cached (fp16; memory-mapped to a temp file beyond
``cache_limit``); :class:`LiveFeatures` recomputes them per batch instead (``--no-cache``) with
the same result. The branches' scores and agreement on such features are measured here too.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from pteenet.cascade._model import EarlyExitModel
from pteenet.cascade._profile import steady_allocator
from pteenet.data._items import ImageData
from pteenet.data._loading import collate_skip, default_workers, make_loader, prefetched
from pteenet.errors import DataError
from pteenet.storage import CACHE_PREFIX

__all__ = ["FeatureSet", "LiveFeatures", "agreement", "branch_logits", "branch_scores",
           "compute_features", "scores_and_preds"]


@dataclass
class FeatureSet:
    """The frozen backbone's outputs on a set of samples, in a fixed order."""

    feats: list[Tensor]  # per cut, the branch's reduced map [N, 2C, h, w] (fp16 in the cache)
    final: Tensor  # backbone logits, [N, K]
    labels: Tensor  # [N], -1 when unlabeled
    indices: Tensor  # [N] dataset indices
    skipped: int = 0
    pre: Tensor | None = None  # the backbone's pre-logits [N, D], where a branch distills them

    def __len__(self) -> int:
        return int(self.indices.numel())

    def take(self, pos: Tensor, device: str | torch.device = "cpu") -> FeatureSet:
        return FeatureSet([f.index_select(0, pos).to(device, torch.float32) for f in self.feats],
                          self.final.index_select(0, pos).to(device), self.labels[pos].to(device),
                          self.indices[pos], pre=_rows(self.pre, pos, device))

    def joined(self, other: FeatureSet) -> FeatureSet:
        """These samples followed by ``other``'s (a second view of the same images: their
        unreadable images are the same ones, counted once)."""
        return FeatureSet([torch.cat([a, b]) for a, b in zip(self.feats, other.feats)],
                          torch.cat([self.final, other.final]),
                          torch.cat([self.labels, other.labels]),
                          torch.cat([self.indices, other.indices]), self.skipped,
                          None if self.pre is None else torch.cat([self.pre, other.pre]))

    def subset(self, pos: Sequence[int]) -> FeatureSet:
        """The samples at positions ``pos``, kept as stored (fp16, on the CPU)."""
        p = torch.as_tensor(list(pos), dtype=torch.long)
        return FeatureSet([f.index_select(0, p) for f in self.feats], self.final.index_select(0, p),
                          self.labels[p], self.indices[p], pre=_rows(self.pre, p))


def _rows(t: Tensor | None, pos: Tensor, device: str | torch.device = "cpu") -> Tensor | None:
    return None if t is None else t.index_select(0, pos).to(device, torch.float32)


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
        feats, final, pre = _features(self.model, batch.images.to(self.device))
        return FeatureSet([_fp16(f).to(device, torch.float32) for f in feats], final.to(device),
                          batch.labels.to(device), batch.indices, pre=_rows(
                              pre, torch.arange(len(final), device=final.device), device))


def _features(model: EarlyExitModel, x: Tensor) -> tuple[list[Tensor], Tensor, Tensor | None]:
    """The reduced maps, the logits and (where a branch distills them) the pre-logits."""
    feats, final, *pre = model.reduced_features(x, model.pre_logits)
    return feats, final, pre[0] if pre else None


def _fp16(f: Tensor) -> Tensor:
    """``f`` in fp16, clamped to its range: a value past 65504 would become inf and every loss
    NaN (random-weight Inception-v3 and MobileOne reach 1e14 at their late cuts)."""
    big = torch.finfo(torch.float16).max
    return f.clamp(-big, big).half()


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
    :func:`~pteenet.data.default_workers`; without any, a thread decodes the next batch during
    this one's forward pass, :func:`~pteenet.data.prefetched`; the first batches are small,
    :func:`~pteenet.data.ramped`); every epoch then reads the cache, not the files.
    Unreadable images are skipped and counted. Beyond ``cache_limit`` bytes the features go to a
    memory-mapped temp file in ``cache_dir`` (default: the system's temp folder), removed when
    ``stack`` closes, or by the next writer of ``cache_dir`` after a kill. On CPU the pass
    keeps freed activation buffers in the process (:func:`~pteenet.cascade.steady_allocator`):
    a batch of 224x224 maps is larger than glibc's largest mmap threshold, so every segment's
    output would otherwise be fresh pages faulted in, batch after batch.
    """
    if not str(device).startswith("cuda"):
        steady_allocator()
    workers = default_workers(data) if num_workers is None else num_workers
    loader = make_loader(data, batch_size=batch_size, indices=indices, num_workers=workers,
                         pin_memory=str(device).startswith("cuda"), ramp=True)
    n = len(indices)
    shapes = [tuple(s) for s in _cut_shapes(model, data)]
    per_sample = sum(math.prod(s) for s in shapes) * 2
    on_disk = per_sample * n > cache_limit and stack is not None
    store = [_storage((n, *s), torch.float16, on_disk, stack, cache_dir)  # type: ignore[arg-type]
             for s in shapes]
    final = torch.empty(n, model.num_classes)
    pre_all: Tensor | None = None
    labels = torch.empty(n, dtype=torch.long)
    idx = torch.empty(n, dtype=torch.long)
    pos, skipped = 0, 0
    for batch in loader if workers else prefetched(loader):
        skipped += batch.skipped
        if batch.images is not None:
            with torch.inference_mode():  # no autograd bookkeeping: the backbone's own speed
                feats, logits, pre = _features(model, batch.images.to(device, non_blocking=True))
            m = len(batch)
            for s, f in zip(store, feats):
                s[pos:pos + m] = _fp16(f.cpu())
            final[pos:pos + m] = logits.float().cpu()
            if pre is not None:
                pre_all = torch.empty(n, pre.shape[1]) if pre_all is None else pre_all
                pre_all[pos:pos + m] = pre.float().cpu()
            labels[pos:pos + m] = batch.labels
            idx[pos:pos + m] = batch.indices
            pos += m
        if progress:
            progress(len(batch) + batch.skipped)
    if pos == 0:
        raise DataError(f"none of the {n} images in {data.name} could be read")
    return FeatureSet([s[:pos] for s in store], final[:pos], labels[:pos], idx[:pos], skipped,
                      None if pre_all is None else pre_all[:pos])


def _cut_shapes(model: EarlyExitModel, data: ImageData) -> list[torch.Size]:
    h, w = data.preprocess.input_size
    feats, _ = model.reduced_features(torch.zeros(1, 3, h, w, device=_device_of(model)))
    return [f.shape[1:] for f in feats]


def _device_of(model: EarlyExitModel) -> torch.device:
    return next(iter(model.parameters()), torch.zeros(0)).device


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
        s, p = scores_and_preds(model, *model.branch_outputs(part.feats))
        scores.append(s)
        preds.append(p)
    model.branches.train(was)
    return torch.cat(scores).cpu(), torch.cat(preds).cpu()


@torch.no_grad()
def branch_logits(model: EarlyExitModel, feats: FeatureSet, device: str = "cpu") -> Tensor:
    """Every branch's own logits on every sample, ``[N, B, K]`` on the CPU (what a ZTW
    ensemble is fitted on)."""
    was = model.branches.training
    model.branches.eval()
    out = [torch.stack(model.branch_outputs(feats.take(pos, device).feats)[0], 1).float().cpu()
           for pos in torch.arange(len(feats)).split(512)]
    model.branches.train(was)
    return torch.cat(out)


def scores_and_preds(model: EarlyExitModel, logits: Sequence[Tensor], conf: Sequence[Tensor]
                     ) -> tuple[Tensor, Tensor]:
    """Every exit's score and prediction, as two ``[N, B]`` tensors: what calibration and
    bench record, so that both simulate the exit rule on the very numbers the model uses
    (the ensembled logits when the model has a ZTW ensemble)."""
    return model.exit_outputs(logits, conf)
