"""Opening image data: a folder of images (class folders, split layouts) or a dataset name.

Items follow :mod:`pteenet.data._items`; class folders named after the backbone's classes get
the backbone's indices (:func:`open_data`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from pteenet.backbone._preprocess import Preprocess
from pteenet.choices import IMAGE_EXTENSIONS, LABELS
from pteenet.data._items import ImageData
from pteenet.data._torchvision import DATASET_NAMES, open_torchvision
from pteenet.errors import DataError, OptionError

__all__ = ["IMAGE_EXTENSIONS", "FolderData", "available_splits", "open_data"]

LAYOUT_HINT = "expected <folder>/<class>/<image>.jpg (or images directly in <folder>)"
_SPLIT_ALIASES = {"train": "train", "test": "test", "val": "test"}


class FolderData(ImageData):
    """Images on disk, one ``(path, label)`` per item in a fixed, sorted order."""

    from_files = True

    def __init__(
        self,
        name: str,
        samples: list[tuple[Path, int]],
        classes: list[str] | None,
        preprocess: Preprocess,
    ) -> None:
        super().__init__(name, classes, preprocess)
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def _label(self, index: int) -> int:
        return self.samples[index][1]

    def _image(self, index: int) -> Image.Image:
        with Image.open(self.samples[index][0]) as img:
            img.load()  # decode now, so truncated files fail here and not later
            return img.convert("RGB")


# --------------------------------------------------------------------------- opening


def open_data(
    spec: str | os.PathLike,
    preprocess: Preprocess,
    *,
    split: str = "train",
    cache_dir: str | os.PathLike | None = None,
    label_names: Sequence[str] | None = None,
    labels: str = "auto",
) -> ImageData:
    """Open a folder of images or a torchvision dataset by name.

    ``labels="none"`` ignores the data's labels (class folders or a dataset's): every image
    is unlabeled, which is all pseudo-labels need, whatever its folders are called.

    ``label_names`` are the backbone's own classes in index order (each may list synonyms,
    e.g. "n01440764, tench, Tinca tinca"): class folders named by them are labelled with the
    backbone's indices, so a folder holding a subset of the classes keeps the right labels (and
    the test split may hold classes the train split lacks).
    Folders of which fewer than half match are the user's own classes, labelled by sorted
    position as before; otherwise a folder that matches none is refused in one line.

    A plain string equal to one of :data:`DATASET_NAMES` (case-insensitive) is a dataset name; a
    :class:`os.PathLike` or any other string is a folder (write ``./cifar10`` for a folder that
    happens to share a dataset's name). ``split`` is ``"train"`` or ``"test"`` (``"val"`` is an
    alias of ``"test"``).
    """
    if labels not in LABELS:
        raise OptionError(f"`labels` must be one of {', '.join(LABELS)}, got {labels!r}")
    name = _dataset_name(spec)
    key = _split_key(split)
    if name is not None:
        data: ImageData = open_torchvision(name, key, preprocess, cache_dir)
    else:
        root = Path(spec).expanduser()
        split_dir, train_dir = _split_dir(root, key)
        data = _open_folder(root, split_dir, None, preprocess)
        if labels == "none":
            return _Unlabeled(data)
        # named by the backbone's classes, a split needs none of the other's folders
        mapped = data if label_names is None else _by_label_names(data, list(label_names))
        if mapped is not data or train_dir in (None, split_dir):
            return mapped
        data = _open_folder(root, split_dir, train_dir, preprocess)
    return _Unlabeled(data) if labels == "none" else data


class _Unlabeled(ImageData):
    """Another dataset's images without its labels (``labels="none"``)."""

    def __init__(self, base: ImageData) -> None:
        super().__init__(base.name, None, base.preprocess)
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def _label(self, index: int) -> int:
        return -1

    def _image(self, index: int) -> Image.Image:
        return self.base._image(index)


def _key(name: str) -> str:
    """A class name as folders spell it: case, spaces and underscores do not matter."""
    return name.strip().lower().replace("_", " ")


def _by_label_names(data: FolderData, label_names: list[str]) -> FolderData:
    """Relabel ``data``'s class folders by their position in ``label_names``, when they are
    named after them (an entry may list comma-separated synonyms: "n01440764, tench")."""
    if data.classes is None:
        return data
    index: dict[str, int] = {}
    for i, name in enumerate(label_names):
        for alias in (name, *name.split(",")):
            index.setdefault(_key(alias), i)
    matched = [c for c in data.classes if _key(c) in index]
    if 2 * len(matched) < len(data.classes):  # a chance match ("orange"): the user's own classes
        return data
    missing = [c for c in data.classes if _key(c) not in index]
    if missing:
        raise DataError(f"{data.name}: class folder {missing[0]!r} is not one of the backbone's "
                        f"classes (others, e.g. {matched[0]!r}, are): rename it, remove it, or "
                        f"pass `labels` none to ignore the folders' labels")
    to = [index[_key(c)] for c in data.classes]
    samples = [(p, to[y]) for p, y in data.samples]
    return FolderData(data.name, samples, label_names, data.preprocess)


def available_splits(spec: str | os.PathLike) -> list[str]:
    """The splits ``open_data`` accepts for ``spec``: ``["train", "test"]`` or ``["train"]``."""
    if _dataset_name(spec) is not None:
        return ["train", "test"]
    splits = _folder_splits(Path(spec).expanduser())
    return ["train", "test"] if "test" in splits else ["train"]


def _dataset_name(spec: str | os.PathLike) -> str | None:
    if not isinstance(spec, str):
        return None
    name = spec.strip().lower().replace("_", "-")
    return name if name in DATASET_NAMES else None


def _split_key(split: str) -> str:
    key = _SPLIT_ALIASES.get(str(split).lower())
    if key is None:
        raise DataError(f"unknown split {split!r}: use 'train' or 'test' (or 'val')")
    return key


# --------------------------------------------------------------------------- folders


def _folder_splits(root: Path) -> dict[str, Path]:
    """Map split -> folder.

    ``train/`` (with ``test/``, else ``val/``, as the test split) is a split layout; a lone
    ``train/`` is taken as the train split too, since a class named "train" is far less likely.
    Anything else means the folder itself is the single split "train".
    """
    _check_folder(root)
    train = root / "train"
    if not train.is_dir():
        return {"train": root}
    splits = {"train": train}
    for sub in ("test", "val"):
        if (root / sub).is_dir():
            splits["test"] = root / sub
            break
    return splits


def _check_folder(path: Path) -> None:
    if not path.exists():
        raise DataError(f"data folder {path} does not exist: check the path ({LAYOUT_HINT})")
    if not path.is_dir():
        raise DataError(f"data path {path} is a file, not a folder: pass a folder ({LAYOUT_HINT})")


def _split_dir(root: Path, key: str) -> tuple[Path, Path | None]:
    """The folder for split ``key`` and, in a split layout, the ``train/`` folder."""
    splits = _folder_splits(root)
    if key not in splits:
        raise DataError(
            f"data folder {root} has no test/ or val/ subfolder: add one next to train/ "
            "or hold out part of the training images instead"
        )
    train_dir = splits["train"] if splits["train"] != root else None
    return splits[key], train_dir


def _open_folder(
    root: Path, split_dir: Path, train_dir: Path | None, preprocess: Preprocess
) -> FolderData:
    classes = _class_dirs(split_dir)
    names = _class_names(split_dir, classes, train_dir)
    samples = _labeled_samples(split_dir, classes, names, train_dir)
    if samples:
        return FolderData(str(root), samples, names, preprocess)
    loose = [(p, -1) for p in _images_in(split_dir, recursive=False)]
    if loose:
        return FolderData(str(root), loose, None, preprocess)
    raise DataError(f"no images found in {split_dir}: {LAYOUT_HINT}")


def _class_dirs(folder: Path) -> list[str]:
    """Visible subfolders, sorted (torchvision ImageFolder convention: label = sorted position)."""
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _class_names(split_dir: Path, classes: list[str], train_dir: Path | None) -> list[str]:
    """The test split reuses train's class list, so a label means the same class in both."""
    if train_dir is None or train_dir == split_dir:
        return classes
    train_classes = _class_dirs(train_dir)
    return train_classes if train_classes else classes


def _labeled_samples(
    split_dir: Path, classes: list[str], names: list[str], train_dir: Path | None
) -> list[tuple[Path, int]]:
    """Images of each class folder, labelled by the class's position in ``names``."""
    index = {c: i for i, c in enumerate(names)}
    samples: list[tuple[Path, int]] = []
    for cls in classes:
        images = _images_in(split_dir / cls, recursive=True)
        if images and cls not in index:
            raise DataError(
                f"{split_dir} has class folder {cls!r} that {train_dir} lacks: "
                "use the same class folders in every split"
            )
        samples.extend((p, index[cls]) for p in images)
    return samples


def _images_in(folder: Path, *, recursive: bool) -> list[Path]:
    """Image files under ``folder`` (hidden ones skipped), sorted by relative path."""
    pattern = "**/*" if recursive else "*"
    found = [
        p
        for p in folder.glob(pattern)
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    ]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


# --------------------------------------------------------------------------- torchvision
