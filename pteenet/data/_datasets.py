"""Image datasets: a folder of images or a torchvision dataset name, behind one interface.

Every item is ``(image, label, index)``. The index travels with the item so that results (exit
decisions, errors, per-image timings) can always be traced back to the same file, even through a
shuffled :class:`~torch.utils.data.Subset`. An image that cannot be read yields ``None`` instead of
raising, because one bad JPEG in a folder of thousands should cost one sample, not the whole run;
:func:`collate_skip` drops those and counts them so callers can report how many were skipped.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torchvision
import torchvision.transforms.functional as TF
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from pteenet.backbone._preprocess import Preprocess
from pteenet.choices import IMAGE_EXTENSIONS, LABELS
from pteenet.errors import DataError, OfflineError, OptionError

__all__ = [
    "DATASET_NAMES",
    "IMAGE_EXTENSIONS",
    "Batch",
    "ImageData",
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

DATASET_NAMES = ("cifar10", "cifar100", "svhn", "mnist", "fashion-mnist")
LAYOUT_HINT = "expected <folder>/<class>/<image>.jpg (or images directly in <folder>)"

# name -> (torchvision class name, how the split is passed)
_TORCHVISION = {
    "cifar10": ("CIFAR10", "train"),
    "cifar100": ("CIFAR100", "train"),
    "svhn": ("SVHN", "split"),
    "mnist": ("MNIST", "train"),
    "fashion-mnist": ("FashionMNIST", "train"),
}
_SPLIT_ALIASES = {"train": "train", "test": "test", "val": "test"}


# --------------------------------------------------------------------------- datasets


class ImageData(Dataset):
    """A sized dataset of preprocessed images.

    Items are ``(image, label, index)``: ``image`` is a normalised ``FloatTensor[3, H, W]`` (or
    ``None`` when the file is unreadable or corrupt), ``label`` an ``int`` (``-1`` when the data
    is unlabeled) and ``index`` the item's position in this dataset.
    """

    def __init__(self, name: str, classes: list[str] | None, preprocess: Preprocess) -> None:
        self.name = name
        self.classes = classes
        self.preprocess = preprocess

    @property
    def has_labels(self) -> bool:
        return self.classes is not None

    @property
    def targets(self) -> list[int]:
        """All labels, without decoding any image (for stratified splits and class counts)."""
        return [self._label(i) for i in range(len(self))]

    def __len__(self) -> int:
        raise NotImplementedError

    def _label(self, index: int) -> int:
        raise NotImplementedError

    def _image(self, index: int) -> Image.Image:
        """The raw image; may raise on a bad file (the caller turns that into ``None``)."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[Tensor | None, int, int]:
        index = self._check_index(index)
        label = self._label(index)
        try:
            tensor = _to_tensor(self._image(index), self.preprocess)
        except Exception:  # any failure to decode means "skip this image", never a crash
            return None, label, index
        return tensor, label, index

    def _check_index(self, index: int) -> int:
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        return index

    def __repr__(self) -> str:
        n_cls = len(self.classes) if self.classes is not None else "unlabeled"
        return f"{type(self).__name__}(name={self.name!r}, images={len(self)}, classes={n_cls})"


class FolderData(ImageData):
    """Images on disk, one ``(path, label)`` per item in a fixed, sorted order."""

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


class TorchvisionData(ImageData):
    """A torchvision dataset (which returns PIL images) adapted to the item convention."""

    def __init__(
        self, name: str, base: Dataset, classes: list[str], preprocess: Preprocess
    ) -> None:
        super().__init__(name, classes, preprocess)
        self.base = base
        self._targets = _base_targets(base)

    def __len__(self) -> int:
        return len(self.base)

    def _label(self, index: int) -> int:
        if self._targets is not None:
            return self._targets[index]
        return int(self.base[index][1])

    def _image(self, index: int) -> Image.Image:
        image = self.base[index][0]
        return image.convert("RGB")


def _to_tensor(image: Image.Image, preprocess: Preprocess) -> Tensor:
    """RGB PIL image -> normalised float tensor of ``input_size``.

    With a ``resize_size`` (ImageNet models) the shorter side is resized on the 8-bit image with
    the model's interpolation and the centre cropped, as timm and torchvision evaluate; without
    one the image is resized straight to ``input_size`` (a no-op for CIFAR-size data).
    """
    size = [int(s) for s in preprocess.input_size]
    if preprocess.resize_size is not None:
        mode = TF.InterpolationMode(preprocess.interpolation)
        image = TF.center_crop(TF.resize(image.convert("RGB"), preprocess.resize_size, mode), size)
    tensor = TF.to_tensor(image.convert("RGB"))
    if list(tensor.shape[1:]) != size:
        tensor = TF.resize(
            tensor, size, interpolation=TF.InterpolationMode.BILINEAR, antialias=True
        )
    return TF.normalize(tensor, list(preprocess.mean), list(preprocess.std))


def _base_targets(base: Any) -> list[int] | None:
    """A torchvision dataset's labels without decoding images (SVHN calls them ``labels``)."""
    for attr in ("targets", "labels"):
        values = getattr(base, attr, None)
        if values is not None:
            return [int(v) for v in values]
    return None


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
        data: ImageData = _open_torchvision(name, key, preprocess, cache_dir)
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


def default_cache_dir() -> Path:
    """Where named datasets go: ``$PTEENET_DATA_DIR``, else ``~/.cache/pteenet/datasets``."""
    env = os.environ.get("PTEENET_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pteenet" / "datasets"


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


def _open_torchvision(
    name: str, key: str, preprocess: Preprocess, cache_dir: str | os.PathLike | None
) -> TorchvisionData:
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    root = root / name
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(
            f"cannot create dataset folder {root} ({exc.strerror or exc}): "
            "set PTEENET_DATA_DIR or pass another cache folder"
        ) from exc
    base = _load_torchvision(name, key, root)
    classes = list(getattr(base, "classes", None) or [str(d) for d in range(10)])
    return TorchvisionData(name, base, classes, preprocess)


def _load_torchvision(name: str, key: str, root: Path) -> Dataset:
    """Use files already in ``root``; download only when they are missing or damaged."""
    cls_name, split_style = _TORCHVISION[name]
    split_kw = {"split": key} if split_style == "split" else {"train": key == "train"}
    factory = getattr(torchvision.datasets, cls_name)  # looked up late so tests can replace it
    try:
        return factory(str(root), download=False, **split_kw)
    except Exception:  # missing or corrupt: fall through to a download
        pass
    try:
        return factory(str(root), download=True, **split_kw)
    except Exception as exc:
        raise OfflineError(
            f"cannot download {name} (no network?): put the dataset in {root} "
            "or pass a folder as `data`"
        ) from exc


# --------------------------------------------------------------------------- batching


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
    datasets are not worth a process, and neither is a machine of two cores or fewer. There the
    backbone's threads take every core, and a worker cost more than it saved: handing each
    decoded 224x224 image over (600 KB of float32 through shared memory) halved the pipeline's
    rate, and the caching pass ran 1.1-2.8x faster decoding in the main process
    (``benchmarks/imagenet_size.py``, seven models on 2 cores)."""
    cores = os.cpu_count() or 1
    if not isinstance(data, FolderData) or cores <= 2:
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
    its first forward pass before a whole batch is decoded: 256 ImageNet-size JPEGs take 0.6 s
    on one core, while the backbone waits. Starting small, each batch decodes while the
    half-size one before it runs: on a 300-image folder (2 cores, batch 256) attach's caching
    passes ran 1.3x faster on MobileNetV3, 1.2x on EfficientNet-B0 and 1.04x on ResNet-50.
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
    if n - n_val < 1:
        raise DataError(f"only {n} samples: too few to hold out a calibration split")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[n_val:]), sorted(perm[:n_val])
