"""A token backbone (a small ViT of the user's own, [N, T, C] residual stream with
nn.MultiheadAttention) attaches, reloads and exports end to end: its cuts are token cuts, the
early-exit model with every exit off is the backbone, and the exported cascade reproduces it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import pteenet
from pteenet.training import TrainConfig
from tests._helpers import write_images


class _Block(nn.Module):
    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 4, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        y = self.n1(t)
        t = t + self.attn(y, y, y, need_weights=False)[0]
        return t + self.mlp(self.n2(t))


class TinyViT(nn.Module):
    """Patches of 8x8 pixels as 16 tokens, four pre-norm attention blocks, a mean-pooled head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 32, 8, 8)
        self.blocks = nn.Sequential(*[_Block() for _ in range(4)])
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        return self.head(self.blocks(t).mean(1))


@pytest.fixture(scope="module")
def vit_bundle(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vit")
    data = write_images(tmp / "data", per_class=6, splits=("train",))
    torch.manual_seed(0)
    model = TinyViT().eval()
    pteenet.attach(model, data, input_size=(32, 32), branches=2, out=tmp / "b",
                   config=TrainConfig(epochs=1, batch_size=8), progress=False)
    return model, tmp


def test_a_vit_gets_token_cuts_and_equals_itself_with_exits_off(vit_bundle):
    model, tmp = vit_bundle
    ee = pteenet.load(tmp / "b", model=model)
    assert [b.reduce.layout for b in ee.branches] == ["tc", "tc"]
    ee.set_thresholds(2.0)
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ee(x).logits, model(x), rtol=1e-4, atol=1e-5)


def test_a_vit_with_multi_head_attention_exports_to_onnx(vit_bundle):
    """nn.MultiheadAttention's fused inference op has no ONNX symbol (torchvision vit_b_16
    failed to export); the export takes the unfused path and computes the same numbers."""
    pytest.importorskip("onnxruntime")
    from pteenet.runtime import Cascade

    model, tmp = vit_bundle
    pteenet.export(tmp / "b", out=tmp / "onnx", format="onnx", model=model)
    assert torch.backends.mha.get_fastpath_enabled()  # the user's setting is restored
    cascade = Cascade.open(tmp / "onnx")
    ee = pteenet.load(tmp / "b", model=model)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        want = ee(x)
    got = cascade.run(x.numpy())
    np.testing.assert_allclose(got.logits, want.logits.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(got.exit_index, want.exit_index.numpy())
