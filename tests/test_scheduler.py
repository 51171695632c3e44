"""Properties of the pure-data slot scheduler."""

from __future__ import annotations

import random

import pytest

from stages.caption.scheduler import SlotScheduler


@pytest.mark.parametrize("seed", range(20))
def test_every_request_admitted_once_and_slots_stay_contiguous(seed):
    rng = random.Random(seed)
    n_slots = rng.randint(1, 6)
    s = SlotScheduler(n_slots, bucket=16, max_prefill_batch=rng.randint(1, 4))
    lengths = {rid: rng.randint(1, 100) for rid in range(rng.randint(1, 40))}
    for rid, n in lengths.items():
        s.submit(rid, n)
    admitted, finished = [], []
    steps = 0
    while len(finished) < len(lengths):
        while group := s.admit():
            # a prefill group shares one length bucket: padding < bucket per row
            assert len({-(-a.length // 16) for a in group}) == 1
            assert len(group) <= s.max_prefill_batch
            admitted += [a.rid for a in group]
        s.compact()
        active = s.active_rids()
        assert sorted(s.rid_in) == list(range(len(active)))          # contiguous 0..n-1
        assert len(active) <= n_slots
        # finish a random subset
        for rid in active:
            if rng.random() < 0.3:
                s.release(rid)
                finished.append(rid)
        steps += 1
        assert steps < 10_000
    assert sorted(admitted) == sorted(lengths) == sorted(finished)


def test_fifo_head_is_never_starved():
    s = SlotScheduler(2, bucket=8, max_prefill_batch=2)
    s.submit(0, 100)          # long head
    for rid in range(1, 10):
        s.submit(rid, 3)      # many short ones behind it
    first = s.admit()
    assert first[0].rid == 0


def test_compact_moves_highest_rows_into_holes():
    s = SlotScheduler(4, max_prefill_batch=4)
    for rid in range(4):
        s.submit(rid, 10)
    s.admit()
    s.release(0)
    s.release(2)
    moves = s.compact()
    assert [(m.src, m.dst) for m in moves] == [(3, 0)]
    assert s.active_rids() == [3, 1]
