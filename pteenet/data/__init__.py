"""Images in: folders and torchvision datasets, skipped bad files, loaders and splits."""

from pteenet._face import lazy_face

_NAMES = {
    "Batch": "_datasets",
    "DATASET_NAMES": "_datasets",
    "IMAGE_EXTENSIONS": "_datasets",
    "ImageData": "_datasets",
    "available_splits": "_datasets",
    "collate_skip": "_datasets",
    "default_cache_dir": "_datasets",
    "default_workers": "_datasets",
    "make_loader": "_datasets",
    "open_data": "_datasets",
    "prefetched": "_datasets",
    "ramped": "_datasets",
    "split_indices": "_datasets",
}
__all__ = sorted(_NAMES)
__getattr__, __dir__ = lazy_face(__name__, _NAMES)
