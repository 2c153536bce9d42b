"""Shared fixtures: the ../shared test material (skipped cleanly when absent) and the CLI runner."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CIFAR_TEST_TAR = SHARED / "data" / "cifar10-jpeg" / "test.tar.gz"
CIFAR_WEIGHTS = SHARED / "weights" / "cifar-resnet"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The ``../shared`` folder beside the repository root, or skip."""
    if not SHARED.is_dir():
        pytest.skip(f"shared test material not found at {SHARED}")
    return SHARED


@pytest.fixture(scope="session")
def cifar_test_dir(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``test.tar.gz`` extracted once per session; returns its ``test/`` folder of classes."""
    if not CIFAR_TEST_TAR.is_file():
        pytest.skip(f"{CIFAR_TEST_TAR} not found")
    dest = tmp_path_factory.mktemp("cifar10-jpeg")
    with tarfile.open(CIFAR_TEST_TAR) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
        else:  # pragma: no cover - Python without extraction filters
            tar.extractall(dest)  # noqa: S202
    test_dir = dest / "test"
    if not test_dir.is_dir():
        pytest.fail(f"{CIFAR_TEST_TAR} has no test/ folder")
    return test_dir


@pytest.fixture
def cli_runner() -> CliRunner:
    # Click >= 8.2 always keeps stderr apart: result.stdout, result.stderr, result.output (both).
    return CliRunner()


@pytest.fixture
def invoke(cli_runner: CliRunner):
    """Run the ``pteenet`` app with a list of arguments; returns click's ``Result``."""
    from pteenet_cli.app import app

    def run(*args: str):
        return cli_runner.invoke(app, [str(a) for a in args])

    return run
