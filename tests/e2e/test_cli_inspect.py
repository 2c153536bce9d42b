"""``pteenet inspect`` through the real Typer app: output, JSON, and one-line errors."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pteenet_cli.app import app

from pteenet.backbone import cifar_resnet

REPO = Path(__file__).resolve().parents[2]


def _assert_clean_failure(result, code: int | None = None) -> str:
    """Non-zero exit, exactly one line on stderr, no traceback anywhere; returns that line."""
    assert result.exit_code != 0, result.output
    if code is not None:
        assert result.exit_code == code, (result.exit_code, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("error")
    return lines[0]


# --------------------------------------------------------------------------- success


def test_inspect_table_and_exits(invoke):
    result = invoke("inspect", "resnet20", "--branches", "3")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "cifar:resnet20" in out
    assert re.search(r"\d+ cut points", out)
    for column in ("cut", "shape", "FLOPs", "params"):
        assert column in out
    assert "16x32x32" in out and "64x8x8" in out
    assert out.count("<-- exit") == 3
    thop = re.search(r"thop: ([\d.]+) MMACs", out)  # thop's figure is shown beside ours
    assert thop and float(thop.group(1)) == pytest.approx(40.6, rel=0.05)
    assert "40.55 MMACs" in out
    assert "placement linear:" in out
    assert "Traceback" not in result.output


def test_inspect_json(invoke):
    result = invoke("inspect", "resnet20", "--branches", "3", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)  # notes went to stderr, stdout is pure JSON
    assert info["model"] == "cifar:resnet20"
    assert info["num_classes"] == 10
    assert info["input_size"] == [32, 32]
    assert len(info["chosen"]) == 3
    assert info["placement"] == "linear"
    assert info["total_macs"] == pytest.approx(40.6e6, rel=0.02)
    assert info["total_flops"] == 2 * info["total_macs"]
    assert info["thop_macs"] == pytest.approx(info["total_macs"], rel=0.05)
    assert info["total_params"] == pytest.approx(0.27e6, rel=0.02)
    names = [c["name"] for c in info["cuts"]]
    assert [n for n in names if n in info["chosen"]] == info["chosen"]  # in order
    assert sum(c["chosen"] for c in info["cuts"]) == 3
    fractions = [c["fraction"] for c in info["cuts"]]
    assert fractions == sorted(fractions) and fractions[0] > 0 and fractions[-1] <= 1
    assert all(len(c["shape"]) == 3 for c in info["cuts"])


def test_inspect_explicit_at_and_cuts(invoke):
    result = invoke("inspect", "resnet20", "--at", "0.25,0.5,0.75", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["placement"] == "at"
    assert len(info["chosen"]) == 3

    result = invoke("inspect", "resnet20", "--cuts", "layer1,layer2,layer3", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert [c["name"] for c in info["cuts"]] == ["layer1", "layer2", "layer3"]
    assert info["chosen"] == ["layer1", "layer2", "layer3"]


def test_inspect_with_checkpoint_and_num_classes(invoke, tmp_path):
    path = tmp_path / "cifar100.pt"
    torch.save(cifar_resnet("resnet20", num_classes=100).state_dict(), path)
    result = invoke("inspect", "resnet20", "-c", path, "--num-classes", "100", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["num_classes"] == 100

    result = invoke("inspect", "resnet20", "-c", path)  # read from the checkpoint, and said
    assert result.exit_code == 0 and "--num-classes 100: read from" in result.stdout

    result = invoke("inspect", "resnet20", "-c", path, "--num-classes", "10")
    line = _assert_clean_failure(result, 3)
    assert "--num-classes 100" in line


# --------------------------------------------------------------------------- bad input


def test_unknown_model_suggests_closest(invoke):
    line = _assert_clean_failure(invoke("inspect", "resnt20"), 2)
    assert "unknown model" in line
    assert "did you mean resnet20" in line


def test_unknown_source(invoke):
    line = _assert_clean_failure(invoke("inspect", "keras:resnet20"), 2)
    assert "keras" in line


def test_missing_checkpoint(invoke, tmp_path):
    path = tmp_path / "missing.th"
    line = _assert_clean_failure(invoke("inspect", "resnet20", "--checkpoint", path), 3)
    assert str(path) in line and "does not exist" in line


def test_corrupt_checkpoint(invoke, tmp_path):
    path = tmp_path / "corrupt.pt"
    path.write_bytes(random.Random(0).randbytes(4096))
    line = _assert_clean_failure(invoke("inspect", "resnet20", "--checkpoint", path), 3)
    assert str(path) in line


def test_truncated_checkpoint(invoke, tmp_path):
    full = tmp_path / "full.pt"
    torch.save(cifar_resnet("resnet20").state_dict(), full)
    path = tmp_path / "half.pt"
    path.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    _assert_clean_failure(invoke("inspect", "resnet20", "--checkpoint", path), 3)


def test_wrong_architecture_checkpoint(invoke, tmp_path):
    path = tmp_path / "resnet32.pt"
    torch.save(cifar_resnet("resnet32").state_dict(), path)
    line = _assert_clean_failure(invoke("inspect", "resnet20", "--checkpoint", path), 3)
    assert "unexpected keys" in line
    assert "cifar:resnet20" in line


def test_too_many_branches(invoke):
    line = _assert_clean_failure(invoke("inspect", "resnet20", "--branches", "500"), 2)
    assert "500 branches" in line and re.search(r"only \d+ useful cut points", line)


@pytest.mark.parametrize(("at", "words"), [("0.5,abc", "comma-separated"),
                                           ("0.5,0.3", "increasing"),
                                           ("0,0.5", "between 0 and 1")])
def test_bad_at(invoke, at, words):
    line = _assert_clean_failure(invoke("inspect", "resnet20", "--at", at), 2)
    assert "--at" in line and words in line


def test_bad_placement_name(invoke):
    line = _assert_clean_failure(invoke("inspect", "resnet20", "-n", "2", "-p", "gold"), 2)
    assert "golden" in line


def test_bad_cut_name(invoke):
    line = _assert_clean_failure(invoke("inspect", "resnet20", "--cuts", "layer9"), 3)
    assert "layer9" in line


def test_debug_shows_the_traceback(invoke, tmp_path):
    path = tmp_path / "missing.pt"
    result = invoke("--debug", "inspect", "resnet20", "--checkpoint", path)
    assert result.exit_code == 3
    assert "Traceback (most recent call last)" in result.stderr
    assert "CheckpointError" in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error (checkpoint):") and "does not exist" in last


@pytest.mark.parametrize(("args", "words"), [
    (("inspect", "resnet20", "--branches", "0"), "--branches"),  # below min=1
    (("inspect", "resnet20", "--bogus"), "--bogus"),
    (("bogus",), "bogus"),
])
def test_usage_errors_are_usage_errors(invoke, args, words):
    # typer vendors click: its usage errors and --help exits must pass through app.py's
    # error handler untouched (they once became "internal error: ..." with exit code 1).
    result = invoke(*args)
    assert result.exit_code == 2, result.stderr
    assert words in result.stderr
    assert "internal error" not in result.stderr
    assert "Traceback" not in result.output


# --------------------------------------------------------------------------- entry points


def test_inspect_help(invoke):
    result = invoke("inspect", "--help")
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    for option in ("--branches", "--placement", "--at", "--cuts", "--checkpoint", "--json"):
        assert option in result.stdout


def test_root_help(invoke):
    result = invoke("--help")
    assert result.exit_code == 0
    assert "inspect" in result.stdout and "--debug" in result.stdout


def test_python_dash_m_pteenet_help():
    proc = subprocess.run([sys.executable, "-m", "pteenet", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "inspect" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_preprocessing_overrides_reach_the_trace(cli_runner):
    r = cli_runner.invoke(app, ["inspect", "resnet20", "--input-size", "64", "--mean",
                                "0.5,0.5,0.5", "--std", "0.25,0.25,0.25", "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["input_size"] == [64, 64] and info["mean"] == [0.5] * 3
    assert info["std"] == [0.25] * 3
    assert info["total_macs"] == pytest.approx(4 * 40.55e6, rel=0.02)  # 4x the pixels


@pytest.mark.parametrize("args", [["--std", "1,2"], ["--std", "0,1,1"], ["--mean", "a,b,c"],
                                  ["--input-size", "0"], ["--input-size", "3.5"]])
def test_bad_preprocessing_options_are_one_line(cli_runner, args):
    r = cli_runner.invoke(app, ["inspect", "resnet20", *args])
    assert r.exit_code == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.output
