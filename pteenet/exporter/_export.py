"""Export a bundle's cascade as standalone graphs (ONNX or TorchScript) plus a JSON manifest.

Each segment and each branch becomes its own graph, so a runtime can stop after any branch and
feed only the samples still in flight to the next segment (true early exit, batch compaction):
one monolithic graph could not skip work per sample. Branch graphs return ``(logits, score)``
with the exit score (sigmoid of the confidence head, or the top softmax probability, raised to
the exit's power for the gate score) baked in; unless the score is the head's, the graph leaves
the confidence head out. So the runtime needs neither torch nor pteenet's model code:
:mod:`pteenet.runtime` runs the folder with numpy and onnxruntime (or torch for TorchScript).

Folder layout (``<bundle>/export-<format>`` by default)::

    segment_0.onnx ... segment_B.onnx   image -> cut 0 -> ... -> backbone logits
    branch_0.onnx  ... branch_{B-1}.onnx  cut k -> (logits [N, K], score [N])
    cascade_1.onnx                      ONNX only: the batch-1 cascade as one graph
    manifest.json                       order, thresholds (null = never), FLOPs, preprocessing

``cascade_1.onnx`` (:mod:`pteenet.exporter`) holds the exits active at export under nested
``If`` nodes, the table as an input; it is left out for an ensemble, an opset below 12 or
weights near ONNX's 2 GB limit, and the manifest's ``single_runs`` lists the branches it holds.

With a ZTW ensemble (Wołczyk et al. 2021; :mod:`pteenet.cascade`) branch k > 0 also takes the
log-softmaxes of exits 0..k-1 (input ``history`` ``[N, k, K]``) and returns the ensembled
``(logits, score)`` plus ``history`` extended with its own (``[N, k+1, K]``): the weights and
the combination are baked into the graphs, so the runtime only carries that array along with
the samples in flight. Such manifests say ``"ensemble": true`` and are format version 2 (older
runtimes refuse them rather than run the exits alone); manifests without it stay version 1.

Every graph has a dynamic batch dimension, and each is checked after writing by running it on a
batch size other than the one it was traced with, so a graph that silently fixed the batch size
is refused here rather than in deployment. Every file is written atomically, the manifest last
with each graph's SHA-256, so a cascade whose export was interrupted is refused by the runtime
rather than run with old and new graphs mixed; the folder's writer lock keeps two exports apart.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pteenet import __version__
from pteenet.backbone._registry import sha256_file
from pteenet.bundle._derived import BUNDLE_HASH_KEY
from pteenet.bundle._load import load
from pteenet.bundle._read import read_bundle
from pteenet.bundle._schema import Bundle, BundleInfo
from pteenet.cascade._model import EarlyExitModel
from pteenet.cascade._onnx import save_onnx
from pteenet.cascade._score import exit_score
from pteenet.cascade._traced import Answer
from pteenet.choices import FORMATS
from pteenet.errors import BundleError, ExportError, OptionError
from pteenet.exporter._single_graph import MIN_OPSET, single_graph
from pteenet.runtime import MANIFEST, MANIFEST_VERSION
from pteenet.storage import atomic_path, write_text, writer_lock
from pteenet.thresholds import json_rows

__all__ = ["MANIFEST", "MANIFEST_VERSION", "export", "export_model", "manifest_for"]

SUFFIX = {"onnx": ".onnx", "torchscript": ".pt"}
SINGLE = "cascade_1.onnx"  # the batch-1 cascade as one graph (ONNX only)
MAX_SINGLE_BYTES = 1900 << 20  # one graph holds every weight: ONNX protobufs stop at 2 GB
TRACE_BATCH = 2  # graphs are traced on this batch size ...
CHECK_BATCH = 3  # ... and verified on another, to prove the batch dimension stayed dynamic
INSTALL_HINT = "pip install pteenet[onnx]"


class ScoredBranch(nn.Module):
    """Branch ``k`` of ``model`` whose second output is already its exit score, so runtimes need
    no torch math. The score is :func:`~pteenet.cascade._score.exit_score`, the one the model
    runs, so the exported graph and the Python model cannot compute it differently.
    With an ensemble it takes the earlier exits' log-softmaxes too and returns them extended,
    combined by the model's own :class:`~pteenet.cascade._ensemble.ZTWEnsemble`."""

    def __init__(self, model: EarlyExitModel, k: int) -> None:
        super().__init__()
        self.k = k
        self.answer = Answer(model.branches[k], model.score == "head")  # head only if read
        self.ensemble = model.ensemble
        self._score = functools.partial(exit_score, model.score, gamma=float(model.gamma[k]))

    def forward(self, x: torch.Tensor, *history: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.answer(x)
        logits, confidence = out if self.answer.head else (out, None)
        if self.ensemble is None:
            return logits, self._score(logits, confidence)
        logits, seen = self.ensemble.step(history[0] if history else None, logits, self.k)
        return logits, self._score(logits, confidence), seen


def export(
    bundle: str | os.PathLike = "pteenet-out",
    *,
    format: str = "onnx",
    out: str | os.PathLike | None = None,
    opset: int = 17,
    checkpoint: str | os.PathLike | None = None,
    force: bool = False,
    model: nn.Module | Callable[[], nn.Module] | None = None,
) -> Path:
    """Write the bundle's segments, branches and manifest into ``out``; return that folder.
    ``model``: the backbone module of a bundle attached to the user's own (see :func:`load`)."""
    _check_format(format, opset)
    b = read_bundle(bundle)  # fail fast on a bad bundle, before building the backbone
    folder = _folder(out, b.path / f"export-{format}")
    with writer_lock(folder, create=True):  # also the writability check, before any work
        ee = load(b, checkpoint=checkpoint, force=force, model=model)
        return _export(ee, b, folder, format, opset)


def export_model(model: EarlyExitModel, bundle: Bundle, out: str | os.PathLike, *,
                 format: str = "onnx", opset: int = 17) -> Path:
    """:func:`export` of a model already loaded from ``bundle`` (what :func:`pteenet.load`
    returned for :func:`pteenet.bundle.read_bundle`'s value), under its current thresholds:
    what ``bench`` times without reading, building and hashing the bundle a second time."""
    _check_format(format, opset)
    folder = _folder(out, None)
    with writer_lock(folder, create=True):
        return _export(model, bundle, folder, format, opset)


def _folder(out: str | os.PathLike | None, default: Path | None) -> Path:
    folder = Path(out) if out is not None else default
    if folder.exists() and not folder.is_dir():
        raise OptionError(f"`out` {folder} is a file; give a folder")
    return folder


def _export(ee: EarlyExitModel, b: Bundle, folder: Path, format: str, opset: int) -> Path:
    was = ee.training
    ee.eval()
    try:
        size = b.info.preprocess.input_size
        files = _write_graphs(ee, size, folder, format, opset)
        if format == "onnx":
            files.update(_write_single(ee, size, folder, files, opset))
    finally:
        ee.train(was)
    manifest = manifest_for(ee, b.info, format, files, b.sha256)
    manifest["sha256"] = {f: sha256_file(folder / f) for group in files.values() for f in group}
    write_text(folder / MANIFEST, json.dumps(manifest, indent=1))
    return folder


def _write_graphs(model: Any, size: tuple[int, int], folder: Path, format: str, opset: int
                  ) -> dict[str, list[str]]:
    """Each segment and branch as its own graph file; returns their names by group."""
    graphs = {"segment": list(model.segments),
              "branch": [ScoredBranch(model, k).eval() for k in range(model.num_branches)]}
    traced = _example_inputs(model, size, TRACE_BATCH)
    checked = _example_inputs(model, size, CHECK_BATCH)
    files: dict[str, list[str]] = {"segments": [], "branches": []}
    for kind, group in (("segment", "segments"), ("branch", "branches")):
        for k, module in enumerate(graphs[kind]):
            name = f"{kind}_{k}{SUFFIX[format]}"
            _write_graph(module, traced[kind][k], checked[kind][k], folder / name, format,
                         opset, f"{kind} {k}")
            files[group].append(name)
    return files


def _write_single(model: Any, size: tuple[int, int], folder: Path, files: dict[str, list[str]],
                  opset: int) -> dict[str, list[str]]:
    """The batch-1 cascade as one graph (:mod:`pteenet.exporter._single_graph`), built from the
    pieces just written: ``{"single": [name]}``, or nothing for an ensemble (its exits read the
    earlier ones), an opset below the graph's, a table where no exit can fire, or weights near
    ONNX's 2 GB limit."""
    if model.ensemble is not None or opset < MIN_OPSET or not any(model.evaluated):
        return {}
    if sum((folder / f).stat().st_size for group in files.values() for f in group) > \
            MAX_SINGLE_BYTES:
        return {}
    import onnx

    def read(group: str) -> list[Any]:
        return [onnx.load(str(folder / f)) for f in files[group]]

    with _writing(folder / SINGLE, "onnx", "the batch-1 cascade") as tmp:
        graph = single_graph(read("segments"), read("branches"), model.evaluated,
                             model.num_classes)
        onnx.save(graph, str(tmp))
        onnx.checker.check_model(str(tmp))
        _verify_single(model, size, tmp)
    return {"single": [SINGLE]}


def manifest_for(model: Any, info: BundleInfo, format: str, files: dict[str, list[str]],
                 bundle_sha256: str | None) -> dict[str, Any]:
    """The manifest: everything a runtime needs besides the graphs, as plain JSON;
    ``info`` is the bundle the model was loaded from and ``bundle_sha256`` the hash of its
    bundle.json."""
    ensemble = {} if model.ensemble is None else {"ensemble": True}
    return {
        "format_version": MANIFEST_VERSION, **ensemble,
        "pteenet_version": __version__, "format": format,
        "backbone": info.backbone.get("name"), "num_branches": model.num_branches,
        "num_classes": model.num_classes, "input_size": list(info.preprocess.input_size),
        "mean": list(info.preprocess.mean), "std": list(info.preprocess.std),
        "resize_size": info.preprocess.resize_size,
        "interpolation": info.preprocess.interpolation, "classes": info.classes,
        "cuts": list(info.cuts), "score": model.score, "thresholds": json_rows(model.thresholds),
        "active": model.active, "segment_flops": list(model.segment_flops),
        "branch_flops": list(model.branch_flops), "backbone_flops": model.backbone_flops,
        "exit_costs": model.cost_in("flops").exits(model.active), "files": files,
        **({"single_runs": list(model.evaluated)} if "single" in files else {}),
        BUNDLE_HASH_KEY: bundle_sha256,
    }


# -- helpers ----------------------------------------------------------------------------------
def _check_format(format: str, opset: int) -> None:
    if format not in FORMATS:
        raise OptionError(f"unknown export format '{format}': use one of {', '.join(FORMATS)}")
    if format == "onnx":
        try:
            import onnx  # noqa: F401
        except ImportError as e:
            raise OptionError(f"ONNX export needs the onnx package: {INSTALL_HINT}") from e
        if not 9 <= opset <= 25:
            raise OptionError(f"`opset` must lie in 9..25, got {opset}")


@torch.no_grad()
def _example_inputs(model: Any, size: tuple[int, int], n: int
                    ) -> dict[str, list[tuple[torch.Tensor, ...]]]:
    """Seeded inputs of every segment and branch: the image, then each cut's feature map (and,
    with an ensemble, the log-softmaxes of the exits before the branch)."""
    h, w = size
    x = torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(n))
    feats, _ = model.features(x)
    branch, history = [], None
    for k, (f, answer) in enumerate(zip(feats, model.answers(x))):
        branch.append((f,) if history is None else (f, history))
        if model.ensemble is not None:
            history = model.ensemble.step(history, answer(f)[0], k)[1]
    return {"segment": [(x,), *((f,) for f in feats)], "branch": branch}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Tracing and the legacy ONNX exporter warn about things that do not apply here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _write_graph(module: nn.Module, example: tuple[torch.Tensor, ...],
                 check: tuple[torch.Tensor, ...], path: Path, format: str, opset: int,
                 what: str) -> None:
    """Export one graph atomically, then prove it reproduces the module on another batch size."""
    with _writing(path, format, what) as tmp:
        if format == "onnx":
            _save_onnx(module, example, tmp, opset)
        else:
            torch.jit.save(torch.jit.trace(module, example, check_trace=False), str(tmp))
        _verify(module, check, tmp, format, what)


@contextlib.contextmanager
def _writing(path: Path, format: str, what: str) -> Iterator[Path]:
    """A temporary path that becomes ``path`` if the body succeeds; any failure one line."""
    try:
        with atomic_path(path) as tmp, _quiet():
            yield tmp
    except (OptionError, ExportError):
        raise
    except OSError as e:  # the folder, not the format: another --format would not help
        raise BundleError(f"cannot write {path} ({e.strerror or e}); check the folder's "
                          f"permissions and free space") from e
    except Exception as e:  # exporters raise many types; the user needs one line and a way out
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        other = "torchscript" if format == "onnx" else "onnx"
        raise ExportError(f"cannot export {what} as {format} ({type(e).__name__}: {first}); "
                          f"try `format` {other}") from e


def _save_onnx(module: nn.Module, example: tuple[torch.Tensor, ...], path: Path,
               opset: int) -> None:
    """The TorchScript-based exporter (dynamo=False): it needs no onnxscript and works offline."""
    import onnx

    inputs = ["input", "history"][: len(example)]
    outputs = ["output"] if not isinstance(module, ScoredBranch) else ["logits", "score"]
    if isinstance(module, ScoredBranch) and module.ensemble is not None:
        outputs.append("history_out")
    save_onnx(module, example, path, inputs, outputs, opset)
    onnx.checker.check_model(onnx.load(str(path)))


def _run_saved(path: Path, format: str, xs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    if format == "torchscript":
        with torch.no_grad():
            out = torch.jit.load(str(path), map_location="cpu")(*xs)
        return list(out) if isinstance(out, tuple) else [out]
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {i.name: x.numpy() for i, x in zip(sess.get_inputs(), xs)}
    return [torch.from_numpy(o) for o in sess.run(None, feed)]


@torch.no_grad()
def _verify_single(model: Any, size: tuple[int, int], path: Path) -> None:
    """Run the batch-1 graph on one image against the model: under the model's own table, with
    every threshold inf (the backbone answers), and once per branch it holds with that exit's
    row at 0 and every other inf (that exit answers), so every ``If`` is taken both ways.

    Skipped when onnxruntime is absent (the checker has already passed)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    h, w = size
    x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(1))
    feats, final = model.features(x)
    answers = model.answers(x)  # no ensemble here: each exit answers with its own logits
    table = model.thresholds.numpy().astype(np.float32)
    res = model.early_exit(x)
    cases = [(table, int(res.exit_index[0]), res.logits),
             (np.full_like(table, np.inf), model.num_branches, final)]
    for k in (k for k, on in enumerate(model.evaluated) if on):
        only = np.full_like(table, np.inf)
        only[k] = 0
        cases.append((only, k, answers[k](feats[k])[0]))
    for thresholds, want_exit, want in cases:
        logits, exit_index = sess.run(None, {"input": x.numpy(), "thresholds": thresholds})
        tol = 1e-3 * (1 + float(want.abs().max()))
        if int(exit_index[0]) != want_exit or float((torch.from_numpy(logits) - want).abs()
                                                     .max()) > tol:
            raise ExportError(f"the exported batch-1 cascade answers at exit "
                              f"{int(exit_index[0])} where the model answers at {want_exit}, or "
                              f"with other logits; export with `opset` below {MIN_OPSET} to "
                              f"leave it out")


def _verify(module: nn.Module, xs: tuple[torch.Tensor, ...], path: Path, format: str,
            what: str) -> None:
    """Run the saved graph on a batch size it was not traced with and compare with torch.

    Skipped for ONNX when onnxruntime is absent (the checker has already passed)."""
    if format == "onnx":
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return
    with torch.no_grad():
        ref = module(*xs)
    ref = list(ref) if isinstance(ref, tuple) else [ref]
    got = _run_saved(path, format, xs)
    if len(got) != len(ref):
        raise ExportError(f"the exported {what} returns {len(got)} outputs, not {len(ref)}")
    for r, g in zip(ref, got):
        tol = 1e-3 * (1 + float(r.abs().max()))
        if tuple(r.shape) != tuple(g.shape) or float((r - g).abs().max()) > tol:
            raise ExportError(f"the exported {what} does not reproduce the model on a batch of "
                              f"{xs[0].shape[0]} (fixed batch size or unsupported op); try the "
                              f"other `format`")
