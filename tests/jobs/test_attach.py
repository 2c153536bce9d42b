"""attach end to end: real backbone, real training, real files; the bundle round-trips."""

from __future__ import annotations

import json

import pytest
import torch
from pteenet_cli.app import app
from typer.testing import CliRunner

from pteenet.backbone import create_backbone
from pteenet.bundle import BRANCHES_FILE, THRESHOLDS_FILE, load, read_info
from pteenet.data import open_data
from pteenet.errors import BundleError, OptionError
from pteenet.jobs import attach
from pteenet.training import TrainConfig, eenet_loss

runner = CliRunner()


@pytest.fixture(scope="module")
def bundle(tiny, tmp_path_factory):
    data, ckpt = tiny
    out = tmp_path_factory.mktemp("bundle")
    before = create_backbone("resnet20", checkpoint=ckpt, num_classes=3).model.state_dict()
    result = runner.invoke(app, ["attach", "resnet20", "--data", str(data), "--checkpoint",
                                 str(ckpt), "--num-classes", "3", "--branches", "2",
                                 "--branch", "conv1", "--epochs", "4", "--out", str(out),
                                 "--batch-size", "16", "--quiet"])
    assert result.exit_code == 0, result.output
    return out, result, before


def test_attach_writes_a_complete_bundle(bundle):
    out, result, _ = bundle
    assert (out / BRANCHES_FILE).is_file() and (out / THRESHOLDS_FILE).is_file()
    assert (out / "thresholds.csv").read_text().startswith("branch,class,threshold")
    assert "calibrated (mincost) on the held-out split" in result.output
    info = read_info(out)
    assert info.num_branches == 2 and info.num_classes == 3
    assert info.backbone["checkpoint_sha256"] and info.preprocess.input_size == (32, 32)
    assert len(info.calibration_indices) == round(0.2 * 72)
    assert info.classes == ["blue", "green", "red"]
    assert not list(out.glob(".*.tmp"))


def test_training_lowers_the_loss_and_branches_agree_far_above_chance(bundle):
    info = read_info(bundle[0])
    losses, agreement = info.training["losses"], info.training["agreement"]
    assert losses[-1] < losses[0]
    assert max(agreement) > 0.6  # chance is 1/3


def test_backbone_weights_and_bn_buffers_are_byte_identical(tiny, tmp_path):
    data, ckpt = tiny
    bb = create_backbone("resnet20", checkpoint=ckpt, num_classes=3)
    before = {k: v.clone() for k, v in bb.model.state_dict().items()}
    attach(bb, data, branches=2, branch="conv1", out=tmp_path,
           config=TrainConfig(epochs=2, batch_size=16), progress=False)
    after = bb.model.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():  # running means/vars and num_batches_tracked included
        assert torch.equal(v, after[k]), k
    assert not bb.model.training


def test_bundle_round_trips_to_identical_outputs(tiny, tmp_path):
    data, ckpt = tiny
    res = attach("resnet20", data, checkpoint=ckpt, num_classes=3, branches=2, branch="pool",
                 out=tmp_path, config=TrainConfig(epochs=1, batch_size=16), progress=False)
    loaded = load(tmp_path)
    res.model.eval()
    x = torch.randn(10, 3, 32, 32)
    for t in (0.0, 0.3, 0.6, 2.0):
        res.model.set_thresholds(t)
        loaded.set_thresholds(t)
        a, b = res.model(x), loaded(x)
        assert torch.equal(a.logits, b.logits) and torch.equal(a.exit_index, b.exit_index)


def test_same_seed_gives_byte_identical_bundles(tiny, tmp_path):
    data, ckpt = tiny
    for name in ("a", "b"):
        attach("resnet20", data, checkpoint=ckpt, num_classes=3, branches=1, branch="pool",
               out=tmp_path / name, config=TrainConfig(epochs=1, batch_size=16), progress=False)
    a = (tmp_path / "a" / BRANCHES_FILE).read_bytes()
    b = (tmp_path / "b" / BRANCHES_FILE).read_bytes()
    assert a == b


def test_interrupted_attach_leaves_no_partial_bundle(tiny, tmp_path, monkeypatch):
    """Ctrl-C while the bundle is being written (its branches file already on disk, not yet
    committed): no bundle appears, and nothing half-written is left in --out."""
    data, ckpt = tiny
    import pteenet.storage._commit as commit

    real = commit.pause_point

    def ctrl_c_after_branches(step: str) -> None:
        real(step)
        if step == f"wrote-{BRANCHES_FILE}":
            raise KeyboardInterrupt

    monkeypatch.setattr(commit, "pause_point", ctrl_c_after_branches)
    out = tmp_path / "b"
    result = runner.invoke(app, ["attach", "resnet20", "--data", str(data), "--checkpoint",
                                 str(ckpt), "--num-classes", "3", "-n", "1", "--out", str(out),
                                 "--epochs", "1", "--quiet"])
    assert result.exit_code == 130
    assert "interrupted" in result.stderr
    left = sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) \
        if out.exists() else []
    assert left == [], left
    with pytest.raises(BundleError):
        read_info(out)


def test_boosted_branch_k_trains_on_the_survivors(tiny, tmp_path):
    data, ckpt = tiny
    res = attach("resnet20", data, checkpoint=ckpt, num_classes=3, branches=2, branch="pool",
                 out=tmp_path, progress=False,
                 config=TrainConfig(epochs=3, batch_size=16, boosted="hard", margin=0.5,
                                    min_support=2, views=1))
    surv = res.report.survivors
    assert surv[0] == {"train": 58, "held_out": 14}  # everyone; 20 % of 72 held out by default
    thr = res.report.thresholds
    # Count by hand who branch 0 takes, with its final weights and calibrated thresholds.
    from pteenet.thresholds import exit_index
    from pteenet.training import branch_scores, compute_features

    dataset = open_data(data, read_info(tmp_path).preprocess)
    info = read_info(tmp_path)
    held = compute_features(res.model, dataset, info.calibration_indices)
    train_idx = sorted(set(range(len(dataset))) - set(info.calibration_indices))
    train = compute_features(res.model, dataset, train_idx)
    for fs, key in ((train, "train"), (held, "held_out")):
        s, p = branch_scores(res.model, fs)
        stay = int((exit_index(s[:, :1], p[:, :1], thr[:1]) == 1).sum())
        assert surv[1][key] == stay
    doc = json.loads((tmp_path / THRESHOLDS_FILE).read_text())
    assert doc["method"] == "cpm" and info.training["mode"] == "boosted-hard"
    assert info.training["survivors"] == surv


def test_the_caching_pass_starts_on_a_small_batch_and_caches_every_image_in_order(tiny):
    from pteenet.cascade import build_early_exit
    from pteenet.graph import choose_cuts, trace_backbone
    from pteenet.training import compute_features

    data, ckpt = tiny
    bb = create_backbone("resnet20", checkpoint=ckpt, num_classes=3)
    trace = trace_backbone(bb.model, (32, 32), with_thop=False)
    model = build_early_exit(trace, choose_cuts(trace, 2), 3, "pool").eval()
    seen, run = [], model.reduced_features  # the first call probes the cut shapes
    model.reduced_features = lambda x, *rest: seen.append(len(x)) or run(x, *rest)
    idx = list(range(3, 70))
    feats = compute_features(model, open_data(data, bb.preprocess), idx, batch_size=32)
    assert seen[1:] == [8, 16, 32, 11] and feats.indices.tolist() == idx
    with torch.inference_mode():
        x = torch.stack([open_data(data, bb.preprocess)[i][0] for i in idx[-5:]])
        assert torch.allclose(feats.final[-5:], run(x)[1], rtol=1e-4, atol=1e-4)


def test_eenet_loss_is_finite_for_extreme_confidences():
    logits = [torch.randn(4, 3, requires_grad=True)]
    conf = [torch.tensor([-200.0, 200.0, 0.0, 80.0], requires_grad=True)]
    target = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 0]), 3).float()
    loss = eenet_loss(logits, conf, torch.randn(4, 3), target, [0.3, 1.0], lam=1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(conf[0].grad).all()


@pytest.mark.parametrize("branch", ["pool", "mlp"])
def test_cache_and_no_cache_train_the_same_branches(tiny, tmp_path, branch):
    data, ckpt = tiny
    models = []
    for cache in (True, False):
        res = attach("resnet20", data, checkpoint=ckpt, num_classes=3, branches=2, branch=branch,
                     out=tmp_path / str(cache), progress=False,
                     config=TrainConfig(epochs=2, batch_size=16, cache=cache, views=1))
        models.append(res.model.branches.state_dict())
    for k, v in models[0].items():
        assert torch.allclose(v.float(), models[1][k].float(), rtol=1e-4, atol=1e-4), k


def test_resume_continues_to_the_same_bundle(tiny, tmp_path, monkeypatch):
    data, ckpt = tiny
    kw = dict(checkpoint=ckpt, num_classes=3, branches=2, branch="pool", progress=False)
    attach("resnet20", data, out=tmp_path / "full", config=TrainConfig(epochs=3, batch_size=16),
           **kw)
    from pteenet.training import Resume

    real_save = Resume.save

    def save_then_die(self, epoch, *a):
        real_save(self, epoch, *a)
        if epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(Resume, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        attach("resnet20", data, out=tmp_path / "r", resume=True,
               config=TrainConfig(epochs=3, batch_size=16), **kw)
    assert (tmp_path / "r" / ".attach-state.pt").is_file()
    assert not (tmp_path / "r" / BRANCHES_FILE).exists()
    monkeypatch.setattr(Resume, "save", real_save)
    attach("resnet20", data, out=tmp_path / "r", resume=True,
           config=TrainConfig(epochs=3, batch_size=16), **kw)
    assert not (tmp_path / "r" / ".attach-state.pt").exists()
    a = load(tmp_path / "full").branches.state_dict()
    b = load(tmp_path / "r").branches.state_dict()
    assert all(torch.equal(v, b[k]) for k, v in a.items())
    assert read_info(tmp_path / "r").training["losses"] == read_info(tmp_path / "full").training[
        "losses"]


def test_amp_trains_in_bf16_and_stays_close(tiny, tmp_path):
    data, ckpt = tiny
    res = attach("resnet20", data, checkpoint=ckpt, num_classes=3, branches=1, branch="pool",
                 out=tmp_path, progress=False,
                 config=TrainConfig(epochs=2, batch_size=16, amp=True))
    assert read_info(tmp_path).training["amp"] is True
    assert all(torch.isfinite(torch.tensor(res.report.losses)))
    assert res.report.losses[-1] < res.report.losses[0]


def test_attach_warns_in_one_line_when_branches_cost_too_much(tiny, tmp_path,
                                                              monkeypatch):
    import pteenet.jobs._attach as attaching

    data, ckpt = tiny
    args = ["attach", "resnet20", "--data", str(data), "--checkpoint", str(ckpt),
            "--num-classes", "3", "-n", "2", "--epochs", "1", "--batch-size", "16", "--quiet"]
    quiet = runner.invoke(app, [*args, "--out", str(tmp_path / "a")])
    assert quiet.exit_code == 0 and "warning" not in quiet.output  # 2 branches: ~1 % together
    monkeypatch.setattr(attaching, "WARN_SHARE", 0.001)
    loud = runner.invoke(app, [*args, "--out", str(tmp_path / "b")])
    assert loud.exit_code == 0, loud.output
    lines = [ln for ln in loud.stderr.splitlines() if ln.startswith("warning:")]
    assert len(lines) == 1 and "branches together cost" in lines[0]


def test_labels_of_other_classes_are_not_targets(tiny, tmp_path):
    data, _ = tiny  # three colour classes; this backbone predicts four
    bb = create_backbone("resnet20", num_classes=4)
    res = attach(bb, data, branches=2, out=tmp_path / "auto",
                 config=TrainConfig(epochs=1, batch_size=16), progress=False)
    assert res.info.training["target"] == "soft"  # auto: the backbone's softmax, not labels
    with pytest.raises(OptionError, match="`target` mixed needs them to match"):
        attach(bb, data, branches=2, out=tmp_path / "mixed",
               config=TrainConfig(epochs=1, target="mixed"), progress=False)


def test_cli_defaults_are_the_library_defaults():
    """`pteenet attach` with no flags must run what `pteenet.attach` runs with no arguments."""
    import inspect as pyinspect

    from pteenet_cli.app import app as cli_app
    from typer.main import get_command

    from pteenet.jobs import attach as lib_attach
    command = get_command(cli_app).commands["attach"]
    lib = pyinspect.signature(lib_attach).parameters
    cli = {p.name: p.default for p in command.params
           if p.param_type_name == "option" and p.default is not None}  # None: the library's
    shared = [name for name in lib if name in cli and lib[name].default is not pyinspect._empty]
    assert "val_fraction" in shared
    as_given = {n: getattr(cli[n], "value", cli[n]) for n in shared}  # Enum choices: values
    assert {n: str(v) for n, v in as_given.items()} == {n: str(lib[n].default) for n in shared}
