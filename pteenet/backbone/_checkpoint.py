"""Checkpoints: read one safely, flatten it to a state dict, fit it to a model.

``torch.load(weights_only=True)`` (or safetensors) only: a checkpoint must never run code on the
user's machine. Every way a file can fail -- missing, empty, truncated, a pickle that loads more
than tensors, weights for another architecture or class count -- is one CheckpointError line.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from pteenet.backbone._classes import checkpoint_classes
from pteenet.errors import CheckpointError

__all__ = ["apply_state_dict", "flatten_state_dict", "head_classes", "load_state_dict_file",
           "read_checkpoint"]

_PREFIXES = ("module.", "_orig_mod.")


def _read_raw(path: Path) -> object:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    # weights_only=True: a checkpoint must never be able to run code on the user's machine.
    with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": our error says enough
        warnings.simplefilter("ignore")
        return torch.load(path, map_location="cpu", weights_only=True)


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint safely and return a flat ``name -> tensor`` state dict.

    Accepts a bare state dict or one nested under ``state_dict``/``model`` and strips the
    ``module.`` (DataParallel) and ``_orig_mod.`` (torch.compile) prefixes.
    """
    return read_checkpoint(path)[0]


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], list[str] | None]:
    """:func:`load_state_dict_file`, and the class list the checkpoint saved, if any."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty")
    try:
        raw = _read_raw(path)
    except Exception as e:  # torch and safetensors raise many types; each becomes one line
        raise CheckpointError(_unreadable(path, e)) from e
    return flatten_state_dict(raw, path), checkpoint_classes(raw)


def _raw_pickle(path: Path) -> bool:
    """A legacy raw pickle (``pickle.dump``, not torch's zip format): protocol 2-5 header."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        return False
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _unreadable(path: Path, e: Exception) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    if re.search(r"unsupported global", text, re.IGNORECASE) or _raw_pickle(path) and \
            re.search(r"weights only load failed", text, re.IGNORECASE):
        found = re.search(r"(GLOBAL \S+|Unsupported operand \d+)", text)
        what = f" ({found.group(1)})" if found else ""
        return (f"checkpoint {path} was refused: it is a pickle that loads more than tensors"
                f"{what}, which could run code (torch.load weights_only=True); re-save it as a "
                f"plain state_dict or .safetensors")
    reason = re.search(r"WeightsUnpickler error: \s*(\S[^\n]*)", text)  # not torch's advice
    first = reason.group(1) if reason else (text.strip().splitlines() or [type(e).__name__])[0]
    return (f"checkpoint {path} is not a readable PyTorch or safetensors file (truncated or not a "
            f"checkpoint?): {first[:160]}")


def flatten_state_dict(raw: object, path: Path) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(raw, dict) and isinstance(raw.get(key), dict):
            raw = raw[key]
            break
    if not isinstance(raw, dict) or not raw:
        raise CheckpointError(f"checkpoint {path} holds no state_dict (found {type(raw).__name__})")
    out: dict[str, torch.Tensor] = {}
    for k, v in raw.items():
        if not isinstance(v, torch.Tensor):
            continue
        for prefix in _PREFIXES:
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    if not out:
        raise CheckpointError(f"checkpoint {path} holds no tensors")
    return out


def apply_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], path: Path,
                      label: str) -> None:
    own = model.state_dict()
    # Checkpoints saved before PyTorch 0.4.1 have no BatchNorm step counters; they carry no
    # information for a frozen model, so the model's own are kept.
    sd = {**{k: v for k, v in own.items() if k.endswith("num_batches_tracked")}, **sd}
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [k for k in own if k in sd and own[k].shape != sd[k].shape]
    if not (missing or unexpected or wrong):
        model.load_state_dict(sd, strict=True)
        return

    def few(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")

    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys ({few(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys ({few(unexpected)})")
    if wrong:
        k = wrong[0]
        parts.append(f"{len(wrong)} shape mismatches ({k}: {tuple(sd[k].shape)} in file, "
                     f"{tuple(own[k].shape)} in model)")
    hint = "is it for another architecture?"
    if wrong and not missing and not unexpected and sd[wrong[-1]].ndim <= 2:
        hint = f"wrong number of classes? pass `num_classes` {sd[wrong[-1]].shape[0]}"
    raise CheckpointError(f"checkpoint {path} does not fit {label}: {'; '.join(parts)}; {hint}")


def head_classes(model: nn.Module, sd: dict[str, torch.Tensor]) -> tuple[int, str] | None:
    """The checkpoint's class count, when its classifier differs from the model's default: the
    classifier is the model's last 2-D weight (``linear``, ``fc``, ``classifier.3``, ``head``)."""
    own = model.state_dict()
    key = next((k for k in reversed(own) if k.endswith("weight") and own[k].ndim == 2), None)
    if key is None or key not in sd or sd[key].ndim != 2 or sd[key].shape == own[key].shape:
        return None
    if sd[key].shape[1] != own[key].shape[1]:
        return None  # another architecture: the load below says so
    return int(sd[key].shape[0]), key
