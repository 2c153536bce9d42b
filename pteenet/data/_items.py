"""The item convention every dataset follows: ``(image, label, index)``, a bad file ``None``.

The index travels with the item so that results (exit decisions, errors, per-image timings) can
always be traced back to the same file, even through a shuffled
:class:`~torch.utils.data.Subset`. An image that cannot be read yields ``None`` instead of
raising, because one bad JPEG in a folder of thousands should cost one sample, not the whole run.
"""

from __future__ import annotations

import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import Dataset

from pteenet.backbone._preprocess import Preprocess

__all__ = ["ImageData", "Mirrored", "Shifted", "to_tensor"]


class ImageData(Dataset):
    """A sized dataset of preprocessed images.

    Items are ``(image, label, index)``: ``image`` is a normalised ``FloatTensor[3, H, W]`` (or
    ``None`` when the file is unreadable or corrupt), ``label`` an ``int`` (``-1`` when the data
    is unlabeled) and ``index`` the item's position in this dataset.
    """

    from_files = False  # decoded from image files (worth loader processes on a big machine)

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
            tensor = to_tensor(self._image(index), self.preprocess)
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


class Mirrored(ImageData):
    """``base`` with every image mirrored left-right, labels and order kept: a second view of
    each training image whose target is the backbone's own answer on it (``TrainConfig.views``;
    ``benchmarks/results/training-views.md``)."""

    def __init__(self, base: ImageData) -> None:
        super().__init__(f"{base.name} (mirrored)", base.classes, base.preprocess)
        self.base, self.from_files = base, base.from_files

    def __len__(self) -> int:
        return len(self.base)

    def _label(self, index: int) -> int:
        return self.base._label(index)

    def _image(self, index: int) -> Image.Image:
        return ImageOps.mirror(self.base._image(index))


class Shifted(ImageData):
    """``base`` with each image moved by up to an eighth of its side each way (the gap black) and
    mirrored at random, labels and order kept: CIFAR training's pad-and-crop as one more view of
    each training image (``TrainConfig.views``). The moves are drawn once from ``seed``, so the
    view is the same image every epoch and on every rank."""

    def __init__(self, base: ImageData, seed: int) -> None:
        super().__init__(f"{base.name} (shifted)", base.classes, base.preprocess)
        self.base, self.from_files = base, base.from_files
        g = torch.Generator().manual_seed(seed)
        self.moves = (torch.rand(len(base), 2, generator=g) * 2 - 1) / 8
        self.mirror = torch.rand(len(base), generator=g) < 0.5

    def __len__(self) -> int:
        return len(self.base)

    def _label(self, index: int) -> int:
        return self.base._label(index)

    def _image(self, index: int) -> Image.Image:
        image = self.base._image(index).convert("RGB")
        dx, dy = (round(float(m) * s) for m, s in zip(self.moves[index], image.size))
        moved = Image.new("RGB", image.size)
        moved.paste(image, (dx, dy))
        return ImageOps.mirror(moved) if self.mirror[index] else moved


def to_tensor(image: Image.Image, preprocess: Preprocess) -> Tensor:
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
