"""The end-to-end demo: real data, a trained backbone, exits attached, calibrated and measured.

``pteenet demo`` has to work on a laptop with no network, so nothing is downloaded: the data is
scikit-learn's bundled handwritten digits (1797 8x8 greyscale images, 10 classes), written out as
an ordinary image folder, and the "pretrained" backbone is a CIFAR ResNet-20 trained on it here in
seconds. Both are cached, so later runs only repeat the part being demonstrated: ``attach``,
``calibrate`` and ``bench``, exactly as a user would call them on their own model.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from .atomic import atomic_path, write_text
from .attaching import attach
from .backbones import create_backbone, sha256_file
from .benchmarking import bench
from .branches import DEFAULT_BRANCH
from .calibration import calibrate
from .cifar_resnet import cifar_resnet
from .data import make_loader, open_data
from .devices import threads as threads_for
from .errors import DataError
from .placement import DEFAULT_POLICY
from .preprocess import Preprocess
from .train_config import TrainConfig

__all__ = [
    "DemoSettings",
    "default_workdir",
    "prepare_digits",
    "run_demo",
    "train_backbone",
]

MODEL = "resnet20"
DATA_DIR = "digits"
DATA_MARKER = "digits.json"  # written last: its presence means the image tree is complete
STAGES = 5

Log = Callable[[str], None]


@dataclass(frozen=True)
class DemoSettings:
    """Every knob of one demo run; ``quick`` trades quality for a run short enough for tests."""

    image_size: int = 16  # 8x8 digits upscaled; the ResNet pools adaptively, so any size works
    test_fraction: float = 0.2
    seed: int = 0
    backbone_epochs: int = 8
    attach_epochs: int = 12  # pteenet's defaults otherwise (branches, placement, calibration)
    attach_batch_size: int = 32  # ~1,400 training images: small batches, more steps
    attach_samples: int | None = None
    val_fraction: float = 0.25  # ~350 held-out samples for the calibration's cost search
    bench_samples: int | None = None
    latency_samples: int = 100
    repeats: int = 5

    @classmethod
    def for_mode(cls, quick: bool) -> DemoSettings:
        if not quick:
            return cls()
        return cls(backbone_epochs=2, attach_epochs=4, attach_samples=600, bench_samples=150,
                   latency_samples=10, repeats=2)

    @property
    def input_size(self) -> tuple[int, int]:
        return (self.image_size, self.image_size)


def default_workdir() -> Path:
    """``$PTEENET_CACHE/demo``, else ``~/.cache/pteenet/demo``: survives between runs."""
    env = os.environ.get("PTEENET_CACHE")
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "pteenet"
    return base / "demo"


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- stage 1: data ----------------------------------------------------------------------------
def _digit_png(pixels: np.ndarray, size: int) -> bytes:
    """One 8x8 digit (ink 0..16) as a ``size`` x ``size`` greyscale PNG, ink bright."""
    img = Image.fromarray(np.round(pixels * (255 / 16)).astype(np.uint8), mode="L")
    buf = io.BytesIO()
    img.resize((size, size), Image.BILINEAR).save(buf, format="PNG")
    return buf.getvalue()


def _split(targets: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """A seeded, stratified train/test assignment (True = test), so both splits see every digit."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(targets))
    _, test = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=targets)
    mask = np.zeros(len(targets), dtype=bool)
    mask[test] = True
    return mask


def _read_marker(root: Path) -> dict[str, Any] | None:
    try:
        return json.loads((root / DATA_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_tree(tmp: Path, images: np.ndarray, targets: np.ndarray, test: np.ndarray,
                size: int) -> None:
    for i, (pixels, label) in enumerate(zip(images, targets)):
        folder = tmp / ("test" if test[i] else "train") / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:04d}.png").write_bytes(_digit_png(pixels, size))


def prepare_digits(workdir: str | os.PathLike, settings: DemoSettings = DemoSettings()) -> dict:
    """Write scikit-learn's digits as ``<workdir>/digits/{train,test}/<digit>/<n>.png``, once.

    The tree is built in a temp folder and renamed into place with its marker inside, so a crash
    never leaves a half-written data set that later runs would trust; a complete tree with the
    same settings is reused.
    """
    from sklearn.datasets import load_digits

    workdir = Path(workdir)
    root = workdir / DATA_DIR
    want = {"source": "sklearn.datasets.load_digits", "image_size": settings.image_size,
            "test_fraction": settings.test_fraction, "seed": settings.seed}
    found = _read_marker(root)
    if found is not None and found.get("settings") == want:
        return {**found, "root": str(root), "cached": True}
    digits = load_digits()
    test = _split(digits.target, settings.test_fraction, settings.seed)
    marker = {"settings": want, "classes": 10, "train": int((~test).sum()),
              "test": int(test.sum()),
              "split_sha256": hashlib.sha256(np.packbits(test).tobytes()).hexdigest()}
    workdir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".digits-", dir=workdir))
    try:
        _write_tree(tmp, digits.images, digits.target, test, settings.image_size)
        write_text(tmp / DATA_MARKER, json.dumps(marker, indent=1))
        _swap_in(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {**marker, "root": str(root), "cached": False}


def _swap_in(tmp: Path, root: Path) -> None:
    """Replace ``root`` (stale or absent) by the finished tree ``tmp`` with one rename."""
    if root.exists():
        old = root.with_name(f".{root.name}-old-{os.getpid()}")
        os.replace(root, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, root)


# -- stage 2: the "pretrained" backbone ---------------------------------------------------------
def _load_split(root: Path, preprocess: Preprocess, split: str) -> tuple[Tensor, Tensor]:
    """A whole split as tensors: the digits fit in memory, so training needs no loader."""
    data = open_data(root, preprocess, split=split)
    xs, ys = [], []
    for batch in make_loader(data, batch_size=512):
        if batch.images is not None:
            xs.append(batch.images)
            ys.append(batch.labels)
    if not xs:
        raise DataError(f"no readable images in {root}/{split}: delete {root} and run again")
    return torch.cat(xs), torch.cat(ys)


def _shift(x: Tensor, gen: torch.Generator) -> Tensor:
    """Random translation by up to 1/8 of the image: cheap augmentation against overfitting."""
    pad = max(1, x.shape[-1] // 8)
    dy, dx = torch.randint(0, 2 * pad + 1, (2,), generator=gen).tolist()
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    return padded[..., dy:dy + x.shape[-2], dx:dx + x.shape[-1]]


def _fit(model: torch.nn.Module, x: Tensor, y: Tensor, epochs: int, seed: int,
         on_epoch: Callable[[int, float], None]) -> None:
    """Plain supervised training: Adam with a one-cycle schedule, seeded batch order."""
    gen = torch.Generator().manual_seed(seed)
    batch = 64
    steps = epochs * math.ceil(len(y) / batch)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=4e-3, total_steps=steps)
    model.train()
    for epoch in range(epochs):
        total = 0.0
        for pos in torch.randperm(len(y), generator=gen).split(batch):
            loss = F.cross_entropy(model(_shift(x[pos], gen)), y[pos])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(pos)
        on_epoch(epoch, total / len(y))
    model.eval()


@torch.no_grad()
def _accuracy(model: torch.nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).double().mean())


def _backbone_paths(workdir: Path, quick: bool) -> tuple[Path, Path]:
    stem = f"backbone-{MODEL}{'-quick' if quick else ''}"
    return workdir / f"{stem}.pt", workdir / f"{stem}.json"


def _cached_backbone(ckpt: Path, record: Path, config: dict) -> dict | None:
    """The recorded backbone, if it was trained with ``config`` and its file is intact."""
    try:
        meta = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if meta.get("config") != config or not ckpt.is_file():
        return None
    return meta if sha256_file(ckpt) == meta.get("sha256") else None


def train_backbone(workdir: str | os.PathLike, data: dict, settings: DemoSettings, *,
                   quick: bool = False, log: Log = _stderr) -> dict:
    """Train ResNet-20 on the digits' train split and cache it (checkpoint + JSON record).

    It stands in for a pretrained model a user would bring: pteenet only ever sees the frozen
    checkpoint. The record names the data split it was trained on, so regenerated data retrains.
    """
    ckpt, record = _backbone_paths(Path(workdir), quick)
    config = {"model": MODEL, "input_size": list(settings.input_size),
              "epochs": settings.backbone_epochs, "seed": settings.seed,
              "split_sha256": data["split_sha256"]}
    meta = _cached_backbone(ckpt, record, config)
    if meta is not None:
        return {**meta, "checkpoint": str(ckpt), "cached": True}
    start = time.perf_counter()
    pre = Preprocess(settings.input_size)
    x, y = _load_split(Path(data["root"]), pre, "train")
    x_test, y_test = _load_split(Path(data["root"]), pre, "test")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        model = cifar_resnet(MODEL, num_classes=10)
        _fit(model, x, y, settings.backbone_epochs, settings.seed,
             lambda e, loss: log(f"      epoch {e + 1}/{settings.backbone_epochs}: "
                                 f"loss {loss:.3f}"))
    with atomic_path(ckpt) as tmp:
        torch.save(model.state_dict(), tmp)
    meta = {"config": config, "sha256": sha256_file(ckpt),
            "train_accuracy": _accuracy(model, x, y),
            "test_accuracy": _accuracy(model, x_test, y_test),
            "seconds": time.perf_counter() - start}
    write_text(record, json.dumps(meta, indent=1))
    return {**meta, "checkpoint": str(ckpt), "cached": False}


# -- stages 3-5: what pteenet itself does -------------------------------------------------------
def _attach(root: str, ckpt: str, out: Path, settings: DemoSettings, progress: bool) -> Any:
    bb = create_backbone(MODEL, checkpoint=ckpt, num_classes=10,
                         input_size=settings.input_size)
    config = TrainConfig(epochs=settings.attach_epochs, batch_size=settings.attach_batch_size,
                         seed=settings.seed)
    return attach(MODEL, root, checkpoint=ckpt, val_fraction=settings.val_fraction, out=out,
                  config=config,
                  max_samples=settings.attach_samples, progress=progress, backbone=bb)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _times(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def run_demo(out: str | os.PathLike = "pteenet-demo", *,
             workdir: str | os.PathLike | None = None, quick: bool = False,
             progress: bool = True, log: Log | None = None,
             threads: int | None = 1) -> dict[str, Any]:
    """Run the whole retrofit on real, offline data and return a JSON-serialisable summary.

    Stages: digits -> backbone (both cached in ``workdir``) -> attach -> calibrate ->
    bench, the last three writing the bundle to ``out``, exactly as the commands would.
    ``quick`` is a reduced run for tests; ``threads`` bounds torch's threads
    (:func:`pteenet.devices.threads`): the demo's tensors are tiny (16x16 images, batches of
    32-64), where a second thread gains little, while OpenMP threads that wait on each other on a
    busy machine cost 5-15x (attach took 7 s on one thread and 104 s on two under a load of 5 on
    2 cores); ``log`` gets one line per step (default: stderr) and ``progress``
    shows attach's progress bars.
    """
    log = log or _stderr
    settings = DemoSettings.for_mode(quick)
    workdir = Path(workdir).expanduser() if workdir is not None else default_workdir()
    out = Path(out).expanduser()
    start = time.perf_counter()
    with threads_for(threads):
        data = _stage_data(workdir, settings, log)
        backbone = _stage_backbone(workdir, data, settings, quick, log)
        res = _stage_attach(data, backbone, out, settings, progress, log)
        cal = _stage_calibrate(out, settings, log)
        result = _stage_bench(out, settings, log)
    summary = _summary(out, workdir, data, backbone, res, cal, result, settings, quick)
    summary["threads"] = threads
    summary["seconds"] = time.perf_counter() - start
    log(f"done in {summary['seconds']:.0f}s; the bundle is in {out}/ "
        f"(next: pteenet bench --bundle {out} --sweep, or attach your own model)")
    return summary


def _stage_data(workdir: Path, settings: DemoSettings, log: Log) -> dict:
    log(f"[1/{STAGES}] data: scikit-learn's handwritten digits (offline, ships with the package)")
    data = prepare_digits(workdir, settings)
    how = "reused" if data["cached"] else "wrote"
    log(f"      {how} {data['train']} train + {data['test']} test images, "
        f"{settings.image_size}x{settings.image_size} PNG, in {data['root']}")
    return data


def _stage_backbone(workdir: Path, data: dict, settings: DemoSettings, quick: bool,
                    log: Log) -> dict:
    log(f"[2/{STAGES}] backbone: {MODEL} trained on the train split, standing in for your "
        "pretrained model")
    bb = train_backbone(workdir, data, settings, quick=quick, log=log)
    how = "reused cached" if bb["cached"] else f"trained in {bb['seconds']:.0f}s,"
    log(f"      {how} checkpoint {bb['checkpoint']}: test top-1 {_pct(bb['test_accuracy'])}")
    return bb


def _stage_attach(data: dict, backbone: dict, out: Path, settings: DemoSettings, progress: bool,
                  log: Log) -> Any:
    log(f"[3/{STAGES}] attach: exits with pteenet's defaults ({DEFAULT_BRANCH} branches, "
        f"{DEFAULT_POLICY} placement) trained on the backbone's predictions and the labels")
    res = _attach(data["root"], backbone["checkpoint"], out, settings, progress)
    cuts = ", ".join(f"{r['cut']} ({_pct(r['exit_flops'])} FLOPs, agrees "
                     f"{_pct(r['agreement'])})" for r in res.rows())
    log(f"      exits at {cuts}; trained in {res.seconds:.0f}s")
    return res


def _stage_calibrate(out: Path, settings: DemoSettings, log: Log) -> Any:
    log(f"[4/{STAGES}] calibrate: least FLOPs within one point of the backbone's accuracy on "
        f"the held-out split (exits that do not pay are switched off)")
    cal = calibrate(out)
    s = cal.summary
    log(f"      expected: top-1 {_pct(s['accuracy'])} (backbone {_pct(s['backbone_accuracy'])}), "
        f"relative FLOPs {s['mean_relative_flops']:.2f}; wrote {out}/thresholds.json")
    return cal


def _stage_bench(out: Path, settings: DemoSettings, log: Log) -> dict:
    log(f"[5/{STAGES}] bench: early exits vs the untouched backbone on the test split")
    result = bench(out, latency_samples=settings.latency_samples, repeats=settings.repeats,
                   max_samples=settings.bench_samples, sweep=True, progress=False)
    ee, bb, sp = result["early_exit"], result["backbone"], result["speedup"]
    log(f"      top-1 {_pct(ee['top1'])} vs backbone {_pct(bb['top1'])}, agreement "
        f"{_pct(ee['agreement'])}, relative FLOPs {ee['relative_flops']:.2f} "
        f"(oracle {result['oracle']['relative_flops']:.2f}); speedup: FLOPs "
        f"{_times(sp['flops'])}, latency {_times(sp['latency'])}, throughput "
        f"{_times(sp['throughput'])}")
    for note in result["notes"]:
        log(f"      note: {note}")
    files = ", ".join(Path(f).name for f in result["files"].values())
    log(f"      wrote {files} in {out}/")
    return result


def _summary(out: Path, workdir: Path, data: dict, backbone: dict, res: Any, cal: Any,
             result: dict, settings: DemoSettings, quick: bool) -> dict[str, Any]:
    """Everything worth keeping from the run; ``headline`` holds the numbers the demo is about."""
    ee, sp = result["early_exit"], result["speedup"]
    return {
        "out": str(out), "workdir": str(workdir), "quick": quick, "settings": asdict(settings),
        "data": {k: data[k] for k in ("root", "train", "test", "cached")},
        "backbone": {"model": MODEL, "checkpoint": backbone["checkpoint"],
                     "test_accuracy": backbone["test_accuracy"], "cached": backbone["cached"]},
        "attach": {"cuts": res.info.cuts, "exits": res.rows(), "seconds": res.seconds},
        "calibration": cal.summary,
        "bench": result,
        "headline": {"backbone_top1": result["backbone"]["top1"], "early_exit_top1": ee["top1"],
                     "agreement": ee["agreement"], "relative_flops": ee["relative_flops"],
                     "oracle_relative_flops": result["oracle"]["relative_flops"],
                     "flops_speedup": sp["flops"], "latency_speedup": sp["latency"],
                     "throughput_speedup": sp["throughput"],
                     "exit_shares": [r["share"] for r in ee["exits"]]},
        "files": {"bundle": str(out), **result["files"]},
    }
