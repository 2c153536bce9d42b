"""A user's own nn.Module: retrofitted, saved, and loaded back onto the same module only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import pteenet
from pteenet.errors import BundleError
from pteenet.training import TrainConfig
from tests._helpers import fails_cleanly, write_images


class Net(nn.Module):
    """Not in any registry: four conv stages and a linear head, 32x32 inputs, 3 classes."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        chans = [3, 8, 16, 16, 32]
        self.stages = nn.Sequential(*[nn.Sequential(nn.Conv2d(a, b, 3, padding=1),
                                                    nn.BatchNorm2d(b), nn.ReLU())
                                      for a, b in zip(chans, chans[1:])])
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(x).mean((2, 3)))


@pytest.fixture(scope="module")
def attached(tmp_path_factory) -> tuple[Path, Net, pteenet.jobs.AttachResult]:
    root = tmp_path_factory.mktemp("custom")
    net = Net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    res = pteenet.attach(net, write_images(root / "data", per_class=8), input_size=(32, 32),
                         branches=2, out=root / "bundle", progress=False,
                         config=TrainConfig(epochs=1, batch_size=16))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    return root / "bundle", net, res


def test_a_custom_module_is_retrofitted_and_loads_back(attached):
    out, net, res = attached
    assert res.info.backbone["source"] == "custom" and res.info.backbone["name"] == "Net"
    x = torch.randn(4, 3, 32, 32)
    for model in (pteenet.load(out, model=net), pteenet.load(out, model=Net)):  # or a factory
        model.set_thresholds(2.0)  # every exit off: the model is the module itself
        assert torch.allclose(model(x).logits, net(x), atol=1e-5)
        model.set_thresholds(0.0)  # every sample leaves at the first exit
        assert (model(x).exit_index == 0).all()


def test_the_module_must_be_given_and_be_the_same(attached):
    out, _, _ = attached
    with pytest.raises(BundleError, match=r"your own module \(Net\); pass it back"):
        pteenet.load(out)
    with pytest.raises(BundleError, match="other weights"):
        pteenet.load(out, model=Net(seed=1))
    assert pteenet.load(out, model=Net(seed=1), force=True).num_branches == 2


def test_the_cli_says_it_needs_the_module(attached, invoke):
    out, _, _ = attached
    line = fails_cleanly(invoke("bench", "-b", str(out)), 3)
    assert "your own module (Net)" in line


def test_calibrate_bench_and_export_take_the_module(attached, tmp_path):
    import shutil

    out = Path(shutil.copytree(attached[0], tmp_path / "b"))
    net = attached[1]
    res = pteenet.calibrate(out, model=net, max_drop=0.05)
    assert res.table.thresholds.shape == (2, 3)
    report = pteenet.bench(out, model=net, latency_samples=2, repeats=1, profile=False)
    assert report.backbone.agreement == 1.0
    folder = pteenet.export(out, model=net)
    assert (folder / "manifest.json").is_file()
    with pytest.raises(BundleError, match="your own module"):
        pteenet.export(out, out=tmp_path / "no")
