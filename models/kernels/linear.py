"""fp32 Linear layers whose weights stay in the checkpoint's own width (the widening GEMM).

On CPUs without native bf16 the dtype policy computes in fp32. Both model families ship 16-bit
checkpoints (Bunny fp16, MiniCPM-V-2 bf16), and widening a 16-bit value to fp32 is exact, so
keeping the weights as stored and widening them inside the GEMM (models/kernels/linear.cpp) is the
same fp32 computation over the same values — while a batch-1 decode step, which is bound by the
weight bytes it streams, reads half as many. The kernel also beats PyTorch's fp32 `F.linear` at
decode batch sizes on AMD CPUs (MKL's small-M path there runs at a few GB/s).

A weight stored in fp32 (an fp32 checkpoint) is packed as fp32: nothing is ever rounded.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from models.base import dtype_name

log = logging.getLogger(__name__)

PANEL = 16                       # output columns per packed panel (the kernel's NR)
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def pack_panels(w: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [ceil(N/16), K, 16] (rows padded with zeros): one contiguous stream per panel."""
    n, k = w.shape
    pad = -n % PANEL
    if pad:
        w = torch.cat([w, w.new_zeros(pad, k)])
    return w.reshape(-1, PANEL, k).transpose(1, 2).contiguous()


def unpack_panels(panels: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of pack_panels: [N, K] in the stored dtype."""
    return panels.transpose(1, 2).reshape(-1, panels.shape[1])[:n]


class WideningLinear(nn.Module):
    """Inference-only stand-in for nn.Linear: fp32 activations in and out, weight in panels of its
    stored dtype (fp32 / bf16 / fp16)."""

    def __init__(self, linear: nn.Linear, ops):
        super().__init__()
        w = linear.weight.detach()
        if w.dtype not in WEIGHT_DTYPES or w.device.type != "cpu":
            raise ValueError(f"WideningLinear needs a CPU weight in {WEIGHT_DTYPES}, got {w.dtype} on {w.device}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._ops = ops
        self.register_buffer("panels", pack_panels(w), persistent=False)        # [N/16, K, 16]
        b = linear.bias
        self.register_buffer("bias", None if b is None else b.detach().float().contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = self._ops.widening_linear(x.reshape(-1, self.in_features).contiguous(), self.panels, self.bias,
                                      self.out_features)                          # [M, N] fp32
        return y.view(*lead, self.out_features)

    def dense_weight(self) -> torch.Tensor:
        """[out, in] in the stored dtype (for code that needs the plain matrix, e.g. the bench baseline)."""
        return unpack_panels(self.panels, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, weight={dtype_name(self.panels.dtype)}")


def widen_linears(module: nn.Module, ops) -> dict[str, int]:
    """Replace every CPU nn.Linear under `module` by a WideningLinear; returns {stored dtype: count}."""
    counts: dict[str, int] = {}
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.weight.device.type == "cpu" and child.weight.dtype in WEIGHT_DTYPES:
                setattr(parent, name, WideningLinear(child, ops))
                key = dtype_name(child.weight.dtype)
                counts[key] = counts.get(key, 0) + 1
    log.debug("widening linears: %s", counts)
    return counts
