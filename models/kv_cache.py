"""Preallocated KV cache with a fixed number of slots (one sequence per slot).

Shapes: per layer, k and v are [slots, kv_heads, max_len, head_dim]. A slot's valid length is kept
by the caller (the engine), which knows when a slot is prefilled, stepped or recycled; the cache is
pure storage so its shapes never change during a run (static shapes for the compiled step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CacheShape:
    n_layers: int
    slots: int
    kv_heads: int
    max_len: int
    head_dim: int

    def nbytes(self, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * self.n_layers * self.slots * self.kv_heads * self.max_len * self.head_dim * elem


def allocate(dims: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """One zeroed layer tensor (the single allocation point, so tests can inject a failure)."""
    return torch.zeros(dims, dtype=dtype, device=device)


class KVCache:
    def __init__(self, shape: CacheShape, dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.shape = shape
        dims = (shape.slots, shape.kv_heads, shape.max_len, shape.head_dim)
        # zeros, not empty: masked-out positions are multiplied by 0 probabilities, and
        # 0 * NaN from uninitialised memory would still poison the result.
        self.k = [allocate(dims, dtype, device) for _ in range(shape.n_layers)]
        self.v = [allocate(dims, dtype, device) for _ in range(shape.n_layers)]

    @property
    def slots(self) -> int:
        return self.shape.slots

    @property
    def max_len(self) -> int:
        return self.shape.max_len
