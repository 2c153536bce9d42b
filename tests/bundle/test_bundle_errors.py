"""Bad bundles and threshold tables, as ``calibrate``, ``bench`` and ``pteenet.load`` meet them.

Issue 6 ("Reliability and security"): a bundle that is missing, truncated, edited, from a newer
format, or whose checkpoint hash differs (unless ``--force``), and threshold tables that do not
match the bundle or hold NaN or values outside [0, 1], each give one line on stderr (exit 3) and
``BundleError`` from Python; a refused bundle is left exactly as it was.

Issue 13: a file edited behind bundle.json's back is refused as such; the edits below are
resealed (bundle.json updated to match, see ``reseal``) so the checks behind the manifest are
tested on their own. A bad threshold table is refused by every reader, but ``calibrate`` always
replaces it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from pteenet_cli.app import app
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import pteenet
from pteenet.bundle import (
    BRANCHES_FILE,
    FORMAT_VERSION,
    THRESHOLDS_FILE,
    ThresholdTable,
    write_thresholds,
)
from pteenet.cascade import gate_power
from pteenet.errors import BundleError
from tests._helpers import (
    cli,
    fails_cleanly,
    reseal,
    uncalibrate,
)

FAST_BENCH = ["--latency-samples", "2", "--repeats", "1", "--batch-size", "16", "--quiet"]







def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def refused_everywhere(bundle: Path, *words: str, code: int = 3) -> str:
    """``calibrate -t 0.5`` fails with one line holding ``words`` and leaves the bundle as it
    was; ``pteenet.load`` raises BundleError with the same message."""
    before = snapshot(bundle) if bundle.is_dir() else None
    line = fails_cleanly(cli("calibrate", "-b", bundle, "-t", "0.5"), code)
    assert "internal error" not in line
    for word in words:
        assert word in line, (word, line)
    if before is not None:
        assert snapshot(bundle) == before, "a refused bundle was changed"
    with pytest.raises(BundleError) as info:
        pteenet.load(bundle)
    assert as_shown(str(info.value), "calibrate") in line
    return line


def as_shown(message: str, command: str) -> str:
    """A library message as ``command`` shows it: one line, parameters as its options."""
    import typer
    from pteenet_cli._errors import as_flags, flags_of

    sub = typer.main.get_command(app).get_command(None, command)
    return as_flags(" ".join(message.split()), flags_of(sub))


# --------------------------------------------------------------------------- helpers that spoil


def meta_of(bundle: Path) -> dict:
    with safe_open(str(bundle / BRANCHES_FILE), "pt") as h:
        return json.loads(h.metadata()["pteenet"])


def rewrite(bundle: Path, edit_meta: Callable[[dict], None] | None = None,
            edit_tensors: Callable[[dict], None] | None = None, raw_meta: str | None = None):
    """Rewrite branches.safetensors with save_file: a well-formed file with other contents."""
    f = bundle / BRANCHES_FILE
    meta, tensors = meta_of(bundle), load_file(str(f))
    if edit_meta:
        edit_meta(meta)
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, str(f), metadata={"pteenet": raw_meta if raw_meta is not None
                                         else json.dumps(meta)})
    reseal(bundle)


def edit_header(bundle: Path, edit: Callable[[dict], None]) -> None:
    """Edit the safetensors JSON header in place (same length, space padded): what a hex editor
    or a careless script would do."""
    f = bundle / BRANCHES_FILE
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header, separators=(",", ":")).encode()
    assert len(new) <= n
    f.write_bytes(raw[:8] + new.ljust(n) + raw[8 + n:])
    reseal(bundle)


def first_tensor(header: dict, ndim: int) -> str:
    return next(k for k in sorted(header) if k.startswith("branches.")
                and header[k]["dtype"] == "F32" and len(header[k]["shape"]) == ndim)


def write_table(bundle: Path, text: str | None = None, **fields) -> None:
    f = bundle / THRESHOLDS_FILE
    if text is None:
        doc = json.loads(f.read_text())
        doc.update(fields)
        text = json.dumps(doc)  # json writes NaN and Infinity as bare words
    f.write_text(text)
    reseal(bundle)


def refused_by_readers_replaced_by_calibrate(bundle: Path, *words: str) -> str:
    """``pteenet.load`` and ``bench`` refuse the table with one line holding ``words``;
    ``calibrate`` replaces it (issue 13: it must always be able to), after which it loads."""
    with pytest.raises(BundleError) as info:
        pteenet.load(bundle)
    line = fails_cleanly(cli("bench", "-b", bundle, *FAST_BENCH), 3)
    for word in words:
        assert word in line, (word, line)
    assert as_shown(str(info.value), "bench") in line
    result = cli("calibrate", "-b", bundle, "-t", "0.5")
    assert result.exit_code == 0, result.output
    assert torch.equal(pteenet.load(bundle).thresholds, torch.full((2, 3), 0.5))
    return line


# --------------------------------------------------------------------------- the bundle file


def test_missing_bundle_folder(tmp_path):
    line = refused_everywhere(tmp_path / "nope", "no bundle at", "run `pteenet attach` first")
    assert str(tmp_path / "nope") in line


def test_folder_without_branches_file(bundle):
    (bundle / BRANCHES_FILE).unlink()
    refused_everywhere(bundle, "branches.safetensors missing", "pteenet attach")


def test_bundle_path_is_a_text_file(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("not a bundle")
    refused_everywhere(f, "not a readable bundle")


def test_truncated_branches_file(bundle):
    f = bundle / BRANCHES_FILE
    raw = f.read_bytes()
    f.write_bytes(raw[: len(raw) // 2])
    reseal(bundle)
    refused_everywhere(bundle, "not a readable bundle", "truncated")
    line = fails_cleanly(cli("bench", "-b", bundle, *FAST_BENCH), 3)
    assert "not a readable bundle" in line


@pytest.mark.parametrize("how", ["first-brace", "high-bit", "zero-length"])
def test_header_bytes_flipped(bundle, how):
    f = bundle / BRANCHES_FILE
    raw = bytearray(f.read_bytes())
    if how == "first-brace":
        raw[8] = ord("[")  # the header is no longer a JSON object
    elif how == "high-bit":
        raw[8 + 40] ^= 0x80  # invalid UTF-8 in the middle of the header
    else:
        raw[:8] = (0).to_bytes(8, "little")
    f.write_bytes(bytes(raw))
    reseal(bundle)
    refused_everywhere(bundle, "not a readable bundle")


def test_tensor_shape_changed_in_header(bundle):
    def transpose(h):
        k = first_tensor(h, 2)
        h[k]["shape"] = h[k]["shape"][::-1]

    edit_header(bundle, transpose)
    refused_everywhere(bundle, "do not match the metadata")


def test_tensor_dtype_changed_to_another_size(bundle):
    def to_f16(h):
        h[first_tensor(h, 2)]["dtype"] = "F16"

    edit_header(bundle, to_f16)
    refused_everywhere(bundle, "not a readable bundle")


def test_tensor_dtype_changed_to_same_size(bundle):
    def to_i32(h):
        h[first_tensor(h, 2)]["dtype"] = "I32"

    edit_header(bundle, to_i32)
    refused_everywhere(bundle, "edited")


def test_tensor_missing(bundle):
    def drop_a_weight(tensors):
        tensors.pop(next(k for k in sorted(tensors) if k.startswith("branches.")
                         and tensors[k].ndim == 2))

    rewrite(bundle, edit_tensors=drop_a_weight)
    refused_everywhere(bundle, "do not match the metadata")


def test_extra_tensor(bundle):
    rewrite(bundle, edit_tensors=lambda t: t.update({"branches.9.weight": torch.zeros(3)}))
    refused_everywhere(bundle, "do not match the metadata")


@pytest.mark.parametrize(("name", "edit", "words"), [
    ("no-format-version", lambda m: m.pop("format_version"), ["format_version"]),
    ("version-as-text", lambda m: m.update(format_version="1"), ["format_version"]),
    ("cuts-vs-branches", lambda m: m["cuts"].pop(), ["cuts and branches disagree"]),
    ("unknown-cut", lambda m: m["cuts"].__setitem__(0, "layer9"), ["layer9"]),
    ("unknown-branch-type", lambda m: m["branches"][0].update(type="conv9"), ["conv9"]),
    ("no-backbone-name", lambda m: m["backbone"].pop("name"), ["name"]),
    ("classes-vs-num-classes", lambda m: m["backbone"].update(num_classes=10), ["classes"]),
    ("segment-flops", lambda m: m.update(segment_flops=[1, 2]), ["segment_flops"]),
    ("negative-flops", lambda m: m.update(segment_flops=[1, -2, 3]), ["segment_flops"]),
    ("preprocess-mean", lambda m: m["preprocess"].update(mean="abc"), ["preprocess"]),
])
def test_metadata_edited(bundle, name, edit, words):
    rewrite(bundle, edit)
    refused_everywhere(bundle, *words)


def test_metadata_not_json(bundle):
    rewrite(bundle, raw_meta='{"format_version": 1, "backbone": {')
    refused_everywhere(bundle, "metadata is not valid JSON")


def test_metadata_absent(bundle):
    save_file(load_file(str(bundle / BRANCHES_FILE)), str(bundle / BRANCHES_FILE))
    reseal(bundle)
    refused_everywhere(bundle, "metadata")


def test_newer_format_version(bundle):
    rewrite(bundle, lambda m: m.update(format_version=99))
    line = refused_everywhere(bundle, "format version 99", "upgrade pteenet")
    assert f"({FORMAT_VERSION})" in line  # what this pteenet understands
    line = fails_cleanly(cli("bench", "-b", bundle, *FAST_BENCH), 3)
    assert "upgrade pteenet" in line


@pytest.mark.parametrize("field", ["training", "data", "extra"])
def test_metadata_section_not_an_object(bundle, field):
    rewrite(bundle, lambda m: m.update({field: "abc"}))
    refused_everywhere(bundle, field)


def test_preprocess_input_size_zero(bundle):
    rewrite(bundle, lambda m: m["preprocess"].update(input_size=[0, 0]))
    refused_everywhere(bundle, "preprocess")


# --------------------------------------------------------------------------- the checkpoint hash


@pytest.fixture(scope="module")
def other_checkpoint(shared, tmp_path_factory) -> Path:
    """The bundle's checkpoint with one weight changed: same architecture, other SHA-256."""
    sd = torch.load(shared[1], map_location="cpu", weights_only=True)
    key = next(k for k, v in sd.items() if v.is_floating_point())
    sd[key] = sd[key].clone()
    sd[key].view(-1)[0] += 1e-3
    path = tmp_path_factory.mktemp("other") / "other.pt"
    torch.save(sd, path)
    return path


def test_other_checkpoint_is_refused_without_force(bundle, other_checkpoint):
    before = snapshot(bundle)
    line = fails_cleanly(cli("calibrate", "-b", bundle, "-t", "0.5", "-c", other_checkpoint), 3)
    assert "is not the one the branches were trained on" in line and "--force" in line
    assert str(other_checkpoint) in line
    line = fails_cleanly(cli("bench", "-b", bundle, "-c", other_checkpoint, *FAST_BENCH), 3)
    assert "--force" in line
    with pytest.raises(BundleError, match="not the one the branches were trained on"):
        pteenet.load(bundle, checkpoint=other_checkpoint)
    assert snapshot(bundle) == before


def test_other_checkpoint_is_accepted_with_force(bundle, other_checkpoint):
    result = cli("calibrate", "-b", bundle, "-t", "0.5", "-c", other_checkpoint, "--force")
    assert result.exit_code == 0, result.output
    model = pteenet.load(bundle, checkpoint=other_checkpoint, force=True)
    assert model.num_branches == 2
    assert torch.equal(model.thresholds, torch.full((2, 3), 0.5))


def test_recorded_checkpoint_changed_in_place(bundle, other_checkpoint):
    rewrite(bundle, lambda m: m["backbone"].update(checkpoint_path=str(other_checkpoint)))
    refused_everywhere(bundle, "is not the one the branches were trained on", "--force")


def test_recorded_checkpoint_gone(bundle, tmp_path):
    rewrite(bundle, lambda m: m["backbone"].update(checkpoint_path=str(tmp_path / "gone.pt")))
    refused_everywhere(bundle, "gone", "--checkpoint")


# --------------------------------------------------------------------------- the threshold table


@pytest.mark.parametrize(("name", "fields", "words"), [
    ("wrong-branch-count", {"thresholds": [[0.5] * 3] * 3}, ["3 branches", "2 x 3"]),
    ("wrong-class-count", {"thresholds": [[0.5] * 4] * 2}, ["4 classes", "2 x 3"]),
    ("no-rows", {"thresholds": []}, ["0 branches"]),
    ("above-one", {"thresholds": [[0.5, 1.5, 0.5], [0.5] * 3]}, ["[0, 1]"]),
    ("below-zero", {"thresholds": [[0.5] * 3, [0.5, 0.5, -0.1]]}, ["[0, 1]"]),
    ("nan", {"thresholds": [[float("nan"), 0.5, 0.5], [0.5] * 3]}, ["NaN"]),
    ("infinity", {"thresholds": [[0.5] * 3, [float("inf")] * 3]}, ["[0, 1]"]),
    ("text", {"thresholds": [["high", 0.5, 0.5], [0.5] * 3]}, ["numbers"]),
    ("booleans", {"thresholds": [[True, 0.5, 0.5], [0.5] * 3]}, ["numbers"]),
    ("row-not-a-list", {"thresholds": [[0.5] * 3, "0.5"]}, ["numbers"]),
    ("no-thresholds", {"thresholds": None}, ["thresholds"]),
    ("unknown-score", {"score": "logit"}, ["logit"]),
])
def test_threshold_table_refused(bundle, name, fields, words):
    write_table(bundle, **fields)
    line = refused_by_readers_replaced_by_calibrate(bundle, *words)
    assert THRESHOLDS_FILE in line


@pytest.mark.parametrize("text", ["{not json", "", "\x00\xff garbage", "[0.5, 0.5]"])
def test_threshold_file_not_json_or_not_an_object(bundle, text):
    write_table(bundle, text=text)
    refused_by_readers_replaced_by_calibrate(bundle, THRESHOLDS_FILE)


@pytest.mark.parametrize("rows", [[[0.5] * 3, [0.5]], [[0.5] * 3, [0.5] * 5]])
def test_ragged_threshold_table(bundle, rows):
    write_table(bundle, thresholds=rows)
    refused_by_readers_replaced_by_calibrate(bundle, THRESHOLDS_FILE)


@pytest.mark.parametrize("fields", [{"params": "margin=0.1"}, {"summary": [1, 2]}])
def test_threshold_side_fields_not_objects(bundle, fields):
    write_table(bundle, **fields)
    refused_by_readers_replaced_by_calibrate(bundle, THRESHOLDS_FILE)


def test_threshold_file_is_a_folder(bundle):
    (bundle / THRESHOLDS_FILE).unlink()
    (bundle / THRESHOLDS_FILE).mkdir()
    refused_everywhere(bundle, THRESHOLDS_FILE)


def test_a_deleted_threshold_table_is_refused_and_calibrate_replaces_it(bundle):
    """bundle.json records the table: once deleted it is not read as "never calibrated" (issue
    29), and calibrate writes a new one."""
    (bundle / THRESHOLDS_FILE).unlink()
    refused_by_readers_replaced_by_calibrate(bundle, "thresholds.json missing", "deleted",
                                             "pteenet calibrate")


# --------------------------------------------------------------------------- issue 13


def test_a_file_edited_behind_the_manifest_is_refused(bundle):
    f = bundle / BRANCHES_FILE
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 0x01  # one weight's last byte: still a well-formed safetensors file
    f.write_bytes(bytes(raw))
    refused_everywhere(bundle, "branches.safetensors has changed since pteenet wrote it",
                       "bundle.json", "pteenet attach")


def test_a_table_edited_behind_the_manifest_is_refused_and_replaced(bundle):
    doc = json.loads((bundle / THRESHOLDS_FILE).read_text())
    doc["thresholds"][0][0] = 0.1  # a valid table, but not the one committed
    (bundle / THRESHOLDS_FILE).write_text(json.dumps(doc))
    refused_by_readers_replaced_by_calibrate(bundle, "has changed since pteenet wrote it")


@pytest.mark.parametrize(("name", "edit", "words"), [
    ("num-classes-1e8", lambda m: m["backbone"].update(num_classes=10**8) or
     m.update(classes=None), ["num_classes 100000000", "classifiers for 3"]),
    ("input-size-8192", lambda m: m["preprocess"].update(input_size=[8192, 8192]),
     ["input size", "1..2048"]),
])
def test_size_fields_are_bounded_before_allocating(bundle, name, edit, words):
    """Item 4: without a thresholds file, num_classes 1e8 once allocated 25 GB for the default
    table; an 8192x8192 input size 4 GB for tracing. Both are refused first."""
    uncalibrate(bundle)  # a bundle with no table at all: the default one is made
    rewrite(bundle, edit)
    refused_everywhere(bundle, *words)


@pytest.mark.parametrize(("name", "raw", "words"), [
    ("nested-200000-deep", '{"format_version": ' + "[" * 200_000 + "]" * 200_000 + "}",
     ["metadata is nested too deeply"]),
    ("integer-of-401-digits", '{"format_version": ' + "9" * 401 + "}",
     ["metadata holds an integer of 401 digits"]),
])
def test_parser_limits_in_metadata_are_bundle_errors(bundle, name, raw, words):
    """Item 5: RecursionError and integer conversion errors once escaped as internal errors."""
    rewrite(bundle, raw_meta=raw)
    line = refused_everywhere(bundle, *words)
    assert len(line) < 400  # the number is not echoed


@pytest.mark.parametrize(("name", "text", "words"), [
    ("nested-200000-deep", '{"thresholds": ' + "[" * 200_000 + "]" * 200_000 + "}",
     ["nested too deeply"]),
    ("integer-of-401-digits", '{"thresholds": [[1' + "0" * 400 + ", 0, 0], [0, 0, 0]]}",
     ["integer of 401 digits"]),
])
def test_parser_limits_in_the_table_are_bundle_errors(bundle, name, text, words):
    write_table(bundle, text=text)
    line = refused_by_readers_replaced_by_calibrate(bundle, THRESHOLDS_FILE, *words)
    assert len(line) < 400


@pytest.mark.parametrize(("value", "shown"), [(float("inf"), "found inf"), (-1, "found -1"),
                                              (2, "found 2"), (float("nan"), "NaN")])
def test_out_of_range_thresholds_are_named_as_they_are(bundle, value, shown):
    """Item 9: inf, -1 and 2 were all reported as "NaN is refused"."""
    write_table(bundle, thresholds=[[0.5, value, 0.5], [0.5] * 3])
    line = refused_by_readers_replaced_by_calibrate(bundle, "[0, 1]", shown)
    assert ("NaN" in line) == (shown == "NaN")


def test_a_huge_value_is_not_echoed_in_full(bundle):
    write_table(bundle, score="x" * 100_000)
    line = refused_by_readers_replaced_by_calibrate(bundle, "unknown score")
    assert len(line) < 400


def test_relabelled_calibration_indices_are_refused(bundle):
    """Item 7: the recorded SHA-256 is checked; relabelled indices once made calibrate use
    image 0 over and over."""
    def relabel(tensors):
        tensors["calibration_indices"] = torch.zeros_like(tensors["calibration_indices"])

    rewrite(bundle, edit_tensors=relabel)
    refused_everywhere(bundle, "calibration_indices is malformed")
    rewrite(bundle, edit_tensors=lambda t: t.update(calibration_indices=torch.tensor([0, 1])))
    refused_everywhere(bundle, "calibration indices do not match their recorded SHA-256")


def test_calibration_indices_retyped_in_the_header_are_refused(bundle):
    def to_f64(h):
        h["calibration_indices"]["dtype"] = "F64"

    edit_header(bundle, to_f64)
    refused_everywhere(bundle, "calibration_indices is malformed")


def test_a_bundle_without_the_checkpoint_hash_needs_force(bundle):
    """Item 7: a missing checkpoint_sha256 once skipped the check silently."""
    rewrite(bundle, lambda m: m["backbone"].pop("checkpoint_sha256"))
    refused_everywhere(bundle, "records no SHA-256", "--force")
    result = cli("calibrate", "-b", bundle, "-t", "0.5", "--force")
    assert result.exit_code == 0, result.output
    assert pteenet.load(bundle, force=True).num_branches == 2


def test_a_gate_threshold_a_hair_below_one_round_trips(bundle):
    """The gate's power for a threshold near 1 is in the millions: the reader takes any
    finite power, so a table calibrate wrote always reads back."""
    model = pteenet.load(bundle)
    model.set_thresholds(0.5, score="gate", gamma=[gate_power(0.3), gate_power(1 - 1e-9)])
    assert max(model.gamma.tolist()) > 1e6
    write_thresholds(bundle, ThresholdTable.of(model))
    again = pteenet.load(bundle)
    assert again.gamma.tolist() == pytest.approx(model.gamma.tolist())


# --------------------------------------------------------------------------- other layouts
@pytest.mark.parametrize("version", [1, 2])
def test_a_pre_release_format_version_is_refused(bundle, version):
    """Nothing before format version 3 was released: such a bundle is re-attached, not read."""
    rewrite(bundle, lambda m: m.update(format_version=version))
    line = refused_everywhere(bundle, f"format version {version}", "pre-release",
                              "re-run `pteenet attach`")
    assert "edited" not in line


def resize(key: str, cols: int) -> Callable[[dict], None]:
    return lambda t: t.update({key: torch.randn(t[key].shape[0], cols)})


def test_a_resized_branch_tensor_is_an_edit(bundle):
    rewrite(bundle, edit_tensors=resize("branches.0.body.1.weight", 999))
    refused_everywhere(bundle, "do not match the metadata", "edited?")
