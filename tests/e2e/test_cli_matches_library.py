"""A thin CLI (issue 16): fixed choices listed by ``--help``, library errors that name
parameters and a CLI that shows them as options, calibrate's rows computed by the library."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import pteenet
from pteenet.calibration import calibrate
from pteenet.choices import BOUNDS, BRANCH_TYPES, COSTS, FORMATS, LOSSES, POLICIES, TARGETS
from pteenet.errors import OptionError, PlacementError
from tests._helpers import (
    fails_cleanly,
)

WIDE = {"COLUMNS": "240", "TERMINAL_WIDTH": "240"}


def run(*args: str):
    from pteenet_cli.app import app

    return CliRunner(env=WIDE).invoke(app, [str(a) for a in args])


@pytest.mark.parametrize(("command", "flag", "values"), [
    ("attach", "--branch", BRANCH_TYPES),
    ("attach", "--placement", POLICIES),
    ("attach", "--target", TARGETS),
    ("attach", "--loss", LOSSES),
    ("attach", "--boosted", ("hard", "soft")),
    ("attach", "--cost", COSTS),
    ("inspect", "--placement", POLICIES),
    ("calibrate", "--score", ("softmax", "head")),
    ("calibrate", "--bound", BOUNDS),
    ("calibrate", "--cost", COSTS),
    ("bench", "--split", ("train", "test", "val")),
    ("export", "--format", FORMATS),
])
def test_help_lists_every_choice(command, flag, values):
    result = run(command, "--help")
    assert result.exit_code == 0, result.output
    line = next(ln for ln in result.stdout.splitlines() if f" {flag} " in ln)
    assert f"<{'|'.join(values)}>" in line, line


@pytest.mark.parametrize(("args", "words"), [
    (["calibrate", "--bound", "xx"], ["--bound", "xx", "wsr", "hb"]),
    (["calibrate", "--score", "gate"], ["--score", "softmax", "head"]),
    (["export", "--format", "png"], ["--format", "onnx", "torchscript"]),
    (["bench", "--split", "dev"], ["--split", "train", "test"]),
])
def test_a_bad_choice_is_one_line(args, words):
    line = fails_cleanly(run(*args), 2)
    for word in words:
        assert word in line, (word, line)


def test_library_error_names_the_parameter_and_the_cli_the_option(bundle):
    with pytest.raises(OptionError) as info:
        calibrate(bundle, max_drop=1.5)
    assert "`max_drop`" in str(info.value) and "--max-drop" not in str(info.value)
    line = fails_cleanly(run("calibrate", "-b", bundle, "--max-drop", "1.5"), 2)
    assert "--max-drop must lie" in line and "`max_drop`" not in line


def test_conflicting_options_are_named_as_options(bundle):
    with pytest.raises(OptionError) as info:
        calibrate(bundle, threshold=0.5, cpm=True)
    assert "`threshold` cannot be combined with `cpm`" in str(info.value)
    line = fails_cleanly(run("calibrate", "-b", bundle, "-t", "0.5", "--cpm"), 2)
    assert "--threshold cannot be combined with --cpm, --max-drop, --budget or --risk" in line


def test_placement_error_from_attach_shows_the_option(shared, tmp_path):
    """The library says `at`; attach's line says --at (the command's own option)."""
    data, ckpt, _ = shared
    with pytest.raises(PlacementError, match="`at` fractions must be distinct"):
        pteenet.attach("resnet20", data, checkpoint=ckpt, at=[0.6, 0.3], out=tmp_path / "a",
                       progress=False)
    line = fails_cleanly(run("attach", "resnet20", "-d", data, "-c", ckpt, "--at", "0.6,0.3",
                             "-o", tmp_path / "b", "-q"), 2)
    assert "--at fractions must be distinct" in line


def test_calibrate_rows_come_from_the_library(bundle):
    """Per exit: the threshold (None where it differs by class), the share it takes (summing
    to 1), the agreement there and the cost of leaving there, the backbone last."""
    res = calibrate(bundle, threshold=0.5, write=False)
    rows = res.exit_rows()
    assert [r["branch"] for r in rows] == [0, 1, None]
    assert [r["threshold"] for r in rows[:-1]] == [0.5, 0.5]
    assert sum(r["share"] for r in rows) == pytest.approx(1.0)
    assert [r["cost"] for r in rows] == res.outputs.exit_costs(res.table.thresholds)
    assert [r["share"] for r in rows] == [e["share"] for e in res.summary["exits"]]
    res.table.thresholds[1, 0] = 0.9  # one class differs: the branch has no single threshold
    assert res.exit_rows()[1]["threshold"] is None
    named = res.named_rows()
    assert {r["class_name"] for r in named} == set(res.classes or ["0", "1", "2"])
    assert torch.equal(torch.tensor([r["threshold"] for r in res.rows[:3]]),
                       res.table.thresholds[0].double())
