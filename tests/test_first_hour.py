"""Issue 14, a new user's first hour: what the CLI says and keeps when a run is interrupted,
uncalibrated or repeated, and the options a new user reaches for first."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from pteenet_cli.app import app
from typer.testing import CliRunner

from tests._helpers import fails_cleanly, one_thread, shared_bundle  # noqa: F401  (autouse fixture)

runner = CliRunner()


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    return shared_bundle(tmp_path_factory)


def _attach(data: Path, ckpt: Path, out: Path, *extra: str) -> list[str]:
    return ["attach", "resnet20", "--data", str(data), "-c", str(ckpt), "-n", "2",
            "--branch", "pool", "--epochs", "1", "--batch-size", "16", "--val-fraction", "0.25",
            "--quiet", "--out", str(out), *extra]


# --------------------------------------------------------------------------- options


def test_bare_boosted_names_its_values(shared, tmp_path):
    data, ckpt, _ = shared
    out = tmp_path / "out"
    line = fails_cleanly(runner.invoke(app, [*_attach(data, ckpt, out), "--boosted"]))
    assert "--boosted" in line and "hard" in line and "soft" in line, line
    assert not out.exists()


def test_num_classes_is_read_from_the_checkpoint_and_said(shared, tmp_path):
    data, ckpt, _ = shared  # a 3-class resnet20; the model's own default is 10 classes
    result = runner.invoke(app, ["inspect", "resnet20", "-c", str(ckpt)])
    assert result.exit_code == 0, result.output
    said = [ln for ln in result.stdout.splitlines() if "--num-classes 3" in ln]
    assert len(said) == 1 and "checkpoint" in said[0] and "linear.weight" in said[0], \
        result.stdout
    assert "3 classes" in result.stdout


def test_attach_infers_the_class_count_and_the_bundle_loads(shared, tmp_path):
    import pteenet

    data, ckpt, _ = shared
    out = tmp_path / "out"
    result = runner.invoke(app, _attach(data, ckpt, out))
    assert result.exit_code == 0, result.output
    assert "--num-classes 3: read from the checkpoint" in result.stdout
    assert pteenet.load(out).num_classes == 3


def test_no_pretrained_backbone_is_random_seeded_and_loads_again(shared, tmp_path):
    from pteenet.backbones import create_backbone
    from pteenet.bundle import load_backbone, read_info

    data, _, _ = shared
    out = tmp_path / "out"
    result = runner.invoke(app, ["attach", "resnet20", "--no-pretrained", "--num-classes", "3",
                                 "--data", str(data), "-n", "2", "--branch", "pool",
                                 "--epochs", "1", "--batch-size", "16", "--val-fraction", "0.25",
                                 "--quiet", "--out", str(out)])
    assert result.exit_code == 0, result.output
    info = read_info(out)
    assert info.backbone["pretrained"] is False
    torch.manual_seed(123)  # whatever the global seed, the same random backbone comes back
    loaded = load_backbone(info).model.state_dict()
    torch.manual_seed(456)
    fresh = create_backbone("resnet20", num_classes=3).model.state_dict()
    assert all(torch.equal(loaded[k], fresh[k]) for k in fresh)


# --------------------------------------------------------------------------- bench


def _bench(bundle: Path, *extra: str):
    return runner.invoke(app, ["bench", "--bundle", str(bundle), "--max-samples", "8",
                               "--latency-samples", "0", "--repeats", "1", "--quiet", *extra])


@pytest.fixture
def bundle(shared, tmp_path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(shared[2], copy)
    return copy


def test_bench_warns_once_when_thresholds_were_never_calibrated(bundle):
    (bundle / "thresholds.json").unlink()
    (bundle / "thresholds.csv").unlink()
    result = _bench(bundle)
    assert result.exit_code == 0, result.output
    warned = [ln for ln in result.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warned) == 1 and "never calibrated" in warned[0], result.stderr
    assert "--threshold" in warned[0]
    quiet = _bench(bundle, "--threshold", "0.5")  # the user chose a threshold: nothing to say
    assert quiet.exit_code == 0 and "warning" not in quiet.stderr, quiet.stderr


def test_bench_on_a_calibrated_bundle_does_not_warn(bundle):
    result = _bench(bundle)
    assert result.exit_code == 0, result.output
    assert "warning" not in result.stderr, result.stderr
