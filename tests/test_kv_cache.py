"""KVCache.resize: keeps exactly the rows it is told to keep, and survives a failed allocation."""

from __future__ import annotations

import pytest
import torch

from models import kv_cache
from models.kv_cache import CacheShape, KVCache


def _filled(slots: int, max_len: int) -> KVCache:
    c = KVCache(CacheShape(3, slots, 2, max_len, 4), torch.float32)
    for i, t in enumerate(c.k + c.v):
        t.copy_(torch.arange(t.numel(), dtype=torch.float32).view(t.shape) + 1000 * i)
    return c


def test_grow_keeps_the_live_rows_and_zeroes_the_rest():
    c = _filled(4, 8)
    before = [t.clone() for t in c.k + c.v]
    c.resize(3, 16, keep=2)
    assert c.shape == CacheShape(3, 3, 2, 16, 4)
    for old, new in zip(before, c.k + c.v):
        assert new.shape == (3, 2, 16, 4)
        assert torch.equal(new[:2, :, :8], old[:2]) and not new[:2, :, 8:].any() and not new[2:].any()


def test_a_failed_allocation_keeps_every_live_row_and_the_retry_completes(monkeypatch):
    c = _filled(4, 8)
    before = [t[:2].clone() for t in c.k + c.v]
    real, calls = kv_cache.allocate, []

    def fail_third(dims, dtype, device):
        calls.append(dims)
        if len(calls) == 3:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
        return real(dims, dtype, device)

    monkeypatch.setattr(kv_cache, "allocate", fail_third)
    with pytest.raises(RuntimeError, match="allocate"):
        c.resize(4, 16, keep=2)
    assert {tuple(t.shape) for t in c.k + c.v} == {(4, 2, 16, 4), (4, 2, 8, 4)}      # mixed layers
    assert all(k.shape == v.shape for k, v in zip(c.k, c.v))                           # never within a layer
    assert c.shape.slots == 4 and c.shape.max_len == 8                                 # what all layers have
    for old, t in zip(before, c.k + c.v):
        assert torch.equal(t[:2, :, :8], old)
    c.resize(2, 16, keep=2)                                                            # fewer slots, same length
    for old, t in zip(before, c.k + c.v):
        assert t.shape == (2, 2, 16, 4) and torch.equal(t[:, :, :8], old)


def test_move_and_clear():
    c = _filled(3, 4)
    row2 = [t[2].clone() for t in c.k + c.v]
    c.move(2, 0)
    c.clear(1)
    for r, t in zip(row2, c.k + c.v):
        assert torch.equal(t[0], r) and not t[1].any()
