"""Class names as a person reads them: "tench", not "n01440764, tench, Tinca tinca", nor "0".

A bundle records the backbone's classes in index order, each entry the way class folders may
name that class: comma-separated synonyms, an ImageNet wnid first for ImageNet-1k models (the
folder mapping of :func:`pteenet.data.open_data` needs all of them). Every command shows one
short name per class instead: the first synonym that is not a wnid. Torch-free, so the exported
cascade's runner (``pteenet.runtime``) and ``pteenet predict --export`` use it too.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["class_name", "short_name", "short_names"]

_WNID = re.compile(r"n\d{8}")  # a WordNet synset id, how ImageNet folders are named


def short_name(entry: str) -> str:
    """The name to show for one recorded class entry: its first synonym that is not a wnid
    (``"n01440764, tench, Tinca tinca"`` -> ``"tench"``), else the entry's first part."""
    parts = [p.strip() for p in str(entry).split(",") if p.strip()]
    if not parts:
        return str(entry).strip()
    return next((p for p in parts if not _WNID.fullmatch(p)), parts[0])


def short_names(classes: Sequence[str] | None) -> list[str] | None:
    """:func:`short_name` of every entry (None stays None: the classes are unknown)."""
    return None if classes is None else [short_name(c) for c in classes]


def class_name(classes: Sequence[str] | None, index: int) -> str:
    """Class ``index`` by its short name; its number where the names are unknown."""
    if classes is None or not 0 <= index < len(classes):
        return str(index)
    return short_name(classes[index])
