"""The backbone's class names: found in the checkpoint, torchvision's weights or timm's
ImageNetInfo, recorded in the bundle, and shown short ("tench", not "n01440764, tench, ..." or
"0"); ``labels="none"`` ignores class folders (issue 26, item 3)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pteenet.backbone import Preprocess, cifar_resnet, create_backbone
from pteenet.data import open_data
from pteenet.errors import DataError
from pteenet.labels import class_name, short_name

PRE = Preprocess(input_size=(8, 8), mean=(0.5,) * 3, std=(0.5,) * 3)


@pytest.mark.parametrize(("entry", "shown"), [
    ("n01440764, tench, Tinca tinca", "tench"),
    ("tench", "tench"),
    ("n01440764", "n01440764"),  # nothing but a wnid: better than nothing
    (" airplane ", "airplane"),
])
def test_short_name(entry, shown):
    assert short_name(entry) == shown


def test_class_name_falls_back_to_the_index():
    assert class_name(None, 3) == "3"
    assert class_name(["n01440764, tench"], 0) == "tench"


@pytest.mark.parametrize("saved", [
    {"classes": ["cat", "dog", "eel"]},
    {"class_to_idx": {"dog": 1, "cat": 0, "eel": 2}},
    {"idx_to_class": {0: "cat", 1: "dog", 2: "eel"}},
])
def test_a_checkpoints_own_class_list_names_the_classes(tmp_path, saved):
    torch.manual_seed(0)
    path = tmp_path / "r20.pt"
    torch.save({"state_dict": cifar_resnet("resnet20", 3).state_dict(), **saved}, path)
    bb = create_backbone("resnet20", checkpoint=path)
    assert bb.classes == ["cat", "dog", "eel"]


def test_a_list_of_another_length_is_not_the_classes(tmp_path):
    path = tmp_path / "r20.pt"
    torch.save({"state_dict": cifar_resnet("resnet20", 3).state_dict(), "classes": ["a", "b"]},
               path)
    assert create_backbone("resnet20", checkpoint=path).classes is None


def test_torchvision_categories_with_their_wnids():
    """torchvision's own names, with timm's wnid first so wnid folders map too."""
    bb = create_backbone("torchvision:mobilenet_v3_small")
    assert len(bb.classes) == 1000
    assert bb.classes[0].startswith("n01440764, tench")
    assert short_name(bb.classes[2]) == "great white shark"


def test_labels_none_ignores_folders_that_match_nothing(tmp_path):
    from PIL import Image

    for c in ("n01", "n02", "zebra"):
        (tmp_path / c).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / c / "a.png")
    names = ["n01, tench", "n02, goldfish", "n03, shark"]
    with pytest.raises(DataError, match="`labels` none"):
        open_data(tmp_path, PRE, label_names=names)
    data = open_data(tmp_path, PRE, label_names=names, labels="none")
    assert not data.has_labels and len(data) == 3 and set(data.targets) == {-1}
    assert data[0][0] is not None


def test_the_bundle_records_the_backbones_names(tmp_path):
    """A checkpoint that names its classes (in another language than the folders): the bundle
    keeps the backbone's names, and calibrate shows them."""
    from pteenet import attach, calibrate
    from pteenet.bundle import read_info
    from pteenet.training import TrainConfig
    from tests._helpers import write_images

    data = write_images(tmp_path / "data", per_class=6, splits=("train",))
    torch.manual_seed(0)
    ckpt = tmp_path / "r20.pt"
    torch.save({"model": cifar_resnet("resnet20", 3).state_dict(),
                "classes": ["n09000001, bleu", "n09000002, vert", "n09000003, rouge"]}, ckpt)
    attach("resnet20", data, checkpoint=ckpt, branches=2, branch="pool", out=tmp_path / "b",
           config=TrainConfig(epochs=1, batch_size=16), progress=False, labels="none")
    info = read_info(tmp_path / "b")
    assert info.classes == ["n09000001, bleu", "n09000002, vert", "n09000003, rouge"]
    assert info.data["labels"] == "none" and not info.data["has_labels"]
    res = calibrate(tmp_path / "b", write=False)
    assert [res.class_name(c) for c in range(3)] == ["bleu", "vert", "rouge"]


def test_checkpoint_path_kept(tmp_path):
    """``load_state_dict_file`` still returns the state dict alone."""
    from pteenet.backbone import load_state_dict_file

    path = tmp_path / "r.pt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "classes": ["a"]}, path)
    assert list(load_state_dict_file(Path(path))) == ["w"]


def test_a_test_split_may_hold_classes_the_train_split_lacks(tmp_path):
    """Named by the backbone's classes, each split's folders map on their own (ImageNet's val
    images in classes the training pool does not cover)."""
    from PIL import Image

    for split, c in (("train", "n01440764"), ("val", "n01484850")):
        (tmp_path / split / c).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / split / c / "a.png")
    names = ["n01440764, tench", "n01443537, goldfish", "n01484850, shark"]
    data = open_data(tmp_path, PRE, split="test", label_names=names)
    assert data.targets == [2]
    with pytest.raises(DataError, match="lacks"):  # the user's own classes must agree
        open_data(tmp_path, PRE, split="test")
