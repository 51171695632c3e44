"""The machine's ceilings and the model's work, for honest "ours vs floor" ratios.

- bandwidth: GB/s of streaming a large tensor (an fp32 sum reads every byte once),
- matmul rate: GFLOP/s of a prefill-sized GEMM in the compute dtype through every path this
  machine has (PyTorch's, oneDNN-packed, our widening kernel); the floor uses the fastest,
- model work: FLOPs of vision + prefill + decode, bytes read per decode step (weights as stored).

floors: decode step >= (weights + KV read) / bandwidth; a whole captioning job >= FLOPs / rate.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from models.decoder import DecoderConfig
from models.vit import ViTConfig


@dataclass(frozen=True)
class Machine:
    bandwidth_gbs: float
    matmul_gflops: float                  # the fastest GEMM path measured for the compute dtype
    matmul_paths: dict = field(default_factory=dict)     # GFLOP/s of every path measured
    matmul_shape: tuple = ()              # (M, K, N) of the probe


def _median_time(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _gemm_paths(dtype: torch.dtype, w: torch.Tensor, M: int, ops) -> dict[str, object]:
    """Every way this machine can run x[M, K] @ w.T in `dtype` that the pipeline could use."""
    paths: dict[str, object] = {}
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight = nn.Parameter(w.to(dtype), requires_grad=False)
    paths["torch"] = lin
    if dtype == torch.bfloat16:
        from models.packed_linear import PackedLinear
        try:
            paths["onednn-bf16-packed"] = PackedLinear(lin, batch_hint=M)
        except RuntimeError:                       # this CPU cannot reorder bf16 weights
            pass
    if dtype == torch.float32:
        try:                                       # oneDNN's fp32 path (what inductor freezing uses)
            packed = torch.ops.mkldnn._reorder_linear_weight(w.float(), M)
            paths["onednn-fp32-packed"] = lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        except (RuntimeError, AttributeError):
            pass
        if ops is not None:
            from models.kernels.linear import WideningLinear
            paths["widening-bf16-weights"] = WideningLinear(nn.Linear(w.shape[1], w.shape[0], bias=False)
                                                            .to(torch.bfloat16).requires_grad_(False), ops)
    return paths


def measure_machine(dtype: torch.dtype = torch.bfloat16, reps: int = 5, ops=None) -> Machine:
    """Streaming bandwidth and the GEMM rate of every path, at a prefill-like shape.

    The compute floor uses the FASTEST path measured, whether or not the model uses it, so a
    ratio to it says how far the pipeline is from what this machine can do, not from itself."""
    # an fp32 sum does 1 add per 4 bytes read: memory-bound with all cores (a bf16 reduction is not:
    # its conversions make it compute-bound on CPU)
    big = torch.ones(512 * 2**20 // 4, dtype=torch.float32)            # 512 MiB
    t = _median_time(lambda: big.sum(), reps)
    bandwidth = big.numel() * big.element_size() / t / 1e9
    del big
    M, K, N = 768, 2048, 5504
    w = torch.randn(N, K)
    x = torch.randn(M, K).to(dtype)
    rates = {}
    with torch.inference_mode():
        for name, fn in _gemm_paths(dtype, w, M, ops).items():
            rates[name] = 2 * M * K * N / _median_time(lambda: fn(x), reps) / 1e9
    return Machine(bandwidth_gbs=bandwidth, matmul_gflops=max(rates.values()), matmul_paths=rates,
                   matmul_shape=(M, K, N))


def weight_bytes_per_step(llm: nn.Module) -> int:
    """Bytes of weights one decode step streams, read off the loaded modules (so the floor uses
    the widths the model really stores: 16-bit panels, packed bf16, or fp32)."""
    from models.kernels.linear import WideningLinear
    from models.packed_linear import PackedLinear

    total = 0
    for m in llm.modules():
        if isinstance(m, WideningLinear):
            total += m.panels.numel() * m.panels.element_size()
        elif isinstance(m, PackedLinear):
            total += m.in_features * m.out_features * 2
        elif isinstance(m, nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
    return total


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


def decode_step_floor_s(c: DecoderConfig, weight_bytes: int, kv_dtype: torch.dtype, batch: int, context: int,
                        m: Machine) -> float:
    """One decode step can be no faster than streaming the weights once plus every row's KV cache,
    nor than its FLOPs at the best GEMM rate."""
    bytes_ = weight_bytes + batch * context * kv_bytes_per_token(c, kv_dtype)
    return max(bytes_ / (m.bandwidth_gbs * 1e9), batch * c.flops_per_token(context) / (m.matmul_gflops * 1e9))
