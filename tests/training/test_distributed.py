"""Two CPU processes (gloo, torchrun) train the same branches as one process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from pteenet.bundle import load, read_info


def _attach(args: list[str], nproc: int, tmp) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                "--master-port", str(29500 + os.getpid() % 1000)] if nproc > 1 else \
        [sys.executable]
    return subprocess.run([*launcher, "-m", "pteenet", "attach", *args], env=env, cwd=tmp,
                          capture_output=True, text=True, timeout=600)


def _ranks_log(stderr: str) -> str:
    """A failed torchrun's log: its start (where a rank says why it died) and its end."""
    return stderr if len(stderr) <= 6000 else f"{stderr[:4000]}\n[...]\n{stderr[-2000:]}"


def _common(data, ckpt, extra: list[str]) -> list[str]:
    """The attach arguments both distributed tests run (one and two processes alike)."""
    return ["resnet20", "--data", str(data), "--checkpoint", str(ckpt), "--num-classes", "3",
            "--branches", "2", "--branch", "sdn", "--epochs", "2", "--batch-size", "16",
            "--views", "1", "--quiet", *extra]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--boosted", "hard", "--margin", "0.5"]])
def test_two_gloo_processes_match_one(tiny, tmp_path, extra):
    data, ckpt = tiny
    common = _common(data, ckpt, extra)
    one = _attach([*common, "--out", str(tmp_path / "one")], 1, tmp_path)
    assert one.returncode == 0, one.stderr
    two = _attach([*common, "--out", str(tmp_path / "two")], 2, tmp_path)
    assert two.returncode == 0, _ranks_log(two.stderr)
    assert two.stdout.count(" exits (") == 1  # only rank 0 reports
    a = load(tmp_path / "one").branches.state_dict()
    b = load(tmp_path / "two").branches.state_dict()
    for k, v in a.items():
        assert torch.allclose(v, b[k], rtol=1e-4, atol=1e-5), k
    ia, ib = read_info(tmp_path / "one"), read_info(tmp_path / "two")
    assert ia.calibration_indices == ib.calibration_indices
    assert ia.training["survivors"] == ib.training["survivors"]
    assert ia.training["losses"] == pytest.approx(ib.training["losses"], rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--boosted", "hard", "--margin", "0.5"]])
def test_two_processes_resume_a_one_process_run(tiny, tmp_path, monkeypatch, extra):
    """One process is interrupted after its first saved state; two processes resume it (rank 0
    writes the state, every rank reads it) and end where an uninterrupted run ends."""
    from pteenet_cli.app import app
    from typer.testing import CliRunner

    from pteenet.training import Resume

    data, ckpt = tiny
    common = _common(data, ckpt, extra)
    one = _attach([*common, "--out", str(tmp_path / "one")], 1, tmp_path)
    assert one.returncode == 0, one.stderr

    def stop(self, state, done):
        real(self, state, done)
        raise KeyboardInterrupt

    real = Resume._write
    monkeypatch.setattr(Resume, "_write", stop)
    out = tmp_path / "two"
    cut = CliRunner().invoke(app, ["attach", *common, "--resume", "--out", str(out)])
    assert cut.exit_code == 130 and "--resume" in cut.stderr, cut.output
    assert (out / ".attach-state.pt").is_file()
    two = _attach([*common, "--resume", "--out", str(out)], 2, tmp_path)
    assert two.returncode == 0, _ranks_log(two.stderr)
    assert not (out / ".attach-state.pt").exists()
    a = load(tmp_path / "one").branches.state_dict()
    b = load(out).branches.state_dict()
    for k, v in a.items():
        assert torch.allclose(v, b[k], rtol=1e-4, atol=1e-5), k
    assert read_info(tmp_path / "one").training["losses"] == pytest.approx(
        read_info(out).training["losses"], rel=1e-5)
