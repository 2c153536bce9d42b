"""bench warns, in one line, when the images it scores look unlike the calibration split."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pteenet.benchmark import bench, drift_warning, promise_warning
from pteenet.calibration import calibrate
from pteenet.jobs import attach
from pteenet.training import TrainConfig
from tests._helpers import CLASSES


def test_a_fall_beyond_noise_warns_and_noise_does_not():
    summary = {"agreement": 0.95, "num_samples": 2000}
    assert drift_warning(summary, 0.94, 1000) is None  # within sampling noise
    line = drift_warning(summary, 0.80, 1000)
    assert line and "80.0%" in line and "95.0%" in line and "calibrate --data" in line
    assert "\n" not in line
    assert drift_warning(summary, 0.80, 0) is None
    assert drift_warning({}, 0.5, 100) is None  # an uncalibrated table promises nothing


def test_a_loss_beyond_the_tables_max_drop_never_passes_silently():
    """Issue 27's case: 2.23 pt lost on ImageNet val where the pool-made table allowed 1 pt,
    with agreement (97.5 %) too close to the pool's for the drift check to fire."""
    params = {"max_drop": 0.01}
    line = promise_warning(params, 0.975, 0.0223, 1300)
    assert line and "2.2% top-1" in line and "1.0%" in line and "calibrate --data" in line
    assert promise_warning(params, 0.975, 0.012, 1300) is None  # within sampling noise
    assert promise_warning(params, 0.995, 0.003, 10000) is None  # CIFAR's defaults
    assert "agreement" in promise_warning(params, 0.95, None, 1000)  # no labels: agreement
    assert promise_warning({"max_drop": None}, 0.5, 0.4, 100) is None  # a table with no bound


@pytest.fixture(scope="module")
def bundle(tiny, tmp_path_factory):
    data, ckpt = tiny
    out = tmp_path_factory.mktemp("drift")
    attach("resnet20", data, checkpoint=ckpt, num_classes=3, branches=2, out=out, val_fraction=0.5,
           config=TrainConfig(epochs=6, batch_size=16), progress=False)
    calibrate(out, threshold=0.0)  # every image leaves at the first exit: agreement can move
    return out


def _unlike(root, n: int = 300):
    """Images of another world: smooth gradients in random hues, none of the training stripes."""
    rng = np.random.default_rng(5)
    ramp = np.linspace(0, 1, 32)[None, :, None]
    for split in ("train", "test"):
        for c in CLASSES:
            (root / split / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = (ramp * rng.integers(0, 256, 3) + (1 - ramp) * rng.integers(0, 256, 3))
            img = np.repeat(img, 32, 0).astype("uint8")
            Image.fromarray(img).save(root / split / CLASSES[i % 3] / f"{i:03d}.png")
    return root


def test_bench_warns_on_unlike_images_only(bundle, tiny, tmp_path):
    kw = dict(out_json=False, latency_samples=0, repeats=1, profile=False)
    like = bench(bundle, data=tiny[0], split="test", **kw)
    assert not any("unlike" in w for w in like.warnings)
    other = bench(bundle, data=_unlike(tmp_path / "other"), split="test", **kw)
    assert other.early_exit.agreement < like.early_exit.agreement
    assert [w for w in other.warnings if "look unlike the calibration split" in w]
