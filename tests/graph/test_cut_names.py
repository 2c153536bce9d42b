"""Cuts are named by module path (``layer2.1``), as torchvision's ``get_graph_node_names``
does, not by fx node names (``relu_14``); bundles that recorded node names still load."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import pteenet
from pteenet.backbone import cifar_resnet
from pteenet.bundle import BRANCHES_FILE, read_info
from pteenet.graph import trace_backbone
from tests._helpers import (
    reseal,
)

FX_NAME = re.compile(r"^(relu|add)_\d+$")


@pytest.fixture(scope="module")
def trace():
    return trace_backbone(cifar_resnet("resnet20", num_classes=3), (32, 32), with_thop=False)


def test_block_outputs_are_named_by_module_path(trace):
    names = [c.name for c in trace.cuts]
    modules = dict(trace.model.named_modules())
    blocks = [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)]
    assert [n for n in names if n in modules and "." in n] == blocks
    assert not [n for n in names if FX_NAME.match(n)], names
    assert "layer1.0.add" in names  # inside a block: the op's name within its module
    assert len(set(names)) == len(names)


def test_old_node_names_still_find_their_cut(trace):
    block = trace.cut("layer1.0")
    assert FX_NAME.match(block.node)
    assert trace.cut(block.node) is block


def test_module_cuts_take_the_same_names(trace):
    """``--cuts layer1.2,layer2.2`` keeps those modules whole; the cuts carry the names and the
    FLOPs the automatic trace gives the same places."""
    named = trace_backbone(trace.model, (32, 32), cuts=["layer1.2", "layer2.2"],
                           with_thop=False)
    assert [(c.name, c.flops, c.shape) for c in named.cuts] == \
        [(c.name, c.flops, c.shape) for c in map(trace.cut, ["layer1.2", "layer2.2"])]


def test_bundle_with_fx_node_names_loads(shared, tmp_path, trace):
    """A bundle written before module-path names (its metadata lists fx node names) loads
    into the same model as one that records the new names."""
    new = Path(shutil.copytree(shared[2], tmp_path / "new"))
    old = Path(shutil.copytree(shared[2], tmp_path / "old"))
    f = old / BRANCHES_FILE
    with safe_open(str(f), "pt") as h:
        meta = json.loads(h.metadata()["pteenet"])
    assert not any(FX_NAME.match(c) for c in meta["cuts"])
    meta["cuts"] = [trace.cut(c).node for c in meta["cuts"]]
    assert all(FX_NAME.match(c) for c in meta["cuts"]), meta["cuts"]
    save_file(load_file(str(f)), str(f), metadata={"pteenet": json.dumps(meta)})
    reseal(old)
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    a, b = pteenet.load(new), pteenet.load(old)
    assert read_info(old).cuts == meta["cuts"]
    for m in (a, b):
        m.set_thresholds(0.0)  # every sample leaves at the first branch: the branch counts
    assert torch.equal(a(x).logits, b(x).logits)
    a.set_thresholds(2.0)
    b.set_thresholds(2.0)
    assert torch.equal(a(x).logits, b(x).logits)


def test_inspect_shows_module_paths():
    from pteenet_cli.app import app
    from typer.testing import CliRunner

    result = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["inspect", "resnet20",
                                                            "--no-pretrained"])
    assert result.exit_code == 0, result.output
    assert "layer2.1" in result.stdout and "layer1.0.add" in result.stdout
    assert not re.search(r"\b(relu|add)_\d+\b", result.stdout), result.stdout
