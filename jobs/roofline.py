"""The machine's ceilings and the model's work, for honest "ours vs floor" ratios.

- bandwidth: GB/s of streaming a large tensor (an fp32 sum reads every byte once),
- matmul rate: GFLOP/s of a large bf16 GEMM through the same Linear path the model uses,
- model work: FLOPs of vision + prefill + decode, bytes read per decode step.

floors: decode step >= (weights + KV read) / bandwidth; a whole captioning job >= FLOPs / rate.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from models.decoder import DecoderConfig
from models.vit import ViTConfig


@dataclass(frozen=True)
class Machine:
    bandwidth_gbs: float
    matmul_gflops: float


def _median_time(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def measure_machine(dtype: torch.dtype = torch.bfloat16, reps: int = 5) -> Machine:
    # an fp32 sum does 1 add per 4 bytes read: memory-bound with all cores (a bf16 reduction is not:
    # its conversions make it compute-bound on CPU)
    big = torch.ones(512 * 2**20 // 4, dtype=torch.float32)            # 512 MiB
    t = _median_time(lambda: big.sum(), reps)
    bandwidth = big.numel() * big.element_size() / t / 1e9
    del big
    M, K, N = 512, 2048, 5504
    lin = nn.Linear(K, N, bias=False).to(dtype)
    if dtype == torch.bfloat16:
        from models.packed_linear import PackedLinear, available
        if available():
            lin = PackedLinear(lin, batch_hint=M)
    x = torch.randn(M, K).to(dtype)
    with torch.inference_mode():
        t = _median_time(lambda: lin(x), reps)
    return Machine(bandwidth_gbs=bandwidth, matmul_gflops=2 * M * K * N / t / 1e9)


def vit_flops(c: ViTConfig, n_tokens: int) -> int:
    """One crop of n_tokens patches through the tower (linear layers + attention), x2 for MACs."""
    w = c.width
    per_layer = n_tokens * (4 * w * w + 2 * w * c.mlp_dim) + 2 * n_tokens * n_tokens * w
    patch = n_tokens * 3 * c.patch * c.patch * w
    return 2 * (c.depth * per_layer + patch)


def prefill_flops(c: DecoderConfig, n: int) -> int:
    """A prompt of n tokens, logits for the last position only."""
    h, i, d = c.hidden_size, c.intermediate_size, c.head_dim
    lin = h * (c.n_heads * d + 2 * c.n_kv_heads * d) + c.n_heads * d * h + 3 * h * i
    attn = c.n_heads * d * n * n   # q k^T and p v, causal: half of 2 * n^2 * d each
    return 2 * (c.n_layers * (n * lin + attn) + c.vocab_size * h)


def decode_flops(c: DecoderConfig, prompt: int, new: int) -> int:
    return sum(c.flops_per_token(prompt + t) for t in range(new - 1))   # the first token came from prefill


def kv_bytes_per_token(c: DecoderConfig, dtype: torch.dtype) -> int:
    return 2 * c.n_layers * c.n_kv_heads * c.head_dim * torch.empty((), dtype=dtype).element_size()


def decode_step_bytes(c: DecoderConfig, dtype: torch.dtype, batch: int, context: int) -> int:
    """Weights once per step + every row's KV cache up to its context."""
    return c.weight_bytes(dtype) + batch * context * kv_bytes_per_token(c, dtype)
