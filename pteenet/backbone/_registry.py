"""Backbones: resolve a name, build the model, load its weights, freeze it.

A name is ``cifar:NAME``, ``timm:NAME`` or ``torchvision:NAME``; a bare name is looked up in the
built-in CIFAR ResNet family first, then timm, then torchvision (like timm's ``create_model``, this
is the one way in). The returned :class:`Backbone` is frozen: ``requires_grad_(False)`` and eval
mode, so BatchNorm running statistics never move while branches train (the reference PTEEnet code
left BN in train mode and silently changed the pretrained backbone).
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import functools
import io
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from pteenet.backbone._checkpoint import (
    apply_state_dict,
    flatten_state_dict,
    head_classes,
    read_checkpoint,
)
from pteenet.backbone._cifar_resnet import CIFAR_DEPTHS, cifar_resnet
from pteenet.backbone._classes import backbone_classes
from pteenet.backbone._preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    INTERPOLATIONS,
    MAX_INPUT_SIDE,
    Preprocess,
    check_normalisation,
)
from pteenet.errors import ModelNotFoundError, OfflineError, OptionError
from pteenet.storage import sha256_file

__all__ = [
    "Backbone",
    "CIFAR_URLS",
    "SOURCES",
    "create_backbone",
    "freeze",
    "head_size",
    "label_names",
    "list_backbones",
    "resolve_name",
    "sha256_file",
]

SOURCES = ("cifar", "timm", "torchvision")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".th", ".bin", ".safetensors", ".ckpt")

_CIFAR_BASE = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/"
CIFAR_URLS = {
    name: _CIFAR_BASE + file
    for name, file in {
        "resnet20": "resnet20-12fca82f.th",
        "resnet32": "resnet32-d509ac18.th",
        "resnet44": "resnet44-014dd654.th",
        "resnet56": "resnet56-4bfd9763.th",
        "resnet110": "resnet110-1d1ed7c2.th",
        "resnet1202": "resnet1202-f3b1deed.th",
    }.items()
}
CIFAR_PREPROCESS = Preprocess(input_size=(32, 32), mean=IMAGENET_MEAN, std=IMAGENET_STD)
RANDOM_INIT_SEED = 0  # the seed of random (not pretrained) backbone weights


@dataclass
class Backbone:
    """A frozen pretrained classifier and what pteenet needs to know about it."""

    model: nn.Module
    name: str
    source: str
    num_classes: int
    preprocess: Preprocess
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    pretrained: bool = False  # the registry's weights (False with a checkpoint, or random ones)
    notes: list[str] = field(default_factory=list)  # what was inferred, one line each
    weights_sha256: str | None = None  # a user's own module: its weights' hash (see _custom)
    classes: list[str] | None = None  # in index order (pteenet.backbone._classes), if known

    @property
    def full_name(self) -> str:
        return f"{self.source}:{self.name}"


def label_names(backbone: Backbone) -> list[str] | None:
    """The backbone's classes in index order, as class folders may name them (each entry may
    list comma-separated synonyms: "n01440764, tench, Tinca tinca"); None when no source
    knows them (:mod:`pteenet.backbone._classes`)."""
    return backbone.classes


@functools.cache
def _timm_names() -> frozenset[str]:
    import timm

    return frozenset(timm.list_models())


@functools.cache
def _torchvision_names() -> frozenset[str]:
    import torchvision

    return frozenset(torchvision.models.list_models())


def _known(source: str) -> frozenset[str]:
    if source == "cifar":
        return frozenset(CIFAR_DEPTHS)
    return _timm_names() if source == "timm" else _torchvision_names()


def list_backbones(pattern: str = "*", source: str | None = None) -> list[str]:
    """The backbone names ``create_backbone`` knows, as ``source:name``, matching the shell-style
    ``pattern`` (``"*mobilenet*"``), sorted: the CIFAR ResNets, then timm's, then
    torchvision's (the order names resolve in), like timm's ``list_models``."""
    if source is not None and source not in SOURCES:
        raise ModelNotFoundError(f"unknown model source '{source}': use one of "
                                 f"{', '.join(SOURCES)}")
    return [f"{src}:{n}" for src in (SOURCES if source is None else (source,))
            for n in sorted(_known(src)) if fnmatch.fnmatchcase(n, pattern)]


def resolve_name(name: str) -> tuple[str, str]:
    """Return ``(source, model_name)`` for a possibly prefixed name, or raise with suggestions."""
    source, sep, bare = name.partition(":")
    if sep and source in SOURCES:
        candidates = (source,)
    elif sep:
        raise ModelNotFoundError(
            f"unknown model source '{source}' in '{name}': use one of {', '.join(SOURCES)}"
        )
    else:
        candidates, bare = SOURCES, name
    for src in candidates:
        if bare in _known(src):
            return src, bare
    pool = sorted(set().union(*(_known(s) for s in candidates)))
    close = difflib.get_close_matches(bare, pool, n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else (
        "; names look like resnet20, timm:resnet50 or torchvision:mobilenet_v3_small "
        "(try one with `pteenet inspect NAME`)")
    raise ModelNotFoundError(f"unknown model '{name}'{hint}")


def freeze(model: nn.Module) -> nn.Module:
    """Freeze for good: no gradients and eval mode, so BatchNorm statistics never move."""
    model.requires_grad_(False)
    return model.eval()


def _build(source: str, name: str, num_classes: int | None, pretrained: bool) -> nn.Module:
    """The model with the registry's weights, or random ones drawn from a fixed seed so that
    a bundle trained on a random backbone (``--no-pretrained``) loads the same backbone again."""
    if pretrained:
        return _build_model(source, name, num_classes, True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        return _build_model(source, name, num_classes, False)


def _build_model(source: str, name: str, num_classes: int | None, pretrained: bool
                 ) -> nn.Module:
    if source == "cifar":
        model = cifar_resnet(name, num_classes or 10)
        if pretrained:
            _download_cifar(model, name)
        return model
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    try:
        if source == "timm":
            import timm

            with _hub_offline_unless_reachable(pretrained):
                return timm.create_model(name, pretrained=pretrained, **kwargs)
        import torchvision

        return torchvision.models.get_model(name, weights="DEFAULT" if pretrained else None,
                                            **kwargs)
    except (OSError, RuntimeError, ValueError, ConnectionError) as e:
        if not pretrained:
            raise
        raise OfflineError(
            f"could not download pretrained weights for {source}:{name} (offline?): "
            f"pass `checkpoint` (a weights file)"
        ) from e


@contextlib.contextmanager
def _hub_offline_unless_reachable(pretrained: bool, timeout: float = 3.0):
    """Offline, let the Hugging Face hub use its cache only: otherwise it retries each file for a
    minute before failing. Online nothing changes."""
    import socket

    if not pretrained:
        yield
        return
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        yield
        return
    except OSError:
        pass
    from huggingface_hub import constants

    old, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old


def _download_cifar(model: nn.Module, name: str) -> None:
    url = CIFAR_URLS[name]
    try:  # torch hub announces downloads on stderr even without progress; keep ours one line
        with contextlib.redirect_stderr(io.StringIO()):
            sd = torch.hub.load_state_dict_from_url(url, map_location="cpu", check_hash=True,
                                                    weights_only=True, progress=False)
    except Exception as e:
        raise OfflineError(
            f"could not download pretrained weights for cifar:{name} from {url} (offline?): "
            f"pass `checkpoint` (a weights file)"
        ) from e
    apply_state_dict(model, flatten_state_dict(sd, Path(url)), Path(url), f"cifar:{name}")


def _default_preprocess(source: str, name: str, model: nn.Module) -> Preprocess:
    """The model's own evaluation recipe (timm's data config, torchvision's weights transforms);
    ImageNet's resize-256-crop-224 where torchvision knows no weights for the name."""
    if source == "cifar":
        return CIFAR_PREPROCESS
    if source == "timm":
        from timm.data import resolve_data_config

        cfg = resolve_data_config({}, model=model)
        size = tuple(cfg["input_size"][1:])
        resize = math.floor(min(size) / cfg["crop_pct"]) if cfg.get("crop_pct") else None
        return Preprocess(size, tuple(cfg["mean"]), tuple(cfg["std"]), resize,
                          _interpolation(cfg.get("interpolation")))
    import torchvision

    try:
        t = torchvision.models.get_model_weights(name).DEFAULT.transforms()
        return Preprocess((t.crop_size[0], t.crop_size[0]), tuple(t.mean), tuple(t.std),
                          int(t.resize_size[0]), _interpolation(t.interpolation.value))
    except (ValueError, AttributeError, KeyError):
        return Preprocess((224, 224), resize_size=256)


def _interpolation(name: str | None) -> str:
    """timm and torchvision name it the same way; anything exotic falls back to bilinear."""
    return name if name in INTERPOLATIONS else "bilinear"


def head_size(model: nn.Module, preprocess: Preprocess) -> int:
    """How many classes ``model`` (in eval mode) predicts: the width of its output."""
    with torch.no_grad():
        out = model(torch.zeros(1, 3, *preprocess.input_size))
    return int(out.shape[-1])


def create_backbone(
    name: str,
    *,
    checkpoint: str | os.PathLike | None = None,
    pretrained: bool = False,
    num_classes: int | None = None,
    input_size: tuple[int, int] | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
    known_sha256: str | None = None,
) -> Backbone:
    """Build a frozen backbone from a name, with weights from ``checkpoint`` or the registry.

    ``pretrained=True`` downloads the registry's weights when no checkpoint is given (timm's and
    torchvision's own mechanisms; the CIFAR family from its public URLs, hash-checked, into the
    torch hub cache). Offline that fails with :class:`OfflineError` saying to pass a checkpoint.
    ``known_sha256``: the checkpoint's hash when the caller has just computed it (a bundle's
    load checks it before loading), so a large file is hashed once.
    """
    if input_size and max(input_size) > MAX_INPUT_SIDE:
        raise OptionError(f"`input_size` {max(input_size)} is larger than pteenet supports "
                          f"({MAX_INPUT_SIDE} per side)")
    check_normalisation(mean, std)
    source, bare = resolve_name(name)
    pretrained = pretrained and checkpoint is None
    model = _build(source, bare, num_classes, pretrained)
    sha, notes, own = None, [], None
    if checkpoint is not None:
        path = Path(checkpoint)
        sd, own = read_checkpoint(path)
        if num_classes is None and (found := head_classes(model, sd)) is not None:
            num_classes, key = found
            model = _build(source, bare, num_classes, False)
            notes.append(f"`num_classes` {num_classes}: read from the checkpoint's classifier "
                         f"({key})")
        apply_state_dict(model, sd, path, f"{source}:{bare}")
        sha = known_sha256 or sha256_file(path)
    pre = _default_preprocess(source, bare, model)
    pre = replace(pre.resized(tuple(input_size)) if input_size else pre,
                  mean=tuple(mean) if mean else pre.mean, std=tuple(std) if std else pre.std)
    freeze(model)
    num_classes = num_classes or head_size(model, pre)
    return Backbone(model=model, name=bare, source=source, num_classes=num_classes,
                    preprocess=pre, checkpoint=str(checkpoint) if checkpoint is not None else None,
                    checkpoint_sha256=sha, pretrained=pretrained, notes=notes,
                    classes=backbone_classes(source, bare, num_classes, own))
