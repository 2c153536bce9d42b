"""export + runtime end to end: a real bundle exported both ways matches the Python cascade."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pteenet_cli.app import app
from typer.testing import CliRunner

import pteenet.runtime as runtime
import pteenet.runtime._sessions as sessions
from pteenet.bundle import ThresholdTable, load, write_thresholds
from pteenet.cascade import exit_score
from pteenet.data import open_data
from pteenet.errors import BundleError, OptionError
from pteenet.exporter import MANIFEST
from pteenet.exporter._export import ScoredBranch
from pteenet.jobs import attach
from pteenet.runtime import Cascade, preprocess
from pteenet.training import TrainConfig
from tests._helpers import PRE

runner = CliRunner()
FORMATS = ("onnx", "torchscript")
FIXTURE = [HealthCheck.function_scoped_fixture]


def _gap_threshold(scores: torch.Tensor, q: float) -> float:
    """A threshold in the widest gap between scores near quantile ``q``: far from every score,
    so float noise between runtimes (~1e-7) cannot flip an exit decision."""
    s = scores.double().sort().values
    n = s.numel()
    lo, hi = max(0, int(n * (q - 0.25))), min(n - 1, int(n * (q + 0.25)))
    gaps = s[lo + 1:hi + 1] - s[lo:hi]
    i = lo + int(gaps.argmax())
    assert float(gaps.max()) > 1e-5, "scores too dense to place a safe threshold"
    return float((s[i] + s[i + 1]) / 2)


@torch.no_grad()
def _spread_table(model, x: torch.Tensor) -> list[list[float | None]]:
    """Thresholds that send samples to every exit; class 2 may never leave at branch 0."""
    feats, _ = model.features(x)
    outs = [b(f) for b, f in zip(model.branches, feats)]
    s0, s1 = (exit_score(model.score, lg, c, float(model.gamma[k]))
              for k, (lg, c) in enumerate(outs))
    t0 = _gap_threshold(s0, 0.6)
    left = ~((s0 >= t0) & (outs[0][0].argmax(1) != 2))
    t1 = _gap_threshold(s1[left], 0.5)
    return [[t0, t0, None], [t1] * 3]


@pytest.fixture(scope="module")
def bundle(tiny, tmp_path_factory):
    """(bundle folder, inputs, test image paths): 32 random inputs then real test images."""
    data, ckpt = tiny
    out = tmp_path_factory.mktemp("export-bundle")
    attach("resnet20", data, checkpoint=ckpt, num_classes=3, branches=2, branch="pool", out=out,
           config=TrainConfig(epochs=1, batch_size=16), progress=False)
    test = open_data(data, PRE, split="test")
    idx = list(range(0, len(test), 3))
    paths = [test.samples[i][0] for i in idx]
    real = torch.stack([test[i][0] for i in idx])
    x = torch.cat([torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(0)), real])
    model = load(out)
    model.set_thresholds(1.0, score="softmax")
    table = _spread_table(model, x)
    write_thresholds(out, ThresholdTable(torch.tensor(
        [[float("inf") if v is None else v for v in r] for r in table]), score="softmax"))
    return out, x, paths


@pytest.fixture(scope="module")
def reference(bundle):
    """The in-Python model's answers; every exit must be used or the comparison proves little."""
    res = load(bundle[0])(bundle[1])
    print("exits used:", torch.bincount(res.exit_index, minlength=3).tolist())
    assert (torch.bincount(res.exit_index, minlength=3) > 0).all(), res.exit_index
    return res


@pytest.fixture(scope="module")
def onnx_export(bundle) -> Path:
    """ONNX into the default folder, <bundle>/export-onnx."""
    result = runner.invoke(app, ["export", "--bundle", str(bundle[0]), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["folder"] == str(bundle[0] / "export-onnx") and doc["manifest"]["format"] == "onnx"
    return Path(doc["folder"])


@pytest.fixture(scope="module", params=FORMATS)
def exported(request, bundle, tmp_path_factory) -> Path:
    if request.param == "onnx":
        return request.getfixturevalue("onnx_export")
    out = tmp_path_factory.mktemp("export-torchscript")
    result = runner.invoke(app, ["export", "-b", str(bundle[0]), "-f", "torchscript", "-o",
                                 str(out)])
    assert result.exit_code == 0, result.output
    assert "segment_0.pt" in result.stdout and "Cascade.open" in result.stdout
    return out


def test_cascade_matches_model_preds_and_exits(exported, bundle, reference):
    cascade = Cascade.open(exported)
    preds, exits = cascade(bundle[1].numpy())
    assert preds.dtype == np.int64 and exits.dtype == np.int64
    np.testing.assert_array_equal(exits, reference.exit_index.numpy())
    np.testing.assert_array_equal(preds, reference.preds.numpy())
    res = cascade.run(bundle[1].numpy())
    np.testing.assert_allclose(res.logits, reference.logits.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(res.flops, reference.flops.numpy())


def test_batch_of_one_and_empty_batch(exported, bundle, reference):
    cascade = Cascade.open(exported)
    x = bundle[1].numpy()
    for i in (0, 5, 40):
        preds, exits = cascade(x[i:i + 1])
        assert exits.shape == (1,)
        assert exits[0] == reference.exit_index[i] and preds[0] == reference.preds[i]
    preds, exits = cascade(np.zeros((0, 3, 32, 32), np.float32))
    assert preds.shape == exits.shape == (0,)


def test_manifest_describes_the_cascade(exported, bundle, reference):
    doc = json.loads((exported / MANIFEST).read_text())
    model = load(bundle[0])
    assert doc["num_branches"] == 2 and doc["num_classes"] == 3 and doc["score"] == "softmax"
    assert doc["thresholds"][0][2] is None and doc["input_size"] == [32, 32]
    assert doc["segment_flops"] == model.segment_flops
    assert doc["branch_flops"] == model.branch_flops
    assert doc["backbone_flops"] == model.backbone_flops
    assert doc["classes"] == ["blue", "green", "red"]
    files = doc["files"]["segments"] + doc["files"]["branches"]
    assert len(files) == 5 and all((exported / f).is_file() for f in files)
    assert not list(exported.glob(".*.tmp"))


def test_preprocess_matches_the_training_pipeline(exported, bundle):
    cascade = Cascade.open(exported)
    x = cascade.preprocess(bundle[2])
    np.testing.assert_allclose(x, bundle[1][32:].numpy(), atol=1e-6)


def test_preprocess_resizes_and_crops_like_the_models_recipe(tmp_path):
    """An ImageNet model's manifest: shorter side to resize_size, centre crop, its filter."""
    from PIL import Image

    from pteenet.backbone import Preprocess
    from pteenet.data._items import to_tensor

    pre = Preprocess((224, 224), resize_size=235, interpolation="bicubic")
    manifest = {"input_size": [224, 224], "mean": list(pre.mean), "std": list(pre.std),
                "resize_size": 235, "interpolation": "bicubic"}
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, s, dtype=np.uint8))
              for s in ((300, 410, 3), (410, 300, 3))]
    want = np.stack([to_tensor(im, pre).numpy() for im in images])
    np.testing.assert_allclose(preprocess(images, manifest, (224, 224)), want, atol=1e-6)


def test_onnx_runtime_needs_neither_torch_nor_pteenet(onnx_export, bundle, reference, tmp_path):
    np.save(tmp_path / "x.npy", bundle[1].numpy())
    code = (
        "import sys, importlib.util, numpy as np\n"
        "sys.modules['torch'] = sys.modules['pteenet'] = None\n"  # importing either fails
        f"spec = importlib.util.spec_from_file_location('rt', {runtime.__file__!r},\n"
        f"    submodule_search_locations=[{str(Path(runtime.__file__).parent)!r}])\n"
        "rt = importlib.util.module_from_spec(spec); sys.modules['rt'] = rt\n"
        "spec.loader.exec_module(rt)\n"
        f"p, e = rt.Cascade.open({str(onnx_export)!r})(np.load({str(tmp_path / 'x.npy')!r}))\n"
        f"np.save({str(tmp_path / 'e.npy')!r}, e)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    np.testing.assert_array_equal(np.load(tmp_path / "e.npy"), reference.exit_index.numpy())


def test_scored_branch_bakes_in_every_score(bundle):
    """The exported branch's second output is the score the exit rule compares: the head's
    sigmoid, the top softmax probability, or that probability to the gate's power."""
    model = load(bundle[0])
    feats, _ = model.features(bundle[1][:8])
    with torch.no_grad():
        logits, conf = model.branches[0](feats[0])
    top = torch.softmax(logits, 1).amax(1)
    for score, want in (("head", torch.sigmoid(conf)), ("softmax", top), ("gate", top ** 2)):
        model.set_thresholds(0.5, score=score, gamma=[2.0] * model.num_branches)
        with torch.no_grad():
            got = ScoredBranch(model, 0)(feats[0])
        assert torch.equal(got[0], logits)
        torch.testing.assert_close(got[1], want)


def test_unknown_format_is_one_line(bundle):
    result = runner.invoke(app, ["export", "-b", str(bundle[0]), "--format", "tflite"])
    assert result.exit_code != 0
    assert result.stderr.strip().count("\n") == 0 and "tflite" in result.stderr


def test_missing_bundle_is_one_line(tmp_path):
    result = runner.invoke(app, ["export", "-b", str(tmp_path / "nope")])
    assert result.exit_code != 0
    assert result.stderr.strip().count("\n") == 0 and "pteenet attach" in result.stderr


def test_runtime_errors_are_clear(tmp_path, monkeypatch, onnx_export):
    with pytest.raises(BundleError, match="pteenet export"):
        Cascade.open(tmp_path)
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        Cascade.open(tmp_path)
    with pytest.raises(OptionError, match="float32 array"):
        Cascade.open(onnx_export)(np.zeros((2, 3, 16, 16), np.float32))
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(OptionError, match=r"pteenet\[onnx\]"):
        Cascade.open(onnx_export)


# --------------------------------------------------------------------------- issue 13, item 8


@pytest.fixture
def spoilable(onnx_export, tmp_path) -> Path:
    """A private copy of the ONNX export, to spoil."""
    return Path(shutil.copytree(onnx_export, tmp_path / "export"))


def edit_manifest(folder: Path, edit=None, text: str | None = None) -> None:
    doc = json.loads((folder / MANIFEST).read_text())
    if edit is not None:
        edit(doc)
    (folder / MANIFEST).write_text(text if text is not None else json.dumps(doc))


def _set(path: tuple, value):
    def edit(doc):
        *parents, last = path
        for key in parents:
            doc = doc[key]
        doc[last] = value
    return edit


@pytest.mark.parametrize(("name", "edit", "words"), [
    ("parent-path", _set(("files", "segments", 0), "../segment_0.onnx"), "outside its folder"),
    ("absolute-path", _set(("files", "branches", 0), "/etc/hostname"), "outside its folder"),
    ("folder-itself", _set(("files", "branches", 1), "."), "outside its folder"),
    ("not-a-name", _set(("files", "branches", 0), 7), "outside its folder"),
    ("nan-threshold", _set(("thresholds", 0, 0), float("nan")), r"\[0, 1\]"),
    ("inf-threshold", _set(("thresholds", 0, 0), float("inf")), r"\[0, 1\]"),
    ("threshold-above-one", _set(("thresholds", 1, 2), 2), r"\[0, 1\]"),
    ("negative-threshold", _set(("thresholds", 1, 2), -1), r"\[0, 1\]"),
    ("huge-class-count", _set(("num_classes",), 10**12), "malformed"),
    ("huge-input-size", _set(("input_size",), [8192, 8192]), "malformed"),
    ("negative-flops", _set(("segment_flops", 0), -5), "malformed"),
    ("text-resize", _set(("resize_size",), "256"), "malformed"),
    ("unknown-interpolation", _set(("interpolation",), "lanczos9"), "malformed"),
    ("single-runs-short", _set(("single_runs",), [True]), "malformed"),
    ("single-outside", _set(("files", "single"), ["../cascade_1.onnx"]), "outside its folder"),
    ("single-null", _set(("files", "single"), None), "malformed"),
    ("single-without-runs", _set(("single_runs",), None), "malformed"),
])
def test_the_manifest_is_not_trusted(spoilable, name, edit, words):
    edit_manifest(spoilable, edit)
    with pytest.raises(BundleError, match=words):
        Cascade.open(spoilable)


@pytest.mark.parametrize("text", ['{"format": "onnx", "x": ' + "[" * 200_000 + "]" * 200_000
                                  + "}", '{"num_branches": 1' + "0" * 400 + "}"])
def test_parser_limits_in_the_manifest(spoilable, text):
    edit_manifest(spoilable, text=text)
    with pytest.raises(BundleError, match="not valid JSON"):
        Cascade.open(spoilable)


def test_a_graph_linked_from_outside_the_folder_is_refused(spoilable, tmp_path):
    outside = tmp_path / "elsewhere.onnx"
    shutil.copy(spoilable / "branch_0.onnx", outside)
    (spoilable / "branch_0.onnx").unlink()
    (spoilable / "branch_0.onnx").symlink_to(outside)
    with pytest.raises(BundleError, match="outside its folder"):
        Cascade.open(spoilable)


def test_a_graph_changed_after_export_is_refused(spoilable):
    """What an export killed between its graphs and its manifest leaves, too."""
    with open(spoilable / "segment_1.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="does not match manifest.json"):
        Cascade.open(spoilable)


def test_an_unloadable_graph_is_a_bundle_error(spoilable):
    """onnxruntime's own exceptions never reach the caller."""
    (spoilable / "branch_1.onnx").write_bytes(b"not an onnx graph")
    edit_manifest(spoilable, lambda d: d["sha256"].update(
        {"branch_1.onnx": hashlib.sha256(b"not an onnx graph").hexdigest()}))
    with pytest.raises(BundleError, match="cannot load graph .*branch_1.onnx"):
        Cascade.open(spoilable)


def test_the_pieces_do_not_spin_the_single_graph_does(exported, monkeypatch):
    """Idle workers of one session spinning would take the cores from the next segment's; the
    one-graph cascade runs alone, and waking sleeping workers at every operator is its cost."""
    opts = runtime.session_options(2)
    assert opts.intra_op_num_threads == 2
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    with pytest.raises(RuntimeError, match="does not have"):  # onnxruntime's default: spin
        runtime.session_options(2, spin=True).get_session_config_entry(
            "session.intra_op.allow_spinning")
    with pytest.raises(OptionError):
        runtime.session_options(0)
    made = []
    monkeypatch.setattr(sessions, "session_options",
                        lambda threads=None, spin=False: made.append((threads, spin)) or opts)
    cascade = Cascade.open(exported, threads=1)
    assert made == ([(1, False), (1, True)] if cascade.manifest["format"] == "onnx" else [])


def _counted(graph, calls: list[str], name: str):
    def run(*xs):
        calls.append(name)
        return graph(*xs)
    return run


def _watched(cascade: Cascade) -> list[str]:
    """The names of the graphs each run calls: 'single', or 'piece'."""
    calls: list[str] = []
    cascade.single = _counted(cascade.single, calls, "single")
    cascade.segments = [_counted(g, calls, "piece") for g in cascade.segments]
    cascade.branches = [_counted(g, calls, "piece") for g in cascade.branches]
    return calls


def test_single_images_run_as_one_graph_with_the_same_answers(onnx_export, bundle, reference):
    doc = json.loads((onnx_export / MANIFEST).read_text())
    assert doc["files"]["single"] == ["cascade_1.onnx"] and doc["single_runs"] == [True, True]
    cascade = Cascade.open(onnx_export)
    x = bundle[1].numpy()
    cascade.run(x[:2])
    assert cascade.single.graph is None  # loaded on the first single image, not before
    calls = _watched(cascade)
    for i in range(len(x)):
        res = cascade.run(x[i:i + 1])
        assert res.exit_index[0] == reference.exit_index[i]  # every exit is used (reference)
        np.testing.assert_allclose(res.logits[0], reference.logits[i].numpy(), rtol=1e-4,
                                   atol=1e-4)
        assert res.flops[0] == reference.flops[i]
    assert calls == ["single"] * len(x)  # no segment or branch graph ran
    cascade.run(x[:2])
    assert "piece" in calls[len(x):]  # batches compact, through the pieces


@settings(max_examples=10, deadline=None, suppress_health_check=FIXTURE)
@given(t=st.floats(0.0, 1.0))
def test_the_single_graph_reads_the_runtimes_thresholds(onnx_export, bundle, t):
    """The table is the graph's input: a new global threshold moves single images as it moves
    the pieces' cascade."""
    one, pieces = Cascade.open(onnx_export), Cascade.open(onnx_export)
    pieces.single = None
    for c in (one, pieces):
        c.thresholds = np.full(c.thresholds.shape, t)  # float64: stored as the model's float32
    calls = _watched(one)
    x = bundle[1].numpy()
    got = [one.run(x[i:i + 1]) for i in range(0, len(x), 4)]
    assert calls == ["single"] * len(got)
    want = pieces.run(x[::4])
    np.testing.assert_array_equal([g.exit_index[0] for g in got], want.exit_index)
    np.testing.assert_allclose(np.concatenate([g.logits for g in got]), want.logits, rtol=1e-4,
                               atol=1e-4)


def test_a_table_with_other_active_exits_runs_the_pieces(onnx_export, bundle, reference):
    cascade = Cascade.open(onnx_export)
    calls = _watched(cascade)
    x = bundle[1].numpy()
    cascade.run(x[:1])  # the plan of the table it opened with is worked out and kept ...
    assert calls == ["single"]
    calls.clear()
    cascade.thresholds[0] = np.inf  # ... and an edit in place is seen: exit 0 off, so the
    res = cascade.run(x[:1])  # single graph holds a branch that never runs
    assert "single" not in calls and res.exit_index[0] in (1, 2)


def test_a_table_of_another_shape_is_one_line(onnx_export):
    cascade = Cascade.open(onnx_export)
    for bad in (np.zeros((3, 2)), [[None] * 3] * 2, [[float("nan")] * 3] * 2):
        with pytest.raises(OptionError, match=r"\[2, 3\] table"):
            cascade.thresholds = bad
    cascade.thresholds = [[0.5] * 3, [0.25] * 3]
    assert cascade.thresholds.dtype == np.float32


def test_export_model_writes_the_model_as_it_is_without_reading_the_bundle_again(
        bundle, tmp_path):
    """``bench`` times the model it measures: exported from the loaded model and Bundle, under
    the model's current table (not the one on disk), and the cascade answers as the model."""
    pytest.importorskip("onnxruntime")
    from pteenet.bundle import read_bundle
    from pteenet.exporter import export_model

    folder, x, _ = bundle
    b = read_bundle(folder)
    model = load(b)
    model.set_thresholds(0.0)  # every sample leaves at the first exit
    out = export_model(model, b, tmp_path / "export")
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["thresholds"] == [[0.0] * 3, [0.0] * 3]
    cascade = Cascade.open(out)
    preds, exits = cascade(x.numpy())
    with torch.no_grad():
        res = model(x)
    assert (exits == 0).all() and np.array_equal(preds, res.preds.numpy())
    assert not model.training


def test_a_switched_off_gate_exports_for_every_batch_size(bundle, tmp_path):
    """An exit calibration switched off scores 0 for each sample of any batch: a score of the
    traced batch's size (an exporter once folded ``zeros_like`` into one) fails here."""
    folder = tmp_path / "off"
    shutil.copytree(bundle[0], folder, ignore=shutil.ignore_patterns("export-*"))
    inf = float("inf")
    write_thresholds(folder, ThresholdTable(torch.tensor([[inf] * 3, [0.5] * 3]), score="gate",
                                            gamma=[inf, 1.0]))
    result = runner.invoke(app, ["export", "--bundle", str(folder), "--json"])
    assert result.exit_code == 0, result.output
    cascade = Cascade.open(Path(json.loads(result.stdout)["folder"]))
    x = bundle[1].numpy()
    for n in (1, 5, 9):
        h = cascade.segments[0](x[:n])[0]
        out, score, *_ = cascade.branches[0](h)
        assert out.shape == (n, 3) and score.shape == (n,) and not score.any()
