"""Preallocated KV cache with a number of slots (one sequence per slot).

Shapes: per layer, k and v are [slots, kv_heads, max_len, head_dim]. A slot's valid length is kept
by the caller (the engine), which knows when a slot is prefilled, stepped or recycled; the cache is
pure storage. Its shape changes only through resize(), which keeps the rows it is told to keep.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

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

    @property
    def dims(self) -> tuple[int, int, int, int]:
        return (self.slots, self.kv_heads, self.max_len, self.head_dim)


def allocate(dims: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """One zeroed layer tensor (the single allocation point, so tests can inject a failure).

    zeros, not empty: masked-out positions are multiplied by 0 probabilities, and 0 * NaN from
    uninitialised memory would still poison the result."""
    return torch.zeros(dims, dtype=dtype, device=device)


class KVCache:
    def __init__(self, shape: CacheShape, dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.shape = shape
        self.k = [allocate(shape.dims, dtype, device) for _ in range(shape.n_layers)]
        self.v = [allocate(shape.dims, dtype, device) for _ in range(shape.n_layers)]

    @property
    def slots(self) -> int:
        return self.shape.slots

    @property
    def max_len(self) -> int:
        return self.shape.max_len

    def resize(self, slots: int, max_len: int, keep: int) -> None:
        """Reshape to slots x max_len, copying rows 0..keep-1 (their first min(old, new) positions).

        One layer (its k and v) at a time is allocated, filled and swapped in, so the peak is the
        new cache plus one old layer, not both caches. If an allocation fails, each layer has
        either its old or its new shape (k and v alike) and rows 0..keep-1 are intact in all; `shape` then
        says what every layer has at least, and calling resize again (with fewer slots, say)
        finishes the job from there.
        """
        target = replace(self.shape, slots=slots, max_len=max_len)
        if keep > min(slots, self.shape.slots):
            raise ValueError(f"cannot keep {keep} rows in a resize from {self.shape.slots} to {slots} slots")
        try:
            for i in range(self.shape.n_layers):
                old_k, old_v = self.k[i], self.v[i]
                if tuple(old_k.shape) == target.dims:
                    continue
                # both new tensors first: a layer's k and v always have the same shape (kernels check)
                new_k = allocate(target.dims, old_k.dtype, old_k.device)
                new_v = allocate(target.dims, old_v.dtype, old_v.device)
                n = min(old_k.shape[2], max_len)
                new_k[:keep, :, :n] = old_k[:keep, :, :n]
                new_v[:keep, :, :n] = old_v[:keep, :, :n]
                self.k[i], self.v[i] = new_k, new_v
                del old_k, old_v, new_k, new_v      # the old layer is freed before the next is allocated
        except BaseException:
            self.shape = replace(self.shape, slots=min(slots, self.shape.slots),
                                 max_len=min(max_len, self.shape.max_len))
            raise
        self.shape = target

    def move(self, src: int, dst: int) -> None:
        """Copy slot src's row over slot dst's, in every layer."""
        for tensors in (self.k, self.v):
            for t in tensors:
                t[dst] = t[src]

    def clear(self, slot: int) -> None:
        """Zero one slot's row (after a row produced non-finite values, so no NaN outlives it)."""
        for tensors in (self.k, self.v):
            for t in tensors:
                t[slot].zero_()
