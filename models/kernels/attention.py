"""The decode-attention kernel (models/kernels/attention.cpp) in the decoder's calling convention."""

from __future__ import annotations

from functools import partial

import torch


def _call(ops, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
          scale: float) -> torch.Tensor:
    """q [B, H, 1, D] -> [B, H, 1, D]; attends positions 0..lengths[b]-1 of cache rows 0..B-1
    (k_cache, v_cache [S, H, L, D], fp32 or bf16 like q)."""
    return ops.decode_attention(q[:, :, 0], k_cache, v_cache, lengths, scale)[:, :, None]


def decode_attention(ops):
    """A callable for Decoder.decode_attention backed by the compiled extension `ops`."""
    return partial(_call, ops)
