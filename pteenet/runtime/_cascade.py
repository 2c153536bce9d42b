"""Run an exported early-exit cascade (``pteenet export``) with onnxruntime or TorchScript.

A deployment should not need torch or pteenet's training code, so the runtime imports only
numpy at import time: onnxruntime, torch (TorchScript folders only) and Pillow (only for
:meth:`Cascade.preprocess`) are imported when first needed. Its modules import only each other
(relatively) and :mod:`pteenet.errors` (with stand-ins, :mod:`._errors`), so the ``runtime``
folder can also be copied alone beside an exported folder.

    from pteenet.runtime import Cascade

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

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._errors import OptionError
from ._manifest import read_manifest
from ._preprocess import preprocess
from ._sessions import Graph, OnFirstUse, onnx_loader, torchscript_loader

__all__ = ["Cascade", "CascadeResult"]


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
    path compares alike; negatives and NaN are refused, and a value above 1 never fires) to
    try it without exporting again.
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
        if table is None or table.shape != shape or np.isnan(table).any() or \
                (table < 0).any():
            got = "NaN, negatives or non-numbers" if table is None or table.shape == shape \
                else f"shape {list(table.shape)}"
            raise OptionError(f"thresholds must be a {list(shape)} table of numbers >= 0 (0 = "
                              f"always exit, inf = never), got {got}")
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
        load = onnx_loader(providers, threads) if onnx else torchscript_loader()
        files = manifest["files"]
        single = files.get("single")
        alone = onnx_loader(providers, threads, spin=True) if single and onnx else None
        return cls(manifest, [load(folder / f) for f in files["segments"]],
                   [load(folder / f) for f in files["branches"]],
                   OnFirstUse(lambda: alone(folder / single[0])) if alone else None)

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
        table, worked out once per table (its bytes, so an in-place edit counts), not on every
        call, where they were a visible share of a small model's batch-1 call
        (``design-timings.md``)."""
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
        h, w = self.input_size
        try:
            x = np.ascontiguousarray(images, dtype=np.float32)
        except (TypeError, ValueError):  # strings, objects, ragged lists
            x = None
        if x is None or x.ndim != 4 or x.shape[1:] != (3, h, w):
            got = f"shape {list(x.shape)}" if x is not None else \
                f"{type(images).__name__} that is not numbers"
            raise OptionError(f"images must be a float32 array [N, 3, {h}, {w}] (normalised, "
                              f"see Cascade.preprocess), got {got}")
        return x

    def preprocess(self, images: Sequence[Any]) -> np.ndarray:
        """PIL images (or paths) -> normalised float32 ``[N, 3, H, W]``, as the bundle's data.

        With the manifest's ``resize_size`` (ImageNet models) the shorter side is resized with
        its interpolation and the centre cropped, exactly as the bundle's data was. Otherwise
        Pillow's bilinear filter resizes straight to the input size: identical to training for
        images already at the input size, very close (not bit-identical) to torchvision's resize
        otherwise."""
        return preprocess(images, self.manifest, self.input_size)


def _exit_flops(manifest: dict[str, Any], runs: np.ndarray) -> np.ndarray:
    """FLOPs spent by a sample leaving at exit k (k = B: the backbone), counting the branches
    that run only (:meth:`Cascade.runs`)."""
    seg, br = manifest["segment_flops"], manifest["branch_flops"]
    steps = [s + (b if on else 0) for s, b, on in zip(seg, br, runs)] + [seg[-1]]
    return np.cumsum(np.asarray(steps, dtype=np.float64))
