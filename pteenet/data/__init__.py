"""Images in: folders and torchvision datasets, skipped bad files, loaders and splits."""

from pteenet.data._datasets import (
    DATASET_NAMES,
    IMAGE_EXTENSIONS,
    SPLITS,
    Batch,
    ImageData,
    available_splits,
    collate_skip,
    default_cache_dir,
    default_workers,
    make_loader,
    open_data,
    prefetched,
    ramped,
    split_indices,
)

__all__ = [
    "Batch",
    "DATASET_NAMES",
    "IMAGE_EXTENSIONS",
    "ImageData",
    "SPLITS",
    "available_splits",
    "collate_skip",
    "default_cache_dir",
    "default_workers",
    "make_loader",
    "open_data",
    "prefetched",
    "ramped",
    "split_indices",
]
