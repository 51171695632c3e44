"""ONE SigLIP-style ViT encoder with knobs, for both families' vision towers.

Bunny:       HF SigLIP semantics, gelu-tanh MLP, feature = output of the last kept layer
             (no post-layernorm), fixed 27x27 grid.
MiniCPM-V-2: timm SigLIP semantics, exact erf GELU, final LayerNorm applied, absolute position
             embedding resampled (antialiased bicubic, fp32) to each slice's patch grid.

Pre-norm blocks: x = x + attn(LN1(x)); x = x + mlp(LN2(x)). Attention is softmax(q k^T / sqrt(d)) v
without mask (SDPA); the patch embedding is a stride-p conv (right/bottom remainders are ignored,
as by the references' "valid" convolution).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ViTConfig:
    width: int
    depth: int              # layers actually built and run (after any "drop last layer")
    heads: int
    mlp_dim: int
    patch: int
    grid: int               # side of the stored position-embedding grid (384 // 14 = 27)
    eps: float = 1e-6
    gelu_tanh: bool = True  # HF SigLIP "gelu_pytorch_tanh"; timm uses exact erf
    final_norm: bool = False
    channels: int = 3


class Block(nn.Module):
    def __init__(self, c: ViTConfig):
        super().__init__()
        self.heads = c.heads
        self.norm1 = nn.LayerNorm(c.width, eps=c.eps)
        self.qkv = nn.Linear(c.width, 3 * c.width)
        self.proj = nn.Linear(c.width, c.width)
        self.norm2 = nn.LayerNorm(c.width, eps=c.eps)
        self.fc1 = nn.Linear(c.width, c.mlp_dim)
        self.fc2 = nn.Linear(c.mlp_dim, c.width)
        self.approximate = "tanh" if c.gelu_tanh else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        h = self.norm1(x)
        q, k, v = self.qkv(h).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # 3x[B,h,N,d]
        a = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(a.transpose(1, 2).reshape(B, N, C))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x)), approximate=self.approximate))


class ViT(nn.Module):
    def __init__(self, c: ViTConfig):
        super().__init__()
        self.cfg = c
        self.patch_embed = nn.Conv2d(c.channels, c.width, kernel_size=c.patch, stride=c.patch)
        self.pos_embed = nn.Parameter(torch.zeros(c.grid * c.grid, c.width))
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.width, eps=c.eps) if c.final_norm else None

    def pos_for_grid(self, gh: int, gw: int) -> torch.Tensor:
        """Position embedding for a gh x gw patch grid, [gh*gw, width].

        timm's resample_abs_pos_embed: unchanged for the native square grid, else antialiased
        bicubic interpolation computed in fp32 and cast back.
        """
        g = self.cfg.grid
        if gh == g and gw == g:
            return self.pos_embed
        p = self.pos_embed.float().reshape(1, g, g, -1).permute(0, 3, 1, 2)          # [1, C, g, g]
        p = F.interpolate(p, size=(gh, gw), mode="bicubic", antialias=True, align_corners=False)
        return p.permute(0, 2, 3, 1).reshape(gh * gw, -1).to(self.pos_embed.dtype)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, H, W] (same size in a batch) -> features [B, (H//p)*(W//p), width]."""
        x = self.patch_embed(pixels.to(self.pos_embed.dtype))                       # [B, C, gh, gw]
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2) + self.pos_for_grid(gh, gw)                # row-major patches
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x) if self.norm is not None else x
