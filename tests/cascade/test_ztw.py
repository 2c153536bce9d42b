"""ZTW ensembles of the exits so far (Wołczyk et al. 2021), opt-in with ``ensemble="ztw"``:
the true early exit against a hand-computed cascade, the backbone when no exit can fire, the
bundle, calibration, bench and the exported cascade, on a really trained bundle."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pteenet_cli.app import app
from typer.testing import CliRunner

from pteenet.benchmark import bench
from pteenet.bundle import (
    BRANCHES_FILE,
    ThresholdTable,
    calibration_digest,
    load,
    read_bundle,
    write_thresholds,
)
from pteenet.calibration import calibrate, min_cost_thresholds
from pteenet.cascade import (
    Cost,
    EarlyExitModel,
    ZTWEnsemble,
    cascade_cost,
    exit_score,
    fit_split,
    fit_ztw,
    gate_power,
)
from pteenet.data import open_data, split_indices
from pteenet.errors import BundleError, OptionError
from pteenet.exporter import export
from pteenet.jobs import attach
from pteenet.runtime import Cascade
from pteenet.thresholds import exit_index
from pteenet.training import TrainConfig
from tests._helpers import PRE, fails_cleanly, reseal, shared_bundle

runner = CliRunner()
B, K, VAL = 3, 3, 0.4
FIXTURE = [HealthCheck.function_scoped_fixture]


@pytest.fixture(scope="module")
def ztw(tiny, tmp_path_factory):
    """(bundle folder, the attach result, inputs): 3 pool branches trained for two epochs on
    real images, with a ZTW ensemble; inputs are 32 random images then the real test split."""
    data, ckpt = tiny
    out = tmp_path_factory.mktemp("ztw-bundle")
    res = attach("resnet20", data, checkpoint=ckpt, num_classes=K, branches=B, branch="pool",
                 out=out, val_fraction=VAL, config=TrainConfig(epochs=2, batch_size=16),
                 progress=False, ensemble="ztw")
    test = open_data(data, PRE, split="test")
    real = torch.stack([test[i][0] for i in range(len(test))])
    x = torch.cat([torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(0)), real])
    return out, res, x


def moderate() -> ZTWEnsemble:
    """Seeded weights of ordinary size: a tiny data set is separable, so the fitted weights
    saturate every later exit's softmax at 1.0 and would leave no scores to set thresholds
    between; the cascade's mechanics are the same for any weights."""
    g = torch.Generator().manual_seed(0)
    return ZTWEnsemble(torch.rand(B, B, generator=g).tril() + 0.2 * torch.eye(B),
                       0.3 * torch.randn(B, K, generator=g))


@pytest.fixture(scope="module")
def model(ztw) -> EarlyExitModel:
    m = load(ztw[0])
    m.set_ensemble(moderate())
    return m


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@torch.no_grad()
def hand_cascade(model: EarlyExitModel, x: torch.Tensor):
    """Reference by hand: every branch on every sample, ZTW's formula written out, the exit rule
    sample by sample, and the FLOPs of every segment run plus every branch up to the last
    exit that may fire (no compaction, none of the model's ensemble code)."""
    feats, final = model.reduced_features(x)
    logits, conf = model.branch_outputs(feats)
    w, b = model.ensemble.weight, model.ensemble.bias
    logp = [z.float().log_softmax(1) for z in logits]
    ens = [sum(w[k, j] * logp[j] for j in range(k + 1)) + b[k] for k in range(len(logits))]
    scores = torch.stack([exit_score(model.score, z, c, float(model.gamma[k])) for k, (z, c) in
                          enumerate(zip(ens, conf))], 1)
    preds = torch.stack([z.argmax(1) for z in ens], 1)
    exits = exit_index(scores, preds, model.thresholds)
    on = model.thresholds.amin(1) <= 1
    last = int(on.nonzero().max()) if bool(on.any()) else -1
    seg = torch.tensor(model.segment_flops, dtype=torch.float64).cumsum(0)
    br = torch.tensor([f if k <= last else 0 for k, f in enumerate(model.branch_flops)],
                      dtype=torch.float64).cumsum(0)
    cost = seg + torch.cat([br, br[-1:]])
    every = torch.stack([*ens, final.float()], 1)
    return every[torch.arange(len(x)), exits], exits, cost[exits]


# -- the model --------------------------------------------------------------------------------
@settings(max_examples=20, deadline=None, suppress_health_check=FIXTURE)
@given(table=st.lists(st.lists(st.one_of(st.floats(0.0, 1.0), st.just(math.inf)), min_size=K,
                               max_size=K), min_size=B, max_size=B),
       score=st.sampled_from(["softmax", "head"]))
def test_true_early_exit_matches_the_hand_computed_ensemble(model, ztw, table, score):
    x = ztw[2]
    model.set_thresholds(table, score=score)
    res = model(x)
    logits, exits, flops = hand_cascade(model, x)
    assert torch.equal(res.exit_index, exits)
    assert torch.allclose(res.logits, logits, atol=1e-5)
    assert torch.equal(res.flops, flops)
    costs = torch.tensor(model.cost.exits(model.active), dtype=torch.float64) * model.backbone_flops
    assert torch.allclose(res.flops, costs[exits])


@settings(max_examples=15, deadline=None, suppress_health_check=FIXTURE)
@given(table=st.lists(st.lists(st.floats(1.001, math.inf), min_size=K, max_size=K),
                      min_size=B, max_size=B),
       score=st.sampled_from(["gate", "head", "softmax"]))
def test_thresholds_above_one_equal_the_backbone_at_exactly_its_cost(model, ztw, table, score):
    x = ztw[2]
    model.set_thresholds(table, score=score)
    res = model(x)
    assert torch.equal(res.logits, model.whole(x))
    assert (res.exit_index == B).all()
    assert model.active == model.evaluated == [False] * B
    assert torch.equal(res.flops, torch.full_like(res.flops, model.backbone_flops))
    assert model.cost.exits(model.active)[-1] == 1.0


def test_every_branch_up_to_the_last_active_exit_runs(model, ztw, monkeypatch):
    x = ztw[2]
    ran: list[int] = []
    monkeypatch.setattr(model, "frozen", False)  # eager: the branches' Python code runs
    for k, br in enumerate(model.branches):
        classify = br.classify  # softmax scores: inference runs the classifier path alone
        monkeypatch.setattr(br, "classify", lambda h, k=k, f=classify: ran.append(k) or f(h))
    model.set_thresholds([math.inf, 0.0, math.inf], score="softmax")  # only exit 1 fires
    res = model(x)
    assert ran == [0, 1] and (res.exit_index == 1).all()  # branch 0 runs: exit 1 reads it
    assert model.active == [False, True, False] and model.evaluated == [True, True, False]
    spent = sum(model.segment_flops[:2]) + sum(model.branch_flops[:2])
    assert (res.flops == spent).all()
    assert model.cost.exits(model.active)[1] == pytest.approx(spent / model.backbone_flops)


@settings(max_examples=8, deadline=None, suppress_health_check=FIXTURE)
@given(t=st.floats(0.3, 1.0), batch=st.integers(1, 20))
def test_compaction_keeps_each_samples_history(model, ztw, t, batch):
    x = ztw[2]
    model.set_thresholds([t, t, t], score="softmax")
    whole = model(x)
    parts = [model(x[i:i + batch]) for i in range(0, len(x), batch)]
    assert torch.equal(whole.exit_index, torch.cat([p.exit_index for p in parts]))
    assert torch.allclose(whole.logits, torch.cat([p.logits for p in parts]), atol=1e-5)


def test_weights_are_nonnegative_lower_triangular_and_refit_identically(ztw):
    ens = ztw[1].model.ensemble
    assert ens.weight.shape == (B, B) and ens.bias.shape == (B, K)
    assert (ens.weight >= 0).all() and (ens.weight.triu(1) == 0).all()
    logits = torch.randn(40, B, K, generator=torch.Generator().manual_seed(1))
    targets = torch.arange(40) % K
    a, b = fit_ztw(logits, targets), fit_ztw(logits, targets)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    with pytest.raises(OptionError, match="`ensemble`"):
        ZTWEnsemble(torch.ones(B, B), torch.zeros(B, K))  # reads exits not run yet


def test_the_cost_search_counts_every_branch_the_ensemble_reads():
    seg, br = [0.25, 0.5, 0.75, 1.0], [0.1, 0.1, 0.1]
    on = torch.tensor([False, True, False])
    assert cascade_cost(seg, br, on).tolist() == pytest.approx([0.25, 0.6, 0.85, 1.1])
    assert cascade_cost(seg, br, on, chained=True).tolist() == \
        pytest.approx([0.35, 0.7, 0.95, 1.2])
    # exit 0 is always wrong, exit 1 always right: the search turns on exit 1 alone, and with
    # an ensemble that still pays for branch 0 (0.2 + 0.3 + 0.05, not 0.25)
    br = [0.3, 0.05, 0.05]
    scores, preds = torch.full((50, 3), 0.9), torch.tensor([[1, 0, 0]]).expand(50, 3)
    final = torch.zeros(50, dtype=torch.long)
    for chained, want in ((False, 0.25), (True, 0.55)):
        cost = Cost("flops", (0.1, 0.2, 0.9, 1.0), tuple(br), chained)
        found = min_cost_thresholds(scores, preds, final, cost, max_drop=0.0)
        assert (found.thresholds <= 1).tolist() == [False, True, False]
        assert found.cost == pytest.approx(want)


# -- attach, bundle, calibration, bench ---------------------------------------------------------
def test_weights_are_fitted_on_held_out_samples_calibration_never_sees(ztw, tiny):
    out, res, _ = ztw
    n = len(open_data(tiny[0], PRE, split="train"))
    held = split_indices(n, VAL, 0)[1]
    fit_pos, cal_pos = fit_split(len(held), 0)
    info = read_bundle(out).info
    assert info.calibration_indices == [held[i] for i in cal_pos]
    assert info.ensemble["fit_sha256"] == calibration_digest([held[i] for i in fit_pos])
    assert info.ensemble["kind"] == "ztw" and info.ensemble["fit_targets"] == "labels"
    assert not set(info.calibration_indices) & {held[i] for i in fit_pos}


def test_bundle_round_trip_gives_the_same_model(ztw):
    out, res, x = ztw
    fresh = load(out)
    assert torch.equal(fresh.ensemble.weight, res.model.ensemble.weight)
    assert torch.equal(fresh.ensemble.bias, res.model.ensemble.bias)
    meta = json.loads(safetensors.safe_open(str(out / BRANCHES_FILE), "pt").metadata()["pteenet"])
    assert meta["format_version"] == 3 and meta["ensemble"]["kind"] == "ztw"
    res.model.set_thresholds(fresh.thresholds, score=fresh.score, gamma=fresh.gamma.tolist())
    a, b = fresh(x), res.model(x)
    assert torch.equal(a.exit_index, b.exit_index) and torch.equal(a.logits, b.logits)


def test_a_bundle_without_an_ensemble_loads_without_one(tmp_path_factory):
    _, _, plain = shared_bundle(tmp_path_factory)
    meta = json.loads(safetensors.safe_open(str(plain / BRANCHES_FILE), "pt").metadata()
                      ["pteenet"])
    assert meta["format_version"] == 3 and "ensemble" not in meta
    assert read_bundle(plain).ensemble is None and load(plain).ensemble is None


def test_a_gate_at_a_threshold_of_one_reads_back(tmp_path_factory, tmp_path):
    """A cost-search threshold of exactly 1.0 (an ensemble's top softmax saturates in float32)
    gives the gate's largest finite power, 6.9e6; the reader once refused anything above 1e6."""
    bundle = _copy(shared_bundle(tmp_path_factory)[2], tmp_path / "gate")
    gamma = [gate_power(1.0), gate_power(0.5)]
    write_thresholds(bundle, ThresholdTable(torch.full((2, K), 0.5), "gate", gamma=gamma))
    assert read_bundle(bundle).table.gamma == pytest.approx(gamma)


def _rewrite(bundle: Path, edit) -> None:
    """Rewrite branches.safetensors with ``edit(tensors, meta)`` applied, then reseal."""
    f = bundle / BRANCHES_FILE
    with safetensors.safe_open(str(f), "pt") as sf:
        meta = json.loads(sf.metadata()["pteenet"])
    tensors = safetensors.torch.load_file(str(f))
    edit(tensors, meta)
    safetensors.torch.save_file(tensors, str(f), metadata={"pteenet": json.dumps(meta)})
    reseal(bundle)


@pytest.mark.parametrize("name,edit", [
    ("negative-weight", lambda t, m: t["ensemble.weight"].fill_(-1.0)),
    ("nan-bias", lambda t, m: t["ensemble.bias"].fill_(float("nan"))),
    ("bias-shape", lambda t, m: t.update({"ensemble.bias": torch.zeros(B, K + 1)})),
    ("no-weights", lambda t, m: t.pop("ensemble.weight")),
    ("no-field", lambda t, m: m.pop("ensemble")),
    ("unknown-kind", lambda t, m: m["ensemble"].update(kind="mean")),
])
def test_a_corrupt_ensemble_is_one_bundle_error(ztw, tmp_path, name, edit):
    bundle = _copy(ztw[0], tmp_path / name)
    _rewrite(bundle, edit)
    with pytest.raises(BundleError, match="ensemble"):
        read_bundle(bundle)
    result = runner.invoke(app, ["calibrate", "--bundle", str(bundle)])
    assert "ensemble" in fails_cleanly(result, 3)


def test_calibrate_and_bench_use_the_ensembled_exits(ztw, tmp_path):
    bundle = _copy(ztw[0], tmp_path / "cal")
    res = calibrate(bundle, max_drop=0.05)
    assert res.outputs.cost.chained and res.table.score == "gate"
    assert res.outputs.scores.shape[0] == len(read_bundle(bundle).info.calibration_indices)
    model = load(bundle)
    report = bench(bundle, out_json=False, profile=False, latency_samples=4, repeats=1)
    assert report.simulation["exit_match"] == 1.0  # the recorded scores are the model's
    assert report.exit_costs == pytest.approx(model.cost_in("flops").exits(model.active))


# -- export -----------------------------------------------------------------------------------
def _gap(scores: torch.Tensor, q: float) -> float:
    """A threshold in the widest gap between scores near quantile ``q`` (far from every score,
    so float noise between runtimes cannot flip an exit)."""
    s = scores.double().sort().values
    lo, hi = max(0, int(len(s) * (q - 0.3))), min(len(s) - 1, int(len(s) * (q + 0.3)))
    i = lo + int((s[lo + 1:hi + 1] - s[lo:hi]).argmax())
    assert float(s[i + 1] - s[i]) > 1e-5
    return float((s[i] + s[i + 1]) / 2)


@torch.no_grad()
def _spread(model: EarlyExitModel, x: torch.Tensor) -> list[float]:
    """Per-exit thresholds sending samples to exits 0, 1 and the backbone (exit 2 off)."""
    feats, _ = model.reduced_features(x)
    scores, _ = model.exit_outputs(*model.branch_outputs(feats))
    t0 = _gap(scores[:, 0], 0.5)
    t1 = _gap(scores[scores[:, 0] < t0, 1], 0.5)
    return [t0, t1, math.inf]


@pytest.fixture(scope="module")
def spread(ztw, tmp_path_factory):
    bundle = _copy(ztw[0], tmp_path_factory.mktemp("ztw-export") / "bundle")
    ens = moderate()
    _rewrite(bundle, lambda t, m: t.update({"ensemble.weight": ens.weight,
                                             "ensemble.bias": ens.bias}))
    model = load(bundle)
    model.set_thresholds(1.0, score="softmax")
    write_thresholds(bundle, ThresholdTable(torch.tensor(_spread(model, ztw[2]))[:, None]
                                            .expand(B, K).clone(), score="softmax"))
    return bundle


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_exported_cascade_matches_the_model(spread, ztw, fmt):
    x = ztw[2]
    folder = export(spread, format=fmt)
    doc = json.loads((folder / "manifest.json").read_text())
    assert doc["ensemble"] is True and doc["format_version"] == 2
    assert "single" not in doc["files"] and not (folder / "cascade_1.onnx").exists()
    cascade, model = Cascade.open(folder), load(spread)
    for thresholds in (None, [math.inf, model.thresholds[1, 0].item(), math.inf]):
        if thresholds is not None:  # exit 0 off: it still runs, since exit 1 reads it
            model.set_thresholds(thresholds)
            cascade.thresholds = model.thresholds.numpy().copy()
        want = model(x)
        assert (torch.bincount(want.exit_index, minlength=B + 1) > 0).sum() >= 2
        got = cascade.run(x.numpy())
        np.testing.assert_array_equal(got.exit_index, want.exit_index.numpy())
        np.testing.assert_array_equal(got.preds, want.preds.numpy())
        np.testing.assert_allclose(got.logits, want.logits.numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(got.flops, want.flops.numpy())


# -- options ----------------------------------------------------------------------------------
def test_cli_lists_the_choice_and_refuses_others(tmp_path):
    result = runner.invoke(app, ["attach", "--help"], terminal_width=200)
    assert result.exit_code == 0 and "--ensemble" in result.stdout and "ztw" in result.stdout
    bad = runner.invoke(app, ["attach", "resnet20", "--data", str(tmp_path), "--ensemble",
                              "mean"])
    assert "mean" in fails_cleanly(bad, 2)


def test_boosted_training_with_an_ensemble_is_refused(tiny, tmp_path):
    with pytest.raises(OptionError, match="`ensemble`.*`boosted`"):
        attach("resnet20", tiny[0], checkpoint=tiny[1], num_classes=K, out=tmp_path / "b",
               config=TrainConfig(boosted="hard"), progress=False, ensemble="ztw")
