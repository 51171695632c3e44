"""CPU bf16 fast path: Linear layers with weights pre-reordered into oneDNN's blocked layout.

Why: PyTorch's plain bf16 `F.linear` on CPU re-lays-out the weight on every call; at decode
batch sizes (M = 1..16 rows) that caps weight streaming at ~20-25 GB/s, a third of this class of
machine's memory bandwidth. Reordering once at load time (the same op inductor uses when it
freezes a CPU graph) lets the GEMV/GEMM stream weights at ~55-60 GB/s and reach ~850 GFLOP/s at
M >= 64. Results equal F.linear bit for bit at decode sizes (tested); for large M the
reduction may be blocked differently (bf16 rounding-level differences, same greedy tokens).

Only used for bfloat16 on CPUs with native bf16 (pipeline/device.cpu_kernels decides: oneDNN's
bf16 reorder refuses to run without AVX-512 BW/VL/DQ or AVX-NE-CONVERT); everything else keeps
nn.Linear.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


def available() -> bool:
    return (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class PackedLinear(nn.Module):
    """Drop-in for an inference-only nn.Linear; the weight lives in oneDNN's layout."""

    def __init__(self, linear: nn.Linear, batch_hint: int):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        # packed oneDNN tensor [out, in]: not a Parameter (opaque layout), so kept as an attribute
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w, batch_hint)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def pack_linears(module: nn.Module, batch_hint: int = 16) -> int:
    """Replace every bf16 nn.Linear under `module` by a PackedLinear; returns how many."""
    if not available():
        log.info("oneDNN linear packing unavailable; keeping nn.Linear")
        return 0
    n = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.weight.dtype == torch.bfloat16 and child.weight.device.type == "cpu":
                try:
                    packed = PackedLinear(child, batch_hint)
                except RuntimeError as e:    # this CPU lacks what oneDNN's bf16 reorder needs
                    if n:
                        raise
                    log.warning("oneDNN bf16 linear packing unavailable here (%s); keeping nn.Linear",
                                str(e).splitlines()[0][:200])
                    return 0
                setattr(parent, name, packed)
                n += 1
    log.debug("packed %d linear layers for oneDNN", n)
    return n
