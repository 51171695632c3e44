"""The streaming runner: shards of images through preprocess -> encode -> caption -> commit.

    refs ──> preprocess pool (worker processes, `ahead` items in flight, in order)
              │  Failed ─────────────────────────────────────────────┐
              ▼                                                      │
         encode (small batches of what the pool has ready)           │
              │  Failed ───────────────────────────────────────────┐ │
              ▼                                                    ▼ ▼
         caption engine (pulls input only when a slot is free) ──> shard assembly ──> commit
                                                                  (when a shard has all its rows)

One stream spans shard boundaries so the engine's slots stay full between shards; records are
routed back to their shard by ref.shard and a shard is committed (atomically, by the callback)
the moment its last row arrives. A shard is claimed (locked) just before its first image enters
the stream, and its image references are made only then (by the claim, from the input's index);
a claim that fails means another process has it or did it, and the shard is skipped. The claimed
refs pass a screen first: those that cannot be opened at all (a missing local file, a rejected
tar member) become rows right here and never cost a trip through the preprocessing pool.

The runner knows no model: it is given the stage callables. Stage time is measured exclusively
(time in a nested section is not counted in the enclosing one) so the numbers add up to the wall
time and the model stages' busy share can be read off directly.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Protocol

from pipeline.errors import JobError
from pipeline.records import Caption, Failed, ImageRef

if TYPE_CHECKING:       # the stages' tensor records, named in annotations only: no torch import here
    from stages.records import ImageInputs, VisionFeatures

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardWork:
    """A shard to do, as planned: small (no refs), so 39,000 of them cost nothing to hold or send."""

    shard: int
    images: int                     # images it is planned to (re)caption (progress totals)
    attempt: int = 0                # 0 = first pass; k = k-th --retry-failed pass
    retry: bool = False             # --retry-failed: redo only the committed shard's failed rows


@dataclass(frozen=True)
class Claim:
    """A shard this process now holds (its lock) with the images to do, made at claim time."""

    shard: int
    lock: Any
    refs: tuple[ImageRef, ...]
    attempt: int = 0
    keep: Any = None                # retry: the shard's committed rows that stay (opaque here)


@dataclass
class OpenShard:
    claim: Claim
    started: float
    records: list[Caption | Failed] = field(default_factory=list)


def screen_nothing(refs: tuple[ImageRef, ...]) -> tuple[list[Failed], list[ImageRef]]:
    return [], list(refs)


@dataclass(frozen=True)
class RunSummary:
    committed: tuple[int, ...]
    failed: tuple[tuple[int, str], ...]          # (shard, reason): infrastructure failures
    busy: tuple[int, ...]                        # claimed by another process
    not_started: tuple[int, ...]                 # left after an abort
    images: int
    status: dict[str, int]
    new_tokens: int
    wall_s: float
    stages: dict[str, float]                     # exclusive seconds per section

    @property
    def model_busy_share(self) -> float:
        busy = self.stages.get("encode", 0.0) + self.stages.get("caption", 0.0)
        return busy / self.wall_s if self.wall_s > 0 else 0.0


class Timers:
    """Exclusive wall time per named section; sections nest."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._stack: list[list] = []          # [name, start of the current uninterrupted stretch]

    @contextmanager
    def section(self, name: str):
        now = time.perf_counter()
        if self._stack:
            outer = self._stack[-1]
            self.seconds[outer[0]] += now - outer[1]
        self._stack.append([name, now])
        try:
            yield
        finally:
            now = time.perf_counter()
            top = self._stack.pop()
            self.seconds[top[0]] += now - top[1]
            if self._stack:
                self._stack[-1][1] = now


class Engine(Protocol):
    def run(self, items: Iterable[VisionFeatures | Failed]) -> Iterator[Caption | Failed]: ...


class Pool(Protocol):
    def map(self, items: Iterable[ImageRef]) -> Iterator[ImageInputs | Failed]: ...

    def head_ready(self) -> bool: ...


class Progress(Protocol):
    def record(self, rec: Caption | Failed) -> None: ...


@dataclass(frozen=True)
class Stages:
    pool: Pool
    encode: Callable[[list[ImageInputs]], list[VisionFeatures | Failed]]
    make_engine: Callable[[], Engine]                         # a fresh engine per stream (after a failure too)
    claim: Callable[[ShardWork], Claim | None]               # lock + re-check + refs; None = skip the shard
    release: Callable[[Any], None]                            # the claim's lock
    commit: Callable[[Claim, list[Caption | Failed], float], None]   # (claim, records, unix start)
    progress: Progress
    screen: Callable[[tuple[ImageRef, ...]], tuple[list[Failed], list[ImageRef]]] = screen_nothing
    encode_batch: int = 8
    max_stream_failures: int = 2                              # consecutive failed streams before giving up


class Runner:
    def __init__(self, stages: Stages):
        self.s = stages
        self.timers = Timers()

    def run(self, work: list[ShardWork]) -> RunSummary:
        t0 = time.perf_counter()
        todo = list(work)
        committed: list[int] = []
        failed: list[tuple[int, str]] = []
        busy: list[int] = []
        status: dict[str, int] = defaultdict(int)
        tokens = 0
        images = 0
        consecutive = 0
        while todo:
            stream = _Stream(self.s, self.timers, todo)
            try:
                stream.run()
                todo = []
            except (JobError, KeyboardInterrupt):
                stream.abandon()
                raise
            except Exception as e:  # noqa: BLE001 - infrastructure: the stream dies, the run goes on
                log.exception("stream failed (%s: %s); shards %s are not committed", type(e).__name__, e,
                              sorted(stream.open) or "-")
                for shard in sorted(stream.open):
                    failed.append((shard, f"{type(e).__name__}: {e}"))
                stream.abandon()
                todo = todo[stream.claimed_upto:]
                consecutive = 0 if stream.committed else consecutive + 1
                if consecutive >= self.s.max_stream_failures and todo:
                    log.error("%d streams in a row failed without committing a shard; giving up on %d shard(s)",
                              consecutive, len(todo))
                    break
            finally:
                committed += stream.committed
                busy += stream.busy
                tokens += stream.tokens
                images += stream.images
                for k, v in stream.status.items():
                    status[k] += v
        wall = time.perf_counter() - t0
        return RunSummary(committed=tuple(committed), failed=tuple(failed), busy=tuple(busy),
                          not_started=tuple(w.shard for w in todo), images=images, status=dict(status),
                          new_tokens=tokens, wall_s=wall, stages=dict(self.timers.seconds))


class _Stream:
    """One pass of the pipeline over a list of shards; dies as a whole on an infrastructure error."""

    def __init__(self, stages: Stages, timers: Timers, work: list[ShardWork]):
        self.s = stages
        self.t = timers
        self.work = work
        self.open: dict[int, OpenShard] = {}
        self.committed: list[int] = []
        self.busy: list[int] = []
        self.claimed_upto = 0          # work[:claimed_upto] have been claimed or skipped
        self.status: dict[str, int] = defaultdict(int)
        self.tokens = 0
        self.images = 0
        self._mapped: Iterator | None = None
        self._results: Iterator | None = None

    # -- the source: claims each shard as its first image is pulled ---------------------------------
    def _refs(self) -> Iterator[ImageRef]:
        for i, w in enumerate(self.work):
            with self.t.section("claim"):
                claim = self.s.claim(w)
            self.claimed_upto = i + 1
            if claim is None:
                self.busy.append(w.shard)
                continue
            sh = self.open[w.shard] = OpenShard(claim, time.time())
            with self.t.section("screen"):
                failed, rest = self.s.screen(claim.refs)
                for rec in failed:
                    self._accept(rec)
                if not claim.refs:
                    self._commit(sh)
            yield from rest

    def _accept(self, rec: Caption | Failed) -> None:
        sh = self.open.get(rec.ref.shard)
        if sh is None:
            raise RuntimeError(f"record for shard {rec.ref.shard}, which is not open (engine returned a stray row)")
        sh.records.append(rec)
        self.images += 1
        self.status["ok" if isinstance(rec, Caption) else rec.status] += 1
        if isinstance(rec, Caption):
            self.tokens += rec.n_new
        self.s.progress.record(rec)
        if len(sh.records) == len(sh.claim.refs):
            self._commit(sh)

    def _commit(self, sh: OpenShard) -> None:
        shard = sh.claim.shard
        with self.t.section("write"):
            keys = {r.ref.key for r in sh.records}
            if len(keys) != len(sh.records):
                raise RuntimeError(f"shard {shard}: duplicate rows from the stages")
            self.s.commit(sh.claim, sh.records, sh.started)
            self.s.release(sh.claim.lock)
            del self.open[shard]
            self.committed.append(shard)

    # -- encode: batches of whatever the pool has ready -----------------------------------------------
    def _features(self, inputs: Iterator[ImageInputs | Failed]) -> Iterator[VisionFeatures]:
        while True:
            batch: list[ImageInputs] = []
            while len(batch) < self.s.encode_batch:
                if batch and not self.s.pool.head_ready():
                    break               # encode what we have rather than let the engine wait
                with self.t.section("preprocess_wait"):
                    item = next(inputs, None)
                if item is None:
                    break
                if isinstance(item, Failed):
                    self._accept(item)
                else:
                    batch.append(item)
            if not batch:
                return
            with self.t.section("encode"):
                out = self.s.encode(batch)
            for rec in out:
                if isinstance(rec, Failed):
                    self._accept(rec)
                else:
                    yield rec

    def run(self) -> None:
        engine = self.s.make_engine()
        self._mapped = self.s.pool.map(self._refs())
        self._results = engine.run(self._features(self._mapped))
        while True:
            with self.t.section("caption"):
                rec = next(self._results, None)
            if rec is None:
                break
            self._accept(rec)
        if self.open:
            raise RuntimeError(f"stream ended with incomplete shards {sorted(self.open)} "
                               f"({sum(len(s.records) for s in self.open.values())} rows)")

    def abandon(self) -> None:
        """Release claims and stop the stages' iterators (queued preprocessing is cancelled)."""
        for it in (self._results, self._mapped):
            if it is not None:
                try:
                    it.close()
                except (RuntimeError, ValueError):
                    pass
        for sh in self.open.values():
            try:
                self.s.release(sh.claim.lock)
            except OSError:
                pass
        self.open.clear()
