"""``TrainConfig.flip``: each training image and its mirror, the mirror's target the backbone's
own answer on it; calibration stays on the unmirrored held-out images."""

from __future__ import annotations

import pytest
import torch

from pteenet.backbone import create_backbone
from pteenet.bundle import load, read_info
from pteenet.cascade import build_early_exit
from pteenet.data import Mirrored, open_data
from pteenet.errors import OptionError
from pteenet.graph import choose_cuts, trace_backbone
from pteenet.jobs import attach
from pteenet.training import TrainConfig, compute_features


def test_mirrored_images_are_the_flipped_tensors_with_the_same_labels(tiny):
    data, ckpt = tiny
    bb = create_backbone("resnet20", checkpoint=ckpt, num_classes=3)
    ds = open_data(data, bb.preprocess, split="train")
    mirror = Mirrored(ds)
    assert len(mirror) == len(ds) and mirror.targets == ds.targets
    for i in (0, len(ds) - 1):
        (x, y, j), (m, my, mj) = ds[i], mirror[i]
        assert torch.allclose(m, x.flip(-1), atol=1e-6) and (y, j) == (my, mj)


def test_flip_trains_on_both_views_and_is_recorded(tiny, tmp_path, monkeypatch):
    data, ckpt = tiny
    import pteenet.jobs._attach as job

    seen = []
    real = job.train_branches

    def spy(ee, train, held, config, *args, **kwargs):
        seen.append((len(train), len(held), train))
        return real(ee, train, held, config, *args, **kwargs)

    monkeypatch.setattr(job, "train_branches", spy)
    kw = dict(checkpoint=ckpt, num_classes=3, branches=2, branch="pool", progress=False)
    attach("resnet20", data, out=tmp_path / "plain", config=TrainConfig(epochs=1), **kw)
    attach("resnet20", data, out=tmp_path / "flip", config=TrainConfig(epochs=1, flip=True),
           **kw)
    (n, held, _), (n2, held2, both) = seen
    assert n2 == 2 * n and held2 == held  # the mirrors train; held-out is as it was
    assert torch.equal(both.indices[:n], both.indices[n:])
    assert not torch.equal(both.final[:n], both.final[n:])  # the backbone saw the mirrors
    assert read_info(tmp_path / "flip").training["flip"] is True
    assert read_info(tmp_path / "plain").training["flip"] is False
    load(tmp_path / "flip")


def test_flip_needs_the_cache(tiny, tmp_path):
    data, ckpt = tiny
    with pytest.raises(OptionError, match="`flip` needs the feature cache"):
        attach("resnet20", data, checkpoint=ckpt, num_classes=3, branches=2, progress=False,
               out=tmp_path / "b", config=TrainConfig(flip=True, cache=False))


def test_joined_feature_sets_keep_order_and_count_unreadable_once(tiny):
    data, ckpt = tiny
    bb = create_backbone("resnet20", checkpoint=ckpt, num_classes=3)
    trace = trace_backbone(bb.model, bb.preprocess.input_size)
    ee = build_early_exit(trace, choose_cuts(trace, 2), 3, "pool").eval()
    ds = open_data(data, bb.preprocess, split="train")
    a = compute_features(ee, ds, [0, 1, 2], num_workers=0)
    b = compute_features(ee, Mirrored(ds), [0, 1, 2], num_workers=0)
    j = a.joined(b)
    assert len(j) == 6 and torch.equal(j.final[3:], b.final) and j.skipped == a.skipped
    assert all(torch.equal(f[:3], g) for f, g in zip(j.feats, a.feats))
