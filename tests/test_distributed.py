"""Two CPU processes (gloo, torchrun) train the same branches as one process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from pteenet.bundle import load, read_info
from tests._helpers import tiny  # noqa: F401  (fixture)


def _attach(args: list[str], nproc: int, tmp) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                "--master-port", str(29500 + os.getpid() % 1000)] if nproc > 1 else \
        [sys.executable]
    return subprocess.run([*launcher, "-m", "pteenet", "attach", *args], env=env, cwd=tmp,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--boosted", "hard", "--margin", "0.5"]])
def test_two_gloo_processes_match_one(tiny, tmp_path, extra):  # noqa: F811
    data, ckpt = tiny
    common = ["resnet20", "--data", str(data), "--checkpoint", str(ckpt), "--num-classes", "3",
              "--branches", "2", "--branch", "sdn", "--epochs", "2", "--batch-size", "16",
              "--quiet", *extra]
    one = _attach([*common, "--out", str(tmp_path / "one")], 1, tmp_path)
    assert one.returncode == 0, one.stderr
    two = _attach([*common, "--out", str(tmp_path / "two")], 2, tmp_path)
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count(" exits (") == 1  # only rank 0 reports
    a = load(tmp_path / "one").branches.state_dict()
    b = load(tmp_path / "two").branches.state_dict()
    for k, v in a.items():
        assert torch.allclose(v, b[k], atol=1e-5), k
    ia, ib = read_info(tmp_path / "one"), read_info(tmp_path / "two")
    assert ia.calibration_indices == ib.calibration_indices
    assert ia.training["survivors"] == ib.training["survivors"]
    assert ia.training["losses"] == pytest.approx(ib.training["losses"], rel=1e-5)
