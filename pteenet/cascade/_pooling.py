"""The reduction's pooling: average and max to a small grid, exportable for every map size.

``F.adaptive_avg_pool2d``/``adaptive_max_pool2d`` are what eager PyTorch runs, but the ONNX
exporter refuses them when the output size does not divide the input size (a 7x7 map to 4x4,
MobileNetV3's, Swin's and SqueezeNet's last maps) or where it cannot see the input's size.
While exporting, every map is pooled by fixed slices instead: adaptive pooling's cell ``i`` of
``s`` over ``n`` rows spans ``[floor(i*n/s), ceil((i+1)*n/s))``, and both the mean and the max
over a rectangle are separable (rows first, then columns; every row of a cell has the same
columns), so ``s`` slices per axis reproduce it exactly in arithmetic, within float rounding.

Token maps (``[N, T, C]``, a transformer's residual stream) are reduced by :func:`token_pool`:
one head cell (the class token, or the mean of every patch where there is none, beside the max
over the patches) and the patch tokens pooled over a grid as a map would be.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["MAX_PREFIX", "grid_pool", "patch_grid", "token_cells", "token_pool"]

MAX_PREFIX = 8  # at most this many leading tokens before a square patch grid count as prefix


def _bins(n: int, s: int) -> list[tuple[int, int]]:
    return [((i * n) // s, -((-(i + 1) * n) // s)) for i in range(s)]


def sliced_pool(x: torch.Tensor, sh: int, sw: int, op: str) -> torch.Tensor:
    """Adaptive pooling of ``x`` [N, C, H, W] to ``sh`` x ``sw`` by fixed slices (``op``:
    ``mean`` or ``amax``), rows then columns."""
    h, w = int(x.shape[-2]), int(x.shape[-1])
    rows = torch.cat([getattr(x[:, :, a:b], op)(2, keepdim=True) for a, b in _bins(h, sh)], 2)
    return torch.cat([getattr(rows[..., a:b], op)(3, keepdim=True) for a, b in _bins(w, sw)], 3)


def grid_pool(x: torch.Tensor, sh: int, sw: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Average and max pooling of ``x`` [N, C, H, W] to ``sh`` x ``sw`` cells, as adaptive
    pooling defines them. While exporting to ONNX, where the exporter refuses adaptive pooling
    (a size not a multiple of its cells, or the input's size lost, as after a reshape with a
    dynamic batch): one fixed-kernel pooling node each where equal cells tile the map (exactly
    adaptive pooling there; the slices cost a ReduceMean and a ReduceMax per cell row and
    column, slower than the backbone's convolutions on a CIFAR map, design-timings.md), else
    the fixed slices."""
    if torch.onnx.is_in_onnx_export():
        h, w = int(x.shape[-2]), int(x.shape[-1])
        if h % sh == 0 and w % sw == 0:
            cell = (h // sh, w // sw)
            return F.avg_pool2d(x, cell), F.max_pool2d(x, cell)
        return sliced_pool(x, sh, sw, "mean"), sliced_pool(x, sh, sw, "amax")
    return F.adaptive_avg_pool2d(x, (sh, sw)), F.adaptive_max_pool2d(x, (sh, sw))


def patch_grid(tokens: int) -> tuple[int, int, int]:
    """(prefix, rows, columns) of a token sequence: a square patch grid after at most
    :data:`MAX_PREFIX` leading tokens (ViT's class token, DeiT's distillation token), else no
    prefix and the tokens in one column (a sequence with no square grid)."""
    side = math.isqrt(tokens)
    prefix = tokens - side * side
    if side > 1 and prefix <= MAX_PREFIX:
        return prefix, side, side
    return 0, tokens, 1


def _patch_cells(tokens: int, s: int) -> tuple[int, int]:
    _, rows, cols = patch_grid(tokens)
    if cols == 1:
        return min(s * s, rows), 1
    return min(s, rows), min(s, cols)


def token_cells(tokens: int, s: int) -> int:
    """How many cells :func:`token_pool` gives a ``tokens``-long sequence at grid ``s``: the
    head cell plus the patch grid's (``s`` = 0: the head cell alone)."""
    if s < 1:
        return 1
    sh, sw = _patch_cells(tokens, s)
    return 1 + sh * sw


def token_pool(x: torch.Tensor, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The average and max halves of a token map ``x`` [N, T, C], each [N, C, cells, 1].

    Cell 0 holds the prefix tokens' mean (the class token itself where there is one; the mean
    of every patch where there is none) in the average half and the max over the patches in
    the max half: a ViT answers from its class token, so an exit should read it whole (DeiT's
    and BEiT's heads, Touvron et al. 2021). Cells 1.. are the patch grid pooled to ``s`` x ``s``
    (``s`` = 0: none), as a convolutional map is."""
    prefix, rows, cols = patch_grid(int(x.shape[1]))
    patches = x[:, prefix:]
    head = x[:, :prefix].mean(1) if prefix else patches.mean(1)
    avg, top = [head.unsqueeze(2)], [patches.amax(1).unsqueeze(2)]
    if s >= 1:
        grid = patches.transpose(1, 2).reshape(-1, int(x.shape[2]), rows, cols)
        a, m = grid_pool(grid, *_patch_cells(int(x.shape[1]), s))
        avg.append(a.flatten(2))
        top.append(m.flatten(2))
    return torch.cat(avg, 2).unsqueeze(3), torch.cat(top, 2).unsqueeze(3)
