"""MiniCPM-V-2's perceiver resampler: 64 learned queries cross-attend to one crop's ViT tokens.

Spec: ../shared/docs/minicpmv2.md §4. With the reference's `adaptive=True`:
- keys get a 2D sin-cos position embedding generated fresh at the crop's exact patch grid
  (rows, cols): not interpolated, and computed in numpy float32 like the reference (MAE formula);
- queries get the stored 8x8 `pos_embed` parameter (whatever the checkpoint holds, bf16-rounded);
- values get no position embedding.
Attention is torch's nn.MultiheadAttention itself (seq-first layout, weights loaded as stored),
called with need_weights=True so it takes the same explicit bmm/softmax path as the reference
rather than SDPA. The output is `ln_post(out) @ proj` with proj stored as [in, out].
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import nn


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """[M] float32 positions -> [M, dim] = [sin(p*w_k) for k<dim/2] ++ [cos(p*w_k) ...], float32."""
    omega = np.arange(dim // 2, dtype=np.float32)
    omega /= dim / 2.0                                  # in place: stays float32
    omega = 1.0 / 10000 ** omega                        # float32 [dim/2]
    angles = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


@lru_cache(maxsize=64)
def sincos_2d(dim: int, rows: int, cols: int) -> torch.Tensor:
    """[rows*cols, dim] float32, row-major (index = i*cols + j).

    The FIRST dim/2 channels encode the column index j and the second half the row index i
    (the reference meshgrids (w, h), "w goes first", and then names the halves the other way).
    Cached per grid: a run sees only a handful of slice shapes. Treat the result as read-only.
    """
    if dim % 4:
        raise ValueError(f"2D sin-cos embedding needs dim divisible by 4, got {dim}")
    col, row = np.meshgrid(np.arange(cols, dtype=np.float32), np.arange(rows, dtype=np.float32))  # [rows, cols]
    emb = np.concatenate([_sincos_1d(dim // 2, col), _sincos_1d(dim // 2, row)], axis=1)
    return torch.from_numpy(emb)


class Resampler(nn.Module):
    def __init__(self, n_queries: int, dim: int, heads: int, kv_dim: int, eps: float = 1e-6):
        super().__init__()
        self.dim = dim
        self.query = nn.Parameter(torch.zeros(n_queries, dim))
        self.pos_embed = nn.Parameter(torch.zeros(n_queries, dim))     # fixed 8x8 sin-cos, as stored
        # The reference projects only when the widths differ (kv_dim 1152 -> 2304 in the real model).
        self.kv_proj = nn.Linear(kv_dim, dim, bias=False) if kv_dim != dim else nn.Identity()
        self.attn = nn.MultiheadAttention(dim, heads)                     # seq-first (batch_first=False)
        self.ln_q = nn.LayerNorm(dim, eps=eps)
        self.ln_kv = nn.LayerNorm(dim, eps=eps)
        self.ln_post = nn.LayerNorm(dim, eps=eps)
        self.proj = nn.Parameter(torch.zeros(dim, dim))                 # used as x @ proj ([in, out])

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """x [B, rows*cols, kv_dim] (B crops of the same grid) -> [B, n_queries, dim]."""
        rows, cols = grid
        if x.shape[1] != rows * cols:
            raise ValueError(f"{x.shape[1]} vision tokens do not form a {rows}x{cols} grid")
        pos_k = sincos_2d(self.dim, rows, cols).to(device=x.device, dtype=x.dtype)     # [L, D]
        kv = self.ln_kv(self.kv_proj(x)).transpose(0, 1)                               # [L, B, D]
        q = (self.ln_q(self.query) + self.pos_embed)[:, None].expand(-1, x.shape[0], -1)  # [Q, B, D]
        out = self.attn(q, kv + pos_k[:, None], kv, need_weights=True)[0]              # [Q, B, D]
        return self.ln_post(out.transpose(0, 1)) @ self.proj                           # [B, Q, D]
