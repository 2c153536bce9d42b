"""Tests for pteenet.thresholds: exit rule, summary, CPM calibration and risk control."""

from __future__ import annotations

import json
import math
from itertools import pairwise

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pteenet.errors import CalibrationError, OptionError
from pteenet.thresholds import (
    RiskResult,
    as_table,
    cascade_predictions,
    class_precision,
    cpm_thresholds,
    exit_index,
    global_candidates,
    hoeffding_bentkus_ucb,
    losses_for,
    risk_control,
    scaled_candidates,
    summarize,
    wsr_ucb,
)

INF = math.inf


def _assert_table(table, expected):
    torch.testing.assert_close(table, torch.tensor(expected, dtype=table.dtype))


# --------------------------------------------------------------------------------------------
# as_table
# --------------------------------------------------------------------------------------------


def test_as_table_broadcasts_every_granularity():
    assert torch.equal(as_table(0.5, 2, 3), torch.full((2, 3), 0.5))
    assert torch.equal(as_table([0.1, 0.9], 2, 3)[:, 0], torch.tensor([0.1, 0.9]))
    assert torch.equal(as_table([0.1, 0.9], 2, 3)[1], torch.full((3,), 0.9))
    nested = as_table([[0.1, None, 0.3], 0.7], 2, 3)
    _assert_table(nested, [[0.1, INF, 0.3], [0.7, 0.7, 0.7]])
    assert as_table(None, 1, 2).tolist() == [[INF, INF]]
    assert as_table(torch.tensor(0.25), 2, 2).shape == (2, 2)
    _assert_table(as_table(torch.tensor([0.2, 0.4]), 2, 2), [[0.2, 0.2], [0.4, 0.4]])
    assert as_table(torch.rand(2, 2, dtype=torch.float64), 2, 2).dtype == torch.float64
    table = torch.rand(3, 4)
    assert torch.equal(as_table(table, 3, 4), table)
    assert as_table(1, 1, 1).dtype == torch.float32


@pytest.mark.parametrize(
    "value",
    [
        [0.1, 0.2, 0.3],  # 3 branches for 2
        [[0.1, 0.2], [0.1]],  # second row has 1 class threshold, not 2
        float("nan"),
        [0.1, float("nan")],
        -0.1,
        [[0.1, -1.0], [0.2, 0.2]],
        torch.zeros(3, 2),
        torch.zeros(2, 2, 1),
        torch.tensor([0.5, float("nan")]),
        "0.5",
        True,
        [["a", 0.1], [0.1, 0.1]],
    ],
)
def test_as_table_rejects_bad_values(value):
    with pytest.raises(OptionError):
        as_table(value, 2, 2)


def test_as_table_rejects_bad_sizes():
    with pytest.raises(OptionError):
        as_table(0.5, 2, 0)


# --------------------------------------------------------------------------------------------
# exit rule
# --------------------------------------------------------------------------------------------


def _random_cascade(n=50, b=3, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(n, b, generator=g)
    preds = torch.randint(0, k, (n, b), generator=g)
    final = torch.randint(0, k, (n,), generator=g)
    labels = torch.randint(0, k, (n,), generator=g)
    return scores, preds, final, labels


def test_exit_index_extremes():
    scores, preds, _, _ = _random_cascade()
    scores[0] = 1.0  # even a perfectly confident sample does not pass a threshold above 1
    assert (exit_index(scores, preds, as_table(1.01, 3, 4)) == 3).all()
    assert (exit_index(scores, preds, as_table(None, 3, 4)) == 3).all()
    assert (exit_index(scores, preds, as_table(0.0, 3, 4)) == 0).all()


def test_exit_index_uses_the_class_of_each_branch():
    scores = torch.tensor([[0.6, 0.9], [0.6, 0.9], [0.4, 0.2]])
    preds = torch.tensor([[0, 1], [1, 1], [0, 0]])
    thr = torch.tensor([[0.5, 0.7], [0.95, 0.8]])
    # sample 0: class 0 at branch 0, 0.6 >= 0.5 -> exit 0
    # sample 1: class 1 at branch 0, 0.6 < 0.7; class 1 at branch 1, 0.9 >= 0.8 -> exit 1
    # sample 2: 0.4 < 0.5, then 0.2 < 0.95 -> backbone (2)
    assert exit_index(scores, preds, thr).tolist() == [0, 1, 2]


def _reference_exit(scores, preds, thr):
    out = []
    for n in range(scores.shape[0]):
        taken = scores.shape[1]
        for k in range(scores.shape[1]):
            if scores[n, k].item() >= thr[k, preds[n, k]].item():
                taken = k
                break
        out.append(taken)
    return out


GRID = [0.0, 0.25, 0.5, 0.75, 1.0]


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_exit_index_matches_a_per_sample_loop(data):
    n = data.draw(st.integers(0, 12))
    b = data.draw(st.integers(0, 4))
    k = data.draw(st.integers(1, 4))
    scores = torch.tensor(
        data.draw(
            st.lists(
                st.lists(st.sampled_from(GRID), min_size=b, max_size=b), min_size=n, max_size=n
            )
        ),
        dtype=torch.float32,
    ).reshape(n, b)
    preds = torch.tensor(
        data.draw(
            st.lists(
                st.lists(st.integers(0, k - 1), min_size=b, max_size=b), min_size=n, max_size=n
            )
        ),
        dtype=torch.long,
    ).reshape(n, b)
    thr_values = st.sampled_from([*GRID, 1.5, INF])
    thr = torch.tensor(
        data.draw(st.lists(st.lists(thr_values, min_size=k, max_size=k), min_size=b, max_size=b)),
        dtype=torch.float32,
    ).reshape(b, k)
    final = torch.arange(n) % k
    got = exit_index(scores, preds, thr)
    assert got.dtype == torch.long
    assert got.tolist() == _reference_exit(scores, preds, thr)
    pred, exits = cascade_predictions(scores, preds, final, thr)
    assert torch.equal(exits, got)
    for i, e in enumerate(got.tolist()):
        assert pred[i].item() == (final[i].item() if e == b else preds[i, e].item())


def test_exit_index_compares_in_the_scores_dtype():
    scores = torch.tensor([[0.7]], dtype=torch.float32)
    thr = torch.tensor([[0.7]], dtype=torch.float64)  # float64 0.7 > float32 0.7
    assert exit_index(scores, torch.zeros(1, 1, dtype=torch.long), thr).tolist() == [0]


def test_exit_index_input_errors():
    scores, preds, _, _ = _random_cascade()
    with pytest.raises(OptionError):
        exit_index(scores, preds, 0.5)
    with pytest.raises(OptionError):
        exit_index(scores, preds, torch.zeros(2, 4))
    with pytest.raises(CalibrationError):
        exit_index(scores, preds, torch.zeros(3, 2))  # preds reach class 3
    with pytest.raises(CalibrationError):
        exit_index(scores, preds[:, :2], torch.zeros(3, 4))
    with pytest.raises(CalibrationError):
        exit_index(scores, preds.float(), torch.zeros(3, 4))


def test_summarize_by_hand():
    # B = 2 branches, K = 2, global threshold 0.5, exit costs 0.2 / 0.5 / 1.0
    scores = torch.tensor([[0.9, 0.0], [0.8, 0.0], [0.1, 0.7], [0.1, 0.1], [0.2, 0.3]])
    preds = torch.tensor([[0, 0], [1, 0], [1, 1], [0, 1], [0, 0]])
    final = torch.tensor([0, 0, 1, 1, 0])
    labels = torch.tensor([0, 1, 0, 1, 1])
    # exits: 0, 0, 1, 2, 2 ; cascade preds: 0, 1, 1, 1, 0
    out = summarize(scores, preds, final, as_table(0.5, 2, 2), [0.2, 0.5, 1.0], labels)
    assert out["num_samples"] == 5
    assert [e["count"] for e in out["exits"]] == [2, 1, 2]
    assert [e["share"] for e in out["exits"]] == pytest.approx([0.4, 0.2, 0.4])
    assert [e["agreement"] for e in out["exits"]] == pytest.approx([0.5, 1.0, 1.0])
    assert [e["accuracy"] for e in out["exits"]] == pytest.approx([1.0, 0.0, 0.5])
    assert out["agreement"] == pytest.approx(0.8)
    assert out["accuracy"] == pytest.approx(0.6)  # right: samples 0, 1, 3
    assert out["backbone_accuracy"] == pytest.approx(0.4)  # right: samples 0, 3
    assert out["mean_relative_flops"] == pytest.approx((0.2 * 2 + 0.5 + 1.0 * 2) / 5)
    json.dumps(out)  # plain Python types only

    no_labels = summarize(scores, preds, final, as_table(INF, 2, 2), [0.2, 0.5, 1.0])
    assert no_labels["accuracy"] is None and no_labels["backbone_accuracy"] is None
    assert no_labels["exits"][0]["agreement"] is None  # nobody leaves early
    assert no_labels["exits"][2]["count"] == 5
    assert no_labels["mean_relative_flops"] == pytest.approx(1.0)
    with pytest.raises(OptionError):
        summarize(scores, preds, final, as_table(0.5, 2, 2), [0.2, 1.0])
    with pytest.raises(OptionError):
        summarize(scores, preds, final, as_table(0.5, 2, 2), [0.2, -0.5, 1.0])


# --------------------------------------------------------------------------------------------
# CPM
# --------------------------------------------------------------------------------------------


def _one_branch(scores, preds, refs):
    return (
        torch.tensor(scores, dtype=torch.float32)[:, None],
        torch.tensor(preds)[:, None],
        torch.tensor(refs),
    )


# branch 0, class 0 (sorted by score; ref == 0 means the exit would be correct):
#   0.9 ok  -> 1/1 = 1.00
#   0.8 bad -> 1/2 = 0.50
#   0.7 ok  -> 2/3 = 0.67
#   0.6 ok  -> 3/4 = 0.75
#   0.5 bad -> 3/5 = 0.60
#   0.4 bad -> 3/6 = 0.50
# class 1: both samples wrong (ref 0) -> precision 0 at every cut.
DIP = _one_branch(
    [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.95, 0.3],
    [0, 0, 0, 0, 0, 0, 1, 1],
    [0, 1, 0, 0, 1, 1, 0, 0],
)


def test_cpm_takes_the_lowest_qualifying_cut_when_precision_dips():
    # target = 1.0 - 0.3 = 0.7: cuts 0.9 (1.00) and 0.6 (0.75) qualify, 0.8 and 0.7 do not;
    # the lowest is 0.6. Class 1 never reaches 0.7 -> inf.
    thr = cpm_thresholds(*DIP, num_classes=2, margin=0.3, min_support=1)
    assert thr.tolist() == [[pytest.approx(0.6), INF]]
    assert thr.dtype == torch.float32
    # the exit rule with this table releases exactly the 4 samples scoring >= 0.6 in class 0
    assert exit_index(DIP[0], DIP[1], thr).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


def test_cpm_min_support_blocks_small_sets():
    # min_support 4: only cuts with >= 4 samples count; 0.6 (4 samples, 0.75) still qualifies.
    assert cpm_thresholds(*DIP, 2, margin=0.3, min_support=4)[0, 0].item() == pytest.approx(0.6)
    # min_support 5: the cuts left are 0.5 (0.60) and 0.4 (0.50), both below 0.7 -> inf.
    assert cpm_thresholds(*DIP, 2, margin=0.3, min_support=5)[0, 0].item() == INF
    # a class with fewer samples than min_support never exits, whatever its precision
    assert cpm_thresholds(*DIP, 2, margin=1.0, min_support=3)[0, 1].item() == INF


def test_cpm_margin_and_backbone_precision_set_the_target():
    # margin 0 -> target 1.0: only the 0.9 cut is pure.
    assert cpm_thresholds(*DIP, 2, margin=0.0, min_support=1)[0, 0].item() == pytest.approx(0.9)
    # backbone precision 0.8 for class 0 with margin 0.2 -> target 0.6: cut 0.5 has 3/5 = 0.6.
    thr = cpm_thresholds(*DIP, 2, margin=0.2, min_support=1, backbone_precision=[0.8, 1.0])
    assert thr[0, 0].item() == pytest.approx(0.5)
    # target <= 0 lets every sample of the class exit at the lowest score
    thr = cpm_thresholds(*DIP, 2, margin=1.0, min_support=1)
    assert thr.tolist() == [[pytest.approx(0.4), pytest.approx(0.3)]]


def test_cpm_treats_tied_scores_as_one_cut():
    # class 0: 0.9 ok, then three samples tied at 0.8: ok, bad, bad.
    # {>= 0.9}: 1/1 ; {>= 0.8}: 2/4 = 0.5 < 0.6. Splitting the tie after its first (correct)
    # member would wrongly see 2/2 and pick 0.8; the right answer is 0.9.
    data = _one_branch([0.9, 0.8, 0.8, 0.8], [0, 0, 0, 0], [0, 0, 1, 1])
    assert cpm_thresholds(*data, 2, margin=0.4, min_support=1)[0, 0].item() == pytest.approx(0.9)


def test_cpm_later_branches_only_see_survivors():
    # samples a, b, c, d; references 0, 1, 1, 0; margin 0 (target precision 1.0), min_support 1.
    # branch 0 predicts class 0 for all, scores a .9, b .8, c .1, d .2
    #   sorted: a .9 ok (1/1), b .8 bad (1/2), d .2 ok (2/3), c .1 bad (2/4) -> tau = 0.9
    #   branch 0 takes a; class 1 has no samples -> inf.
    # branch 1 predicts a:1 (.99), b:1 (.5), c:1 (.4), d:0 (.7)
    #   survivors b, c, d: class 1 -> b .5 ok, c .4 ok -> tau = 0.4 ; class 0 -> d .7 ok -> 0.7
    #   (had a been included, class 1 would start with a .99 bad and never reach 1.0 -> inf)
    scores = torch.tensor([[0.9, 0.99], [0.8, 0.5], [0.1, 0.4], [0.2, 0.7]])
    preds = torch.tensor([[0, 1], [0, 1], [0, 1], [0, 0]])
    refs = torch.tensor([0, 1, 1, 0])
    thr = cpm_thresholds(scores, preds, refs, 2, margin=0.0, min_support=1)
    assert thr.tolist() == [
        [pytest.approx(0.9), INF],
        [pytest.approx(0.7), pytest.approx(0.4)],
    ]
    assert exit_index(scores, preds, thr).tolist() == [0, 1, 1, 1]


def test_cpm_with_backbone_reference_never_loses_agreement_at_margin_zero():
    scores, preds, final, _ = _random_cascade(n=400, b=3, k=3, seed=3)
    preds[:200] = final[:200, None]  # make branches often agree, so some exits open
    thr = cpm_thresholds(scores, preds, final, 3, margin=0.0, min_support=5)
    assert torch.isfinite(thr).any()
    out = summarize(scores, preds, final, thr, [0.1, 0.2, 0.3, 1.0])
    assert out["agreement"] == 1.0


def test_cpm_option_errors():
    with pytest.raises(OptionError):
        cpm_thresholds(*DIP, 2, margin=1.5)
    with pytest.raises(OptionError):
        cpm_thresholds(*DIP, 2, margin=-0.1)
    with pytest.raises(OptionError):
        cpm_thresholds(*DIP, 2, margin=0.1, min_support=0)
    with pytest.raises(OptionError):
        cpm_thresholds(*DIP, 2, margin=0.1, backbone_precision=[1.0])
    with pytest.raises(CalibrationError):
        cpm_thresholds(*DIP, 1, margin=0.1)  # preds hold class 1


def test_class_precision():
    pred = torch.tensor([0, 0, 1, 1])
    ref = torch.tensor([0, 1, 1, 1])
    assert class_precision(pred, ref, 3).tolist() == pytest.approx([0.5, 1.0, 1.0])
    assert class_precision(pred, ref, 3, empty=0.0).tolist() == pytest.approx([0.5, 1.0, 0.0])
    assert class_precision(pred, pred, 3).tolist() == [1.0, 1.0, 1.0]


# --------------------------------------------------------------------------------------------
# Upper confidence bounds
# --------------------------------------------------------------------------------------------


def test_hb_closed_form_at_zero_risk():
    # with no observed losses p(r) = (1 - r)^n, so the bound is 1 - delta^(1/n)
    for n in (10, 100, 1000):
        assert hoeffding_bentkus_ucb(0.0, n, 0.1) == pytest.approx(1 - 0.1 ** (1 / n), abs=1e-7)
    assert hoeffding_bentkus_ucb(1.0, 50, 0.1) == 1.0


@pytest.mark.parametrize(("risk_hat", "n", "delta"), [
    (0.0, 20, 0.1), (0.05, 200, 0.05), (0.1, 500, 0.01), (0.3, 1000, 0.1), (0.6, 40, 0.2),
    (0.02, 10000, 0.1), (0.333, 100, 0.1)])
def test_hb_is_where_scipys_p_value_falls_to_delta(risk_hat, n, delta):
    """Bates et al.'s HB p-value, computed here with scipy.stats (the binomial cdf and the
    Bernoulli KL divergence), is <= delta at the bound and above it a hair below it."""
    from scipy import stats

    def p_value(r: float) -> float:
        kl = stats.entropy([risk_hat, 1 - risk_hat], [r, 1 - r])
        tail = stats.binom.cdf(math.ceil(n * risk_hat - 1e-9), n, r)
        return min(math.exp(-n * kl), math.e * tail)

    ucb = hoeffding_bentkus_ucb(risk_hat, n, delta)
    assert p_value(ucb) <= delta < p_value(ucb - 1e-6)


def test_hb_is_above_the_mean_and_shrinks_with_n():
    ucbs = [hoeffding_bentkus_ucb(0.1, n, 0.05) for n in (20, 100, 500, 2000, 10000)]
    assert all(u > 0.1 for u in ucbs)
    assert all(a > b for a, b in pairwise(ucbs))
    assert ucbs[-1] < 0.11  # and it gets tight
    assert hoeffding_bentkus_ucb(0.1, 500, 0.01) > hoeffding_bentkus_ucb(0.1, 500, 0.2)
    for r in (0.0, 0.03, 0.5, 0.97):
        assert r <= hoeffding_bentkus_ucb(r, 200, 0.1) <= 1.0


def _exact_share(n, share, seed):
    losses = torch.zeros(n)
    losses[: int(n * share)] = 1.0
    return losses[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]


def test_wsr_is_above_the_mean_and_shrinks_with_n():
    ucbs = [wsr_ucb(_exact_share(n, 0.2, seed=n), 0.05) for n in (50, 200, 1000, 5000)]
    assert all(u >= 0.2 for u in ucbs)
    assert all(a > b for a, b in pairwise(ucbs))
    assert ucbs[-1] < 0.23
    assert wsr_ucb(torch.zeros(1000), 0.1) < 0.01  # no losses at all: a small bound
    assert wsr_ucb(torch.ones(100), 0.1) == 1.0
    # low-variance non-binary losses: much tighter than Hoeffding's sqrt(log(1/delta) / 2n)
    near = torch.full((1000,), 0.3)
    assert wsr_ucb(near, 0.1) < 0.3 + 0.5 * math.sqrt(math.log(10) / 2000)


def test_bounds_reject_bad_options():
    with pytest.raises(OptionError):
        hoeffding_bentkus_ucb(0.1, 0, 0.1)
    with pytest.raises(OptionError):
        hoeffding_bentkus_ucb(1.1, 10, 0.1)
    with pytest.raises(OptionError):
        hoeffding_bentkus_ucb(0.1, 10, 1.0)
    with pytest.raises(OptionError):
        wsr_ucb(torch.zeros(10), 0.0)
    with pytest.raises(CalibrationError):
        wsr_ucb(torch.tensor([0.5, 1.5]), 0.1)


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_ucb_coverage_on_bernoulli_draws(p):
    delta, n, draws = 0.1, 100, 500
    g = torch.Generator().manual_seed(int(p * 1000))
    samples = (torch.rand(draws, n, generator=g) < p).float()
    hb = torch.tensor([hoeffding_bentkus_ucb(float(row.mean()), n, delta) for row in samples])
    wsr = torch.tensor(risk_control(samples, 0.5, delta, bound="wsr").ucbs)
    for i in range(0, draws, 100):  # the batched WSR equals the public one
        assert wsr[i].item() == pytest.approx(wsr_ucb(samples[i], delta), abs=1e-8)
    means = samples.mean(dim=1).double()
    assert (hb >= means - 1e-9).all() and (wsr >= means - 1e-9).all()
    assert (hb < p).float().mean().item() <= delta + 0.02
    assert (wsr < p).float().mean().item() <= delta + 0.02
    # ... without being vacuous
    assert hb.mean().item() < p + 0.2 and wsr.mean().item() < p + 0.2


# --------------------------------------------------------------------------------------------
# Risk control
# --------------------------------------------------------------------------------------------


def test_risk_control_walks_in_order_and_stops_at_the_first_failure():
    g = torch.Generator().manual_seed(0)
    rates = [0.0, 0.01, 0.5, 0.0]  # candidate 3 would pass but comes after a failure
    losses = torch.stack([(torch.rand(1000, generator=g) < r).float() for r in rates])
    for bound in ("hb", "wsr"):
        res = risk_control(losses, epsilon=0.1, delta=0.1, bound=bound)
        assert isinstance(res, RiskResult)
        assert res.index == 1
        assert res.ucb == res.ucbs[1] <= 0.1 < res.ucbs[2]
        assert res.empirical == pytest.approx(rates[1], abs=0.01)
        assert len(res.ucbs) == len(res.empiricals) == 4
        assert res.to_dict()["index"] == 1
    failing = risk_control(torch.ones(2, 100), 0.1, 0.1)
    assert failing.index is None and failing.ucb == 1.0 and failing.empirical == 1.0


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"epsilon": 0.0}, OptionError),
        ({"epsilon": 1.0}, OptionError),
        ({"delta": 0.0}, OptionError),
        ({"delta": 1.2}, OptionError),
        ({"bound": "hoeffding"}, OptionError),
        ({"candidate_losses": torch.zeros(0, 10)}, CalibrationError),
        ({"candidate_losses": []}, CalibrationError),
        ({"candidate_losses": torch.full((2, 10), 2.0)}, CalibrationError),
        ({"candidate_losses": torch.zeros(10)}, CalibrationError),
    ],
)
def test_risk_control_rejects_bad_options(kwargs, error):
    args = {"candidate_losses": torch.zeros(2, 10), "epsilon": 0.1, "delta": 0.1, **kwargs}
    with pytest.raises(error):
        risk_control(**args)


def test_losses_for():
    scores = torch.tensor([[0.9], [0.9], [0.9], [0.1]])
    preds = torch.tensor([[0], [1], [1], [1]])
    final = torch.tensor([0, 0, 1, 0])
    labels = torch.tensor([1, 0, 0, 0])
    thr = as_table(0.5, 1, 2)
    # cascade preds 0, 1, 1, 0 (the last goes to the backbone)
    assert losses_for(scores, preds, final, thr).tolist() == [0.0, 1.0, 0.0, 0.0]
    # (1[cascade wrong] - 1[backbone wrong] + 1) / 2: sample 1 breaks a right answer (1),
    # samples 0 and 2 are wrong either way (1/2), sample 3 is the backbone's own answer (1/2)
    losses = losses_for(scores, preds, final, thr, labels)
    assert losses.tolist() == [0.5, 1.0, 0.5, 0.5]
    # its mean is (drop + 1) / 2
    right = (torch.tensor([0, 1, 1, 0]) == labels).double().mean()
    drop = (final == labels).double().mean() - right
    assert float(losses.double().mean()) == pytest.approx((float(drop) + 1) / 2)
    fixed = losses_for(scores, preds, final, thr, torch.tensor([0, 1, 1, 1]))
    assert fixed.tolist() == [0.5, 0.0, 0.5, 0.5]  # sample 1: the exit fixes the backbone


def _simulate(n, g):
    """One branch, 2 classes; scores ~ U(0, 1), disagreement w.p. 0.5 (1 - s)^2.

    A global threshold t then has true disagreement risk (1 - t)^3 / 6.
    """
    scores = torch.rand(n, 1, generator=g)
    final = torch.randint(0, 2, (n,), generator=g)
    disagree = torch.rand(n, generator=g) < 0.5 * (1 - scores[:, 0]) ** 2
    preds = torch.where(disagree, 1 - final, final)[:, None]
    return scores, preds, final, disagree


def test_risk_control_controls_the_true_risk():
    epsilon, delta, n_cal, reps = 0.05, 0.1, 500, 200
    candidates = global_candidates(1, 2, steps=101)
    t = torch.tensor([c[0, 0].item() for c in candidates])
    true_risk = (1 - t.double()) ** 3 / 6
    g = torch.Generator().manual_seed(1234)

    # the closed form matches a large sample pushed through the real exit rule
    big = _simulate(200_000, g)
    for i in (0, 30, 67, 100):
        est = losses_for(*big[:3], candidates[i]).double().mean().item()
        assert est == pytest.approx(true_risk[i].item(), abs=0.003)

    chosen = {"hb": [], "wsr": [], "naive": []}
    for rep in range(reps):
        scores, preds, final, disagree = _simulate(n_cal, g)
        losses = ((scores[:, 0][None, :] >= t[:, None]) & disagree[None, :]).float()
        if rep == 0:
            assert torch.equal(losses[50], losses_for(scores, preds, final, candidates[50]))
        for bound in ("hb", "wsr"):
            chosen[bound].append(risk_control(losses, epsilon, delta, bound=bound).index)
        ok = (losses.mean(dim=1) <= epsilon).tolist()  # plug-in risk, no confidence bound
        chosen["naive"].append(next((i - 1 for i, good in enumerate(ok) if not good), len(ok) - 1))

    def violation_rate(indices):
        risks = [0.0 if i is None or i < 0 else true_risk[i].item() for i in indices]
        return sum(r > epsilon for r in risks) / len(risks)

    assert violation_rate(chosen["hb"]) <= delta + 0.03
    assert violation_rate(chosen["wsr"]) <= delta + 0.03
    assert violation_rate(chosen["naive"]) > delta + 0.1  # the check can detect a bad method
    # and the bounds still buy speed: most draws open the exit well below t = 1
    for bound in ("hb", "wsr"):
        opened = [t[i].item() for i in chosen[bound] if i is not None]
        assert len(opened) >= 0.9 * reps
        assert sum(opened) / len(opened) < 0.75


# --------------------------------------------------------------------------------------------
# Candidate families
# --------------------------------------------------------------------------------------------


def test_global_candidates_go_from_conservative_to_permissive():
    cands = global_candidates(2, 3, steps=11)
    assert len(cands) == 11
    assert (cands[0] == 1.0).all() and (cands[-1] == 0.0).all()
    assert all((a >= b).all() for a, b in pairwise(cands))
    with pytest.raises(OptionError):
        global_candidates(2, 3, steps=1)


def test_scaled_candidates_shrink_a_table_towards_one():
    table = torch.tensor([[0.2, INF], [0.6, 1.5]])
    cands = scaled_candidates(table, steps=5)
    assert len(cands) == 5
    assert cands[0].tolist() == [[1.0, INF], [1.0, 1.5]]
    _assert_table(cands[2], [[0.6, INF], [0.8, 1.5]])
    assert torch.equal(cands[-1], table)  # exactly: CPM thresholds are observed scores
    table64 = torch.rand(2, 2, dtype=torch.float64)
    assert torch.equal(scaled_candidates(table64, steps=3)[-1], table64)
    assert all((a >= b).all() for a, b in pairwise(cands))
    with pytest.raises(OptionError):
        scaled_candidates([[0.2]], steps=5)
