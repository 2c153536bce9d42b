"""The FLOP counter every count in pteenet uses: aten-level ``FlopCounterMode``, plus attention.

``FlopCounterMode`` knows the CUDA kernels of ``scaled_dot_product_attention`` but not the one
PyTorch runs on a CPU (``_scaled_dot_product_flash_attention_for_cpu``), so a ViT's attention
(its ``QK^T`` and ``AV`` matmuls, 14 % of ViT-Ti's FLOPs at 224) counted as nothing and a
token backbone's cuts sat at the wrong FLOP fractions. The same formula as for the CUDA
kernels (:func:`torch.utils.flop_counter.sdpa_flop`) is registered for it. Likewise the fused
``_native_multi_head_attention`` that ``nn.MultiheadAttention`` runs in inference (torchvision's
``vit_b_16``): its projections and attention counted as the unfused ops would be, where the
plain counter saw none of its 17.5 GMACs (half of vit_b_16's).
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop

__all__ = ["flop_counter"]


def _cpu_attention(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop(query, key, value)


def _fused_mha(query, key, value, embed_dim, num_heads, *args, out_shape=None, **kwargs) -> int:
    """Q, K, V and output projections plus ``QK^T`` and ``AV`` ([N, T, E] inputs)."""
    n, t, e = query
    s = key[1]
    projections = 2 * n * e * e * (t + 2 * s) + 2 * n * t * e * e
    return projections + 4 * n * t * s * e


_EXTRA = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention,
          torch.ops.aten._native_multi_head_attention: _fused_mha}


def flop_counter() -> FlopCounterMode:
    """A silent ``FlopCounterMode`` that also counts CPU attention."""
    return FlopCounterMode(display=False, custom_mapping=_EXTRA)
