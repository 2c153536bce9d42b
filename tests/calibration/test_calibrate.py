"""calibrate through the CLI: the table round-trips and load() applies per-class thresholds."""

from __future__ import annotations

import json
import math

import pytest
import torch
from pteenet_cli.app import app
from typer.testing import CliRunner

from pteenet.bundle import THRESHOLDS_FILE, load, read_info, read_thresholds
from pteenet.calibration import calibrate, collect
from pteenet.cascade import Cost
from pteenet.jobs import attach
from pteenet.thresholds import exit_index
from pteenet.training import TrainConfig

runner = CliRunner()


@pytest.fixture(scope="module")
def bundle(tiny, tmp_path_factory):
    data, ckpt = tiny
    out = tmp_path_factory.mktemp("cal")
    attach("resnet20", data, checkpoint=ckpt, num_classes=3, branches=2, branch="conv1",
           out=out, val_fraction=0.4, config=TrainConfig(epochs=3, batch_size=16),
           progress=False)
    return out


def test_cpm_table_round_trips_and_load_applies_it(bundle):
    r = runner.invoke(app, ["calibrate", "--bundle", str(bundle), "--cpm", "--margin", "0.3",
                            "--min-support", "2", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["method"] == "cpm" and doc["params"]["margin"] == 0.3
    info = read_info(bundle)
    table = read_thresholds(bundle, info)
    model = load(bundle)
    assert torch.equal(model.thresholds, table.thresholds)
    # The real model applies tau[k, c] to the class predicted at branch k.
    out = collect(model, bundle)
    sim = exit_index(out.scores, out.preds, table.thresholds)
    assert doc["summary"]["exits"][0]["count"] == int((sim == 0).sum())
    saved = json.loads((bundle / THRESHOLDS_FILE).read_text())["thresholds"]
    assert [[math.inf if v is None else v for v in row] for row in saved] == \
        table.thresholds.tolist()


def test_per_class_thresholds_from_the_table_drive_real_exits(bundle):
    model = load(bundle)
    x = torch.randn(16, 3, 32, 32)
    feats, _ = model.reduced_features(x)
    logits, _ = model.branch_outputs(feats)
    pred0 = logits[0].argmax(1)
    table = torch.full((2, 3), math.inf)
    table[0, int(pred0[0])] = 0.0
    model.set_thresholds(table)
    res = model(x)
    assert torch.equal(res.exit_index == 0, pred0 == pred0[0])


def test_global_threshold_and_risk_control(bundle):
    r = runner.invoke(app, ["calibrate", "-b", str(bundle), "--threshold", "0.7"])
    assert r.exit_code == 0, r.output
    assert "0.700" in r.stdout
    res = calibrate(bundle, max_drop=0.5, delta=0.2, risk=True, bound="hb")
    p = res.table.params
    assert p["certified"] and p["ucb"] <= 0.5 and p["empirical"] <= p["ucb"]
    assert res.table.method == "risk" and res.table.score == "gate"
    r = runner.invoke(app, ["calibrate", "-b", str(bundle), "--max-drop", "0.5", "--cpm",
                            "--risk", "--delta", "0.2", "--min-support", "2"])
    assert r.exit_code == 0, r.output
    assert "risk control: wsr bound" in r.stdout


def test_score_is_recorded_and_used(bundle):
    calibrate(bundle, threshold=0.9, score="head")
    assert load(bundle).score == "head"
    calibrate(bundle, threshold=0.5)
    assert load(bundle).score == "softmax"
    calibrate(bundle)
    assert load(bundle).score == "gate"


@pytest.mark.parametrize("args", [["--threshold", "1.5"], ["--threshold", "0.5", "--cpm"],
                                  ["--margin", "2"], ["--max-drop", "0"], ["--delta", "1"],
                                  ["--score", "nope", "-t", "0.5"], ["--min-support", "0"]])
def test_bad_options_are_one_line_errors(bundle, args):
    r = runner.invoke(app, ["calibrate", "-b", str(bundle), *args])
    assert r.exit_code != 0
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.output


def test_missing_bundle_is_one_line(tmp_path):
    r = runner.invoke(app, ["calibrate", "-b", str(tmp_path / "nope")])
    assert r.exit_code == 3
    assert "run `pteenet attach` first" in r.stderr



def _calibrated_outputs(n: int, b: int, seed: int):
    """``b`` exits whose top softmax is calibrated (a sample is right with probability = score),
    sharper with depth, at evenly spaced depths; the backbone is right on 90 %."""
    from pteenet.calibration import Outputs
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    final = torch.where(torch.rand(n, generator=g) < 0.9, labels, (labels + 2) % 10)
    scores = torch.rand(n, b, generator=g) ** torch.linspace(1.0, 0.1, b)
    right = torch.rand(n, b, generator=g) < scores
    preds = torch.where(right, labels[:, None], (labels[:, None] + 1) % 10)
    return Outputs(scores, preds, final, labels,
                   Cost("flops", tuple(torch.linspace(0, 1, b + 2)[1:].tolist()), (0.005,) * b))


@pytest.mark.parametrize("seed", [0, 1])
def test_risk_control_costs_little_more_than_the_uncertified_search(seed):
    """Certifying a 1 pt drop on 4,500 samples gives up little of the uncertified saving: the
    family walked is made of cost-search optima (the greedy's own path cost up to 0.47 more)."""
    from pteenet.calibration import choose_table
    out = _calibrated_outputs(4500, 6, seed)
    free = choose_table(out, 10, method="mincost").summary["mean_relative_flops"]
    table = choose_table(out, 10, method="risk")
    assert table.params["certified"] and table.params["ucb"] <= 0.01
    assert free < 0.5 and free <= table.summary["mean_relative_flops"] <= free + 0.08


def test_blend_moves_from_one_table_to_the_next():
    from pteenet.calibration._calibrate import blend_tables
    a = torch.tensor([0.9, math.inf, 0.5])
    b = torch.tensor([0.7, 0.6, math.inf])
    half = blend_tables(a, b, 0.5)
    assert half.tolist() == pytest.approx([0.8, 0.8, 0.5])  # on-both, switched on, switched off
    assert torch.equal(blend_tables(a, b, 1.0), b)
    assert torch.equal(blend_tables(a, b, 0.0)[:1], a[:1])
