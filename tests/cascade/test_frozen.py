"""Frozen inference graphs: CPU inference runs the segments frozen, equal to eager, or eager."""

from __future__ import annotations

import copy
import io
import math
import threading

import pytest
import torch
from torch import nn

from pteenet.backbone import cifar_resnet
from pteenet.backbone import freeze as freeze_backbone
from pteenet.cascade import EarlyExitModel, build_early_exit, exit_score, freeze
from pteenet.graph import choose_cuts, trace_backbone


@pytest.fixture(scope="module")
def model() -> EarlyExitModel:
    torch.manual_seed(0)
    backbone = freeze_backbone(cifar_resnet("resnet20", num_classes=4))
    trace = trace_backbone(backbone, (32, 32), with_thop=False)
    return build_early_exit(trace, choose_cuts(trace, 3, "linear"), 4).eval()


def test_cpu_inference_runs_frozen_graphs_that_equal_the_eager_segments(model):
    x = torch.randn(5, 3, 32, 32)
    with torch.inference_mode():
        pieces = model.pieces(x)
        assert all(isinstance(p, torch.jit.ScriptModule) for p in pieces)
        # BatchNorm is folded into the convolutions: rounding apart, the same maps
        h_frozen, h_eager = x, x
        for p, seg in zip(pieces, model.segments):
            h_frozen, h_eager = p(h_frozen), seg(h_eager)
            torch.testing.assert_close(h_frozen, h_eager, rtol=1e-4, atol=1e-4)
        model.set_thresholds(0.0)  # everyone leaves at the first exit: one segment, one branch
        assert model(x).exit_index.eq(0).all()


def test_with_frozen_off_or_grad_on_the_segments_run_eager(model):
    x = torch.randn(2, 3, 32, 32)
    model.frozen = False
    try:
        with torch.inference_mode():
            assert model.pieces(x) is model.segments
    finally:
        model.frozen = True
    assert model.pieces(x) is model.segments  # grad enabled: training code gets the modules


class _BakesBatch(nn.Module):
    """Flattens with the batch size read as a Python int: the tracer records it as a constant."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(int(x.shape[0]), -1) * 2


def test_a_piece_that_traces_wrong_at_another_batch_size_runs_eager():
    piece = _BakesBatch()
    assert freeze(piece, torch.randn(1, 3, 4, 4)) is piece
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    assert isinstance(freeze(conv, torch.randn(1, 3, 8, 8)), torch.jit.ScriptModule)


def test_a_model_that_ran_frozen_still_copies_pickles_and_moves(model):
    x = torch.randn(3, 3, 32, 32)
    model.set_thresholds(0.5)
    with torch.inference_mode():
        want = model(x).logits
    assert model._graphs  # built by the run above
    twin = copy.deepcopy(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    with torch.inference_mode():
        torch.testing.assert_close(twin(x).logits, want)
    twin.double()  # moved or cast: its graphs (float32) are dropped, float64 runs eager
    assert not twin._graphs
    with torch.inference_mode():
        torch.testing.assert_close(twin(x.double()).logits, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("score", ["gate", "softmax", "head"])
def test_inference_runs_each_exit_as_a_traced_graph_equal_bit_for_bit(model, score):
    x = torch.randn(6, 3, 32, 32)
    model.set_thresholds(0.5, score=score, gamma=[0.5, 2.0, math.inf])
    with torch.inference_mode():
        plan = model.plan(x.device)
        answers, scored, h = model.answers(x), model._scored(x, plan), x
        for k, seg in enumerate(model.pieces(x)[:-1]):
            h = seg(h)
            want, want_conf = _eager(model, k, h)  # the eager branch, and its score
            want_score = exit_score(model.score, want, want_conf, float(model.gamma[k]))
            logits, conf = answers[k](h)  # what the time profile runs
            out = scored[k](h)  # what the exit loop runs
            got, got_score = out[0], out[-1]
            for a, b in ((logits, want), (got, want), (got_score, want_score)):
                assert torch.equal(a, b)  # calibration's eager scores hold exactly
            assert conf is None if score != "head" else torch.equal(conf, want_conf)
            assert len(out) == 2 if score != "head" else torch.equal(out[1], want_conf)
        graphs = [g for key, v in model._graphs.items() if key[0][0] != "segments" for g in v]
    assert len(graphs) >= 2 * model.num_branches and all(_traced(g) for g in graphs)
    with torch.no_grad():  # training the branch later is seen: the graph shares its weights
        model.branches[0].classifier.bias.add_(1.0)
    with torch.inference_mode():
        h0 = model.pieces(x)[0](x)
        assert torch.equal(model.answers(x)[0](h0)[0], _eager(model, 0, h0)[0])


def _eager(model, k: int, h: torch.Tensor):
    """Branch k run by hand: (logits, confidence logit), the head only where the score reads it."""
    branch = model.branches[k]
    return branch(h) if model.score == "head" else (branch.classify(h), None)


def _traced(answer) -> bool:
    """Whether an answer runs a traced graph (a bare one, or wrapped to add None)."""
    closure = getattr(answer, "__closure__", None)
    run = closure[0].cell_contents if closure else answer
    return isinstance(run, torch.jit.ScriptModule)


def test_new_gate_powers_replace_the_old_exit_graphs(model):
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        for power in (0.5, 1.0, 2.0):
            model.set_thresholds(0.5, score="gate", gamma=[power] * model.num_branches)
            model(x)
    scored = [key for key in model._graphs if key[0][0] == "scored"]
    assert len(scored) == 1 and scored[0][0][2] == (2.0,) * model.num_branches


class _Flattens(nn.Module):
    """A convolution whose map is flattened with ``view``: impossible on a channels-last map."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).view(-1, 8 * 16 * 16)


class _Locked(nn.Module):
    """A convolution beside a lock: a module that cannot be deep-copied."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.lock = nn.Conv2d(8, 8, 3, padding=1), threading.Lock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_pieces_freeze_channels_last_or_else_in_their_own_layout():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 16, 16)
    convs = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()).eval()
    flattens, locked = _Flattens().eval(), _Locked().eval()
    with torch.no_grad():
        nhwc, plain = freeze(convs, x), freeze(flattens, x)
        assert isinstance(freeze(locked, x), torch.jit.ScriptModule)  # no copy: own layout
        assert isinstance(nhwc, torch.jit.ScriptModule)
        assert nhwc(x).is_contiguous(memory_format=torch.channels_last)  # computed in NHWC
        torch.testing.assert_close(nhwc(x), convs(x), rtol=1e-4, atol=1e-5)
        assert isinstance(plain, torch.jit.ScriptModule)  # frozen all the same, in NCHW
        torch.testing.assert_close(plain(x), flattens(x), rtol=1e-4, atol=1e-5)
    assert next(convs.parameters()).is_contiguous()  # the eager piece itself is untouched
