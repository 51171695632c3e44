"""The streaming runner and worker pool with small deterministic stand-in stages (no model):
order restoration, shard routing, infrastructure failures, claims, exclusive timers, and a
worker process that dies on one item."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import pytest
import torch

from models.base import PixelInputs, PromptPlan
from pipeline.errors import JobError
from pipeline.records import Caption, Failed, ImageRef
from pipeline.runner import Claim, Runner, ShardWork, Stages, Timers
from pipeline.workers import OrderedPool
from stages.records import ImageInputs, VisionFeatures


REFS: dict[int, tuple[ImageRef, ...]] = {}       # shard -> its refs, as the claim makes them from the index


def _refs(n: int, size: int, bad=()) -> list[ShardWork]:
    refs = [ImageRef(f"{'bad' if i in bad else 'img'}{i}", f"p{i}", f"/x/p{i}", i // size, i) for i in range(n)]
    REFS.clear()
    REFS.update({s: tuple(r for r in refs if r.shard == s) for s in range(-(-n // size))})
    return [ShardWork(s, len(REFS[s])) for s in REFS]


def _claim(w: ShardWork) -> Claim:
    return Claim(w.shard, object(), REFS[w.shard])


@dataclass(frozen=True)
class Prep:
    """Picklable stand-in for the preprocessor: Failed for 'bad' keys; os._exit for 'die' keys."""

    def setup(self):
        return self

    def __call__(self, ref: ImageRef):
        if ref.key.startswith("die"):
            os._exit(3)
        if ref.key.startswith("bad"):
            return Failed(ref, "preprocess", "missing", "no such file")
        return ImageInputs(ref, PixelInputs((torch.zeros(1),)), PromptPlan((1, 2), ()), 4, 3, 0.01)


def encode(batch):
    return [VisionFeatures(b.ref, torch.zeros(2, 1), b.width, b.height, b.seconds, 0.0) for b in batch]


class ReversingEngine:
    """Pulls input three at a time and yields each group in reverse: out of order, like a real engine."""

    def __init__(self, fail_at: str | None = None, fail_always: bool = False):
        self.fail_at = fail_at
        self.fail_always = fail_always

    def run(self, items):
        it = iter(items)
        while True:
            group = [x for _, x in zip(range(3), it)]
            if not group:
                return
            for f in reversed(group):
                if f.ref.key == self.fail_at or self.fail_always:
                    raise RuntimeError("device lost")
                yield Caption(f.ref, f"caption of {f.ref.key}", (5, 6), 2, 2, "length", f.width, f.height,
                              f.preprocess_s, f.encode_s, 0.0, 0.0)


class Recorder:
    def __init__(self):
        self.commits: list[tuple[int, list[str]]] = []
        self.records = 0

    def record(self, rec):
        self.records += 1

    def commit(self, claim, records, started):
        self.commits.append((claim.shard, [r.ref.key for r in records]))


def _stages(rec: Recorder, engine_factory, claim=_claim, pool=None) -> Stages:
    pool = pool or OrderedPool(Prep(), 0, 4, on_crash=None).start()
    return Stages(pool=pool, encode=encode, make_engine=engine_factory, claim=claim, release=lambda c: None,
                  commit=rec.commit, progress=rec, encode_batch=2)


def test_every_row_once_routed_to_its_shard():
    rec = Recorder()
    work = _refs(10, 4, bad={1, 6})
    summary = Runner(_stages(rec, ReversingEngine)).run(work)
    assert summary.committed == (0, 1, 2) and not summary.failed
    assert [s for s, _ in rec.commits] == [0, 1, 2]
    for shard, keys in rec.commits:
        assert sorted(keys) == sorted(r.key for r in REFS[shard])
    assert summary.status == {"ok": 8, "missing": 2} and summary.images == 10 == rec.records
    assert summary.new_tokens == 16


def test_infrastructure_failure_fails_open_shards_and_goes_on():
    rec = Recorder()
    made = []

    def factory():
        made.append(1)
        return ReversingEngine(fail_at="img5" if len(made) == 1 else None)

    summary = Runner(_stages(rec, factory)).run(_refs(12, 3))
    # img5 is in shard 1; shard 0 was committed before, shards 2-3 run in a fresh stream
    assert [s for s, _ in summary.failed] == [1] and "device lost" in summary.failed[0][1]
    assert summary.committed == (0, 2, 3) and len(made) == 2 and not summary.not_started


def test_gives_up_after_consecutive_failed_streams():
    rec = Recorder()
    summary = Runner(_stages(rec, lambda: ReversingEngine(fail_always=True))).run(_refs(12, 2))
    # each stream has pulled 3 images (two shards open) when it dies; two such streams -> stop
    assert summary.committed == () and rec.commits == []
    assert [s for s, _ in summary.failed] == [0, 1, 2, 3] and summary.not_started == (4, 5)


def test_job_error_aborts_immediately():
    rec = Recorder()

    def commit(work, records, started):
        raise JobError("output /x vanished")

    st = _stages(rec, ReversingEngine)
    st = Stages(**{**st.__dict__, "commit": commit})
    with pytest.raises(JobError, match="vanished"):
        Runner(st).run(_refs(4, 2))


def test_unclaimable_shards_are_skipped():
    rec = Recorder()
    summary = Runner(_stages(rec, ReversingEngine, claim=lambda w: None if w.shard == 1 else _claim(w))).run(_refs(6, 2))
    assert summary.committed == (0, 2) and summary.busy == (1,)
    assert [s for s, _ in rec.commits] == [0, 2]


class CountingPool:
    """The inline pool, counting the items that reach it."""

    def __init__(self):
        self.pool = OrderedPool(Prep(), 0, 4, on_crash=None).start()
        self.seen: list[str] = []

    def map(self, items):
        return self.pool.map(self.seen.append(r.key) or r for r in items)

    def head_ready(self):
        return True


def _screen_bad(refs):
    """Stand-in screen: 'bad' keys are rows before the pool (pipeline/screen.py does it by stat)."""
    return ([Failed(r, "preprocess", "missing", "no such file") for r in refs if r.key.startswith("bad")],
            [r for r in refs if not r.key.startswith("bad")])


def test_screened_refs_become_rows_without_reaching_the_pool():
    rec, pool = Recorder(), CountingPool()
    work = _refs(9, 3, bad={0, 1, 2, 4})                    # shard 0: every image screened out
    st = Stages(**{**_stages(rec, ReversingEngine, pool=pool).__dict__, "screen": _screen_bad})
    summary = Runner(st).run(work)
    assert summary.committed == (0, 1, 2) and summary.status == {"ok": 5, "missing": 4}
    assert sorted(pool.seen) == ["img3", "img5", "img6", "img7", "img8"]        # the pool never saw a bad ref
    assert {s: sorted(k) for s, k in rec.commits} == {s: sorted(r.key for r in REFS[s]) for s in REFS}


def test_a_claim_with_no_refs_commits_at_once():
    rec = Recorder()
    work = _refs(4, 2)
    REFS[1] = ()
    summary = Runner(_stages(rec, ReversingEngine)).run(work)
    assert sorted(summary.committed) == [0, 1] and (1, []) in rec.commits and not summary.failed


def test_timers_are_exclusive():
    t = Timers()
    with t.section("outer"):
        time.sleep(0.05)
        with t.section("inner"):
            time.sleep(0.1)
        time.sleep(0.05)
    assert 0.09 <= t.seconds["outer"] < 0.14 and 0.09 <= t.seconds["inner"] < 0.14


def test_pool_isolates_a_worker_crash():
    """A worker that dies on 'die7' fails only that item; every other item comes back, in order."""
    refs = [ImageRef(("die" if i == 7 else "img") + str(i), f"p{i}", f"/x/p{i}", 0, i) for i in range(12)]
    crashes = []

    def on_crash(ref, msg):
        crashes.append(ref.key)
        return Failed(ref, "preprocess", "worker_crashed", msg)

    with OrderedPool(Prep(), 2, ahead=6, on_crash=on_crash) as pool:
        out = list(pool.map(iter(refs)))
    assert [r.ref.key for r in out] == [r.key for r in refs]
    assert crashes == ["die7"] and pool.restarts == 1
    assert [type(r).__name__ for r in out].count("ImageInputs") == 11
