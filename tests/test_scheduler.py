"""The pure-data slot scheduler, executed against a simulated cache (no tensors).

The simulation holds, per slot, whose sequence is stored there and how long it is; executing a
plan moves, resizes (keeping exactly what a resize keeps), decodes and prefills that record. So
"a live row's cache is never lost" is checked on every step of generated traffic, in microseconds:
the growth bug of issue 10 (a resize that kept the first n rows while holes were still open)
fails here on its first example.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stages.caption.scheduler import CacheSize, SlotScheduler


@dataclass
class Seq:
    rid: int
    length: int                        # positions written


class SimCache:
    """What each slot holds: the sequence whose K/V are there (None = zeros/stale)."""

    def __init__(self):
        self.slots: list[Seq | None] = []
        self.max_len = 0

    def resize(self, size: CacheSize, keep: int) -> None:
        kept = self.slots[:keep]
        for s in kept:
            assert s is not None and s.length <= size.max_len
        self.slots = kept + [None] * (size.slots - keep)
        self.max_len = size.max_len


def simulate(rng: random.Random, n_requests: int, max_slots: int, budget_positions: int | None,
             fail_resizes: set[int], max_new: int = 8, max_len: int = 4096, bucket: int = 16,
             max_prefill_batch: int = 3) -> dict:
    """Drive the scheduler like the engine does and check every invariant on the way."""
    def slots_for(length: int) -> int:
        fit = max_slots if budget_positions is None else max(1, budget_positions // length)
        return min(max_slots, fit)

    sched = SlotScheduler(slots_for, max_len, granule=64, bucket=bucket, max_prefill_batch=max_prefill_batch)
    lengths = {rid: rng.choice([rng.randint(1, 60), rng.randint(100, 700)]) for rid in range(n_requests)}
    target = {rid: rng.randint(1, max_new) for rid in range(n_requests)}       # tokens until it finishes
    produced: dict[int, int] = {}
    cache = SimCache()
    submitted = 0
    order_submitted: list[int] = []
    admitted: list[int] = []
    finished: list[int] = []
    resizes = failures = drains = 0
    plans = 0
    while len(finished) < n_requests:
        while submitted < n_requests and sched.wants() > 0:
            sched.submit(submitted, lengths[submitted], lengths[submitted] + max_new)
            order_submitted.append(submitted)
            submitted += 1
        plan = sched.plan()
        plans += 1
        assert plans < 20 * n_requests * max_new + 100, "no progress"
        assert not plan.idle, "idle while work remains"
        # 1. moves
        for mv in plan.moves:
            assert cache.slots[mv.src] is not None and mv.dst < len(cache.slots)
            cache.slots[mv.dst], cache.slots[mv.src] = cache.slots[mv.src], None     # src: a stale copy now
        live = {rid for rid in produced if rid not in finished}
        # 2. resize: only live rows 0..keep-1; a resize plan carries nothing else
        if plan.resize is not None:
            assert not plan.decode and not plan.prefill
            rz = plan.resize
            assert rz.keep == len(live) <= rz.size.slots
            assert {cache.slots[i].rid for i in range(rz.keep)} == live, "a live row is outside 0..keep-1"
            assert rz.size.slots <= slots_for(rz.size.max_len), "over the memory budget"
            resizes += 1
            if resizes in fail_resizes and rz.size.slots > 1:
                failures += 1
                assert sched.resize_failed()
                # the real cache keeps rows 0..keep-1 in every layer; usable size = the smaller
                cache.max_len = min(cache.max_len, rz.size.max_len)
                cache.slots = cache.slots[:min(len(cache.slots), rz.size.slots)]
            else:
                cache.resize(rz.size, rz.keep)
            continue
        # 3. decode: every live row, in slot order 0..n-1, its own data in its slot
        assert len(plan.decode) == len(live) and set(plan.decode) == live
        if plan.decode and sched.waiting and not plan.prefill and sched.n_free > 0:
            drains += 1
        for i, rid in enumerate(plan.decode):
            seq = cache.slots[i]
            assert seq is not None and seq.rid == rid, f"slot {i} holds {seq}, not request {rid}'s cache"
            assert seq.length < cache.max_len
            seq.length += 1
            produced[rid] += 1
        # 4. prefill into free slots, head first
        for group in plan.prefill:
            assert group[0].rid == min(r for r in range(submitted) if r not in admitted), "FIFO head skipped"
            assert len({-(-a.length // bucket) for a in group}) == 1 and len(group) <= max_prefill_batch
            for a in group:
                assert a.rid not in admitted and a.slot < len(cache.slots)
                held = cache.slots[a.slot]
                assert held is None or held.rid not in live, "prefill over a live row"
                assert a.length + max_new <= cache.max_len
                cache.slots[a.slot] = Seq(a.rid, a.length)
                admitted.append(a.rid)
                produced[a.rid] = 1
        for rid in [*plan.decode, *(a.rid for g in plan.prefill for a in g)]:
            if produced[rid] >= target[rid]:
                sched.release(rid)
                finished.append(rid)
    assert sorted(admitted) == sorted(finished) == list(range(n_requests))
    assert sched.done()
    return {"resizes": resizes, "failures": failures, "drains": drains}


@settings(max_examples=300, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 60), max_slots=st.integers(1, 8),
       budget=st.one_of(st.none(), st.integers(64, 4096)), fail=st.sets(st.integers(1, 6), max_size=3))
def test_generated_traffic_keeps_every_live_row(seed, n, max_slots, budget, fail):
    simulate(random.Random(seed), n, max_slots, budget, fail)


def test_the_simulation_sees_growth_drains_and_failures():
    """The generated traffic really exercises growth, drains and allocation failures."""
    seen = {"resizes": 0, "failures": 0, "drains": 0}
    for seed in range(40):
        rng = random.Random(seed)
        out = simulate(rng, 40, rng.randint(2, 8), rng.choice([None, 1500, 3000]), {2, 4})
        for k in seen:
            seen[k] += out[k] > (1 if k == "resizes" else 0)
    assert all(v >= 5 for v in seen.values()), seen


def test_growth_with_a_hole_below_a_live_row_keeps_that_row():
    """Issue 10: slot 0 finished, slot 1 live, then a longer prompt: compact first, then keep 1 row."""
    s = SlotScheduler(lambda n: 4, 4096, granule=256, bucket=64, max_prefill_batch=2)
    s.submit(0, 100, 110)
    s.submit(1, 100, 110)
    assert s.plan().resize.size == CacheSize(4, 256)
    first = s.plan()
    assert [[a.slot for a in g] for g in first.prefill] == [[0, 1]]
    s.release(0)                                  # slot 0 finished: a hole below live slot 1
    s.submit(2, 500, 510)                         # needs a longer cache
    grow = s.plan()
    assert [(m.src, m.dst) for m in grow.moves] == [(1, 0)]
    assert grow.resize.keep == 1 and grow.resize.size == CacheSize(4, 512)
    nxt = s.plan()
    assert nxt.decode == (1,) and [[a.slot for a in g] for g in nxt.prefill] == [[1]]


def test_growth_that_fits_fewer_slots_drains_first():
    """4 live rows; the longer cache fits 2 slots: decode only until 2 are left, then resize."""
    s = SlotScheduler(lambda n: 4 if n <= 256 else 2, 4096, granule=256, bucket=64, max_prefill_batch=4)
    for rid in range(4):
        s.submit(rid, 50, 60)
    s.plan()
    assert len(s.plan().prefill[0]) == 4
    s.submit(4, 400, 410)
    drain = s.plan()
    assert drain.resize is None and drain.decode == (0, 1, 2, 3) and not drain.prefill
    s.release(1)
    s.release(2)
    grow = s.plan()
    assert [(m.src, m.dst) for m in grow.moves] == [(3, 1)]
    assert grow.resize.keep == 2 and grow.resize.size == CacheSize(2, 512)
    assert s.plan().decode == (0, 3)              # full: the long request waits for a free slot


def test_resize_failure_halves_the_slots_and_stops_at_one():
    s = SlotScheduler(lambda n: 8, 4096)
    s.submit(0, 10, 20)
    assert s.plan().resize.size.slots == 8
    assert s.resize_failed() and s.size == CacheSize(0, 0)
    assert s.plan().resize.size.slots == 4
    assert s.resize_failed()
    assert s.plan().resize.size.slots == 2
    assert s.resize_failed()
    assert s.plan().resize.size.slots == 1
    assert not s.resize_failed()


def test_fifo_head_is_never_starved():
    s = SlotScheduler(lambda n: 2, 4096, bucket=8, max_prefill_batch=2)
    s.submit(0, 100, 110)          # long head
    for rid in range(1, 10):
        s.submit(rid, 3, 13)       # many short ones behind it
    s.plan()
    assert s.plan().prefill[0][0].rid == 0


def test_too_long_is_refused_at_submit():
    s = SlotScheduler(lambda n: 2, 1000)
    with pytest.raises(ValueError, match="1001 positions"):
        s.submit(0, 990, 1001)
