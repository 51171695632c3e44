"""ONE llama-family decoder for both model families, with knobs instead of copies.

Qwen2 (Bunny's LLM):   qkv bias, RoPE rotation in the model dtype, no muP scales.
MiniCPM (MiniCPM-V-2): no bias, RoPE rotation in fp32, muP: embeddings x scale_emb,
                       residual branches x scale_depth/sqrt(L), hidden / (hidden/dim_model_base)
                       before lm_head.

Both use RMSNorm computed in fp32 and cast back before the weight multiply, SwiGLU MLP, rotate-half
RoPE whose cos/sin tables are computed in fp32 and rounded to the model dtype (what the references
do once the model is cast), causal attention with softmax scale 1/sqrt(head_dim).

Weights are fused at load time (q|k|v into one matrix, gate|up into one): fewer, larger GEMMs,
which is what matters on CPU at small batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.kv_cache import KVCache
from models.loading import NameMap


@dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    intermediate_size: int
    rms_eps: float
    rope_theta: float
    max_position: int
    qkv_bias: bool = False
    rope_fp32: bool = False          # MiniCPM rotates q/k in fp32; Qwen2 in the model dtype
    scale_emb: float = 1.0           # muP: text embeddings x scale_emb
    residual_scale: float = 1.0      # muP: scale_depth / sqrt(n_layers)
    logit_divisor: float = 1.0       # muP: hidden_size / dim_model_base

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_heads

    def weight_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of weights read by one decode step (all layers + final norm + lm_head)."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        per_layer = h * (self.n_heads * d + 2 * self.n_kv_heads * d) + self.n_heads * d * h + 3 * h * i
        elem = torch.empty((), dtype=dtype).element_size()
        return (self.n_layers * per_layer + self.vocab_size * h) * elem

    def flops_per_token(self, context: int = 0) -> int:
        """Multiply-adds x2 of one token's forward (linear layers + attention at `context`)."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        lin = h * (self.n_heads * d + 2 * self.n_kv_heads * d) + self.n_heads * d * h + 3 * h * i
        attn = 2 * self.n_heads * d * context
        return 2 * (self.n_layers * (lin + attn) + self.vocab_size * h)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.head_dim
        self.q_size, self.kv_size = cfg.n_heads * d, cfg.n_kv_heads * d
        self.qkv = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o = nn.Linear(self.q_size, cfg.hidden_size, bias=False)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x [B, h, T, d]; cos/sin [B, 1, T, d] in the model dtype
        if self.cfg.rope_fp32:
            xf = x.float()
            return (xf * cos.float() + rotate_half(xf) * sin.float()).to(x.dtype)
        return x * cos + rotate_half(x) * sin

    def forward(self, x, cos, sin, step: "Step", layer: int):
        B, T, _ = x.shape
        cfg = self.cfg
        q, k, v = self.qkv(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(B, T, cfg.n_heads, cfg.head_dim).transpose(1, 2)       # [B, h, T, d]
        k = k.view(B, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)    # [B, kvh, T, d]
        v = v.view(B, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
        gqa = cfg.n_heads != cfg.n_kv_heads
        cache = step.cache
        if not step.decoding:
            # Prefill (or no cache): causal attention over this chunk only; rows are right-padded
            # so a real token never sees a pad. Prefill always starts at position 0.
            if cache is not None:
                kc, vc = cache.k[layer], cache.v[layer]
                if step.slots is None:
                    kc[:B, :, :T] = k
                    vc[:B, :, :T] = v
                else:
                    kc[step.slots, :, :T] = k
                    vc[step.slots, :, :T] = v
            out = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)
        else:
            # Decode: one new token per row at its own position; attend to cache[:kv_len].
            kc, vc = cache.k[layer], cache.v[layer]
            kc[step.rows, :, step.positions] = k[:, :, 0]
            vc[step.rows, :, step.positions] = v[:, :, 0]
            if step.kernel is not None and step.slots is None and not gqa:
                out = step.kernel(q, kc, vc, step.positions + 1, cfg.head_dim ** -0.5)     # [B, h, 1, d]
            elif step.slots is None:   # the first B slots: a view, no copy
                out = F.scaled_dot_product_attention(q, kc[:B, :, :step.kv_len], vc[:B, :, :step.kv_len],
                                                     attn_mask=step.mask, enable_gqa=gqa)
            else:
                out = F.scaled_dot_product_attention(q, kc[step.slots, :, :step.kv_len], vc[step.slots, :, :step.kv_len],
                                                     attn_mask=step.mask, enable_gqa=gqa)
        out = out.transpose(1, 2).reshape(B, T, self.q_size)
        return self.o(out)


@dataclass
class Step:
    """What every layer needs to know about this forward, computed once per forward.

    For a decode step, mask is [B, 1, 1, kv_len], True where a row may attend (positions <= its
    own), unless the decode-attention kernel (which takes lengths) will be used; None otherwise.
    """

    cache: KVCache | None
    slots: torch.Tensor | None       # cache rows of the batch rows; None = rows 0..B-1
    rows: torch.Tensor | None        # decode: the cache row index of each batch row
    positions: torch.Tensor          # [B] position of the (last) token of each row
    kv_len: int | None
    mask: torch.Tensor | None
    kernel: object = None            # decode attention kernel (q, k_cache, v_cache, lengths, scale)
    decoding: bool = False           # one cached token per row (else prefill / no cache)


class MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.inter = cfg.intermediate_size
        self.gate_up = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).split([self.inter, self.inter], dim=-1)
        return self.down(F.silu(gate) * up)


class Layer(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.attn = Attention(cfg)
        self.post_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.mlp = MLP(cfg)
        self.residual_scale = cfg.residual_scale

    def forward(self, x, cos, sin, step: Step, layer: int):
        a = self.attn(self.input_norm(x), cos, sin, step, layer)
        if self.residual_scale != 1.0:
            a = a * self.residual_scale
        x = x + a
        m = self.mlp(self.post_norm(x))
        if self.residual_scale != 1.0:
            m = m * self.residual_scale
        return x + m


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._rope_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        # optional decode-attention kernel (models/kernels/attention.py), set by the loader when the
        # device/dtype policy asks for it; None = SDPA
        self.decode_attention = None

    # -- tables ---------------------------------------------------------------------------------
    def rope_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [max_position, head_dim], computed in fp32 and rounded to the weight dtype."""
        w = self.embed_tokens.weight   # never packed: its dtype/device are the model's
        if self._rope_cache is None or self._rope_cache[0].dtype != w.dtype or self._rope_cache[0].device != w.device:
            d = self.cfg.head_dim
            inv_freq = 1.0 / (self.cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
            t = torch.arange(self.cfg.max_position, dtype=torch.float32)
            freqs = torch.outer(t, inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)
            self._rope_cache = (emb.cos().to(w.dtype).to(w.device), emb.sin().to(w.dtype).to(w.device))
        return self._rope_cache

    # -- API ------------------------------------------------------------------------------------
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Text token embeddings, muP-scaled (x scale_emb) where the family asks for it."""
        e = self.embed_tokens(ids)
        return e * self.cfg.scale_emb if self.cfg.scale_emb != 1.0 else e

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None,
                slots: torch.Tensor | None = None, kv_len: int | None = None) -> torch.Tensor:
        """x [B, T, H] input embeddings; positions [B, T] (prefill) or [B] (decode, T == 1).

        Without a cache: plain causal forward. With a cache and T > 1: prefill into `slots`
        (None = slots 0..B-1) at positions 0..T-1. With T == 1: one decode step, each row at its
        own position, attending to cache[:kv_len] (slots None = the first B slots, as a view).
        Returns the final-normed hidden [B, T, H].
        """
        cos_t, sin_t = self.rope_tables()
        pos2d = positions if positions.dim() == 2 else positions[:, None]           # [B, T]
        cos, sin = cos_t[pos2d][:, None], sin_t[pos2d][:, None]                     # [B, 1, T, d]
        pos1d = positions if positions.dim() == 1 else positions[:, -1]
        B, T = x.shape[:2]
        decoding = cache is not None and T == 1
        if decoding and kv_len is None:
            raise ValueError("a cached decode step needs kv_len")
        rows = (torch.arange(B, device=x.device) if slots is None else slots) if decoding else None
        kernel = self.decode_attention if decoding and x.dtype in (torch.float32, torch.bfloat16) else None
        # the SDPA path's mask; the kernel takes lengths instead (it is used only for slots=None and
        # no GQA, so the mask is still built for the other decode cases)
        needs_mask = decoding and (kernel is None or slots is not None or self.cfg.n_heads != self.cfg.n_kv_heads)
        mask = ((torch.arange(kv_len, device=x.device)[None, :] <= pos1d[:, None])[:, None, None, :]
                if needs_mask else None)                                            # [B, 1, 1, kv_len]
        step = Step(cache, slots, rows, pos1d, kv_len, mask, kernel, decoding)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, step, i)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.cfg.logit_divisor != 1.0:
            hidden = hidden / self.cfg.logit_divisor
        return self.lm_head(hidden).float()


def map_llama_names(m: NameMap, cfg: DecoderConfig, src: str, lm_head: str, dst: str = "llm.") -> None:
    """Name-map rules from a HF llama-family checkpoint (`{src}layers.i.self_attn.q_proj...`) to
    this Decoder under `dst`, fusing q|k|v and gate|up."""
    m.add(dst + "embed_tokens.weight", src + "embed_tokens.weight")
    for i in range(cfg.n_layers):
        p, q = f"{src}layers.{i}.", f"{dst}layers.{i}."
        m.add(q + "attn.qkv.weight", *(p + f"self_attn.{x}_proj.weight" for x in "qkv"))
        if cfg.qkv_bias:
            m.add(q + "attn.qkv.bias", *(p + f"self_attn.{x}_proj.bias" for x in "qkv"))
        m.add(q + "attn.o.weight", p + "self_attn.o_proj.weight")
        m.add(q + "mlp.gate_up.weight", p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight")
        m.add(q + "mlp.down.weight", p + "mlp.down_proj.weight")
        m.add(q + "input_norm.weight", p + "input_layernorm.weight")
        m.add(q + "post_norm.weight", p + "post_attention_layernorm.weight")
    m.add(dst + "norm.weight", src + "norm.weight")
    m.add(dst + "lm_head.weight", lm_head)


def residual_scale(scale_depth: float, n_layers: int) -> float:
    return scale_depth / math.sqrt(n_layers)
