"""From items to batches: bad images skipped and counted, loaders, prefetching, splits."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from pteenet.data._items import ImageData
from pteenet.errors import DataError, OptionError

__all__ = ["Batch", "collate_skip", "default_workers", "make_loader", "prefetched", "ramped",
           "split_indices"]


@dataclass
class Batch:
    """A collated batch with unreadable images removed.

    ``images`` is ``FloatTensor[B, 3, H, W]``, or ``None`` when every image in the batch was
    unreadable (the size cannot be known then). ``labels`` and ``indices`` are ``LongTensor[B]`` of
    the kept items; ``skipped`` counts the dropped ones so callers can report them.
    """

    images: Tensor | None
    labels: Tensor
    indices: Tensor
    skipped: int = 0

    def __len__(self) -> int:
        return int(self.labels.numel())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return Batch(move(self.images), move(self.labels), move(self.indices), self.skipped)

    def pin_memory(self) -> Batch:
        """Called by DataLoader when ``pin_memory=True``."""
        images = None if self.images is None else self.images.pin_memory()
        return Batch(images, self.labels.pin_memory(), self.indices.pin_memory(), self.skipped)


def collate_skip(batch: Sequence[tuple[Tensor | None, int, int]]) -> Batch:
    """Stack the readable items of ``batch``; drop and count those whose image is ``None``."""
    kept = [item for item in batch if item[0] is not None]
    images = torch.stack([item[0] for item in kept]) if kept else None
    labels = torch.tensor([int(item[1]) for item in kept], dtype=torch.long)
    indices = torch.tensor([int(item[2]) for item in kept], dtype=torch.long)
    return Batch(images, labels, indices, len(batch) - len(kept))


_T = TypeVar("_T")
_END = object()


def prefetched(batches: Iterable[_T]) -> Iterator[_T]:
    """``batches``, each next one produced in a background thread while the caller works on
    this one: where no loader process decodes (two cores or fewer, :func:`default_workers`),
    decoding the next batch (PIL lets go of the GIL) fills the cores the backbone's forward pass
    leaves idle between its many small ops. On 2 cores attach's caching pass ran 1.05-1.13x
    faster on MobileNetV3 and EfficientNet-B0, level on ResNet-50. Errors surface here, in
    order; stopping early waits for the one batch in flight."""
    it = iter(batches)
    with ThreadPoolExecutor(1, thread_name_prefix="pteenet-prefetch") as pool:
        ahead = pool.submit(next, it, _END)
        while (batch := ahead.result()) is not _END:
            ahead = pool.submit(next, it, _END)
            yield batch


def default_workers(data: ImageData) -> int:
    """Loader processes for one pass over ``data``: image files are decoded in parallel with the
    backbone's forward pass (half the cores, at most 8: the backbone needs the rest); in-memory
    datasets are not worth a process, and neither is a machine of two cores or fewer, where
    handing each decoded image over costs more than it saves (measured by
    ``benchmarks/imagenet_size.py``)."""
    cores = os.cpu_count() or 1
    if not data.from_files or cores <= 2:
        return 0
    return min(8, cores // 2)


def make_loader(
    data: ImageData,
    *,
    batch_size: int,
    indices: Sequence[int] | None = None,
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
    ramp: bool = False,
) -> DataLoader:
    """A DataLoader of :class:`Batch` over ``data`` (or the ``indices`` subset of it).

    ``pin_memory`` (for CUDA) puts batches in page-locked memory so host-to-GPU copies overlap.
    ``ramp`` (unshuffled only) makes the first batches small (:func:`ramped`), so that a pass
    which decodes ahead of its forward pass starts computing after a few images, not a batch.

    Shuffling uses its own generator seeded with ``seed``, so the order is reproducible and does
    not depend on (or disturb) torch's global RNG. ``Batch.indices`` are always indices into
    ``data``, also when iterating a subset.
    """
    if batch_size < 1:
        raise DataError(f"`batch_size` must be at least 1, got {batch_size}: pass a positive value")
    dataset: Dataset = data
    if indices is not None:
        dataset = Subset(data, _checked_indices(indices, len(data)))
    loading: dict[str, Any] = {"num_workers": num_workers, "collate_fn": collate_skip,
                               "pin_memory": pin_memory}
    if ramp and not shuffle:
        return DataLoader(dataset, batch_sampler=ramped(len(dataset), batch_size), **loading)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle,
                      generator=torch.Generator().manual_seed(int(seed)), **loading)


def ramped(n: int, batch_size: int, first: int = 8) -> list[list[int]]:
    """Positions ``0..n-1`` in order, in batches of ``first``, twice that, ... up to
    ``batch_size``. A decode-ahead pipeline (:func:`prefetched`, loader processes) cannot start
    its first forward pass before a whole batch is decoded, while the backbone waits. Starting
    small, each batch decodes while the half-size one before it runs, so the caching pass
    starts computing after a few images (see design-timings.md).
    """
    if min(first, batch_size) < 1:
        raise OptionError(f"batches must hold at least one image, got first={first}, "
                          f"batch_size={batch_size}: pass positive sizes")
    batches, start, size = [], 0, min(first, batch_size)
    while start < n:
        batches.append(list(range(start, min(n, start + size))))
        start, size = start + size, min(2 * size, batch_size)
    return batches


def _checked_indices(indices: Sequence[int], n: int) -> list[int]:
    chosen = [int(i) for i in indices]
    bad = [i for i in chosen if not 0 <= i < n]
    if bad:
        raise DataError(
            f"index {bad[0]} is out of range for a dataset of {n} images: pass indices in [0, {n})"
        )
    return chosen


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded split into (train, held-out calibration) dataset indices, both sorted."""
    if not 0 < val_fraction < 1:
        raise OptionError(f"`val_fraction` must lie strictly between 0 and 1, got {val_fraction}")
    n_val = max(1, round(n * val_fraction))
    if n - n_val < 2:  # batch norm trains on two samples at least
        raise DataError(f"only {n} samples: too few to hold out a calibration split and still "
                        f"train on two; use more images (`max_samples`) or a smaller "
                        f"`val_fraction`")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[n_val:]), sorted(perm[:n_val])
