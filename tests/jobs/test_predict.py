"""``pteenet predict`` / ``pteenet.predict``: per image the class by name, its probability, the
exit that answered and the FLOPs spent, from the bundle (torch) or from an exported cascade
(no torch imported); unreadable images skipped and counted (issue 31, item 1)."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pteenet import PredictResult, predict
from pteenet.errors import DataError, OptionError
from pteenet.jobs import find_images
from tests._helpers import fails_cleanly, train_backbone, write_images


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(images with one unreadable file, bundle, its ONNX export)."""
    from pteenet.exporter import export
    from pteenet.jobs import attach
    from pteenet.training import TrainConfig

    root = tmp_path_factory.mktemp("predict")
    data = write_images(root / "data", per_class=8)
    ckpt = train_backbone(data, root / "r20.pt", steps=10)
    attach("resnet20", data, checkpoint=ckpt, branches=2, branch="pool", out=root / "bundle",
           config=TrainConfig(epochs=1, batch_size=16), progress=False)
    images = root / "images"
    shutil.copytree(data / "test", images)
    (images / "red" / "broken.jpg").write_bytes(b"not a jpeg")
    return images, root / "bundle", export(root / "bundle", out=root / "export")


def test_python_api_names_exits_and_flops(made):
    images, bundle, _ = made
    res = predict(images, bundle, top_k=2, batch_size=10)
    assert isinstance(res, PredictResult) and res.engine == "bundle"
    assert len(res.predictions) == 24 and res.skipped == [str(images / "red" / "broken.jpg")]
    p = res.predictions[0]
    assert p.label in ("blue", "green", "red") and p.path.endswith("blue/000.png")
    assert [c for c, _ in p.top_k][0] == p.label and len(p.top_k) == 2
    assert p.top_k[0][1] >= p.top_k[1][1] and p.score == p.top_k[0][1]
    assert res.exit_names == ["branch 0", "branch 1", "backbone"]
    assert all(q.exit_name == res.exit_names[q.exit] for q in res.predictions)
    backbone = [q for q in res.predictions if q.exit_name == "backbone"]
    assert all(q.relative_flops >= 1 for q in backbone)  # the branches tried are counted
    assert sum(res.exit_shares) == pytest.approx(1)
    line = res.summary()
    assert "24 images" in line and "images/s" in line and "1 unreadable skipped" in line


@pytest.mark.parametrize("threshold", [0.0, 2.0])
def test_the_export_answers_as_the_bundle(made, threshold):
    """Same classes, exits and FLOPs per image from onnxruntime as from torch, also with a
    global threshold (0: the first exit that is on takes all; 2: none leaves early)."""
    images, bundle, exported = made
    a = predict(images, bundle, threshold=threshold)
    b = predict(images, export=exported, threshold=threshold)
    assert b.engine == "export" and b.skipped == a.skipped
    assert [(p.path, p.label, p.exit) for p in a.predictions] == \
        [(p.path, p.label, p.exit) for p in b.predictions]
    assert [p.relative_flops for p in a.predictions] == \
        pytest.approx([p.relative_flops for p in b.predictions])
    exits = {p.exit for p in a.predictions}
    assert exits == ({2} if threshold > 1 else {min(exits)}) and (threshold > 1 or 2 not in exits)


def test_globs_files_and_folders(made):
    images, _, _ = made
    pattern = str(images / "*" / "00[01].png")
    found = find_images([pattern, images / "blue" / "000.png"])
    assert len(found) == 6  # three classes x two; the file named again counts once
    with pytest.raises(DataError, match="does not exist"):
        find_images([images / "nope"])
    with pytest.raises(DataError, match="no images"):
        find_images([str(images / "*.gif")])


def test_cli_writes_csv_and_refuses_other_suffixes(made, invoke, tmp_path):
    images, bundle, _ = made
    out = tmp_path / "preds.csv"
    r = invoke("predict", images, "--bundle", bundle, "--out", out, "--top-k", "2", "--quiet")
    assert r.exit_code == 0, r.output
    rows = list(csv.reader(out.open()))
    assert rows[0] == ["path", "class", "score", "exit", "flops", "relative_flops", "class_2",
                       "score_2"]
    assert len(rows) == 25 and rows[1][1] in ("blue", "green", "red")
    assert "predicted 24 images" in r.stdout and "images/s" in r.stdout
    assert "skipped" in r.stderr
    with pytest.raises(OptionError):
        predict(images, bundle, out=tmp_path / "preds.txt")
    fails_cleanly(invoke("predict", images, "--bundle", bundle, "--out", tmp_path / "p.txt"))


def test_export_path_never_imports_torch(made, tmp_path):
    """The whole command, run on an exported cascade in a fresh interpreter: torch stays out."""
    images, _, exported = made
    out = tmp_path / "p.jsonl"
    code = ("import sys\nfrom pteenet_cli.app import app\n"
            f"try:\n    app(['predict', {str(images)!r}, '--export', {str(exported)!r}, "
            f"'--out', {str(out)!r}])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 24 and {"class", "score", "exit_name", "flops"} <= set(rows[0])
