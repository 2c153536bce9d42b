"""The early-exit model: true early exit agrees with the simulated cascade and the backbone."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pteenet.backbone import cifar_resnet, freeze
from pteenet.cascade import EarlyExitModel, build_early_exit, gate, gate_power
from pteenet.errors import OptionError
from pteenet.graph import choose_cuts, trace_backbone
from pteenet.thresholds import exit_index

K = 4
FIXTURE = [HealthCheck.function_scoped_fixture]


@pytest.fixture(scope="module")
def setup() -> tuple[torch.nn.Module, EarlyExitModel, torch.Tensor]:
    torch.manual_seed(0)
    backbone = freeze(cifar_resnet("resnet20", num_classes=K))
    trace = trace_backbone(backbone, (32, 32), with_thop=False)
    cuts = choose_cuts(trace, 3, "linear")
    model = build_early_exit(trace, cuts, K, ["pool", "conv1", "conv1d"]).eval()
    for b in model.branches:  # spread the confidence logits so thresholds split the batch
        torch.nn.init.normal_(b.confidence.weight, std=3.0)
    x = torch.randn(24, 3, 32, 32)
    return backbone, model, x


def simulate(model: EarlyExitModel, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: run everything, then apply the exit rule sample by sample (no compaction)."""
    feats, final = model.reduced_features(x)
    logits, conf = model.branch_outputs(feats)
    scores, preds = model.exit_outputs(logits, conf)
    exits = exit_index(scores, preds, model.thresholds)
    every = torch.stack([*logits, final], 1)
    return every[torch.arange(len(x)), exits], exits


@settings(max_examples=15, deadline=None, suppress_health_check=FIXTURE)
@given(table=st.lists(st.lists(st.floats(1.001, math.inf), min_size=K,
                               max_size=K), min_size=3, max_size=3),
       score=st.sampled_from(["gate", "head", "softmax"]))
def test_thresholds_above_one_equal_the_backbone_at_exactly_its_cost(setup, table, score):
    backbone, model, x = setup
    model.set_thresholds(table, score=score)
    res = model(x)
    assert torch.equal(res.logits, backbone(x))
    assert (res.exit_index == model.num_branches).all()
    # every exit is off: no branch runs, so the cost is the backbone's, not a FLOP more
    assert model.active == [False] * model.num_branches
    assert torch.equal(res.flops, torch.full_like(res.flops, model.backbone_flops))
    assert model.cost.exits(model.active)[-1] == 1.0


def test_zero_thresholds_leave_at_the_first_branch(setup):
    _, model, x = setup
    model.set_thresholds(0.0)
    res = model(x)
    assert (res.exit_index == 0).all()
    expected = (model.segment_flops[0] + model.branch_flops[0])
    assert (res.flops == expected).all()


@settings(max_examples=25, deadline=None, suppress_health_check=FIXTURE)
@given(table=st.lists(st.lists(st.floats(0.0, 1.0), min_size=K, max_size=K), min_size=3,
                      max_size=3),
       score=st.sampled_from(["head", "softmax"]))
def test_true_early_exit_matches_the_simulated_cascade(setup, table, score):
    _, model, x = setup
    model.set_thresholds(table, score=score)
    res = model(x)
    logits, exits = simulate(model, x)
    assert torch.equal(res.exit_index, exits)
    assert torch.allclose(res.logits, logits, atol=1e-5)
    costs = torch.tensor(model.cost.exits(model.active), dtype=torch.float64) * model.backbone_flops
    assert torch.allclose(res.flops, costs[exits])


@settings(max_examples=10, deadline=None, suppress_health_check=FIXTURE)
@given(t=st.floats(0.0, 1.0), batch=st.integers(1, 24))
def test_batch_size_does_not_change_per_sample_results(setup, t, batch):
    _, model, x = setup
    model.set_thresholds([t, t / 2, 1 - t])
    ones = [model(x[i:i + 1]) for i in range(len(x))]
    chunks = [model(x[i:i + batch]) for i in range(0, len(x), batch)]
    for field in ("exit_index", "flops"):
        a = torch.cat([getattr(r, field) for r in ones])
        b = torch.cat([getattr(r, field) for r in chunks])
        assert torch.equal(a, b)
    a = torch.cat([r.logits for r in ones])
    b = torch.cat([r.logits for r in chunks])
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)


def test_per_class_thresholds_apply_to_the_predicted_class(setup):
    _, model, x = setup
    feats, _ = model.reduced_features(x)
    logits, _ = model.branch_outputs(feats)
    pred0 = logits[0].argmax(1)
    c = int(pred0.mode().values)
    table = torch.full((3, K), 2.0)
    table[0, c] = 0.0  # only class c may leave at branch 0, and all of it does
    model.set_thresholds(table)
    res = model(x)
    assert torch.equal(res.exit_index == 0, pred0 == c)
    assert (res.exit_index[pred0 != c] == 3).all()
    one_by_one = torch.cat([model(x[i:i + 1]).exit_index for i in range(len(x))])
    assert torch.equal(one_by_one, res.exit_index)  # batch 1 tests numbers, not tensors


def test_training_mode_returns_every_branch_and_keeps_the_backbone_frozen(setup):
    _, model, x = setup
    before = {k: v.clone() for k, v in model.segments.state_dict().items()}
    model.train()
    out = model(x)
    assert len(out.logits) == 3 and out.final_logits.shape == (24, K)
    assert not model.segments.training
    sum(lg.sum() for lg in out.logits).backward()
    assert all(p.grad is None for p in model.segments.parameters())
    model.eval()
    assert all(torch.equal(v, model.segments.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("bad", [float("nan"), -0.1, [0.5, 0.5], [[0.5] * (K + 1)] * 3])
def test_bad_thresholds_are_refused(setup, bad):
    _, model, _ = setup
    with pytest.raises(OptionError):
        model.set_thresholds(bad)


def test_an_off_exit_is_not_run_and_costs_nothing(setup, monkeypatch):
    _, model, x = setup
    model.set_thresholds([0.0, math.inf, math.inf], score="softmax")
    ran: list[int] = []
    monkeypatch.setattr(model, "frozen", False)  # eager: the branches' Python code runs
    monkeypatch.setattr(model.branches[1], "classify", lambda h: ran.append(1))
    model.set_thresholds([math.inf, math.inf, 0.0])
    res = model(x)
    assert ran == [] and (res.exit_index == 2).all()  # branch 1 never ran
    expected = sum(model.segment_flops[:3]) + model.branch_flops[2]
    assert (res.flops == expected).all()
    assert model.cost.exits(model.active)[2] == pytest.approx(expected / model.backbone_flops)


def test_gate_half_is_the_calibrated_softmax_table_and_off_exits_stay_off(setup):
    _, model, x = setup
    softmax = [0.3, 0.6, math.inf]  # a table on the top-softmax scale; exit 2 off
    model.set_thresholds(softmax, score="softmax")
    want = model(x)
    gamma = [gate_power(t) for t in softmax]
    model.set_thresholds([0.5, 0.5, math.inf], score="gate", gamma=gamma)
    got = model(x)
    assert torch.equal(got.exit_index, want.exit_index) and torch.equal(got.flops, want.flops)
    # the knob: higher is safer (later exits), lower is earlier; exit 2 stays off at any value
    model.set_thresholds(0.9)
    later = model(x)
    model.set_thresholds(0.0)
    earliest = model(x)
    assert model.active == [True, True, False]
    assert (later.exit_index >= got.exit_index).all() and (earliest.exit_index == 0).all()
    assert gate(torch.tensor([0.3, 1.0]), gate_power(0.3)).tolist() == pytest.approx([0.5, 1.0])
    assert gate(torch.tensor([0.3, 1.0]), math.inf).tolist() == [0.0, 0.0]  # switched off
    model.set_thresholds(0.5, score="softmax", gamma=[1.0] * 3)


@pytest.mark.parametrize("score", ["softmax", "head"])
def test_the_confidence_head_runs_only_when_the_score_reads_it(setup, monkeypatch, score):
    _, model, x = setup
    model.set_thresholds([0.0, 0.5, 0.5], score=score)  # every sample answers at exit 0
    full = [b(f)[0] for b, f in zip(model.branches, model.features(x)[0])]
    heads: list[int] = []
    monkeypatch.setattr(model, "frozen", False)  # eager: the branches' Python code runs
    for k, b in enumerate(model.branches):
        fwd = b.confidence.forward
        monkeypatch.setattr(b.confidence, "forward", lambda z, k=k, f=fwd: heads.append(k) or f(z))
    res = model(x)
    assert bool(heads) == (score == "head")  # softmax and gate scores never read the head
    assert (res.exit_index == 0).all()
    assert torch.allclose(res.logits, full[0])  # the same logits either way


def test_a_table_edited_in_place_moves_the_exits_at_once(setup):
    _, model, x = setup
    model.set_thresholds(2.0, score="softmax")
    assert (model(x).exit_index == model.num_branches).all()
    model.thresholds[1].fill_(0.0)  # no set_thresholds: the exit loop must still see it
    assert (model(x).exit_index == 1).all()
    model.gamma.fill_(1.0)
    model.set_thresholds(0.5, score="gate")
    want = model(x).exit_index
    model.gamma[0] = math.inf  # the gate switches exit 0 off
    assert (model(x).exit_index != 0).all() and (want == 0).any()


def test_batch_one_route_follows_the_thresholds_branches_and_graphs(setup):
    _, model, x = setup
    one = x[:1]
    model.set_thresholds(2.0, score="softmax")
    model.thresholds[1].fill_(0.0)  # in place, as above
    assert int(model(one).exit_index) == 1
    route = model._exit_plan.route
    assert route is not None and int(model(one).exit_index) == 1
    assert model._exit_plan.route is route  # worked out once, then reused
    model.thresholds[0].fill_(0.0)
    assert int(model(one).exit_index) == 0
    old = model.branches[0]
    model.branches[0] = copy.deepcopy(old)
    with torch.no_grad():
        model.branches[0].classifier.bias.add_(5.0)
    got = model(one)
    with torch.inference_mode():
        want = model.branches[0].classify(model.pieces(one)[0](one))
    assert torch.equal(got.logits, want)  # the new branch answers, not the old graph
    model.branches[0] = old
    model.double().float()  # moved: new graphs, so a new route
    route = model._exit_plan.route
    assert int(model(one).exit_index) == 0 and model._exit_plan.route is not route


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 9), c=st.integers(1, 5), side=st.integers(1, 4),
       channels_last=st.booleans(), seed=st.integers(0, 99))
def test_compaction_keeps_the_rows_asked_for_in_the_maps_own_layout(n, c, side, channels_last,
                                                                    seed):
    from pteenet.cascade._exit_loop import keep_rows

    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, c, side, side, generator=g)
    if channels_last:
        h = h.contiguous(memory_format=torch.channels_last)
    rows = torch.randperm(n, generator=g)[:max(1, n // 2)].sort().values
    kept = keep_rows(h, rows)
    assert torch.equal(kept, h[rows])
    assert kept.is_contiguous(memory_format=torch.channels_last if channels_last
                              else torch.contiguous_format)
