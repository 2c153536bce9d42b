"""Cuts are read in the layout the model really uses: channels-last maps (Swin, MaxViT, PVT) as
[H, W, C], token streams as [T, C]; window-partitioned tensors are no cuts; and placement says
in one line when it cannot spread the exits. Random-weight timm and torchvision models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pteenet.cascade import Reduce
from pteenet.graph import Cut, Trace, choose_cuts, split_at, spread_note, trace_backbone

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")


def _widths(model: nn.Module) -> tuple[set[int], set[int]]:
    """The widths the model normalises last-axis (LayerNorm, Linear) and first-axis (conv, BN)."""
    last, first = set(), set()
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            last.add(m.normalized_shape[-1])
        elif isinstance(m, nn.Linear):
            last |= {m.in_features, m.out_features}
        elif isinstance(m, nn.Conv2d):
            first |= {m.in_channels, m.out_channels}
        elif isinstance(m, nn.BatchNorm2d):
            first.add(m.num_features)
    return last, first


def _families():
    swin = timm.create_model("swin_tiny_patch4_window7_224", depths=(1, 1, 1, 1), embed_dim=24,
                             num_heads=(1, 1, 2, 2))
    tv_swin = torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=24,
                                                 depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
                                                 window_size=[7, 7])
    return [("timm swin", swin, (224, 224)), ("torchvision swin", tv_swin, (224, 224)),
            ("timm maxvit", timm.create_model("maxvit_rmlp_pico_rw_256"), (256, 256)),
            ("timm pvt_v2", timm.create_model("pvt_v2_b0"), (64, 64))]


@pytest.fixture(scope="module", params=_families(), ids=lambda f: f[0])
def family(request):
    name, model, size = request.param
    return name, model.eval(), trace_backbone(model.eval(), size, with_thop=False)


def test_channels_last_maps_are_read_channels_last(family):
    """Each cut's channel axis, read in its layout, is a width the model has there: a
    channels-last map read as [C, H, W] would take its height (56, 28, ...) for channels."""
    _, model, trace = family
    last, first = _widths(model)
    layouts = {c.layout for c in trace.cuts}
    assert "hwc" in layouts, layouts
    for c in trace.cuts:
        channels = {"hwc": c.shape[-1], "tc": c.shape[-1], "chw": c.shape[0]}[c.layout]
        assert channels in (last if c.layout != "chw" else first | last), (c.name, c.shape,
                                                                           c.layout)


def test_every_cut_holds_whole_images(family):
    """No window-partitioned tensor ([N * windows, tokens, C]): run at batch 2, each chosen cut's
    tensor is [2, *shape] and its branch reduction pools one image per row."""
    _, model, trace = family
    names = choose_cuts(trace, 4)
    x = torch.randn(2, 3, *trace.input_size)
    with torch.no_grad():
        h = x
        for seg, name in zip(split_at(trace, names), names):
            h = seg(h)
            cut = trace.cut(name)
            assert tuple(h.shape) == (2, *cut.shape), (name, h.shape, cut.shape)
            r = Reduce(2, layout=cut.layout)
            assert tuple(r(h).shape) == (2, *r.out_shape(cut.shape))


def test_a_channels_last_reduction_is_the_permuted_maps():
    x = torch.randn(2, 7, 9, 16)
    torch.testing.assert_close(Reduce(4, layout="hwc")(x), Reduce(4)(x.permute(0, 3, 1, 2)))


class _Windows(nn.Module):
    """A stem, then 4 windows of 4x4 tokens each partitioned into the batch, then back."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 4, 4)
        self.norm = nn.LayerNorm(8)
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).permute(0, 2, 3, 1)  # [B, 8, 8, C]
        b = x.shape[0]
        w = x.reshape(b, 2, 4, 2, 4, 8).permute(0, 1, 3, 2, 4, 5).reshape(-1, 16, 8)
        w = self.mix(self.norm(w))  # [B * 4, 16, C]: window-partitioned
        x = w.reshape(b, 2, 2, 4, 4, 8).permute(0, 1, 3, 2, 4, 5).reshape(b, 8, 8, 8)
        return self.head(x.mean((1, 2)))


def test_window_partitioned_tensors_are_refused():
    trace = trace_backbone(_Windows().eval(), (32, 32), with_thop=False)
    shapes = {c.shape for c in trace.cuts}
    assert (16, 8) not in shapes, shapes  # the windows: their first axis is not the batch
    assert (8, 8, 8) in shapes and any(c.layout == "hwc" for c in trace.cuts)


def _stem_only(fractions: list[float]) -> Trace:
    total = 1000
    cuts = [Cut(f"stem{i}", (8, 4, 4), round(f * total), i) for i, f in enumerate(fractions)]
    return Trace(None, cuts, total, 10, (32, 32), _index={c.name: i for i, c in enumerate(cuts)})


def test_placement_says_when_it_cannot_spread_the_exits():
    """LeViT as it traced before token cuts: every cut in the convolutional stem."""
    trace = _stem_only([0.02, 0.07, 0.11, 0.16])
    names = choose_cuts(trace, 4)
    line = spread_note(trace, names)
    assert line is not None and "\n" not in line
    assert "between 2% and 16%" in line and "2%, 7%, 11%, 16%" in line
    assert spread_note(_stem_only([0.2, 0.4, 0.6, 0.8]), ["stem0", "stem1", "stem2", "stem3"]) \
        is None


def test_levit_now_spreads_over_its_token_stages():
    trace = trace_backbone(timm.create_model("levit_128s").eval(), (224, 224), with_thop=False)
    names = choose_cuts(trace, 4)
    assert spread_note(trace, names) is None
    assert {trace.cut(n).layout for n in names} == {"tc"}
    assert trace.cut(names[-1]).flops / trace.total_flops > 0.6
