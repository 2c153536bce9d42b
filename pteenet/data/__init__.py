"""Images in: folders and torchvision datasets, skipped bad files, loaders and splits."""

from pteenet._face import lazy_face

_NAMES = {
    "IMAGE_EXTENSIONS": "_datasets",
    "available_splits": "_datasets",
    "open_data": "_datasets",
    "ImageData": "_items",
    "Mirrored": "_items",
    "Shifted": "_items",
    "DATASET_NAMES": "_torchvision",
    "default_cache_dir": "_torchvision",
    "Batch": "_loading",
    "collate_skip": "_loading",
    "default_workers": "_loading",
    "make_loader": "_loading",
    "prefetched": "_loading",
    "ramped": "_loading",
    "split_indices": "_loading",
}
__all__ = sorted(_NAMES)
__getattr__, __dir__ = lazy_face(__name__, _NAMES)
