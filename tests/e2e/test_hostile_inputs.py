"""Issue 29, through the Python API: every hostile input is one PteenetError line, and nothing of
the user's is touched. Each test reproduces one attack of the issue (its item number in the name)
and went red before its fix; the CLI side is tests/e2e/test_attack_table.py."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pteenet_cli.app import app
from safetensors import SafetensorError
from typer.testing import CliRunner

import pteenet
from pteenet.bundle import MEMBERS, THRESHOLDS_FILE, bundle_hash, remove_stale
from pteenet.errors import BundleError, DataError, OptionError
from pteenet.runtime import MANIFEST, Cascade
from pteenet.storage import LOCK_FILE, commit_files, writer_lock

runner = CliRunner()


@pytest.fixture(scope="module")
def export(shared, tmp_path_factory) -> Path:
    """An ONNX export of the shared bundle, made once; copy it before spoiling it."""
    out = tmp_path_factory.mktemp("hostile-export") / "export"
    result = runner.invoke(app, ["export", "-b", str(shared[2]), "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def spoilable(export, tmp_path) -> Path:
    return Path(shutil.copytree(export, tmp_path / "export"))


def edit_manifest(folder: Path, edit) -> None:
    doc = json.loads((folder / MANIFEST).read_text())
    edit(doc)
    (folder / MANIFEST).write_text(json.dumps(doc))


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


# --------------------------------------------------------------------------- storage


def test_1_a_symlinked_lock_is_refused_and_its_target_untouched(bundle, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    (bundle / LOCK_FILE).symlink_to(notes)
    with pytest.raises(BundleError, match="not a plain file"), writer_lock(bundle):
        pass
    assert notes.read_text() == "my notes\n"
    result = runner.invoke(app, ["calibrate", "-b", str(bundle), "-t", "0.5"])
    assert result.exit_code == 3 and "not a plain file" in result.stderr, result.output
    assert notes.read_text() == "my notes\n"


def test_1_a_hard_linked_lock_is_refused(bundle, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    os.link(notes, bundle / LOCK_FILE)
    with pytest.raises(BundleError, match="not a plain file"), writer_lock(bundle):
        pass
    assert notes.read_text() == "my notes\n"


def test_2_files_that_record_no_replaced_bundle_are_the_users(tmp_path):
    """A folder that held no bundle: its bench.json, sweep files and export-*/ are the user's."""
    (tmp_path / "bench.json").write_text('{"mine": true}')
    (tmp_path / "sweep.png").write_bytes(b"png")
    (tmp_path / "sweep.csv").write_text("a,b\n")
    (tmp_path / "export-mine").mkdir()
    (tmp_path / "export-mine" / "manifest.json").write_text('{"files": {"x": ["a.onnx"]}}')
    (tmp_path / "export-mine" / "a.onnx").write_bytes(b"mine")
    before = digest(tmp_path)
    assert remove_stale(tmp_path, None) == []
    assert remove_stale(tmp_path, "0" * 64) == []  # they record no hash: not of that bundle
    assert digest(tmp_path) == before


def test_2_only_files_of_the_replaced_bundle_go(bundle):
    old = bundle_hash(bundle)
    (bundle / "bench.json").write_text(json.dumps({"bundle": {"sha256": old}}))
    (bundle / "export-other").mkdir()
    (bundle / "export-other" / "manifest.json").write_text(
        json.dumps({"bundle_sha256": "f" * 64, "files": {}}))
    assert remove_stale(bundle, old) == []  # still the current bundle: nothing replaced
    (bundle / MEMBERS[0]).touch()  # any change that gives the folder a new bundle.json
    doc = json.loads((bundle / "bundle.json").read_text())
    doc["replaced"] = True
    (bundle / "bundle.json").write_text(json.dumps(doc))
    assert remove_stale(bundle, old) == ["bench.json"]
    assert (bundle / "export-other" / "manifest.json").exists()


def _sealed_disk_full(path: Path) -> None:
    """What safetensors raises on a full disk (its own type, the OS error in its text)."""
    path.write_bytes(b"half a file")
    raise SafetensorError("Error while serializing: I/O error: No space left on device "
                          "(os error 28)")


def test_4_a_full_disk_in_a_library_writer_is_cannot_write(bundle):
    before = digest(bundle)
    with pytest.raises(BundleError, match="cannot write into .*No space left on device"):
        commit_files(bundle, {THRESHOLDS_FILE: _sealed_disk_full}, MEMBERS)
    assert digest(bundle) == before


def test_4_a_full_disk_while_writing_a_single_file(tmp_path):
    from pteenet.storage import atomic_path

    with pytest.raises(BundleError, match="cannot write into"), \
            atomic_path(tmp_path / "bench.json"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert list(tmp_path.iterdir()) == []


def test_8_a_deleted_committed_table_is_refused(bundle):
    (bundle / THRESHOLDS_FILE).unlink()
    with pytest.raises(BundleError, match="thresholds.json missing.*deleted"):
        pteenet.load(bundle)


# --------------------------------------------------------------------------- runtime


def test_7_a_manifest_without_hashes_is_malformed(spoilable):
    edit_manifest(spoilable, lambda d: d.pop("sha256"))
    with pytest.raises(BundleError, match="malformed"):
        Cascade.open(spoilable)


def test_7_a_graph_missing_from_the_hashes_is_refused(spoilable):
    edit_manifest(spoilable, lambda d: d["sha256"].pop("segment_1.onnx"))
    with pytest.raises(BundleError, match="does not match"):
        Cascade.open(spoilable)


@pytest.mark.parametrize(("name", "edit"), [
    ("mean-of-5", lambda d: d.update(mean=[0.5] * 5)),
    ("std-of-zeros", lambda d: d.update(std=[0, 0, 0])),
    ("std-nan", lambda d: d.update(std=[float("nan")] * 3)),
    ("active-wrong-length", lambda d: d.update(active=[True])),
    ("active-yes", lambda d: d.update(active="yes")),
    ("classes-wrong-length", lambda d: d.update(classes=["a"])),
])
def test_9_manifest_fields_are_validated(spoilable, name, edit):
    edit_manifest(spoilable, edit)
    with pytest.raises(BundleError, match="malformed"):
        Cascade.open(spoilable)


@pytest.mark.parametrize("value", [-5, -0.1, float("nan")])
def test_9_the_thresholds_setter_refuses_what_no_exit_rule_means(export, value):
    cascade = Cascade.open(export)
    with pytest.raises(OptionError, match="numbers >= 0"):
        cascade.thresholds = np.full(cascade.thresholds.shape, value)


def test_9_a_threshold_above_one_is_kept_as_never_and_saved(bundle, tmp_path):
    """Scores lie in [0, 1]: 2.0 never fires, and a bundle saved with it reads back (the
    reader takes [0, 1] or null)."""
    from pteenet.bundle import read_info, save_bundle

    model = pteenet.load(bundle)
    model.set_thresholds(2.0)
    assert torch.isinf(model.thresholds).all()
    save_bundle(tmp_path / "b", model, read_info(bundle))
    assert torch.isinf(pteenet.load(tmp_path / "b").thresholds).all()
    with pytest.raises(OptionError):
        model.set_thresholds(-5)


def test_10_the_runtime_refuses_what_is_not_images(export):
    cascade = Cascade.open(export)
    for bad in (np.array([["a", "b"]]), "images", np.zeros((2, 3, 8, 8), np.float32)):
        with pytest.raises(OptionError, match="images must be"):
            cascade(bad)


def test_10_preprocess_errors_are_data_errors(export, tmp_path):
    cascade = Cascade.open(export)
    (tmp_path / "not-an-image.png").write_text("text")
    bomb = tmp_path / "bomb.png"
    Image.new("RGB", (64, 64)).save(bomb)
    cases = [tmp_path / "missing.png", tmp_path / "not-an-image.png", 42]
    for item in cases:
        with pytest.raises(DataError, match="cannot read image|takes PIL images"):
            cascade.preprocess([item])
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 64 * 64 // 4  # over twice the limit: Pillow's bomb error
    try:
        with pytest.raises(DataError, match="DecompressionBombError"):
            cascade.preprocess([bomb])
    finally:
        Image.MAX_IMAGE_PIXELS = limit


# --------------------------------------------------------------------------- the model


@pytest.mark.parametrize(("name", "make"), [
    ("one-channel", lambda: torch.rand(2, 1, 32, 32)),
    ("3-d", lambda: torch.rand(3, 32, 32)),
    ("float64", lambda: torch.rand(2, 3, 32, 32, dtype=torch.float64)),
    ("uint8", lambda: torch.zeros(2, 3, 32, 32, dtype=torch.uint8)),
    ("numpy", lambda: np.zeros((2, 3, 32, 32), np.float32)),
    ("meta", lambda: torch.empty(2, 3, 32, 32, device="meta")),
])
def test_10_the_model_refuses_what_it_cannot_run(shared, name, make):
    model = pteenet.load(shared[2])
    for mode in (model.eval(), model.train()):
        with pytest.raises(OptionError, match="the model takes"):
            mode(make())
