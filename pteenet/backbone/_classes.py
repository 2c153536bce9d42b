"""The backbone's class names, in index order, from wherever the backbone's makers wrote them.

Three sources, the most specific first: the checkpoint's own list (a training script that saved
``classes``, ``class_names`` or ImageFolder's ``class_to_idx`` beside the weights), torchvision's
``weights.meta["categories"]``, and timm's ``ImageNetInfo`` for ImageNet-1k/-22k heads (wnids
and WordNet names). An ImageNet entry holds the wnid, the torchvision name where there is one,
and timm's synonyms (``"n01440764, tench, Tinca tinca"``): class folders named by any of them
map to the backbone's index (:func:`pteenet.data.open_data`), and :func:`pteenet.labels.short_name`
shows the first that is not a wnid. The bundle records the list, so every command shows names.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["backbone_classes", "checkpoint_classes"]

_LIST_KEYS = ("classes", "class_names", "categories", "names", "labels", "idx_to_class")


def checkpoint_classes(raw: Any) -> list[str] | None:
    """A checkpoint's own class list, if it saved one beside the weights: a list of names
    under one of the usual keys, an index -> name dict, or ImageFolder's ``class_to_idx``."""
    if not isinstance(raw, dict):
        return None
    mapping = raw.get("class_to_idx")
    if isinstance(mapping, dict) and mapping and all(isinstance(v, int) for v in mapping.values()):
        by_index = {v: str(k) for k, v in mapping.items()}
        return _dense(by_index)
    for key in _LIST_KEYS:
        found = raw.get(key)
        if isinstance(found, (list, tuple)) and found and all(isinstance(c, str) for c in found):
            return list(found)
        if isinstance(found, dict) and found and all(isinstance(k, int) for k in found):
            return _dense({k: str(v) for k, v in found.items()})
    return None


def _dense(by_index: dict[int, str]) -> list[str] | None:
    """Names for indices 0..n-1 exactly (a gap or a stray index means it is not a class list)."""
    n = len(by_index)
    return [by_index[i] for i in range(n)] if set(by_index) == set(range(n)) else None


def backbone_classes(source: str, name: str, num_classes: int,
                     from_checkpoint: Sequence[str] | None = None) -> list[str] | None:
    """The classes of a ``num_classes``-way head, from the first source that has that many."""
    if from_checkpoint is not None and len(from_checkpoint) == num_classes:
        return list(from_checkpoint)
    if source not in ("timm", "torchvision"):
        return None
    categories = _torchvision_categories(name) if source == "torchvision" else None
    if categories is not None and len(categories) != num_classes:
        categories = None
    imagenet = _imagenet(num_classes)
    if imagenet is None:
        return categories
    if categories is None or len(categories) != len(imagenet):
        return imagenet
    return [_merge(wnid, own, rest) for (wnid, rest), own in
            zip((e.split(", ", 1) for e in imagenet), categories)]


def _merge(wnid: str, own: str, rest: str) -> str:
    """wnid, torchvision's name, then timm's synonyms not already said."""
    seen, parts = set(), []
    for p in (wnid, own, *rest.split(",")):
        p = p.strip()
        if p and p.lower() not in seen:
            seen.add(p.lower())
            parts.append(p)
    return ", ".join(parts)


def _torchvision_categories(name: str) -> list[str] | None:
    import torchvision

    try:
        meta = torchvision.models.get_model_weights(name).DEFAULT.meta
    except (ValueError, AttributeError, KeyError):
        return None
    categories = meta.get("categories")
    return list(categories) if categories else None


def _imagenet(num_classes: int) -> list[str] | None:
    """timm's wnids and names for an ImageNet head of this size (1k, 12k, 22k), else None."""
    from timm.data import ImageNetInfo, infer_imagenet_subset

    subset = infer_imagenet_subset({"num_classes": num_classes})
    if subset is None:
        return None
    info = ImageNetInfo(subset)
    if info.num_classes() != num_classes:
        return None
    return [f"{w}, {d}" for w, d in zip(info.label_names(), info.label_descriptions())]
