"""Placement: the EENets policies' target fractions and the mapping of targets to cut points."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pteenet.choices import DEFAULT_BRANCHES, POLICIES
from pteenet.errors import PlacementError, PteenetError
from pteenet.graph import TAIL, Cut, Trace, choose_cuts, target_fractions, useful_cuts


def _trace(fractions: list[float], total: int = 1000) -> Trace:
    """A hand-made trace whose cut ``c<i>`` lies at ``fractions[i]`` of ``total`` FLOPs."""
    cuts = [Cut(f"c{i}", (8, 4, 4), round(f * total), i) for i, f in enumerate(fractions)]
    return Trace(graph_module=None, cuts=cuts, total_flops=total, total_params=len(cuts),
                 input_size=(32, 32))


# c0..c8 at 0.1, 0.2, ..., 0.9
NINE = _trace([k / 10 for k in range(1, 10)])


# --------------------------------------------------------------------------- target fractions


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("pareto", [0.2, 0.36, 0.488]),
        ("golden", [0.618, 1 - 0.382**2, 1 - 0.382**3]),  # 0.618, 0.854076, 0.944258
        ("fine", [0.05, 0.0975, 0.142625]),
        ("linear", [0.25, 0.5, 0.75]),
        ("quadratic", [1 / 30, 5 / 30, 14 / 30]),  # gaps 1:4:9:16
    ],
)
def test_target_fractions_n3(policy, expected):
    assert target_fractions(policy, 3) == pytest.approx(expected, abs=1e-12)


def test_golden_values_spelled_out():
    """EENets' golden rule: each exit sits at 61.8 % of the FLOPs left after the previous one
    (0.618, then 0.618 of the remaining 0.382, ...), for every n, not only n = 3."""
    for n in range(1, 8):
        expected, at = [], 0.0
        for _ in range(n):
            at += 0.618 * (1 - at)
            expected.append(at)
        assert target_fractions("golden", n) == pytest.approx(expected, rel=1e-12), n
    assert target_fractions("golden", 3) == pytest.approx([0.618, 0.854076, 0.944257], abs=1e-6)


@pytest.mark.parametrize("policy", POLICIES)
def test_target_fractions_increase_inside_unit_interval(policy):
    for n in range(1, 12):
        t = target_fractions(policy, n)
        assert len(t) == n
        assert all(0 < a < b < 1 for a, b in zip(t, t[1:]))
        assert t[0] > 0 and t[-1] < 1


def test_target_fractions_bad_n_and_policy():
    with pytest.raises(PlacementError, match="at least one"):
        target_fractions("pareto", 0)
    with pytest.raises(PlacementError) as info:
        target_fractions("paretto", 2)
    msg = str(info.value)
    assert "paretto" in msg
    assert all(p in msg for p in POLICIES)


# --------------------------------------------------------------------------- choose_cuts


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("pareto", ["c1", "c3", "c4"]),  # 0.2, 0.36, 0.488 -> 0.2, 0.4, 0.5
        # 0.854 is nearer 0.9 than 0.8, but 0.9 must stay free for 0.944
        ("golden", ["c5", "c7", "c8"]),
        ("fine", ["c0", "c1", "c2"]),  # 0.05, 0.0975, 0.1426: all nearest to 0.1
        ("quadratic", ["c0", "c1", "c4"]),  # 0.033, 0.167, 0.467 -> 0.1, 0.2, 0.5
    ],
)
def test_choose_cuts_nearest(policy, expected):
    assert choose_cuts(NINE, 3, policy) == expected


def test_choose_cuts_linear_exact():
    assert choose_cuts(NINE, 4, "linear") == ["c1", "c3", "c5", "c7"]  # 0.2, 0.4, 0.6, 0.8


def test_choose_cuts_tie_goes_to_the_earlier_cut():
    dyadic = _trace([0.25, 0.5, 0.75], total=1024)
    assert choose_cuts(dyadic, at=[0.375]) == ["c0"]
    assert choose_cuts(dyadic, at=[0.625]) == ["c1"]


def test_choose_cuts_targets_sharing_a_nearest_cut_get_distinct_cuts():
    # fine: 0.05, 0.0975, 0.1426 are all nearest to c0 (0.1)
    sparse = _trace([0.1, 0.5, 0.9])
    assert choose_cuts(sparse, 3, "fine") == ["c0", "c1", "c2"]
    # linear n=2: 1/3 and 2/3 are both nearest to c1 (0.5); the first takes it, the second
    # the next one
    assert choose_cuts(sparse, 2, "linear") == ["c1", "c2"]
    # fine n=2 on nine cuts: 0.05 and 0.0975 both nearest to c0
    assert choose_cuts(NINE, 2, "fine") == ["c0", "c1"]


def test_choose_cuts_leaves_room_for_later_targets():
    # golden n=3 on four cuts: 0.618 is nearest to c3 (0.7), but two targets still follow
    four = _trace([0.1, 0.2, 0.3, 0.7])
    chosen = choose_cuts(four, 3, "golden")
    assert chosen == ["c1", "c2", "c3"]
    assert choose_cuts(four, 4, "pareto") == ["c0", "c1", "c2", "c3"]


def test_choose_cuts_explicit_at():
    assert choose_cuts(NINE, at=[0.1, 0.52, 0.88]) == ["c0", "c4", "c8"]
    # at overrides policy and n
    assert choose_cuts(NINE, 5, "golden", at=[0.31, 0.62]) == ["c2", "c5"]


def test_too_many_branches():
    with pytest.raises(PlacementError) as info:
        choose_cuts(NINE, 10, "pareto")
    msg = str(info.value)
    assert "10 branches" in msg and "9 useful cut points" in msg
    with pytest.raises(PlacementError):
        choose_cuts(NINE, at=[i / 11 for i in range(1, 11)])
    assert choose_cuts(NINE, 9, "linear") == [f"c{i}" for i in range(9)]


@pytest.mark.parametrize(
    "at",
    [[0.0, 0.5], [0.5, 1.0], [1.2], [-0.1], [0.5, 0.3], [0.3, 0.3], []],
    ids=["zero", "one", "above-one", "negative", "unsorted", "duplicate", "empty"],
)
def test_bad_at_values(at):
    with pytest.raises(PlacementError) as info:
        choose_cuts(NINE, at=at)
    assert "`at`" in str(info.value)
    assert isinstance(info.value, PteenetError)


def test_unknown_policy_and_no_branches():
    with pytest.raises(PlacementError, match="unknown placement"):
        choose_cuts(NINE, 2, "uniform")
    with pytest.raises(PlacementError):
        choose_cuts(NINE, 0, "pareto")


# --------------------------------------------------------------------------- properties


@st.composite
def profiles(draw):
    """Non-decreasing cumulative FLOPs (equal neighbours happen: ReLUs cost nothing) and a
    total at least as large as the last cut."""
    steps = draw(st.lists(st.integers(0, 10**6), min_size=1, max_size=40))
    flops, running = [], 0
    for s in steps:
        running += s
        flops.append(running)
    total = running + draw(st.integers(1, 10**6))
    cuts = [Cut(f"n{i}", (4, 2, 2), f, i) for i, f in enumerate(flops)]
    trace = Trace(graph_module=None, cuts=cuts, total_flops=total, total_params=len(cuts),
                  input_size=(8, 8))
    useful = len(useful_cuts(trace))
    assume(useful > 0)
    n = draw(st.integers(1, useful))
    return trace, n


@settings(max_examples=150, deadline=None)
@given(profiles())
def test_choose_cuts_always_distinct_ordered_and_useful(case):
    trace, n = case
    order = {c.name: i for i, c in enumerate(trace.cuts)}
    for policy in POLICIES:
        chosen = choose_cuts(trace, n, policy)
        assert len(chosen) == n
        idx = [order[c] for c in chosen]
        assert idx == sorted(set(idx)), (policy, chosen)
        flops = [trace.cut(c).flops for c in chosen]
        assert len(set(flops)) == n  # never two exits at the same FLOP fraction
        assert all(f / trace.total_flops <= 1 - TAIL for f in flops)  # none in the tail


@settings(max_examples=100, deadline=None)
@given(profiles(), st.data())
def test_choose_cuts_at_always_distinct_and_ordered(case, data):
    trace, n = case
    at = data.draw(st.lists(st.floats(0.001, 0.999), min_size=n, max_size=n, unique=True))
    at = sorted(at)
    order = {c.name: i for i, c in enumerate(trace.cuts)}
    idx = [order[c] for c in choose_cuts(trace, at=at)]
    assert len(idx) == n
    assert idx == sorted(set(idx))


def test_duplicate_fractions_and_the_tail_are_not_useful():
    # c0/c1 share a FLOP count (an add and its relu): only the later one counts; c4 sits in
    # the last 5 % and c5 at 100 %: neither can carry an exit
    trace = _trace([0.2, 0.2, 0.5, 0.7, 0.97, 1.0])
    assert [c.name for c in useful_cuts(trace)] == ["c1", "c2", "c3"]
    assert choose_cuts(trace, 3, "linear") == ["c1", "c2", "c3"]
    with pytest.raises(PlacementError, match="only 3 useful cut points"):
        choose_cuts(trace, 4, "linear")


def test_default_count_shrinks_to_the_useful_cuts():
    assert len(choose_cuts(NINE)) == 9 < DEFAULT_BRANCHES
    many = _trace([k / 40 for k in range(1, 38)])
    assert len(choose_cuts(many)) == DEFAULT_BRANCHES
