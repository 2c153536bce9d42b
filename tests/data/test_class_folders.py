"""Class folders named as the backbone knows its classes get the backbone's indices
(issue: ImageNet folders by class): a wnid folder holding a subset of ImageNet's classes keeps
the published-order labels; where most folders match, one that does not is an error in one
line."""
from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
import torch

from pteenet.backbone import Preprocess, create_backbone, label_names
from pteenet.data import open_data
from pteenet.errors import DataError

PRE = Preprocess(input_size=(8, 8), mean=(0.5,) * 3, std=(0.5,) * 3)
NAMES = ["n01, tench", "n02, goldfish", "n03, great white shark"]


def _folder(root: Path, classes: list[str]) -> Path:
    from PIL import Image

    for c in classes:
        (root / c).mkdir(parents=True)
        Image.new("RGB", (8, 8), (len(c) * 9, 0, 0)).save(root / c / "a.png")
    return root


def test_a_subset_of_wnid_folders_keeps_the_backbone_indices(tmp_path):
    data = open_data(_folder(tmp_path, ["n03", "n01"]), PRE, label_names=NAMES)
    assert data.classes == NAMES
    assert sorted(data.targets) == [0, 2]  # n01 -> 0, n03 -> 2 (sorted position would give 1)


def test_folders_named_by_class_name_map_too(tmp_path):
    data = open_data(_folder(tmp_path, ["Great_White_Shark", "goldfish"]), PRE, label_names=NAMES)
    assert sorted(data.targets) == [1, 2]


def test_a_folder_that_matches_no_class_is_one_line(tmp_path):
    with pytest.raises(DataError, match="class folder 'zebra' is not one of the backbone's"):
        open_data(_folder(tmp_path, ["n01", "zebra"]), PRE, label_names=NAMES)


@pytest.mark.parametrize("folders", [["b", "a"], ["apple", "goldfish", "pear"]])
def test_folders_unrelated_to_the_names_keep_sorted_labels(tmp_path, folders):
    """The user's own classes, even where one happens to share a name with the backbone's."""
    data = open_data(_folder(tmp_path, folders), PRE, label_names=NAMES)
    assert data.classes == sorted(folders)
    assert sorted(data.targets) == list(range(len(folders)))


VAL_TAR = "data/imagenet-real/val.tar"
WEIGHTS = "weights/imagenet/tf_efficientnet_lite0-in1k.pth"


def test_real_imagenet_val_subset_scores_the_backbone_right(shared_dir, tmp_path):
    """40 shared val images in 40 wnid folders (a subset of the 1,000): with the mapping the
    real EfficientNet-Lite0 scores >= 80 % top-1 against their own labels."""
    if not (shared_dir / VAL_TAR).is_file() or not (shared_dir / WEIGHTS).is_file():
        pytest.skip("the shared ImageNet material is absent")
    with tarfile.open(shared_dir / VAL_TAR) as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
        picked, seen = [], set()
        for m in members:  # one image from each of the first 40 classes
            wnid = Path(m.name).parent.name
            if wnid not in seen and len(seen) < 40:
                seen.add(wnid)
                picked.append(m)
        tar.extractall(tmp_path, members=picked, filter="data")
    bb = create_backbone("timm:tf_efficientnet_lite0", checkpoint=shared_dir / WEIGHTS)
    names = label_names(bb)
    assert names is not None and names[0].startswith("n01440764, tench")
    data = open_data(tmp_path / "val", bb.preprocess, label_names=names)
    x = torch.stack([data[i][0] for i in range(len(data))])
    with torch.inference_mode():
        pred = bb.model.eval()(x).argmax(1)
    labels = torch.tensor(data.targets)
    assert len(set(labels.tolist())) == 40 and int(labels.max()) > 40  # not sorted positions
    assert (pred == labels).float().mean() >= 0.8
    unmapped = open_data(tmp_path / "val", bb.preprocess)  # sorted positions: wrong labels
    assert (pred == torch.tensor(unmapped.targets)).float().mean() < 0.2
