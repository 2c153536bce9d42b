"""The cost search: never worse than the backbone, within its error limit, exits that pay."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pteenet.calibration import min_cost_thresholds
from pteenet.cascade import Cost, cascade_cost
from pteenet.errors import OptionError


def flops(segments: list[float], branches: list[float]) -> Cost:
    return Cost("flops", tuple(segments), tuple(branches))


def _cascade(seed: int, n: int = 400, b: int = 4, k: int = 5):
    """Random scores; each exit is right (agrees with the backbone) more often when its score is
    high, and later exits more often, like a real cascade."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(n, b, generator=g)
    final = torch.randint(0, k, (n,), generator=g)
    wrong = torch.randint(1, k, (n, b), generator=g)
    p_right = 0.3 + 0.6 * scores * (torch.arange(1, b + 1) / b)
    right = torch.rand(n, b, generator=g) < p_right
    preds = torch.where(right, final[:, None], (final[:, None] + wrong) % k)
    segments = [(i + 1) / (b + 1) for i in range(b)] + [1.0]
    return scores, preds, final, segments


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), drop=st.floats(0.0, 0.2),
       branch=st.floats(0.0, 0.2))
def test_never_costs_more_than_the_backbone_and_stays_within_the_drop(seed, drop, branch):
    scores, preds, final, segments = _cascade(seed)
    found = min_cost_thresholds(scores, preds, final, flops(segments, [branch] * 4), max_drop=drop)
    assert found.cost <= 1.0 + 1e-12
    assert found.error <= drop + 1e-12
    # what it reports is what the table does
    on = found.thresholds <= 1
    leave = scores.double() >= found.thresholds[None, :]
    first = torch.where(leave.any(1), leave.to(torch.uint8).argmax(1), 4)
    cost = cascade_cost(segments, [branch] * 4, on)[first].mean()
    assert float(cost) == pytest.approx(found.cost)
    every = torch.cat([preds, final[:, None]], 1)
    disagree = float((every.gather(1, first[:, None]).squeeze(1) != final).double().mean())
    assert disagree == pytest.approx(found.error)
    # the path starts with every exit off and ends at the answer
    assert torch.isinf(found.path[0]).all() and torch.equal(found.path[-1], found.thresholds)


def test_an_exit_that_does_not_pay_is_switched_off():
    scores, preds, final, segments = _cascade(1)
    found = min_cost_thresholds(scores, preds, final, flops(segments, [0.0] * 4), max_drop=0.05)
    assert (found.thresholds <= 1).any() and found.cost < 1.0
    # a branch dearer than anything it could save (every exit at 90 % of the backbone or
    # later cannot pay for a 20 % branch) is never used
    late = [0.9, 0.92, 0.94, 0.96, 1.0]
    dear = min_cost_thresholds(scores, preds, final, flops(late, [0.2] * 4), max_drop=0.05)
    assert torch.isinf(dear.thresholds).all() and dear.cost == 1.0 and dear.error == 0.0


def test_a_looser_limit_never_costs_more():
    scores, preds, final, segments = _cascade(2)
    costs = [min_cost_thresholds(scores, preds, final, flops(segments, [0.01] * 4), max_drop=d).cost
             for d in (0.0, 0.02, 0.05, 0.2)]
    assert costs[0] >= costs[-1] and costs[-1] < 0.8


def test_budget_reaches_the_cost_it_asks_for():
    scores, preds, final, segments = _cascade(3)
    found = min_cost_thresholds(scores, preds, final, flops(segments, [0.01] * 4), max_drop=None,
                                budget=0.6)
    assert found.cost <= 0.6
    loose = min_cost_thresholds(scores, preds, final, flops(segments, [0.01] * 4), max_drop=None,
                                budget=0.9)
    assert loose.error <= found.error


def test_labels_count_accuracy_not_agreement():
    scores, preds, final, segments = _cascade(4)
    labels = preds[:, 0].clone()  # the first exit is always right, the backbone rarely
    found = min_cost_thresholds(scores, preds, final, flops(segments, [0.0] * 4), labels=labels,
                                max_drop=0.0)
    assert found.thresholds[0] <= float(scores[:, 0].min()) and found.error < 0


@pytest.mark.parametrize("kw", [{"max_drop": None}, {"max_drop": 0.1, "budget": 0.5},
                                {"max_drop": 1.0}, {"max_drop": None, "budget": 0.0}])
def test_bad_limits_are_refused(kw):
    scores, preds, final, segments = _cascade(5)
    with pytest.raises(OptionError):
        min_cost_thresholds(scores, preds, final, flops(segments, [0.0] * 4), **kw)


def test_cascade_cost_counts_only_active_branches():
    cost = cascade_cost([0.25, 0.5, 1.0], [0.1, 0.2], torch.tensor([False, True]))
    assert cost.tolist() == pytest.approx([0.25, 0.7, 1.2])
    assert cascade_cost([0.25, 0.5, 1.0], [0.1, 0.2], torch.tensor([False, False]))[-1] == 1.0
    assert math.isclose(float(cascade_cost([1.0], [], torch.tensor([], dtype=torch.bool))[0]),
                        1.0)


def test_an_exit_no_sample_reaches_is_switched_off():
    scores, preds, final, segments = _cascade(6)
    scores[:, 0] = 1.0  # the first exit is sure of everything and always right
    preds[:, 0] = final
    found = min_cost_thresholds(scores, preds, final, flops(segments, [0.01] * 4), max_drop=0.0)
    assert found.thresholds[0] <= 1
    assert torch.isinf(found.thresholds[1:]).all()  # nothing reaches them: off, never run
