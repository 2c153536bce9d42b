"""Run an exported early-exit cascade (``pteenet export``) with onnxruntime or TorchScript.

A deployment should not need torch or pteenet's training code, so this module imports only
numpy at import time: onnxruntime, torch (TorchScript folders only) and Pillow (only for
:meth:`Cascade.preprocess`) are imported when first needed. It depends on nothing else in
pteenet, so it can also be copied alone beside an exported folder.

    from pteenet.runtime._cascade import Cascade

    cascade = Cascade.open("pteenet-out/export-onnx")
    preds, exits = cascade(cascade.preprocess(["cat.png", "dog.jpg"]))

The exit rule and the batch compaction are those of ``EarlyExitModel.early_exit``: after
segment k and branch k, a sample predicted ``c`` leaves when its score is at least
``thresholds[k][c]`` (null = never); only the samples still in flight go on to segment k + 1.
With a ZTW ensemble (manifest ``"ensemble": true``, format version 2; Wołczyk et al. 2021) each
branch graph after the first also reads the log-softmaxes of the exits before it and returns
them extended: the runtime keeps that array per sample in flight, compacts it with the batch,
and runs every branch up to the last exit that may fire, since the later exits read them.
A single image runs through ``cascade_1.onnx`` when the export wrote one
(:mod:`pteenet.exporter._single_graph`): the same pieces in one session, with the table as its
input.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

try:
    from pteenet.errors import BundleError, OptionError
except ImportError:  # copied alone, outside the pteenet package

    class OptionError(Exception):  # type: ignore[no-redef]
        """A bad argument or a missing optional dependency."""

    class BundleError(Exception):  # type: ignore[no-redef]
        """A missing or corrupt exported folder."""


__all__ = ["MANIFEST", "Cascade", "CascadeResult"]

MANIFEST = "manifest.json"
MANIFEST_VERSION = 2  # 2: branches of a ZTW ensemble read the exits before them
INSTALL_HINT = "pip install pteenet[onnx]"
_MAX_DIGITS = 19  # longer integers are refused while parsing (no count of ours needs more)
_MAX_COUNT = 1 << 20  # branches or classes: beyond it the manifest is edited, not exported
_MAX_SIDE = 2048  # pteenet.backbone._preprocess.MAX_INPUT_SIDE (this module must run alone)

Graph = Callable[..., tuple[np.ndarray, ...]]  # arrays in, in the graph's input order


@dataclass
class CascadeResult:
    """Per sample, in input order: the answering exit's logits, its index and the FLOPs spent."""

    logits: np.ndarray  # [N, K] float32
    exit_index: np.ndarray  # [N] int64: 0..B-1 for branches, B for the backbone's head
    flops: np.ndarray  # [N] float64: segments run plus every branch evaluated

    @property
    def preds(self) -> np.ndarray:
        return self.logits.argmax(1).astype(np.int64)


class Cascade:
    """Segments and branches loaded from an exported folder, run with true early exit.

    ``thresholds`` is a float32 ``[B, K]`` array (inf = never) read from the manifest; assign
    another table to it (any real dtype; stored as float32, the model's own precision, so every
    path compares alike) to try it without exporting again.
    """

    def __init__(self, manifest: dict[str, Any], segments: Sequence[Graph],
                 branches: Sequence[Graph], single: Graph | None = None) -> None:
        self.manifest = manifest
        self.segments = list(segments)
        self.branches = list(branches)
        self.single = single  # the batch-1 cascade as one graph, if exported
        self._planned: tuple[bytes, tuple] | None = None
        rows = manifest["thresholds"]
        self.thresholds = np.array([[np.inf if v is None else v for v in r] for r in rows])

    @property
    def thresholds(self) -> np.ndarray:
        return self._thresholds

    @thresholds.setter
    def thresholds(self, value: Any) -> None:
        shape = (len(self.branches), self.num_classes)
        try:
            table = np.array(value, dtype=np.float32)
        except (TypeError, ValueError):
            table = None
        if table is None or table.shape != shape or np.isnan(table).any():
            got = "NaN or non-numbers" if table is None or table.shape == shape else \
                f"shape {list(table.shape)}"
            raise OptionError(f"thresholds must be a {list(shape)} table of numbers (inf = "
                              f"never), got {got}")
        self._thresholds = table

    # -- loading --------------------------------------------------------------------------
    @classmethod
    def open(cls, folder: str | os.PathLike, *, providers: Sequence[str] | None = None,
             threads: int | None = None) -> Cascade:
        """Read ``manifest.json`` and load every graph; ``providers`` are onnxruntime's,
        ``threads`` its intra-op threads (default: onnxruntime's choice)."""
        folder = Path(folder)
        manifest = read_manifest(folder)
        onnx = manifest["format"] == "onnx"
        load = _onnx_loader(providers, threads) if onnx else _torchscript_loader()
        files = manifest["files"]
        single = files.get("single")
        alone = _onnx_loader(providers, threads, spin=True) if single and onnx else None
        return cls(manifest, [load(folder / f) for f in files["segments"]],
                   [load(folder / f) for f in files["branches"]],
                   _OnFirstUse(lambda: alone(folder / single[0])) if alone else None)

    # -- facts ----------------------------------------------------------------------------
    @property
    def num_branches(self) -> int:
        return len(self.branches)

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    @property
    def input_size(self) -> tuple[int, int]:
        h, w = self.manifest["input_size"]
        return int(h), int(w)

    @property
    def classes(self) -> list[str] | None:
        return self.manifest.get("classes")

    @property
    def ensemble(self) -> bool:
        """Whether each exit answers with a ZTW ensemble of the exits so far."""
        return self.manifest.get("ensemble", False) is True

    def runs(self) -> tuple[np.ndarray, np.ndarray]:
        """(exits that may fire, branches that run) under the current thresholds: an exit that
        can never fire, or that calibration switched off, is not run, unless an ensemble reads
        it (every branch up to the last exit that may fire)."""
        b = self.num_branches
        active = (self.thresholds.min(1) <= 1) & np.asarray(self.manifest.get("active", [True] * b),
                                                            dtype=bool)
        if not self.ensemble or not active.any():
            return active, active
        return active, np.arange(b) <= np.flatnonzero(active).max()

    # -- running --------------------------------------------------------------------------
    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Predicted classes ``[N]`` and exit indices ``[N]`` (int64) of normalised images."""
        res = self.run(images)
        return res.preds, res.exit_index

    def run(self, images: np.ndarray) -> CascadeResult:
        """True early exit with batch compaction: later segments see only samples in flight.
        A single image runs through the one-graph cascade when it holds the current exits."""
        x = self._check_images(images)
        active, runs, flops, fits = self._plan()
        if x.shape[0] == 1 and fits:
            logits, exit_index = self.single(x, self.thresholds)
            exit_index = exit_index.astype(np.int64, copy=False)
            return CascadeResult(logits, exit_index, flops[exit_index])
        n, b = x.shape[0], self.num_branches
        logits = np.zeros((n, self.num_classes), dtype=np.float32)
        exit_index = np.full(n, b, dtype=np.int64)
        alive, h = np.arange(n), x
        history: tuple[np.ndarray, ...] = ()  # the ensemble's: earlier exits' log-softmaxes
        for k in range(b):
            if alive.size == 0:
                break
            h = self.segments[k](h)[0]
            if not runs[k]:
                continue
            out, score, *rest = self.branches[k](h, *history)
            history = tuple(rest[:1]) if self.ensemble else ()
            if not active[k]:
                continue
            leave = score >= self.thresholds[k][out.argmax(1)]
            logits[alive[leave]] = out[leave]
            exit_index[alive[leave]] = k
            if leave.any():
                h, alive = np.ascontiguousarray(h[~leave]), alive[~leave]
                history = tuple(np.ascontiguousarray(a[~leave]) for a in history)
        if alive.size:
            logits[alive] = self.segments[b](h)[0]
        return CascadeResult(logits, exit_index, flops[exit_index])

    def _plan(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
        """(:meth:`runs`, each exit's FLOPs, whether the one-graph cascade fits) for the current
        table, worked out once per table (its bytes, so an in-place edit counts): worked out on
        every call they were 8 us of ResNet-44's 390 us batch-1 cascade call."""
        key = self._thresholds.tobytes()
        if self._planned is None or self._planned[0] != key:
            active, runs = self.runs()
            self._planned = (key, (active, runs, _exit_flops(self.manifest, runs),
                                   self._single_fits(runs)))
        return self._planned[1]

    def _single_fits(self, runs: np.ndarray) -> bool:
        """The one-graph cascade holds the branches that ran at export; it answers a single
        image only while the current table runs the same ones (the thresholds are its input)."""
        return self.single is not None and \
            runs.tolist() == self.manifest.get("single_runs")

    def _check_images(self, images: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(images, dtype=np.float32)
        h, w = self.input_size
        if x.ndim != 4 or x.shape[1:] != (3, h, w):
            raise OptionError(f"images must be a float32 array [N, 3, {h}, {w}] (normalised, "
                              f"see Cascade.preprocess), got shape {list(x.shape)}")
        return x

    def preprocess(self, images: Sequence[Any]) -> np.ndarray:
        """PIL images (or paths) -> normalised float32 ``[N, 3, H, W]``, as the bundle's data.

        With the manifest's ``resize_size`` (ImageNet models) the shorter side is resized with
        its interpolation and the centre cropped, exactly as the bundle's data was. Otherwise
        Pillow's bilinear filter resizes straight to the input size: identical to training for
        images already at the input size, very close (not bit-identical) to torchvision's resize
        otherwise."""
        from PIL import Image

        h, w = self.input_size
        mean = np.asarray(self.manifest["mean"], dtype=np.float32).reshape(-1, 1, 1)
        std = np.asarray(self.manifest["std"], dtype=np.float32).reshape(-1, 1, 1)
        out = np.empty((len(images), 3, h, w), dtype=np.float32)
        for i, item in enumerate(images):
            img = _rgb(item, Image)
            if self.manifest.get("resize_size"):
                img = _resize_crop(img, int(self.manifest["resize_size"]), (h, w),
                                   self.manifest.get("interpolation", "bilinear"), Image)
            if img.size != (w, h):
                img = img.resize((w, h), Image.Resampling.BILINEAR)
            arr = np.asarray(img, dtype=np.float32) / np.float32(255)
            out[i] = (arr.transpose(2, 0, 1) - mean) / std
        return out


class _OnFirstUse:
    """A graph loaded when first run: the batch-1 graph holds every weight a second time, and a
    caller who only sends batches should not pay for it in memory."""

    def __init__(self, load: Callable[[], Graph]) -> None:
        self._load, self.graph = load, None

    def __call__(self, *xs: np.ndarray) -> tuple[np.ndarray, ...]:
        if self.graph is None:
            self.graph = self._load()
        return self.graph(*xs)


def _resize_crop(img: Any, short: int, size: tuple[int, int], interpolation: str,
                 image_module: Any) -> Any:
    """torchvision's ``Resize(short)`` then ``CenterCrop(size)`` on a PIL image, same rounding."""
    w, h = img.size
    new = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    filt = getattr(image_module.Resampling, interpolation.upper(),
                   image_module.Resampling.BILINEAR)
    img = img.resize(new, filt)
    ch, cw = size
    top, left = int(round((new[1] - ch) / 2.0)), int(round((new[0] - cw) / 2.0))
    return img.crop((left, top, left + cw, top + ch))


def _rgb(item: Any, image_module: Any) -> Any:
    """An RGB PIL image from a PIL image or a path (files are closed at once)."""
    if isinstance(item, (str, os.PathLike)):
        with image_module.open(item) as f:
            return f.convert("RGB")
    return item.convert("RGB")


# -- manifest ---------------------------------------------------------------------------------
def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_DIGITS:
        raise ValueError(f"an integer of {len(text)} digits")
    return int(text)


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """Read and check an exported folder's manifest (one clear line on anything wrong).

    Nothing in it is trusted: graph files must be plain names inside the folder (no ``..``,
    no absolute paths, no links out) whose SHA-256 matches the manifest's, thresholds must lie
    in [0, 1] or be null, and every count and FLOP figure must be a sane number."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise BundleError(f"no exported cascade at {folder} ({MANIFEST} missing); "
                          f"run `pteenet export` first")
    try:
        doc = json.loads(path.read_bytes(), parse_int=_bounded_int)
    except (OSError, ValueError, RecursionError) as e:
        raise BundleError(f"{path} is not valid JSON ({type(e).__name__}); run `pteenet export` "
                          f"again") from None
    _check_manifest(doc, path)
    for f in doc["files"]["segments"] + doc["files"]["branches"] + doc["files"].get("single",
                                                                                    []):
        _check_file(path.parent, f, doc.get("sha256"), path)
    _check_fresh(doc, path)
    return doc


def _check_fresh(doc: dict[str, Any], path: Path) -> None:
    """An export inside its bundle (``<bundle>/export-*``) must still be of that bundle: after a
    re-attach or re-calibration its graphs or thresholds are another model's. (The same rule
    as :mod:`pteenet.bundle._derived`, inlined: this module runs without the rest of pteenet.)"""
    folder = path.parent
    record = folder.parent / "bundle.json"
    recorded = doc.get("bundle_sha256")
    if not folder.name.startswith("export-") or recorded is None or not record.is_file():
        return
    if hashlib.sha256(record.read_bytes()).hexdigest() != recorded:
        raise BundleError(f"{folder} is stale: the bundle in {folder.parent} was re-attached or "
                          f"re-calibrated since this export; run `pteenet export` again")


def _number(v: Any, low: float = 0.0, high: float = math.inf) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and low <= v <= high and \
        math.isfinite(v)


def _check_manifest(doc: Any, path: Path) -> None:
    bad = f"{path} is malformed (edited?); run `pteenet export` again"
    if not isinstance(doc, dict):
        raise BundleError(bad)
    version = doc.get("format_version")
    if isinstance(version, int) and version > MANIFEST_VERSION:
        raise BundleError(f"{path} has format version {str(version)[:20]}, newer than this "
                          f"runtime understands ({MANIFEST_VERSION}); upgrade pteenet")
    if doc.get("format") not in ("onnx", "torchscript"):
        raise BundleError(f"{path}: unknown format {str(doc.get('format'))[:40]!r}")
    try:
        b, k, files = doc["num_branches"], doc["num_classes"], doc["files"]
        ok = (_number(b, 1, _MAX_COUNT) and _number(k, 1, _MAX_COUNT)
              and isinstance(b, int) and isinstance(k, int)
              and len(files["segments"]) == b + 1 and len(files["branches"]) == b
              and len(doc["thresholds"]) == b and len(doc["segment_flops"]) == b + 1
              and len(doc["branch_flops"]) == b and len(doc["input_size"]) == 2
              and all(isinstance(v, int) and _number(v, 1, _MAX_SIDE) for v in doc["input_size"])
              and (doc.get("resize_size") is None or isinstance(doc["resize_size"], int)
                   and _number(doc["resize_size"], 1, 2 * _MAX_SIDE))
              and doc.get("interpolation", "bilinear") in ("nearest", "bilinear", "bicubic")
              and all(_number(v) for v in doc["segment_flops"] + doc["branch_flops"])
              and doc.get("ensemble", False) in (True, False)
              and _single_ok(doc, b)
              and all(isinstance(r, list) and len(r) == k for r in doc["thresholds"]))
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(bad) from e
    if not ok:
        raise BundleError(bad)
    if not all(v is None or _number(v, 0, 1) for r in doc["thresholds"] for v in r):
        raise BundleError(f"{path}: thresholds must be numbers in [0, 1] or null (never); "
                          f"run `pteenet export` again")


def _single_ok(doc: dict[str, Any], b: int) -> bool:
    """An exported batch-1 graph (ONNX, plain exits) is one file plus the B booleans of the
    branches it holds; neither key, or both."""
    if "single" not in doc["files"]:
        return "single_runs" not in doc
    single, runs = doc["files"]["single"], doc.get("single_runs")
    return doc.get("format") == "onnx" and not doc.get("ensemble", False) and \
        isinstance(single, list) and len(single) == 1 and isinstance(runs, list) and \
        len(runs) == b and all(isinstance(r, bool) for r in runs)


def _check_file(folder: Path, name: Any, hashes: Any, manifest: Path) -> None:
    """A graph file: a plain name inside ``folder``, present, and as exported."""
    plain = isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and \
        "\\" not in name and "\x00" not in name
    if not plain or (folder / name).resolve().parent != folder.resolve():
        raise BundleError(f"{manifest} names a graph outside its folder "
                          f"({str(name)[:60]!r}); refused")
    f = folder / name
    if not f.is_file():
        raise BundleError(f"{f} is missing; run `pteenet export` again")
    want = hashes.get(name) if isinstance(hashes, dict) else None
    if hashes is not None and (not isinstance(want, str) or _sha256(f) != want):
        raise BundleError(f"{f} does not match {MANIFEST} (changed, or an export was "
                          f"interrupted); run `pteenet export` again")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _exit_flops(manifest: dict[str, Any], runs: np.ndarray) -> np.ndarray:
    """FLOPs spent by a sample leaving at exit k (k = B: the backbone), counting the branches
    that run only (:meth:`Cascade.runs`)."""
    seg, br = manifest["segment_flops"], manifest["branch_flops"]
    steps = [s + (b if on else 0) for s, b, on in zip(seg, br, runs)] + [seg[-1]]
    return np.cumsum(np.asarray(steps, dtype=np.float64))


# -- graph loaders ----------------------------------------------------------------------------
@contextlib.contextmanager
def _graph_errors(path: Path, what: str) -> Iterator[None]:
    """onnxruntime and torch raise many types; the caller gets one BundleError line."""
    try:
        yield
    except BundleError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise BundleError(f"cannot {what} graph {path} ({type(e).__name__}: {first}); run "
                          f"`pteenet export` again") from e


def _onnx_loader(providers: Sequence[str] | None, threads: int | None = None,
                 spin: bool = False) -> Callable[[Path], Graph]:
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise OptionError(f"running an ONNX export needs onnxruntime: {INSTALL_HINT}") from e
    chosen = list(providers) if providers else ["CPUExecutionProvider"]
    opts = session_options(threads, spin=spin)

    def load(path: Path) -> Graph:
        with _graph_errors(path, "load"):
            sess = ort.InferenceSession(str(path), opts, providers=chosen)
            names = [i.name for i in sess.get_inputs()]

        def run(*xs: np.ndarray) -> tuple[np.ndarray, ...]:
            with _graph_errors(path, "run"):
                return tuple(sess.run(None, dict(zip(names, xs))))

        return run

    return load


def session_options(threads: int | None = None, spin: bool = False) -> Any:
    """onnxruntime options for one graph of a cascade (or of a backbone timed against one).

    Spinning is off for the pieces: a cascade runs one session per segment and branch, and
    each session's idle workers would otherwise spin after their run and take the cores from
    the next session (on 2 cores this made the cascade 0.6x of the whole backbone's speed
    batched). A graph run alone, such as the batch-1 cascade, keeps onnxruntime's default
    (``spin``): without it every parallel operator waits for a sleeping worker to wake, which
    made a CIFAR ResNet-44 twice as slow at batch 1.
    """
    import onnxruntime as ort
    if threads is not None and threads < 1:
        raise OptionError(f"threads must be at least 1, got {threads}")
    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = threads
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def _torchscript_loader() -> Callable[[Path], Graph]:
    try:
        import torch
    except ImportError as e:
        raise OptionError("running a TorchScript export needs torch: pip install torch") from e

    def load(path: Path) -> Graph:
        with warnings.catch_warnings(), _graph_errors(path, "load"):
            warnings.simplefilter("ignore", FutureWarning)  # torch >= 2.10: TorchScript
            module = torch.jit.load(str(path), map_location="cpu").eval()  # is deprecated

        def run(*xs: np.ndarray) -> tuple[np.ndarray, ...]:
            # torch.from_numpy warns on read-only arrays
            ts = [torch.from_numpy(x if x.flags.writeable else x.copy()) for x in xs]
            with torch.inference_mode(), _graph_errors(path, "run"):
                out = module(*ts)
            outs = out if isinstance(out, tuple) else (out,)
            return tuple(o.contiguous().numpy() for o in outs)

        return run

    return load
