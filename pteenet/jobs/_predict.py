"""What ``pteenet predict`` runs: classify image files with the early-exit model, or with an
exported cascade, and say per image which exit answered and what it cost.

The point of the whole pipeline is this step: the class (by name), its probability, the exit
that answered (``branch k`` or ``backbone``) and the FLOPs spent, per image, plus one summary
(images/s, mean relative FLOPs, where the images left), as timm's ``inference.py`` writes top-k
per image. Two engines answer alike: the bundle's :class:`~pteenet.cascade.EarlyExitModel`
(torch), or ``export=`` an exported folder run by :mod:`pteenet.runtime` with numpy and
onnxruntime alone; this module imports torch only inside the bundle's engine, so the exported
path never loads it. Unreadable images are skipped and counted, as everywhere else.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pteenet.choices import IMAGE_EXTENSIONS, PREDICT_SUFFIXES
from pteenet.errors import DataError, OptionError
from pteenet.labels import class_name
from pteenet.progress import single_bar
from pteenet.storage import write_text

__all__ = ["Prediction", "PredictResult", "find_images", "predict"]

_GLOB = set("*?[")
# per batch: (positions among the files, logits [n, K], exit [n], FLOPs [n])
_Answers = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


@dataclass
class Prediction:
    """One image's answer: its class by name (``index`` is the backbone's), the class's
    softmax probability at the exit that answered, that exit and the FLOPs it took."""

    path: str
    label: str
    index: int
    score: float
    exit: int  # 0..B-1: branch k; B: the backbone's own head
    exit_name: str
    flops: float
    relative_flops: float  # of the untouched backbone's FLOPs
    top_k: list[tuple[str, float]] = field(default_factory=list)  # (name, probability), best first

    def as_dict(self) -> dict:
        return {"path": self.path, "class": self.label, "index": self.index,
                "score": self.score, "exit": self.exit, "exit_name": self.exit_name,
                "flops": self.flops, "relative_flops": self.relative_flops,
                "top_k": [{"class": c, "score": p} for c, p in self.top_k]}


@dataclass
class PredictResult:
    """Every readable image's :class:`Prediction` in the order given, and what the run took."""

    predictions: list[Prediction]
    skipped: list[str]  # files that could not be read as images
    seconds: float  # wall clock of decoding and inference (after the model is loaded)
    exit_names: list[str]  # branch 0 .. branch B-1, backbone
    engine: str  # "bundle" (torch) or "export" (onnxruntime / TorchScript graphs)
    out: Path | None = None

    @property
    def images_per_second(self) -> float:
        return len(self.predictions) / self.seconds if self.seconds > 0 else math.inf

    @property
    def mean_relative_flops(self) -> float | None:
        p = self.predictions
        return sum(x.relative_flops for x in p) / len(p) if p else None

    @property
    def exit_shares(self) -> list[float]:
        """The share of the answered images each exit took (the backbone last)."""
        counts = np.bincount([p.exit for p in self.predictions], minlength=len(self.exit_names))
        return (counts / max(1, len(self.predictions))).tolist()

    def summary(self) -> str:
        """One line: how many, how fast, how much of the backbone, where they left."""
        n = len(self.predictions)
        shares = ", ".join(f"{name} {s:.0%}" for name, s in zip(self.exit_names, self.exit_shares)
                           if s > 0)
        flops = self.mean_relative_flops
        cost = f"; mean FLOPs {flops:.1%} of the backbone; exits: {shares}" if n else ""
        skipped = f"; {len(self.skipped)} unreadable skipped" if self.skipped else ""
        return (f"predicted {n} images in {self.seconds:.2f} s ({self.images_per_second:.1f} "
                f"images/s, {self.engine}){cost}{skipped}")


def find_images(images: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Image files from folders (searched recursively, by extension), glob patterns and
    files, in the order given (a folder's and a pattern's sorted); each file once."""
    items = [images] if isinstance(images, (str, os.PathLike)) else list(images)
    if not items:
        raise OptionError("`images` is empty: pass a folder, a glob pattern or files")
    found: list[Path] = []
    for item in items:
        text = str(item)
        path = Path(text).expanduser()
        if path.is_dir():
            here = sorted(p for p in path.rglob("*")
                          if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        elif path.is_file():
            here = [path]
        elif _GLOB & set(text):
            here = sorted(Path(p) for p in glob.glob(os.path.expanduser(text), recursive=True)
                          if Path(p).is_file())
        else:
            raise DataError(f"{text} does not exist: pass a folder, a glob pattern or files")
        if not here:
            raise DataError(f"no images in {text} (looked for {', '.join(IMAGE_EXTENSIONS)})")
        found += here
    return list(dict.fromkeys(found))


def _check(top_k: int, threshold: float | None, batch_size: int, out: str | os.PathLike | None
           ) -> None:
    if top_k < 1:
        raise OptionError(f"`top_k` must be at least 1, got {top_k}")
    if threshold is not None and (math.isnan(threshold) or threshold < 0):
        raise OptionError(f"`threshold` must be >= 0 (0 = always exit, above 1 = never), "
                          f"got {threshold}")
    if batch_size < 1:
        raise OptionError(f"`batch_size` must be at least 1, got {batch_size}")
    if out is not None and Path(out).suffix.lower() not in PREDICT_SUFFIXES:
        raise OptionError(f"`out` {out} must end in {' or '.join(PREDICT_SUFFIXES)}")


def predict(
    images: str | os.PathLike | Sequence[str | os.PathLike],
    bundle: str | os.PathLike = "pteenet-out",
    *,
    export: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    top_k: int = 1,
    threshold: float | None = None,
    batch_size: int = 32,
    device: str = "cpu",
    checkpoint: str | os.PathLike | None = None,
    force: bool = False,
    progress: bool = False,
) -> PredictResult:
    """Classify ``images`` (folders, glob patterns or files) with true early exit.

    The bundle's model answers, or with ``export`` the exported cascade in that folder (numpy
    and onnxruntime; torch is never imported then). ``threshold`` replaces the thresholds with
    one global value on the exit score, as ``bench`` does (0.5 on the gate score is the
    calibrated point; exits calibration switched off stay off). ``out`` (``.csv`` or ``.jsonl``)
    receives one row per image, written atomically. Unreadable images are skipped and listed.
    """
    _check(top_k, threshold, batch_size, out)
    paths = find_images(images)
    with single_bar(progress, "predicting", len(paths)) as tick:
        if export is not None:
            engine, meta, answers = "export", *_exported(export, paths, threshold, batch_size,
                                                         tick)
        else:
            engine, meta, answers = "bundle", *_bundled(bundle, paths, threshold, batch_size,
                                                        device, checkpoint, force, tick)
        start = time.perf_counter()  # the model is loaded: from here, decoding and inference
        preds = _predictions(paths, answers, meta, top_k)
    seen = {p.path for p in preds}
    result = PredictResult(preds, [str(p) for p in paths if str(p) not in seen],
                           time.perf_counter() - start, meta.exit_names, engine,
                           Path(out) if out is not None else None)
    if out is not None:
        write_text(out, _table_text(result, Path(out).suffix.lower(), top_k))
    return result


@dataclass
class _Meta:
    """What turns an engine's arrays into answers: class names and the FLOPs yardstick."""

    classes: list[str] | None
    backbone_flops: float
    num_branches: int

    @property
    def exit_names(self) -> list[str]:
        return [f"branch {k}" for k in range(self.num_branches)] + ["backbone"]


def _bundled(bundle, paths, threshold, batch_size, device, checkpoint, force,
             tick: Callable[[int], None] | None) -> tuple[_Meta, Iterator[_Answers]]:
    """The bundle's early-exit model on batches decoded ahead (torch: imported here only)."""
    import torch

    from pteenet.bundle._load import load
    from pteenet.bundle._read import read_bundle
    from pteenet.data._datasets import FolderData
    from pteenet.data._loading import make_loader, prefetched
    from pteenet.machine import check_device

    dev = check_device(device)
    b = read_bundle(bundle)
    model = load(b, checkpoint=checkpoint, force=force, device=dev)
    if threshold is not None:
        model.set_thresholds(float(threshold))
    data = FolderData("images", [(p, -1) for p in paths], None, b.info.preprocess)
    meta = _Meta(b.info.classes, float(model.backbone_flops), model.num_branches)

    def run() -> Iterator[_Answers]:
        with torch.inference_mode():
            for batch in prefetched(make_loader(data, batch_size=batch_size, ramp=True)):
                if batch.images is not None:
                    res = model(batch.images.to(dev))
                    yield (batch.indices.numpy(), res.logits.float().cpu().numpy(),
                           res.exit_index.cpu().numpy(), res.flops.cpu().numpy())
                if tick:
                    tick(len(batch) + batch.skipped)

    return meta, run()


def _exported(folder, paths, threshold, batch_size, tick: Callable[[int], None] | None
              ) -> tuple[_Meta, Iterator[_Answers]]:
    """The exported cascade (:mod:`pteenet.runtime`), decoding with its own preprocessing."""
    from pteenet.runtime._cascade import Cascade

    cascade = Cascade.open(folder)
    if threshold is not None:
        cascade.thresholds = np.full(cascade.thresholds.shape, float(threshold))
    m = cascade.manifest
    meta = _Meta(cascade.classes, float(m["backbone_flops"]), cascade.num_branches)

    def run() -> Iterator[_Answers]:
        for lo in range(0, len(paths), batch_size):
            kept, arrays = [], []
            for i in range(lo, min(lo + batch_size, len(paths))):
                try:
                    arrays.append(cascade.preprocess([paths[i]])[0])
                    kept.append(i)
                except Exception:  # any failure to decode means "skip this image"
                    continue
            if arrays:
                res = cascade.run(np.stack(arrays))
                yield np.asarray(kept), res.logits, res.exit_index, res.flops
            if tick:
                tick(min(batch_size, len(paths) - lo))

    return meta, run()


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def _predictions(paths: list[Path], answers: Iterator[_Answers], meta: _Meta, top_k: int
                 ) -> list[Prediction]:
    found: list[Prediction] = []
    for where, logits, exits, flops in answers:
        probs = _softmax(logits)
        order = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]
        for row, i in enumerate(where.tolist()):
            best = [(class_name(meta.classes, int(c)), float(probs[row, c])) for c in order[row]]
            k = int(exits[row])
            found.append(Prediction(
                str(paths[i]), best[0][0], int(order[row, 0]), best[0][1], k,
                meta.exit_names[k], float(flops[row]),
                float(flops[row]) / meta.backbone_flops, best))
    return found


def _table_text(result: PredictResult, suffix: str, top_k: int) -> str:
    """The rows as CSV (path, class, score, exit, FLOPs; then each further top-k class and
    score) or as JSON lines (every field of :class:`Prediction`)."""
    if suffix == ".jsonl":
        return "".join(json.dumps(p.as_dict()) + "\n" for p in result.predictions)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    extra = [f"{what}_{r}" for r in range(2, top_k + 1) for what in ("class", "score")]
    writer.writerow(["path", "class", "score", "exit", "flops", "relative_flops", *extra])
    for p in result.predictions:
        rest = [v for c, s in p.top_k[1:] for v in (c, f"{s:.6f}")]
        writer.writerow([p.path, p.label, f"{p.score:.6f}", p.exit_name, f"{p.flops:.0f}",
                         f"{p.relative_flops:.6f}", *rest])
    return buf.getvalue()
