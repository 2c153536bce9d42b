"""Shared fixtures: the ../shared test material (skipped cleanly when absent), the CLI runner,
one torch thread per test module, and the small real bundles most tests start from."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests._helpers import cli, shared_bundle, train_backbone, write_images

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
def invoke():
    """Run the ``pteenet`` app with a list of arguments; returns click's ``Result``."""
    return cli


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Torch's two threads stall each other when other jobs share the cores; tests that time
    nothing run faster and steadier on one (tests that time things set their own)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", name="shared")
def shared_fixture(tmp_path_factory) -> tuple[Path, Path, Path]:
    """:func:`tests._helpers.shared_bundle`: (data, checkpoint, bundle), never modified."""
    return shared_bundle(tmp_path_factory)


@pytest.fixture(name="bundle")
def bundle_copy(shared, tmp_path) -> Path:
    """A private copy of the shared bundle, to spoil (the ``bundle`` fixture)."""
    import shutil

    return Path(shutil.copytree(shared[2], tmp_path / "bundle"))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """(data folder with train/ and test/, trained resnet20 checkpoint)."""
    root = tmp_path_factory.mktemp("tiny")
    data = write_images(root / "data")
    return data, train_backbone(data, root / "resnet20-tiny.pt")
