"""Tracing: cut points, FLOP profiles, splitting real architectures into pieces that compose back
to the whole model, and models torch.fx cannot trace."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from torch import nn

from pteenet.backbone import cifar_resnet
from pteenet.errors import PteenetError, TraceError
from pteenet.graph import split_at, trace_backbone

# name -> (factory, input size). Random init; ImageNet models at 64x64 to stay fast.
MODELS = {
    "cifar:resnet20": (lambda: cifar_resnet("resnet20"), (32, 32)),
    "torchvision:resnet18": (lambda: torchvision.models.resnet18(), (64, 64)),
    "torchvision:densenet121": (lambda: torchvision.models.densenet121(), (64, 64)),
    "torchvision:vgg11_bn": (lambda: torchvision.models.vgg11_bn(num_classes=10), (64, 64)),
    "torchvision:mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(), (64, 64)),
    "timm:efficientnet_b0": (lambda: timm.create_model("efficientnet_b0"), (64, 64)),
    # these two trace only with timm's own fx registries (modules and functions kept whole)
    "timm:mobilevit_xxs": (lambda: timm.create_model("mobilevit_xxs"), (64, 64)),
    "timm:efficientvit_b0": (lambda: timm.create_model("efficientvit_b0"), (64, 64)),
}


def _run_pieces(pieces, x: torch.Tensor) -> torch.Tensor:
    for piece in pieces:
        x = piece(x)
    return x


def _split_plans(names: list[str]) -> list[list[str]]:
    """Every cut at once, every other cut (both phases) and single cuts at the two ends and in
    the middle: each cut is a split point at least once, and pieces of several lengths run."""
    n = len(names)
    plans = [names, names[::2], names[1::2], [names[0]], [names[n // 2]], [names[-1]]]
    return [p for p in plans if p]


@pytest.mark.parametrize("name", list(MODELS))
def test_pieces_compose_to_the_whole_model(name):
    factory, size = MODELS[name]
    torch.manual_seed(0)
    model = factory().eval()
    trace = trace_backbone(model, size, with_thop=False)
    cuts = trace.cuts
    assert len(cuts) >= 3, f"{name}: only {len(cuts)} cut points"
    names = [c.name for c in cuts]
    assert len(set(names)) == len(names)

    # Profile: every cut is a (C, H, W) feature map; cumulative FLOPs/params never decrease.
    for c in cuts:
        assert len(c.shape) == 3 and all(d > 0 for d in c.shape), c
    flops = [c.flops for c in cuts]
    assert flops == sorted(flops)
    assert flops[0] >= 0 and flops[-1] <= trace.total_flops
    params = [c.params for c in cuts]
    assert params == sorted(params)
    assert params[-1] <= trace.total_params == sum(p.numel() for p in model.parameters())
    assert trace.input_size == size

    # Batch of one: the shapes the trace ran with, so no new kernels need to be set up (fast).
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = model(x)
        used: set[str] = set()
        for plan in _split_plans(names):
            pieces = split_at(trace, plan)
            assert len(pieces) == len(plan) + 1
            out = pieces[0](x)
            assert tuple(out.shape[1:]) == trace.cut(plan[0]).shape
            out = _run_pieces(pieces[1:], out)
            assert out.shape == whole.shape
            assert torch.allclose(out, whole, atol=1e-5), f"{name}: split at {plan} differs"
            used.update(plan)
    assert used == set(names)


def test_intermediate_pieces_return_the_cut_tensors():
    model = cifar_resnet("resnet20").eval()
    trace = trace_backbone(model, (32, 32), with_thop=False)
    plan = [c.name for c in trace.cuts[::4]]
    pieces = split_at(trace, plan)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for piece, cut in zip(pieces, plan):
            x = piece(x)
            assert tuple(x.shape) == (2, *trace.cut(cut).shape)
    # Pieces share the backbone's parameters rather than copying them.
    backbone_params = {id(p) for p in model.parameters()}
    assert all(id(p) in backbone_params for piece in pieces for p in piece.parameters())


# --------------------------------------------------------------------------- untraceable


class _Gate(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace this."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if x.sum() > 0:
            return torch.relu(y)
        return -y


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), _Gate(8), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.body(self.stem(x)))
        return self.fc(x.mean((2, 3)))


def test_untraceable_model_names_the_module_and_suggests_cuts():
    model = _Untraceable().eval()
    with pytest.raises(TraceError) as info:
        trace_backbone(model, (16, 16))
    msg = str(info.value)
    assert "\n" not in msg
    assert "'body.1'" in msg  # the qualified name of the _Gate
    assert "`cuts`" in msg
    assert isinstance(info.value, PteenetError)


def test_untraceable_model_traces_with_cuts_around_the_bad_module():
    torch.manual_seed(0)
    model = _Untraceable().eval()
    cuts = ["stem", "body", "head"]
    trace = trace_backbone(model, (16, 16), cuts=cuts)
    assert [c.name for c in trace.cuts] == cuts
    assert [c.shape for c in trace.cuts] == [(8, 16, 16), (8, 16, 16), (16, 8, 8)]
    assert [c.flops for c in trace.cuts] == sorted(c.flops for c in trace.cuts)
    assert trace.cuts[-1].flops <= trace.total_flops

    for x in (torch.randn(2, 3, 16, 16), -torch.rand(2, 3, 16, 16)):  # both branches of the gate
        with torch.no_grad():
            whole = model(x)
            for plan in (cuts, ["body"], ["stem", "head"]):
                out = _run_pieces(split_at(trace, plan), x)
                assert torch.allclose(out, whole, atol=1e-5)


def test_cuts_naming_unknown_modules():
    with pytest.raises(TraceError) as info:
        trace_backbone(_Untraceable().eval(), (16, 16), cuts=["stem", "torso"])
    assert "torso" in str(info.value)


def test_cut_that_is_not_a_split_point():
    # Inside a residual block the shortcut input is still needed later: not a place to split.
    with pytest.raises(TraceError) as info:
        trace_backbone(cifar_resnet("resnet20").eval(), (32, 32), cuts=["layer1.0.bn1"],
                       with_thop=False)
    msg = str(info.value)
    assert "layer1.0.bn1" in msg and "\n" not in msg


# --------------------------------------------------------------------------- split_at errors


@pytest.fixture(scope="module")
def resnet20_trace():
    return trace_backbone(cifar_resnet("resnet20").eval(), (32, 32), with_thop=False)


def test_split_at_unordered_cuts(resnet20_trace):
    names = [c.name for c in resnet20_trace.cuts]
    with pytest.raises(TraceError, match="ordered"):
        split_at(resnet20_trace, [names[5], names[2]])
    with pytest.raises(TraceError, match="distinct"):
        split_at(resnet20_trace, [names[3], names[3]])


def test_split_at_unknown_cut(resnet20_trace):
    with pytest.raises(TraceError) as info:
        split_at(resnet20_trace, ["no_such_node"])
    assert "no_such_node" in str(info.value)
    with pytest.raises(TraceError):
        resnet20_trace.cut("no_such_node")


# --------------------------------------------------------------------------- model left as found


def test_model_in_train_mode_stays_in_train_mode():
    model = cifar_resnet("resnet20").train()
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    trace_backbone(model, (32, 32))
    assert model.training
    assert all(m.training for m in model.modules())
    for k, v in model.state_dict().items():  # profiled in eval mode: BN statistics untouched
        assert torch.equal(v, stats[k]), k


def test_model_mode_restored_when_tracing_fails():
    model = _Untraceable().train()
    with pytest.raises(TraceError):
        trace_backbone(model, (16, 16))
    assert all(m.training for m in model.modules())
    model.eval()
    with pytest.raises(TraceError):
        trace_backbone(model, (16, 16))
    assert not any(m.training for m in model.modules())
