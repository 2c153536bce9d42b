"""Images to the exported model's input: the bundle's own resize, crop and normalisation.

Pillow is imported only here, when :meth:`Cascade.preprocess` is first called.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ._errors import DataError

__all__ = ["preprocess"]


def preprocess(images: Sequence[Any], manifest: Mapping[str, Any],
               size: tuple[int, int]) -> np.ndarray:
    """PIL images (or paths) -> normalised float32 ``[N, 3, H, W]`` of ``size``, as the
    bundle's data; see :meth:`pteenet.runtime.Cascade.preprocess`."""
    from PIL import Image

    h, w = size
    mean = np.asarray(manifest["mean"], dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(manifest["std"], dtype=np.float32).reshape(-1, 1, 1)
    out = np.empty((len(images), 3, h, w), dtype=np.float32)
    for i, item in enumerate(images):
        img = _rgb(item, Image)
        if manifest.get("resize_size"):
            img = _resize_crop(img, int(manifest["resize_size"]), (h, w),
                               manifest.get("interpolation", "bilinear"), Image)
        if img.size != (w, h):
            img = img.resize((w, h), Image.Resampling.BILINEAR)
        arr = np.asarray(img, dtype=np.float32) / np.float32(255)
        out[i] = (arr.transpose(2, 0, 1) - mean) / std
    return out


def _resize_crop(img: Any, short: int, size: tuple[int, int], interpolation: str,
                 image_module: Any) -> Any:
    """torchvision's ``Resize(short)`` then ``CenterCrop(size)`` on a PIL image, same rounding."""
    w, h = img.size
    new = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    filt = getattr(image_module.Resampling, interpolation.upper(),
                   image_module.Resampling.BILINEAR)
    img = img.resize(new, filt)
    ch, cw = size
    top, left = int(round((new[1] - ch) / 2.0)), int(round((new[0] - cw) / 2.0))
    return img.crop((left, top, left + cw, top + ch))


def _rgb(item: Any, image_module: Any) -> Any:
    """An RGB PIL image from a PIL image or a path (files are closed at once). Pillow's own
    errors (a missing or unreadable file, not an image, a decompression bomb) and anything
    that is neither become one :class:`DataError` line naming the item."""
    if not isinstance(item, (str, os.PathLike)) and not hasattr(item, "convert"):
        raise DataError(f"preprocess takes PIL images or image paths, got "
                        f"{type(item).__name__}")
    try:
        if isinstance(item, (str, os.PathLike)):
            with image_module.open(item) as f:
                return f.convert("RGB")
        return item.convert("RGB")
    except (OSError, ValueError, image_module.DecompressionBombError) as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise DataError(f"cannot read image {str(item)[:120]} ({type(e).__name__}: {why})") \
            from None
