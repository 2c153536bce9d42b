"""Nothing pteenet reads can run code, and its readers fail only in their own, one-line way.

Issue 6 ("Reliability and security"):

* a source scan: no ``pickle.load(s)`` (or dill / joblib / marshal / shelve) anywhere under
  ``pteenet/`` or ``cli/``, and every ``torch.load`` / ``torch.hub.load_state_dict_from_url``
  passes ``weights_only=True`` in the call itself;
* a poisoned ``--resume`` state file is refused and its payload never runs (the poisoned
  checkpoint is in tests/backbone/test_checkpoint_errors.py);
* hypothesis fuzzing of the bundle readers: random bytes as ``branches.safetensors``, random
  JSON as its metadata and as ``thresholds.json`` -> ``read_info`` / ``read_thresholds``
  succeed or raise ``BundleError``, never anything else.

Issue 13 adds the size-like header fields (``num_classes``, ``input_size``: bounded by the
tensors present and the largest input pteenet builds, before anything is allocated) and the
parser limits (JSON nested hundreds of thousands deep, integers of hundreds of digits) in the
metadata and the threshold table.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pteenet_cli.app import app
from safetensors.torch import save_file
from typer.testing import CliRunner

from pteenet.backbone import MAX_INPUT_SIDE, Preprocess, cifar_resnet
from pteenet.bundle import (
    BRANCHES_FILE,
    THRESHOLDS_FILE,
    BundleInfo,
    calibration_digest,
    read_info,
    read_thresholds,
)
from pteenet.errors import BundleError
from pteenet.jobs import STATE_FILE
from pteenet.storage import MANIFEST
from tests._helpers import write_images

REPO = Path(__file__).resolve().parents[2]
SOURCES = sorted([*(REPO / "pteenet").rglob("*.py"), *(REPO / "cli").rglob("*.py")])

# --------------------------------------------------------------------------- the source scan

NEVER = {"pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.load", "_pickle.loads",
         "cPickle.load", "cPickle.loads", "dill.load", "dill.loads", "joblib.load",
         "marshal.load", "marshal.loads", "shelve.open", "pandas.read_pickle"}
WEIGHTS_ONLY = {"torch.load", "torch.serialization.load", "torch.hub.load_state_dict_from_url"}


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> dotted origin, from ``import x as y`` and ``from x import y as z``."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                names[a.asname or a.name.split(".")[0]] = a.name if a.asname else \
                    a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def _dotted(func: ast.AST, aliases: dict[str, str]) -> str | None:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if not isinstance(func, ast.Name):
        return None
    parts.append(aliases.get(func.id, func.id))
    return ".".join(reversed(parts))


def unsafe_calls(source: str, filename: str = "<string>") -> list[str]:
    """Every call in ``source`` that could unpickle arbitrary objects, as 'file:line: call'."""
    tree = ast.parse(source, filename)
    aliases = _aliases(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func, aliases)
        if name is None:
            continue
        kw = {k.arg: k.value for k in node.keywords}
        bad = name in NEVER
        if name in WEIGHTS_ONLY:
            value = kw.get("weights_only")
            bad = None in kw or not (isinstance(value, ast.Constant) and value.value is True)
        if name in ("numpy.load", "np.load"):
            value = kw.get("allow_pickle")
            bad = None in kw or (value is not None and not (
                isinstance(value, ast.Constant) and value.value is False))
        if bad:
            found.append(f"{filename}:{node.lineno}: {ast.unparse(node)[:100]}")
    return found


def test_the_scanner_catches_what_it_should():
    bad = '''
import pickle as pk
import torch
from torch import load as tl
from pickle import loads
pk.load(open("x", "rb"))
loads(b"")
torch.load("x")
torch.load("x", weights_only=False)
torch.load(
    "x",
    map_location="cpu",
)
tl("x", weights_only=None)
torch.load("x", **opts)
torch.hub.load_state_dict_from_url("u")
import numpy as np
np.load("x", allow_pickle=True)
'''
    flagged = [int(c.split(":")[1]) for c in unsafe_calls(bad)]
    assert flagged == [6, 7, 8, 9, 10, 14, 15, 16, 18], unsafe_calls(bad)
    good = '''
import torch
torch.load("x", map_location="cpu", weights_only=True)
torch.load(
    "x",
    weights_only=True,
)
torch.hub.load_state_dict_from_url("u", check_hash=True, weights_only=True)
# torch.load("in a comment") and "pickle.load in a string" are not calls
'''
    assert unsafe_calls(good) == []


def test_no_source_file_can_unpickle_code():
    assert len(SOURCES) > 10 and any(p.name == "_registry.py" for p in SOURCES)
    found = [c for p in SOURCES for c in unsafe_calls(p.read_text(encoding="utf-8"),
                                                        str(p.relative_to(REPO)))]
    assert found == [], "\n".join(found)
    # Not vacuous: the loads that do exist are seen (and pass because of weights_only=True).
    loads = [p for p in SOURCES if "torch.load(" in p.read_text(encoding="utf-8")]
    assert {p.name for p in loads} >= {"_checkpoint.py", "_resume.py"}


# --------------------------------------------------------------------------- a poisoned state


class _RunsShell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def test_poisoned_resume_state_is_refused_and_never_runs(tmp_path):
    data = write_images(tmp_path / "data", per_class=4, splits=("train",))
    ckpt = tmp_path / "resnet20-3.pt"
    torch.manual_seed(0)
    torch.save(cifar_resnet("resnet20", num_classes=3).state_dict(), ckpt)
    out = tmp_path / "out"
    out.mkdir()
    marker = tmp_path / "pwned"
    torch.save({"key": "x", "epoch": 0, "x": _RunsShell(marker)}, out / STATE_FILE)
    before = (out / STATE_FILE).read_bytes()
    result = CliRunner().invoke(app, ["attach", "resnet20", "--data", str(data), "-c", str(ckpt),
                                      "--num-classes", "3", "-n", "1", "--branch", "pool",
                                      "--epochs", "1", "--resume", "--quiet", "--out", str(out)])
    assert not marker.exists(), "the state file's payload ran"
    assert result.exit_code == 3, result.output  # an input file (issue 29)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(out / STATE_FILE) in lines[0] and "--resume" in lines[0]
    assert "Traceback" not in result.output
    assert (out / STATE_FILE).read_bytes() == before  # left for the user to inspect
    assert not (out / BRANCHES_FILE).exists()


# --------------------------------------------------------------------------- fuzzing the readers

FUZZ = settings(max_examples=80, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                max_size=4),
    max_leaves=16,
)


def valid_meta() -> dict:
    """The metadata of a 2-branch, 3-class bundle, as save_bundle writes it."""
    info = BundleInfo(
        path=Path("."), preprocess=Preprocess((32, 32)), cuts=["add_1", "add_4"],
        backbone={"name": "resnet20", "source": "cifar", "num_classes": 3, "checkpoint": "c.pt",
                  "checkpoint_path": "/nowhere/c.pt", "checkpoint_sha256": "0" * 64},
        module_cuts=False, branches=[{"type": "pool", "flops": 128, "channels": 16}] * 2,
        segment_flops=[100, 200, 300], classes=["a", "b", "c"],
        training={"epochs": 1, "losses": [1.0]}, data={"spec": "/nowhere", "num_samples": 9},
        calibration_indices=[0, 1], extra={"calibration_sha256": calibration_digest([0, 1])},
    )
    return info.to_meta()


def valid_table() -> dict:
    return {"format_version": 1, "num_branches": 2, "num_classes": 3, "score": "head",
            "method": "global", "params": {}, "thresholds": [[0.5, None, 0.25], [1.0, 0.0, 0.5]],
            "summary": {}}


def write_bundle(folder: Path, meta: object = None, raw: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"branches.0.classifier.weight": torch.zeros(3, 16),
               "branches.1.classifier.weight": torch.zeros(3, 16),
               "calibration_indices": torch.tensor([0, 1])}
    text = raw if raw is not None else json.dumps(valid_meta() if meta is None else meta)
    save_file(tensors, str(folder / BRANCHES_FILE), metadata={"pteenet": text})
    return seal(folder)


def seal(folder: Path) -> Path:
    """Record the folder's bundle files in a new bundle.json, as an attacker who knows the
    format would: what the readers see behind the manifest must hold on its own."""
    files = {name: {"sha256": hashlib.sha256((folder / name).read_bytes()).hexdigest(),
                    "size": (folder / name).stat().st_size}
             for name in (BRANCHES_FILE, THRESHOLDS_FILE) if (folder / name).is_file()}
    (folder / MANIFEST).write_text(json.dumps({"format_version": 1, "files": files}))
    return folder


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def valid(fuzz_dir) -> tuple[Path, BundleInfo]:
    folder = write_bundle(fuzz_dir / "valid")
    (folder / THRESHOLDS_FILE).write_text(json.dumps(valid_table()))
    seal(folder)
    info = read_info(folder)
    assert info.num_branches == 2 and info.num_classes == 3
    assert read_thresholds(folder, info).thresholds.shape == (2, 3)
    return folder, info


def only_bundle_errors(fn, *args):
    """Call ``fn``; a BundleError is fine, success is fine, anything else fails the test."""
    try:
        return fn(*args)
    except BundleError:
        return None


@FUZZ
@given(blob=st.binary(max_size=2048))
def test_random_bytes_as_branches_file(fuzz_dir, blob):
    folder = fuzz_dir / "bytes"
    folder.mkdir(exist_ok=True)
    (folder / BRANCHES_FILE).write_bytes(blob)
    seal(folder)
    only_bundle_errors(read_info, folder)


@FUZZ
@given(header=st.binary(max_size=512), body=st.binary(max_size=256))
def test_random_header_behind_a_valid_length(fuzz_dir, header, body):
    """The 8-byte length matches, so the reader gets as far as the header's JSON."""
    folder = fuzz_dir / "header"
    folder.mkdir(exist_ok=True)
    (folder / BRANCHES_FILE).write_bytes(len(header).to_bytes(8, "little") + header + body)
    seal(folder)
    only_bundle_errors(read_info, folder)


@FUZZ
@given(data=st.data())
def test_valid_branches_file_with_flipped_bytes(valid, fuzz_dir, data):
    raw = bytearray((valid[0] / BRANCHES_FILE).read_bytes())
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] ^= data.draw(st.integers(1, 255))
    folder = fuzz_dir / "flipped"
    folder.mkdir(exist_ok=True)
    (folder / BRANCHES_FILE).write_bytes(bytes(raw))
    seal(folder)
    only_bundle_errors(read_info, folder)


@FUZZ
@given(meta=json_values)
def test_random_json_as_metadata(fuzz_dir, meta):
    folder = write_bundle(fuzz_dir / "meta", raw=json.dumps(meta))
    only_bundle_errors(read_info, folder)


@FUZZ
@given(doc=json_values)
def test_random_json_as_threshold_table(valid, fuzz_dir, doc):
    _, info = valid
    f = fuzz_dir / "table.json"
    f.write_text(json.dumps(doc))
    only_bundle_errors(read_thresholds, f, info)


# Deeper: start from a valid document and replace one to three of its fields with random JSON,
# so the readers get past their first checks.

META_FIELDS = [("format_version",), ("backbone",), ("backbone", "name"),
               ("backbone", "source"), ("backbone", "num_classes"), ("preprocess",),
               ("preprocess", "input_size"), ("preprocess", "mean"), ("preprocess", "std"),
               ("cuts",), ("branches",), ("segment_flops",), ("classes",), ("module_cuts",),
               ("training",), ("data",), ("extra",)]
TABLE_FIELDS = [("thresholds",), ("thresholds", 0), ("thresholds", 1), ("thresholds", 0, 1),
                ("score",), ("method",), ("params",), ("summary",), ("format_version",)]


def _replace(doc, path, value) -> None:
    *parents, last = path
    for key in parents:
        try:
            doc = doc[key]
        except (KeyError, IndexError, TypeError):
            return  # an earlier edit removed what this one would change
    if isinstance(doc, (dict, list)) and (isinstance(doc, dict) or last < len(doc)):
        doc[last] = value


@FUZZ
@given(edits=st.lists(st.tuples(st.sampled_from(META_FIELDS), json_values), min_size=1,
                      max_size=3))
def test_valid_metadata_with_random_fields(valid, fuzz_dir, edits):
    meta = valid_meta()
    for path, value in edits:
        _replace(meta, path, value)
    folder = write_bundle(fuzz_dir / "meta-fields", meta)
    info = only_bundle_errors(read_info, folder)
    if info is not None:  # a bundle that reads must also give its default table, or refuse
        only_bundle_errors(read_thresholds, fuzz_dir / "no-such-table.json", info)
        only_bundle_errors(read_thresholds, valid[0], info)


@FUZZ
@given(edits=st.lists(st.tuples(st.sampled_from(TABLE_FIELDS), json_values), min_size=1,
                      max_size=3))
def test_valid_threshold_table_with_random_fields(valid, fuzz_dir, edits):
    _, info = valid
    doc = valid_table()
    for path, value in edits:
        _replace(doc, path, value)
    f = fuzz_dir / "table-fields.json"
    f.write_text(json.dumps(doc))
    only_bundle_errors(read_thresholds, f, info)



# Issue 13, item 4: size-like header fields are bounded by what is present before anything is
# allocated from them (an edited num_classes of 1e8 once allocated 25 GB for the default table).

sizes = st.integers(-2**70, 2**70) | st.integers(-4, 4096) | st.sampled_from([10**8, 2**63 - 1])


@FUZZ
@given(field=st.sampled_from(["num_classes", "height", "width"]), value=sizes)
def test_size_fields_are_bounded_before_allocation(valid, fuzz_dir, field, value):
    meta = valid_meta()
    if field == "num_classes":
        meta["backbone"]["num_classes"] = value
        meta["classes"] = None
    else:
        meta["preprocess"]["input_size"][field == "width"] = value
    info = only_bundle_errors(read_info, write_bundle(fuzz_dir / "sizes", meta))
    if info is not None:  # only what the tensors and the input limit allow gets through
        assert info.num_classes == 3 and max(info.preprocess.input_size) <= MAX_INPUT_SIDE
        assert read_thresholds(fuzz_dir / "no-such-table.json", info).thresholds.shape == (2, 3)


# Issue 13, item 5: every parser limit is a BundleError too (RecursionError and integer
# conversion errors once escaped as internal errors). The number or the nesting is spliced
# into otherwise valid text, so the parser meets it wherever a value may stand.

BIG = '"@@big@@"'
META_SPOTS = [("format_version",), ("backbone", "num_classes"), ("segment_flops",), ("data",),
              ("preprocess", "input_size")]
TABLE_SPOTS = [("thresholds", 0), ("format_version",), ("summary",), ("num_classes",)]


def _splice(doc: dict, spot: tuple, filler: str) -> str:
    _replace(doc, spot, "@@big@@")
    return json.dumps(doc).replace(BIG, filler)


fillers = st.one_of(
    st.integers(20, 5000).map(lambda n: "9" * n),  # beyond int64; from 4301 Python refuses too
    st.integers(20, 400).map(lambda n: "-1" + "0" * n),
    st.integers(1000, 200_000).map(lambda d: "[" * d + "]" * d),
    st.integers(1000, 200_000).map(lambda d: '{"a":' * d + "1" + "}" * d),
)


@FUZZ
@given(spot=st.sampled_from(META_SPOTS), filler=fillers)
def test_parser_limits_in_metadata(fuzz_dir, spot, filler):
    folder = write_bundle(fuzz_dir / "limits-meta", raw=_splice(valid_meta(), spot, filler))
    with pytest.raises(BundleError):
        read_info(folder)


@FUZZ
@given(spot=st.sampled_from(TABLE_SPOTS), filler=fillers)
def test_parser_limits_in_threshold_table(valid, fuzz_dir, spot, filler):
    f = fuzz_dir / "limits-table.json"
    f.write_text(_splice(valid_table(), spot, filler))
    with pytest.raises(BundleError):
        read_thresholds(f, valid[1])


@FUZZ
@given(doc=json_values, depth=st.sampled_from([0, 0, 0, 100_000]))
def test_random_json_as_the_bundle_manifest(valid, fuzz_dir, doc, depth):
    """bundle.json (issue 13) is read before anything else: random JSON there, or JSON nested
    100,000 deep, is a BundleError or, when it names no file, harmless."""
    folder = fuzz_dir / "manifest"
    if not folder.exists():
        shutil.copytree(valid[0], folder)
    text = "[" * depth + "]" * depth if depth else json.dumps(doc)
    (folder / MANIFEST).write_text(text)
    only_bundle_errors(read_info, folder)
    only_bundle_errors(read_thresholds, folder, valid[1])
