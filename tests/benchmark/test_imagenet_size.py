"""ImageNet-size backbones (224x224, random weights): bounded cache, cheap branches, placement."""

from __future__ import annotations

import json
import os
from pathlib import Path
from unittest.mock import patch

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from pteenet.backbone import create_backbone
from pteenet.bundle import read_info
from pteenet.cascade import Reduce, build_early_exit, make_branch, reduction
from pteenet.cascade import _branches as branches
from pteenet.graph import choose_cuts, trace_backbone
from pteenet.jobs import inspect

SEVEN = ("timm:resnet18", "timm:resnet50", "timm:mobilenetv3_large_100", "timm:efficientnet_b0",
         "timm:convnext_tiny", "torchvision:resnet50", "torchvision:mobilenet_v3_large")


@pytest.mark.parametrize("shape", [(16, 32, 32), (32, 16, 16), (64, 8, 8)])
def test_cifar_resnet_maps_keep_the_full_4x4_avg_max_grid(shape):
    reduce = make_branch("mlp", shape, 10, budget=1e9).reduce
    assert (reduce.size, reduce.group) == (4, 1)
    assert reduce.out_shape(shape) == (2 * shape[0], 4, 4)


@pytest.mark.parametrize("shape", [(128, 28, 28), (1024, 14, 14), (2048, 7, 7), (1152, 7, 7),
                                   (1031, 7, 7)])
def test_wide_maps_are_reduced_to_at_most_max_values(shape):
    reduce = reduction(shape, 4)
    out = reduce(torch.randn(2, *shape))
    assert tuple(out.shape[1:]) == reduce.out_shape(shape)
    assert out[0].numel() <= 2048  # 4 KB per cut in the fp16 cache


def test_channel_groups_average_adjacent_channels_of_each_half():
    x = torch.randn(1, 4096, 2, 2)
    out = Reduce(1, 4)(x)
    avg = x.mean((2, 3)).view(1, 1024, 4).mean(2)
    mx = x.amax((2, 3)).view(1, 1024, 4).mean(2)
    assert torch.allclose(out.flatten(1), torch.cat([avg, mx], 1), atol=1e-6)


@settings(max_examples=20, deadline=None)
@given(s=st.integers(1, 4), cell=st.integers(1, 9), c=st.integers(1, 80), n=st.integers(1, 3),
       channels_last=st.booleans(), seed=st.integers(0, 9))
def test_reduce_is_adaptive_avg_and_max_pooling_on_any_layout(s, cell, c, n, channels_last, seed):
    side = s * cell + (seed % 3 == 0)  # now and then cells that do not tile the map
    x = torch.randn(n, c, side, side, generator=torch.Generator().manual_seed(seed))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    want = torch.cat([F.adaptive_avg_pool2d(x, s), F.adaptive_max_pool2d(x, s)], 1)
    with patch.object(branches, "CELL_POOL_MIN", 0):  # small maps too: every path, quickly
        got = Reduce(s)(x)
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5)


def test_large_channels_last_maps_are_pooled_cell_by_cell_and_small_ones_adaptively(monkeypatch):
    calls = []
    real = branches._cell_pool
    monkeypatch.setattr(branches, "_cell_pool", lambda x, s: calls.append(x.shape) or real(x, s))
    big = torch.randn(2, 64, 112, 112)  # MobileNetV3's first tapped map
    cl = big.contiguous(memory_format=torch.channels_last)
    want = torch.cat([F.adaptive_avg_pool2d(big, 4), F.adaptive_max_pool2d(big, 4)], 1)
    assert torch.allclose(Reduce(4)(cl), want, atol=1e-5) and calls == [cl.shape]
    for plain in (big, torch.randn(2, 16, 32, 32).contiguous(memory_format=torch.channels_last),
                  torch.randn(2, 64, 113, 113).contiguous(memory_format=torch.channels_last)):
        Reduce(4)(plain)  # NCHW; a CIFAR-size map; cells that do not tile
    assert calls == [cl.shape]
    half = torch.full_like(cl, 100.0, dtype=torch.float16)  # cell sums past fp16's 65504
    assert torch.isfinite(Reduce(4)(half)).all() and calls == [cl.shape]


@pytest.mark.slow
def test_default_resnet50_attach_caches_at_most_64_kb_per_image():
    info = inspect("timm:resnet50", branches=10)
    chosen = [c for c in info.cuts if c.chosen]
    assert len(chosen) == 10
    assert info.cache_bytes == sum(c.cache_bytes for c in chosen) <= 64 * 1024


@pytest.mark.slow
@pytest.mark.parametrize("model", SEVEN)
def test_default_branches_cost_at_most_2_percent_and_placement_traces(model):
    bb = create_backbone(model)
    trace = trace_backbone(bb.model, bb.preprocess.input_size, with_thop=False)
    names = choose_cuts(trace)  # what attach places by default
    assert len(names) >= 8
    fractions = [trace.cut(n).flops / trace.total_flops for n in names]
    assert fractions[0] < 0.2 and fractions[-1] > 0.8
    ee = build_early_exit(trace, names, bb.num_classes)
    assert max(ee.cost.branch) <= 0.02


@pytest.mark.parametrize("model", ["timm:resnet18", "torchvision:mobilenet_v3_small"])
def test_images_are_preprocessed_like_the_models_own_eval_transform(model):
    from pteenet.data._items import to_tensor

    bb = create_backbone(model)
    if bb.source == "timm":
        from timm.data import create_transform, resolve_data_config

        reference = create_transform(**resolve_data_config({}, model=bb.model))
    else:
        import torchvision

        reference = torchvision.models.get_model_weights(bb.name).DEFAULT.transforms()
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (300, 410, 3), dtype=np.uint8))
    assert bb.preprocess.resize_size is not None
    assert torch.allclose(to_tensor(image, bb.preprocess), reference(image), atol=1e-5)


def _imagenet_folders(root: Path, per_class: int = 10, seed: int = 0) -> Path:
    """An ImageNet-style folder (``train/`` and ``val/`` with class folders) and an unlabeled one
    (``unlabeled/``, images directly inside) of JPEGs of mixed, non-square sizes, so the
    resize-and-crop recipe really runs."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("val", per_class // 2), ("unlabeled", per_class)):
        for c, name in enumerate(("n01440764", "n01443537")):
            d = root / split if split == "unlabeled" else root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                h, w = rng.integers(200, 320, 2)
                img = rng.integers(0, 120, (h, w, 3))
                img[..., c] += 120
                Image.fromarray(img.astype("uint8")).save(d / f"{c}{i:03d}.JPEG", quality=85)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("model, layout", [("timm:mobilenetv3_small_050", "unlabeled"),
                                           ("torchvision:mobilenet_v3_small", "imagenet")])
def test_attach_calibrate_bench_on_a_224_folder(model, layout, tmp_path, invoke):
    root = _imagenet_folders(tmp_path / "images")
    data = root / "unlabeled" if layout == "unlabeled" else root
    bb = create_backbone(model)  # random weights, saved as a user's checkpoint would be
    ckpt = tmp_path / "weights.pth"
    torch.save(bb.model.state_dict(), ckpt)
    out = tmp_path / "bundle"
    r = invoke("attach", model, "--checkpoint", ckpt, "--data", data, "--out", out,
               "--branches", "3", "--epochs", "2", "--batch-size", "8", "--quiet")
    assert r.exit_code == 0, r.output
    assert "feature cache:" in r.stdout
    info = read_info(out)
    assert info.preprocess == bb.preprocess  # the model's own resize, crop, interpolation
    assert info.preprocess.resize_size > 224
    assert sum(b["cache_bytes"] for b in info.branches) <= 3 * 4096
    r = invoke("calibrate", "--bundle", out)
    assert r.exit_code == 0, r.output
    assert info.data["num_samples"] == 20
    assert info.data["has_labels"] == (layout == "imagenet")
    r = invoke("bench", "--bundle", out, "--data", root, "--split", "val", "--batch-size", "4",
               "--latency-samples", "2", "--repeats", "1", "--quiet")
    assert r.exit_code == 0, r.output
    result = json.loads((out / "bench.json").read_text())
    assert result["data"]["num_samples"] == 10 and result["data"]["split"] == "test"
    assert sum(e["count"] for e in result["early_exit"]["exits"]) == 10


def test_every_image_is_decoded_once_however_many_epochs(tiny, tmp_path, monkeypatch):
    from pteenet.data._datasets import FolderData
    from pteenet.jobs import attach
    from pteenet.training import TrainConfig
    from pteenet.training import _features as feature_cache

    data, ckpt = tiny
    decoded: list[int] = []
    original = FolderData._image

    def counting(self, index):
        decoded.append(index)
        return original(self, index)

    monkeypatch.setattr(FolderData, "_image", counting)
    steady: list[bool] = []  # the caching pass fixes the allocator (page faults, not arithmetic)
    monkeypatch.setattr(feature_cache, "steady_allocator", lambda: steady.append(True) or True)
    attach("resnet20", data, checkpoint=ckpt, num_classes=3, branches=2, out=tmp_path / "b",
           progress=False, config=TrainConfig(epochs=3, batch_size=16, num_workers=0, views=1))
    assert sorted(decoded) == list(range(72))  # train and held-out, once each
    assert steady


def test_loader_workers_by_default_only_for_image_files_with_cores_to_spare(tmp_path,
                                                                           monkeypatch):
    from pteenet.backbone import Preprocess
    from pteenet.data import ImageData, default_workers, open_data

    folder = _imagenet_folders(tmp_path, per_class=2) / "unlabeled"
    files, memory = open_data(folder, Preprocess((32, 32))), ImageData("in-memory", None,
                                                                        Preprocess((32, 32)))
    for cores, want in ((64, 8), (8, 4), (4, 2), (2, 0), (1, 0)):
        monkeypatch.setattr(os, "cpu_count", lambda cores=cores: cores)
        assert default_workers(files) == want  # on 2 cores the backbone's threads take both
        assert default_workers(memory) == 0
