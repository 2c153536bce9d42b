"""Tiny real data and a tiny really-trained backbone, shared by the tests (written to disk)."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pteenet.backbone import IMAGENET_MEAN, IMAGENET_STD, Preprocess, cifar_resnet
from pteenet.data import make_loader, open_data

CLASSES = ("blue", "green", "red")
PRE = Preprocess((32, 32), IMAGENET_MEAN, IMAGENET_STD)


def block_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every attempt to resolve or connect fails at once, so no test can hang on the network."""

    def refuse(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def write_images(root: Path, per_class: int = 24, seed: int = 0,
                 splits: tuple[str, ...] = ("train", "test")) -> Path:
    """Noisy 32x32 images whose dominant colour is the class: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    for split in splits:
        for c, name in enumerate(CLASSES):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = rng.integers(0, 90, (32, 32, 3))
                img[..., 2 - c] += rng.integers(80, 160)
                img[rng.integers(0, 32, 8), :, c] = 255  # stripes make early features useful
                Image.fromarray(img.clip(0, 255).astype("uint8")).save(d / f"{i:03d}.png")
    return root


def train_backbone(data_root: Path, path: Path, steps: int = 20, seed: int = 0) -> Path:
    """A resnet20 with a 3-class head, trained briefly so its predictions are meaningful."""
    torch.manual_seed(seed)
    model = cifar_resnet("resnet20", num_classes=len(CLASSES))
    data = open_data(data_root, PRE, split="train")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loader = make_loader(data, batch_size=32, shuffle=True, seed=seed)
    done = 0
    while done < steps:
        for batch in loader:
            loss = torch.nn.functional.cross_entropy(model(batch.images), batch.labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
            if done >= steps:
                break
    model.eval()
    torch.save(model.state_dict(), path)
    return path


def fails_cleanly(result, code: int = 2) -> str:
    """Exit ``code``, exactly one line on stderr (ours, not an internal error), no traceback."""
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output and "Traceback" not in result.stderr
    assert lines[0].startswith("error"), lines[0]
    return lines[0]


def shared_bundle(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(data, checkpoint, bundle): real images, a real untrained resnet20 3-class checkpoint and
    a 2-branch bundle trained on them for one epoch. Made once per session and shared by the
    error and attack tests; never modified: copy it first."""
    from pteenet.jobs import attach
    from pteenet.training import TrainConfig

    root = tmp_path_factory.getbasetemp() / "errors-shared"
    if not (root / "done").exists():
        import shutil

        shutil.rmtree(root, ignore_errors=True)
        data = write_images(root / "data", per_class=8)
        torch.manual_seed(0)
        torch.save(cifar_resnet("resnet20", num_classes=3).state_dict(), root / "resnet20-3.pt")
        attach("resnet20", data, checkpoint=root / "resnet20-3.pt", num_classes=3, branches=2,
               branch="pool", out=root / "bundle", val_fraction=0.25,
               config=TrainConfig(epochs=1, batch_size=16), progress=False)
        (root / "done").touch()
    return root / "data", root / "resnet20-3.pt", root / "bundle"


def reseal(bundle: Path) -> None:
    """Record a bundle's files as they now are in its bundle.json, as someone who edits a bundle
    and knows the format would: the checks behind the manifest must hold on their own."""
    import hashlib
    import json

    from pteenet.storage import MANIFEST

    doc = json.loads((bundle / MANIFEST).read_text())
    for name in doc["files"]:
        f = bundle / name
        if f.is_file():
            doc["files"][name] = {"sha256": hashlib.sha256(f.read_bytes()).hexdigest(),
                                  "size": f.stat().st_size}
    (bundle / MANIFEST).write_text(json.dumps(doc))


def uncalibrate(bundle: Path) -> None:
    """Remove the threshold table and its entries in bundle.json: a bundle that was never
    calibrated (a deleted table that bundle.json still records is refused instead)."""
    import json

    from pteenet.storage import MANIFEST

    doc = json.loads((bundle / MANIFEST).read_text())
    for name in ("thresholds.json", "thresholds.csv"):
        (bundle / name).unlink(missing_ok=True)
        doc["files"].pop(name, None)
    (bundle / MANIFEST).write_text(json.dumps(doc))


def kill_when(proc: subprocess.Popen, ready: Callable[[], bool], *, timeout: float = 120,
              poll: float = 0.002, meanwhile: Callable[[], None] | None = None) -> None:
    """SIGKILL ``proc`` the moment ``ready()`` holds (it must still be running then and get
    there within ``timeout`` s); ``meanwhile`` runs on every poll. The process is always reaped
    and its stderr closed."""
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            if meanwhile:
                meanwhile()
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the moment to kill never came"
            time.sleep(poll)
        proc.kill()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def cli(*args: object):
    """Run the ``pteenet`` app in-process with ``args``; returns click's ``Result`` (the
    :func:`invoke` fixture, for module-level helpers and property tests)."""
    from pteenet_cli.app import app
    from typer.testing import CliRunner

    return CliRunner().invoke(app, [str(a) for a in args])
