"""A bundle is read once, its checkpoint hashed once, its recorded FLOPs never counted again
(issue 16: one ``Bundle`` value passed down)."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import pteenet
from pteenet.backbone import _registry as backbones
from pteenet.bundle import BRANCHES_FILE, THRESHOLDS_FILE, read_bundle
from pteenet.bundle import _load as bundle
from pteenet.storage import MANIFEST

WATCHED = (BRANCHES_FILE, THRESHOLDS_FILE, MANIFEST)


@pytest.fixture
def watch(shared, tmp_path, monkeypatch):
    """A private copy of the shared bundle, and counters of what touches it: opens of each
    bundle file, hashes of the checkpoint, backbones built."""
    folder = Path(shutil.copytree(shared[2], tmp_path / "bundle")).resolve()
    seen: Counter[str] = Counter()
    real_open, real_hash, real_build = Path.open, backbones.sha256_file, bundle.create_backbone

    def opening(self, *args, **kwargs):
        p = Path(self).resolve()
        if p.parent == folder and p.name in WATCHED:
            seen[p.name] += 1
        return real_open(self, *args, **kwargs)

    def hashing(path):
        seen["checkpoint hashed"] += 1
        return real_hash(path)

    def building(*args, **kwargs):
        seen["backbone built"] += 1
        return real_build(*args, **kwargs)

    monkeypatch.setattr(Path, "open", opening)
    monkeypatch.setattr(backbones, "sha256_file", hashing)
    monkeypatch.setattr(bundle, "sha256_file", hashing)
    monkeypatch.setattr(bundle, "create_backbone", building)
    return folder, seen


ONCE = {name: 1 for name in WATCHED} | {"checkpoint hashed": 1, "backbone built": 1}


def test_load_reads_each_file_once(watch):
    folder, seen = watch
    pteenet.load(folder)
    assert seen == ONCE


def test_bench_reads_builds_and_hashes_once(watch):
    folder, seen = watch
    report = pteenet.bench(folder, batch_size=16, latency_samples=2, repeats=1,
                           out_json=False, profile=False)
    assert seen == ONCE
    assert report.bundle["sha256"] == read_bundle(folder).sha256  # the generation measured


def test_load_counts_no_flops(watch, monkeypatch):
    """The model's FLOPs are the recorded ones: load never enters a FLOP counter."""
    folder, _ = watch
    entered = []
    real_enter = FlopCounterMode.__enter__

    def entering(self):
        entered.append(self)
        return real_enter(self)

    monkeypatch.setattr(FlopCounterMode, "__enter__", entering)
    b = read_bundle(folder)
    model = pteenet.load(b)
    assert entered == []
    assert model.segment_flops == b.info.segment_flops
    assert model.branch_flops == [br["flops"] for br in b.info.branches]
    assert not hasattr(model, "info")  # the bundle is read into values the model does not hold


def test_bundle_value_is_what_load_builds_from(watch):
    """A ``Bundle`` read once gives the same model as the folder itself."""
    folder, _ = watch
    b = read_bundle(folder)
    x = torch.randn(4, 3, 32, 32)
    a, c = pteenet.load(folder)(x), pteenet.load(b)(x)
    assert torch.equal(a.logits, c.logits) and torch.equal(a.exit_index, c.exit_index)
    assert torch.equal(b.table.thresholds, pteenet.load(b).thresholds)
