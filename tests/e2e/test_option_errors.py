"""Out-of-range and conflicting options: one line naming the option, exit 2, nothing written.

Issue 6 ("Reliability and security"): negative lambda, zero epochs, margins outside [0, 1],
validation fractions of 0 and 1.5, conflicting flags, zero batch sizes, unknown branch /
placement / target names, for ``attach``, ``calibrate`` and ``bench``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from pteenet_cli.app import app
from typer.testing import CliRunner

from tests._helpers import (
    fails_cleanly,
)

runner = CliRunner()





def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# --------------------------------------------------------------------------- attach

ATTACH = [  # (extra arguments, words the line must hold)
    (["--lam", "-1"], ["--lam", ">= 0"]),
    (["--lam", "nan"], ["--lam"]),
    (["--epochs", "0"], ["--epochs", "at least 1"]),
    (["--epochs", "-3"], ["--epochs"]),
    (["--margin", "1.5"], ["--margin", "[0, 1]"]),
    (["--margin", "-0.1"], ["--margin", "[0, 1]"]),
    (["--val-fraction", "0"], ["--val-fraction", "between 0 and 1"]),
    (["--val-fraction", "1.5"], ["--val-fraction", "between 0 and 1"]),
    (["--val-fraction", "1"], ["--val-fraction"]),
    (["--batch-size", "0"], ["--batch-size", "at least 1"]),
    (["--batch-size", "-8"], ["--batch-size"]),
    (["--lr", "0"], ["--lr", "positive"]),
    (["--lr", "inf"], ["--lr"]),
    (["--branch", "conv9"], ["conv9", "conv1", "conv2", "pool", "sdn"]),
    (["--placement", "gold"], ["gold", "golden", "pareto"]),
    (["--target", "pseudo"], ["--target", "hard", "soft", "labels"]),
    (["--boosted", "medium"], ["--boosted", "hard", "soft"]),
    (["--boosted", "hard", "--no-cache"], ["--boosted", "feature cache", "(--no-cache)"]),
    (["--at", "0.5,abc"], ["--at", "comma-separated"]),
    (["--at", "0.6,0.3"], ["--at", "increasing"]),
    (["--at", "0,0.5"], ["--at", "between 0 and 1"]),
]


@pytest.mark.parametrize(("extra", "words"), ATTACH, ids=[" ".join(a) for a, _ in ATTACH])
def test_attach_bad_option(shared, tmp_path, extra, words):
    data, ckpt, _ = shared
    out = tmp_path / "out"
    result = runner.invoke(app, ["attach", "resnet20", "--data", str(data), "-c", str(ckpt),
                                 "--num-classes", "3", "-n", "2", "--branch", "pool",
                                 "--epochs", "1", "--quiet", "--out", str(out), *extra])
    line = fails_cleanly(result)
    for word in words:
        assert word in line, (word, line)
    assert not out.exists()


def test_attach_labels_target_on_unlabeled_data(shared, tmp_path):
    data, ckpt, _ = shared
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in sorted((data / "train" / "red").iterdir())[:6]:
        shutil.copy(p, flat / p.name)
    result = runner.invoke(app, ["attach", "resnet20", "--data", str(flat), "-c", str(ckpt),
                                 "--num-classes", "3", "--target", "labels", "--out",
                                 str(tmp_path / "out"), "--quiet"])
    line = fails_cleanly(result)
    assert "--target labels" in line and "labeled" in line
    assert not (tmp_path / "out").exists()


def test_attach_unknown_cut(shared, tmp_path):
    data, ckpt, _ = shared
    result = runner.invoke(app, ["attach", "resnet20", "--data", str(data), "-c", str(ckpt),
                                 "--num-classes", "3", "--cuts", "layer9", "--out",
                                 str(tmp_path / "out"), "--quiet"])
    line = fails_cleanly(result, 3)
    assert "layer9" in line




@pytest.mark.parametrize("device", [
    "bogus",
    pytest.param("cuda", marks=pytest.mark.skipif(torch.cuda.is_available(),
                                                  reason="a GPU is present")),
])
def test_attach_bad_device(shared, tmp_path, device):
    data, ckpt, _ = shared
    result = runner.invoke(app, ["attach", "resnet20", "--data", str(data), "-c", str(ckpt),
                                 "--num-classes", "3", "-n", "2", "--device", device,
                                 "--out", str(tmp_path / "out"), "--quiet"])
    line = fails_cleanly(result)
    assert "--device" in line


# --------------------------------------------------------------------------- calibrate

CALIBRATE = [
    (["-t", "0.5", "--cpm"], ["--threshold", "--cpm"]),
    (["-t", "0.5", "--max-drop", "0.1"], ["--threshold", "--max-drop"]),
    (["-t", "1.5"], ["--threshold", "[0, 1]"]),
    (["-t", "-0.1"], ["--threshold"]),
    (["-t", "nan"], ["--threshold"]),
    (["--cpm", "--margin", "2"], ["--margin", "[0, 1]"]),
    (["--cpm", "--margin", "-0.5"], ["--margin", "[0, 1]"]),
    (["--max-drop", "0"], ["--max-drop"]),
    (["--max-drop", "1.5"], ["--max-drop"]),
    (["--max-drop", "0.1", "--delta", "1"], ["--delta"]),
    (["--max-drop", "0.1", "--bound", "chernoff"], ["chernoff", "hb", "wsr"]),
    (["--min-support", "0"], ["--min-support"]),
    (["-t", "0.5", "--score", "logit"], ["logit", "head", "softmax"]),
    (["--budget", "0.5", "--max-drop", "0.1"], ["--budget", "--max-drop"]),
    (["--budget", "0"], ["--budget", "(0, 1]"]),
]


@pytest.mark.parametrize(("extra", "words"), CALIBRATE, ids=[" ".join(a) for a, _ in CALIBRATE])
def test_calibrate_bad_option(shared, tmp_path, extra, words):
    bundle = Path(shutil.copytree(shared[2], tmp_path / "bundle"))
    before = snapshot(bundle)
    line = fails_cleanly(runner.invoke(app, ["calibrate", "-b", str(bundle), *extra]))
    for word in words:
        assert word in line, (word, line)
    assert snapshot(bundle) == before  # the table is untouched


def test_calibrate_bad_device(shared, tmp_path):
    bundle = Path(shutil.copytree(shared[2], tmp_path / "bundle"))
    line = fails_cleanly(runner.invoke(app, ["calibrate", "-b", str(bundle), "-t", "0.5",
                                             "--device", "bogus"]))
    assert "--device" in line


# --------------------------------------------------------------------------- bench

BENCH = [
    (["--batch-size", "-1"], ["--batch-size"]),
    (["--latency-samples", "-1"], ["--latency-samples"]),
    (["--repeats", "0"], ["repeats"]),
    (["--max-samples", "0"], ["--max-samples"]),
    (["--threshold", "-1"], ["--threshold"]),
    (["--device", "bogus"], ["--device", "cpu"]),
]


@pytest.mark.parametrize(("extra", "words"), BENCH, ids=[" ".join(a) for a, _ in BENCH])
def test_bench_bad_option(shared, tmp_path, extra, words):
    bundle = Path(shutil.copytree(shared[2], tmp_path / "bundle"))
    before = snapshot(bundle)
    line = fails_cleanly(runner.invoke(app, ["bench", "-b", str(bundle), "--quiet", *extra]))
    for word in words:
        assert word in line, (word, line)
    assert snapshot(bundle) == before  # no bench.json or sweep files from a refused run


def test_attach_out_is_a_file(shared, tmp_path):
    data, ckpt, _ = shared
    out = tmp_path / "results.txt"
    out.write_text("keep me")
    result = runner.invoke(app, ["attach", "resnet20", "--data", str(data), "-c", str(ckpt),
                                 "--num-classes", "3", "-n", "2", "--branch", "pool",
                                 "--epochs", "1", "--quiet", "--out", str(out)])
    line = fails_cleanly(result)
    assert "--out" in line and str(out) in line
    assert out.read_text() == "keep me"


# --------------------------------------------------------------------------- usage errors


@pytest.mark.parametrize(("args", "words"), [
    (["attach"], ["Missing argument", "pteenet attach --help"]),
    (["calibrate", "--margin", "abc"], ["--margin", "pteenet calibrate --help"]),
    (["bench", "--bogus"], ["--bogus"]),
    (["--bogus"], ["--bogus", "pteenet --help"]),
    (["nosuch"], ["nosuch"]),
])
def test_usage_errors_are_one_line_like_ours(args, words):
    """Issue 13, item 9: typer drew a multi-line box around usage errors."""
    line = fails_cleanly(runner.invoke(app, args), 2)
    assert line.startswith("error (bad option):")
    for word in words:
        assert word in line, (word, line)


def test_help_is_still_help():
    result = runner.invoke(app, ["calibrate", "--help"])
    assert result.exit_code == 0 and "--threshold" in result.stdout
    result = runner.invoke(app, [])
    assert "Usage" in result.output and "error (" not in result.output


def test_input_size_beyond_the_limit_is_refused():
    """Issue 13, item 4: the limit a bundle's recorded input size is held to applies here too,
    so attach cannot write a bundle that load would refuse."""
    line = fails_cleanly(runner.invoke(app, ["inspect", "resnet20", "--input-size", "4096"]), 2)
    assert "--input-size 4096" in line and "2048" in line
