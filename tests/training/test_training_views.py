"""``TrainConfig.views``: each training image, its mirror and random shifts, each view's target
the backbone's own answer on it; calibration stays on the held-out images as they are."""

from __future__ import annotations

import pytest
import torch

from pteenet.backbone import create_backbone
from pteenet.bundle import load, read_info
from pteenet.cascade import build_early_exit
from pteenet.data import Mirrored, Shifted, open_data
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


def test_shifted_images_are_moved_copies_drawn_once_from_the_seed(tiny):
    data, ckpt = tiny
    bb = create_backbone("resnet20", checkpoint=ckpt, num_classes=3)
    ds = open_data(data, bb.preprocess, split="train")
    view, again, other = Shifted(ds, 5), Shifted(ds, 5), Shifted(ds, 6)
    assert len(view) == len(ds) and view.targets == ds.targets
    black = (0 - torch.tensor(bb.preprocess.mean)) / torch.tensor(bb.preprocess.std)
    for i in range(len(ds)):
        x, y, j = ds[i]
        v, vy, vj = view[i]
        assert (vy, vj) == (y, j) and torch.equal(v, again[i][0])
        dx, dy = (round(float(m) * 32) for m in view.moves[i])
        assert abs(dx) <= 4 and abs(dy) <= 4
        if view.mirror[i]:
            v = v.flip(-1)
        src = x[:, max(0, -dy):32 - max(0, dy), max(0, -dx):32 - max(0, dx)]
        dst = v[:, max(0, dy):32 - max(0, -dy), max(0, dx):32 - max(0, -dx)]
        assert torch.allclose(src, dst, atol=1e-6)  # the image, moved
        if dx > 0:  # the gap it left is black
            assert torch.allclose(v[:, :, :dx], black[:, None, None].expand(3, 32, dx))
    moved = [tuple(round(float(m) * 32) for m in view.moves[i]) for i in range(len(ds))]
    assert len(set(moved)) > 1
    assert not torch.equal(view.moves, other.moves)


def test_views_train_on_every_view_and_are_recorded(tiny, tmp_path, monkeypatch):
    data, ckpt = tiny
    import pteenet.jobs._attach as job

    seen = []
    real = job.train_branches

    def spy(ee, train, held, config, *args, **kwargs):
        seen.append((len(train), len(held), train))
        return real(ee, train, held, config, *args, **kwargs)

    monkeypatch.setattr(job, "train_branches", spy)
    kw = dict(checkpoint=ckpt, num_classes=3, branches=2, branch="pool", progress=False)
    attach("resnet20", data, out=tmp_path / "plain", config=TrainConfig(epochs=1, views=1),
           **kw)
    attach("resnet20", data, out=tmp_path / "views", config=TrainConfig(epochs=1, views=3),
           **kw)
    (n, held, _), (n3, held3, all3) = seen
    assert n3 == 3 * n and held3 == held  # the views train; held-out is as it was
    assert torch.equal(all3.indices[:n], all3.indices[n:2 * n])
    assert torch.equal(all3.indices[:n], all3.indices[2 * n:])
    for a, b in ((0, n), (0, 2 * n), (n, 2 * n)):  # the backbone saw each view
        assert not torch.equal(all3.final[a:a + n], all3.final[b:b + n])
    assert read_info(tmp_path / "views").training["views"] == 3
    assert read_info(tmp_path / "plain").training["views"] == 1
    load(tmp_path / "views")


def test_views_default_to_four_below_imagenet_size_heads(tiny, tmp_path):
    """The measured default (pteenet.choices.AUTO_VIEWS): 4 views on a 3-class backbone, one
    without the cache (views need it) and one on a 1,000-class head."""
    data, ckpt = tiny
    attach("resnet20", data, checkpoint=ckpt, num_classes=3, branches=2, branch="pool",
           progress=False, out=tmp_path / "auto", config=TrainConfig(epochs=1))
    assert read_info(tmp_path / "auto").training["views"] == 4
    assert TrainConfig(cache=False).resolved_views(3) == 1
    assert TrainConfig().resolved_views(1000) == 1
    assert TrainConfig(views=2).resolved_views(1000) == 2


@pytest.mark.parametrize(("config", "message"), [
    (TrainConfig(views=2, cache=False), "`views` above 1 needs the feature cache"),
    (TrainConfig(views=0), "`views` must be a whole number >= 1, got 0"),
    (TrainConfig(views=True), "`views` must be a whole number >= 1, got True")])
def test_bad_views_are_refused(tiny, tmp_path, config, message):
    data, ckpt = tiny
    with pytest.raises(OptionError, match=message):
        attach("resnet20", data, checkpoint=ckpt, num_classes=3, branches=2, progress=False,
               out=tmp_path / "b", config=config)


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
