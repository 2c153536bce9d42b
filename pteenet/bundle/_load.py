"""Loading a bundle: the backbone checked against its checkpoint hash, the model rebuilt."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from pteenet.backbone._custom import CUSTOM, module_of, weights_sha256, wrap_module
from pteenet.backbone._registry import Backbone, create_backbone, sha256_file
from pteenet.bundle._fields import show
from pteenet.bundle._read import empty_or_table, read_bundle
from pteenet.bundle._schema import Bundle, BundleInfo
from pteenet.cascade._build import build_early_exit
from pteenet.cascade._model import EarlyExitModel
from pteenet.errors import BundleError, PteenetError
from pteenet.graph._tracing import trace_backbone

__all__ = ["load", "load_backbone"]


def load_backbone(info: BundleInfo, checkpoint: str | os.PathLike | None = None,
                  force: bool = False,
                  model: nn.Module | Callable[[], nn.Module] | None = None) -> Backbone:
    """Rebuild the bundle's backbone and check its checkpoint is the one it was trained on.

    The hash is checked before the weights are loaded (and handed on, so the file is hashed
    once); a bundle that records a checkpoint but no hash (edited?) cannot be checked, so it
    needs ``force`` like a mismatch does."""
    if model is not None or info.backbone["source"] == CUSTOM:
        return _given_backbone(info, model, force)
    bb = info.backbone
    ckpt = checkpoint if checkpoint is not None else bb.get("checkpoint_path")
    if ckpt is not None and not Path(ckpt).is_file() and checkpoint is None:
        raise BundleError(f"the bundle's checkpoint {show(ckpt)} is gone; pass `checkpoint`")
    want, have = bb.get("checkpoint_sha256"), None
    if ckpt is not None and Path(ckpt).is_file() and not force:
        have = sha256_file(ckpt)
        if not want:
            raise BundleError(f"the bundle records no SHA-256 for its checkpoint, so {ckpt} "
                              f"cannot be checked; pass `force` to use it anyway")
        if have != want:
            raise BundleError(
                f"checkpoint {ckpt} (sha256 {have[:12]}) is not the one the branches were "
                f"trained on ({show(want)[:12]}); pass `force` to use it anyway")
    return create_backbone(  # bundles before --no-pretrained recorded no "pretrained"
        f"{bb['source']}:{bb['name']}", checkpoint=ckpt,
        pretrained=ckpt is None and bb.get("pretrained", True) is not False,
        num_classes=info.num_classes, input_size=info.preprocess.input_size,
        mean=info.preprocess.mean, std=info.preprocess.std, known_sha256=have,
    )


def _given_backbone(info: BundleInfo, model: nn.Module | Callable[[], nn.Module] | None,
                    force: bool) -> Backbone:
    """The user's own module as the bundle's backbone, checked against the weights hash the
    bundle recorded (a registry bundle records none: any module of the right shape will do)."""
    name = info.backbone["name"]
    if model is None:
        raise BundleError(f"{info.path} was attached to your own module ({show(name)}); pass it "
                          f"back: pteenet.load(path, model=...)")
    module = module_of(model)
    want, have = info.backbone.get("weights_sha256"), weights_sha256(module)
    if want and not force and have != want:
        raise BundleError(f"the module given has other weights than the one {info.path} was "
                          f"attached to ({show(want)[:12]}); pass `force` to use it anyway")
    return wrap_module(module, num_classes=info.num_classes, preprocess=info.preprocess,
                       name=name, known_sha256=have)


def load(path: str | os.PathLike | Bundle = "pteenet-out", *,
         checkpoint: str | os.PathLike | None = None, force: bool = False,
         device: str | torch.device = "cpu", thresholds: bool = True,
         model: nn.Module | Callable[[], nn.Module] | None = None) -> EarlyExitModel:
    """Rebuild the early-exit model of a bundle, with its threshold table, in eval mode.

    ``path`` is a bundle folder, read once (:func:`read_bundle`), or a :class:`Bundle` already
    read. The FLOPs come from the bundle (nothing is counted again). ``thresholds=False``
    uses no stored table (every exit off): what calibrate needs to replace a table that is
    missing, corrupt or for another bundle. ``model`` is the backbone module itself (or a
    function building it): required for a bundle attached to the user's own module, whose
    weights must hash as recorded unless ``force``."""
    b = path if isinstance(path, Bundle) else read_bundle(path, thresholds)
    info = b.info
    table = b.table if thresholds else empty_or_table(None, "", info)
    backbone = load_backbone(info, checkpoint, force, model)
    try:
        trace = trace_backbone(backbone.model, info.preprocess.input_size,
                               cuts=info.cuts if info.module_cuts else None, with_thop=False,
                               flops=False)
        model = build_early_exit(trace, info.cuts, info.num_classes,
                                 [br["type"] for br in info.branches], budget=None,
                                 widths=[br.get("width") for br in info.branches],
                                 thresholds=table.thresholds, score=table.score,
                                 gamma=table.gamma,
                                 flops=(info.segment_flops, [br["flops"] for br in info.branches]))
    except (PteenetError, RuntimeError) as e:
        raise BundleError(f"{info.path}: cannot rebuild the model ({show(str(e))})") from e
    _load_state(model, b.state, info)
    model.set_ensemble(b.ensemble)
    model.use_cost(info.cost, info.latency)
    return model.to(device).eval()


def _load_state(model: EarlyExitModel, state: dict[str, torch.Tensor], info: BundleInfo
                ) -> None:
    """The branches' tensors into ``model``, each checked for dtype and shape first."""
    own, where = model.branches.state_dict(), info.path
    bad = [k for k, v in own.items() if k in state and (state[k].dtype != v.dtype
                                                       or state[k].shape != v.shape)]
    if bad:
        raise BundleError(f"{where}: branch tensors do not match the metadata ({bad[0]} has "
                          f"the wrong dtype or shape; edited?)")
    try:
        model.branches.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise BundleError(f"{where}: branch tensors do not match the metadata (edited?)") from e
