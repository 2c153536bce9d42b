"""Tests for pteenet.data on real image files written to a temporary folder."""

from __future__ import annotations

import io
import pickle
import threading
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from pteenet.backbone import Preprocess
from pteenet.data import (
    Batch,
    ImageData,
    available_splits,
    collate_skip,
    make_loader,
    open_data,
    prefetched,
    ramped,
)
from pteenet.data import _datasets as data_mod
from pteenet.errors import DataError, OfflineError, OptionError
from tests._helpers import block_network

PRE = Preprocess(input_size=(16, 16), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))
SIZE = (24, 20)  # PIL (width, height): a 20x24 (h x w) image, so every item is resized


def _noise(mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, size=(SIZE[1], SIZE[0], channels), dtype=np.uint8)
    return Image.fromarray(arr.squeeze(-1) if channels == 1 else arr, mode=mode)


def _white() -> Image.Image:
    return Image.new("RGB", SIZE, (255, 255, 255))


def _jpeg_bytes(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    _noise(seed=seed).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _write_split(folder: Path) -> None:
    """Two classes; 'cat' holds a white PNG, a grayscale JPEG and an RGBA PNG."""
    (folder / "cat").mkdir(parents=True)
    (folder / "dog").mkdir(parents=True)
    _white().save(folder / "cat" / "a_white.png")
    _noise("L", 1).save(folder / "cat" / "b_gray.JPG")
    _noise("RGBA", 2).save(folder / "cat" / "c_rgba.png")
    _noise("RGB", 3).save(folder / "dog" / "a.jpeg")
    _noise("RGB", 4).save(folder / "dog" / "b.png")
    (folder / "dog" / "notes.txt").write_text("not an image")


@pytest.fixture
def labeled(tmp_path: Path) -> Path:
    _write_split(tmp_path / "train")
    _write_split(tmp_path / "test")
    return tmp_path


@pytest.fixture
def flat(tmp_path: Path) -> Path:
    for i in range(3):
        _noise(seed=i).save(tmp_path / f"img{i}.png")
    return tmp_path


@pytest.fixture
def with_corrupt(tmp_path: Path) -> Path:
    _write_split(tmp_path)
    rng = np.random.default_rng(7)
    (tmp_path / "cat" / "x.jpg").write_bytes(rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
    whole = _jpeg_bytes(seed=9)
    (tmp_path / "dog" / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    return tmp_path


def _one_line_error(exc_type: type[Exception], fn, *args, **kwargs) -> str:
    with pytest.raises(exc_type) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message
    return message


# --------------------------------------------------------------------------- folders


def test_labeled_folder_classes_labels_shapes(labeled: Path) -> None:
    data = open_data(labeled, PRE)
    assert isinstance(data, ImageData)
    assert data.classes == ["cat", "dog"] and data.has_labels
    assert len(data) == 5
    assert data.name == str(labeled)
    labels = [data[i][1] for i in range(len(data))]
    assert labels == [0, 0, 0, 1, 1] == data.targets
    for i in range(len(data)):
        image, _, index = data[i]
        assert index == i
        assert image is not None and image.shape == (3, 16, 16) and image.dtype == torch.float32


def test_white_image_normalised_per_channel(labeled: Path) -> None:
    image, _, _ = open_data(labeled, PRE)[0]  # cat/a_white.png sorts first
    expected = [(1 - m) / s for m, s in zip(PRE.mean, PRE.std, strict=True)]
    for c in range(3):
        assert torch.allclose(image[c], torch.full((16, 16), expected[c]), atol=1e-4)


def test_no_resize_when_size_matches(labeled: Path) -> None:
    pre = Preprocess(input_size=(SIZE[1], SIZE[0]), mean=(0, 0, 0), std=(1, 1, 1))
    image, _, _ = open_data(labeled, pre)[4]  # dog/b.png
    raw = np.asarray(_noise("RGB", 4), dtype=np.float32) / 255
    assert torch.allclose(image, torch.from_numpy(raw).permute(2, 0, 1), atol=1e-6)


def test_order_is_deterministic(labeled: Path) -> None:
    first = open_data(labeled, PRE)
    second = open_data(str(labeled), PRE)
    names = [p.relative_to(labeled).as_posix() for p, _ in first.samples]
    assert names == [
        "train/cat/a_white.png",
        "train/cat/b_gray.JPG",
        "train/cat/c_rgba.png",
        "train/dog/a.jpeg",
        "train/dog/b.png",
    ]
    assert first.samples == second.samples
    assert torch.equal(first[3][0], second[3][0])


def test_splits_and_val_alias(labeled: Path) -> None:
    assert available_splits(labeled) == ["train", "test"]
    test = open_data(labeled, PRE, split="test")
    assert all(p.parts[-3] == "test" for p, _ in test.samples)
    (labeled / "test").rename(labeled / "val")
    assert available_splits(labeled) == ["train", "test"]
    val = open_data(labeled, PRE, split="val")
    assert all(p.parts[-3] == "val" for p, _ in val.samples)
    _one_line_error(DataError, open_data, labeled, PRE, split="holdout")


def test_lone_train_folder_is_the_train_split(tmp_path: Path) -> None:
    _write_split(tmp_path / "train")
    assert available_splits(tmp_path) == ["train"]
    assert open_data(tmp_path, PRE).classes == ["cat", "dog"]


def test_test_split_keeps_train_labels(tmp_path: Path) -> None:
    _write_split(tmp_path / "train")
    (tmp_path / "test" / "dog").mkdir(parents=True)
    _noise(seed=5).save(tmp_path / "test" / "dog" / "x.png")
    test = open_data(tmp_path, PRE, split="test")
    assert test.classes == ["cat", "dog"] and test.targets == [1]


def test_test_split_with_unknown_class_is_rejected(labeled: Path) -> None:
    (labeled / "test" / "emu").mkdir()
    _noise().save(labeled / "test" / "emu" / "e.png")
    message = _one_line_error(DataError, open_data, labeled, PRE, split="test")
    assert "emu" in message


def test_flat_folder_is_unlabeled(flat: Path) -> None:
    data = open_data(flat, PRE)
    assert data.classes is None and not data.has_labels
    assert len(data) == 3
    assert [data[i][1] for i in range(3)] == [-1, -1, -1]
    assert data[2][0].shape == (3, 16, 16)
    assert available_splits(flat) == ["train"]
    message = _one_line_error(DataError, open_data, flat, PRE, split="test")
    assert "test/" in message and "val/" in message


def test_corrupt_and_truncated_images_yield_none(with_corrupt: Path) -> None:
    data = open_data(with_corrupt, PRE)
    by_name = {p.name: i for i, (p, _) in enumerate(data.samples)}
    for bad in ("x.jpg", "truncated.jpg"):
        image, label, index = data[by_name[bad]]
        assert image is None and index == by_name[bad]
    assert data[by_name["x.jpg"]][1] == 0 and data[by_name["truncated.jpg"]][1] == 1
    batches = list(make_loader(data, batch_size=3))
    assert sum(b.skipped for b in batches) == 2
    assert sum(len(b) for b in batches) == len(data) - 2
    kept = torch.cat([b.indices for b in batches]).tolist()
    assert set(kept) == set(range(len(data))) - {by_name["x.jpg"], by_name["truncated.jpg"]}
    for b in batches:  # the last batch holds only truncated.jpg, so its images are None
        assert len(b) == 0 if b.images is None else b.images.shape == (len(b), 3, 16, 16)
    assert batches[-1].images is None and batches[-1].skipped == 1


def test_missing_folder(tmp_path: Path) -> None:
    message = _one_line_error(DataError, open_data, tmp_path / "nope", PRE)
    assert "does not exist" in message
    _one_line_error(DataError, available_splits, tmp_path / "nope")


def test_file_instead_of_folder(tmp_path: Path) -> None:
    file = tmp_path / "a.png"
    _white().save(file)
    assert "not a folder" in _one_line_error(DataError, open_data, file, PRE)


def test_empty_folder(tmp_path: Path) -> None:
    assert "<class>" in _one_line_error(DataError, open_data, tmp_path, PRE)


def test_empty_class_folders(tmp_path: Path) -> None:
    (tmp_path / "cat").mkdir()
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "readme.txt").write_text("no images here")
    assert "<class>" in _one_line_error(DataError, open_data, tmp_path, PRE)


def test_dataset_pickles(labeled: Path) -> None:
    data = pickle.loads(pickle.dumps(open_data(labeled, PRE)))
    assert data[0][0].shape == (3, 16, 16)


# --------------------------------------------------------------------------- batching


def test_collate_skip() -> None:
    img = torch.zeros(3, 4, 4)
    batch = collate_skip([(img, 1, 10), (None, 2, 11), (img, -1, 12)])
    assert isinstance(batch, Batch)
    assert batch.images.shape == (2, 3, 4, 4)
    assert batch.labels.tolist() == [1, -1] and batch.labels.dtype == torch.long
    assert batch.indices.tolist() == [10, 12] and batch.skipped == 1
    empty = collate_skip([(None, 0, 0), (None, 1, 1)])
    assert empty.images is None and empty.skipped == 2 and len(empty) == 0


def test_loader_subset_and_seeded_shuffle(flat: Path) -> None:
    for i in range(3, 12):
        _noise(seed=i).save(flat / f"img{i:02d}.png")
    data = open_data(flat, PRE)
    subset = [0, 2, 3, 5, 7, 8, 9, 11]

    def order(seed: int) -> list[int]:
        loader = make_loader(data, batch_size=3, indices=subset, shuffle=True, seed=seed)
        return torch.cat([b.indices for b in loader]).tolist()

    assert sorted(order(0)) == subset
    assert order(0) == order(0)
    assert order(0) != order(1)
    plain = make_loader(data, batch_size=4, indices=subset)
    assert torch.cat([b.indices for b in plain]).tolist() == subset
    _one_line_error(DataError, make_loader, data, batch_size=2, indices=[0, len(data)])


@given(n=st.integers(0, 700), batch=st.integers(1, 300), first=st.integers(1, 16))
def test_ramped_batches_cover_every_position_in_order_doubling_up_to_the_batch_size(
        n: int, batch: int, first: int) -> None:
    batches = ramped(n, batch, first)
    assert [i for b in batches for i in b] == list(range(n))
    sizes = [len(b) for b in batches]
    want = min(first, batch)
    for size in sizes[:-1]:
        assert size == want
        want = min(2 * want, batch)
    assert not sizes or 0 < sizes[-1] <= want


@pytest.mark.parametrize(("batch", "first"), [(0, 8), (4, 0), (-1, 8)])
def test_ramped_rejects_batches_that_hold_no_image(batch: int, first: int) -> None:
    _one_line_error(OptionError, ramped, 5, batch, first)


def test_a_ramped_loader_starts_small_and_keeps_the_subset_order(flat: Path) -> None:
    for i in range(3, 24):
        _noise(seed=i).save(flat / f"img{i:02d}.png")
    data = open_data(flat, PRE)
    subset = list(range(1, 21))
    ramp = list(make_loader(data, batch_size=16, indices=subset, ramp=True))
    assert [len(b) for b in ramp] == [8, 12]
    assert torch.cat([b.indices for b in ramp]).tolist() == subset
    plain = list(make_loader(data, batch_size=16, indices=subset))
    assert torch.equal(torch.cat([b.images for b in ramp]), torch.cat([b.images for b in plain]))


# --------------------------------------------------------------------------- named datasets


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to resolve or connect fails at once, so no test can hang on the network."""
    block_network(monkeypatch)


class _FakeMNIST(torch.utils.data.Dataset):
    """Stands in for torchvision.datasets.MNIST with files 'already downloaded'."""

    calls: list[dict] = []

    def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
        _FakeMNIST.calls.append({"root": root, "train": train, "download": download})
        self.classes = [f"{d} - digit" for d in range(10)]
        self.targets = torch.tensor([3, 1, 4]) if train else torch.tensor([5])

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return Image.new("L", (28, 28), 255), int(self.targets[i])


def test_named_dataset_offline_real_torchvision(tmp_path: Path, no_network: None) -> None:
    message = _one_line_error(OfflineError, open_data, "CIFAR10", PRE, cache_dir=tmp_path)
    assert "cifar10" in message and str(tmp_path) in message and "`data`" in message


def test_named_dataset_download_error(tmp_path: Path, monkeypatch, no_network: None) -> None:
    def offline(*args, **kwargs):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(torchvision.datasets, "SVHN", offline)
    message = _one_line_error(
        OfflineError, open_data, "svhn", PRE, split="test", cache_dir=tmp_path
    )
    assert message.startswith("cannot download svhn (no network?)")


def test_named_dataset_uses_existing_files(tmp_path: Path, monkeypatch, no_network: None) -> None:
    monkeypatch.setattr(torchvision.datasets, "MNIST", _FakeMNIST)
    monkeypatch.setenv("PTEENET_DATA_DIR", str(tmp_path))
    _FakeMNIST.calls.clear()
    data = open_data("Mnist", PRE)
    assert _FakeMNIST.calls == [{"root": str(tmp_path / "mnist"), "train": True, "download": False}]
    assert data.name == "mnist" and data.has_labels and len(data.classes) == 10
    image, label, index = data[2]
    assert (label, index) == (4, 2) and data.targets == [3, 1, 4]
    expected = torch.tensor([(1 - m) / s for m, s in zip(PRE.mean, PRE.std, strict=True)])
    assert image.shape == (3, 16, 16)
    assert torch.allclose(image.mean(dim=(1, 2)), expected, atol=1e-4)
    assert open_data("mnist", PRE, split="test").targets == [5]
    assert available_splits("fashion-mnist") == ["train", "test"]


def test_svhn_gets_digit_classes(tmp_path: Path, monkeypatch) -> None:
    class FakeSVHN(_FakeMNIST):
        def __init__(self, root: str, split: str = "train", download: bool = False) -> None:
            super().__init__(root, split == "train", download)
            del self.classes
            self.labels, self.targets = self.targets.numpy(), self.targets

    monkeypatch.setattr(torchvision.datasets, "SVHN", FakeSVHN)
    data = open_data("svhn", PRE, cache_dir=tmp_path)
    assert data.classes == [str(d) for d in range(10)]


def test_path_object_is_always_a_folder(tmp_path: Path) -> None:
    assert data_mod._dataset_name(tmp_path / "cifar10") is None
    assert "does not exist" in _one_line_error(DataError, open_data, Path("cifar10"), PRE)


def test_prefetched_batches_come_in_order_from_a_background_thread() -> None:
    made: list[tuple[int, str]] = []

    def batches():
        for i in range(5):
            made.append((i, threading.current_thread().name))
            yield i

    assert list(prefetched(batches())) == [0, 1, 2, 3, 4]
    assert [i for i, _ in made] == [0, 1, 2, 3, 4]
    assert all(name.startswith("pteenet-prefetch") for _, name in made)


def test_prefetched_errors_surface_in_order_and_an_early_stop_does_not_run_on() -> None:
    made: list[int] = []

    def batches():
        for i in range(100):
            made.append(i)
            if i == 2:
                raise DataError("bad batch")
            yield i

    got = []
    with pytest.raises(DataError, match="bad batch"):
        for b in prefetched(batches()):
            got.append(b)
    assert got == [0, 1]
    made.clear()
    stream = prefetched(made.append(i) or i for i in range(100))
    assert next(stream) == 0
    stream.close()  # the caller stops: only the batch already in flight was made
    assert made == [0, 1]
