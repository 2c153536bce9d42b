"""A representative dozen of the compatibility list (``benchmarks/compat_models.txt``), one or
more of every family kind, end to end with random weights: trace, attach, load, export to ONNX,
and the torch-free cascade answering as the model does (:func:`pteenet.jobs.compat_row`). The
whole list runs in ``benchmarks/compat.py``; these are the small members (2-5 s each)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pteenet.jobs import compat_row
from tests._helpers import write_images

pytest.importorskip("timm")
pytest.importorskip("onnxruntime")

DOZEN = [
    "torchvision:resnet18",  # cnn
    "torchvision:squeezenet1_0",  # cnn, map sizes adaptive pooling cannot export
    "timm:mobilenetv3_small_100",  # mobile
    "torchvision:shufflenet_v2_x0_5",  # mobile
    "timm:tf_efficientnet_lite0",  # mobile, the shared real ImageNet model's architecture
    "timm:convnext_atto",  # hybrid
    "timm:mobilevit_xxs",  # hybrid
    "timm:levit_128s",  # hybrid, token stages
    "timm:vit_tiny_patch16_224",  # vit, class token
    "timm:resmlp_12_224",  # mixer, no class token
    "timm:pit_ti_224",  # multi-stage transformer
    "timm:pvt_v2_b0",  # multi-stage, maps and tokens
]


def _listed() -> set[str]:
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "compat_models.txt"
    return {line.split()[0] for line in path.read_text().splitlines()
            if line.strip() and not line.startswith("#")}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("compat") / "data", per_class=4,
                        splits=("train",))


def test_the_dozen_are_on_the_list():
    assert set(DOZEN) <= _listed() and len(_listed()) >= 60


@pytest.mark.parametrize("model", DOZEN)
def test_every_family_runs_end_to_end(model, data, tmp_path):
    row = compat_row(model, data, tmp_path / "b")
    assert row["ok"], f"{model} stopped at {row['stage']}: {row['error']}"
    assert len(set(row["exits"])) == 4 and row["max_branch"] <= 0.02
