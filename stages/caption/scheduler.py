"""Pure-data planning for the caption engine: one explicit plan per step.

The engine asks `plan()` once per step and executes the returned StepPlan in field order:

  1. moves    compaction: the live rows become slots 0..n-1, so the decode step runs on a view of
              the first n cache rows (no gather); the highest rows fill the holes
  2. resize   the cache changes shape; rows 0..keep-1 are the live rows (compacted just before)
              and every one of them is copied. A resize plan carries nothing else, so an
              allocation failure (`resize_failed()`) leaves no half-executed plan behind
  3. decode   one token for each live row; decode[i] is the request in slot i
  4. prefill  groups of waiting requests into the free slots n.., each group one padded batch

and reports back: release(rid) for each request that finished (or failed), resize_failed() when
a resize could not be allocated. No tensors here, so every ordering property (each request
admitted once, the FIFO head never starved, no live row outside the cache, slots contiguous
before a decode, a resize never dropping a live row, the cache within the memory budget) is
testable in microseconds (tests/test_scheduler.py).

Cache size: the cache grows when the FIFO head needs more positions (prompt + max_new_tokens)
than it has, to a multiple of `granule` positions; each time, the slot count is re-planned for
the new length against the memory budget (`slots_for`). When the re-planned cache has fewer
slots than there are live rows, admission pauses and the live rows drain (decode only) until
they fit; the head is then admitted first, so nothing waits forever.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Request:
    rid: int
    length: int                   # prompt tokens
    need: int                     # cache positions it can fill: prompt + max_new_tokens


@dataclass(frozen=True)
class Admission:
    rid: int
    slot: int
    length: int


@dataclass(frozen=True)
class Move:
    src: int
    dst: int


@dataclass(frozen=True)
class CacheSize:
    slots: int
    max_len: int


@dataclass(frozen=True)
class Resize:
    size: CacheSize
    keep: int                     # rows 0..keep-1 are live and must survive (all < size.slots)


@dataclass(frozen=True)
class StepPlan:
    moves: tuple[Move, ...] = ()
    resize: Resize | None = None
    decode: tuple[int, ...] = ()                          # rids; decode[i] lives in slot i
    prefill: tuple[tuple[Admission, ...], ...] = ()

    @property
    def idle(self) -> bool:
        return not (self.moves or self.resize or self.decode or self.prefill)


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


class SlotScheduler:
    def __init__(self, slots_for: Callable[[int], int], max_len: int, granule: int = 256, bucket: int = 64,
                 max_prefill_batch: int = 4, max_prefill_tokens: int = 8192, size: CacheSize = CacheSize(0, 0)):
        """slots_for(max_len): how many slots of max_len positions the memory budget holds (>= 1,
        already capped by the batch size); max_len: the model's positions (the cache never
        exceeds it); granule: cache lengths are multiples of it (few, cheap growths); size: the
        cache as it is now (nothing allocated yet by default)."""
        self.slots_for = slots_for
        self.max_len = max_len
        self.granule = granule
        self.bucket = bucket
        self.max_prefill_batch = max_prefill_batch
        self.max_prefill_tokens = max_prefill_tokens
        self.size = size
        self.slot_cap: int | None = None                    # lowered by allocation failures
        self.waiting: deque[Request] = deque()              # FIFO
        self.slot_of: dict[int, int] = {}                   # live rid -> slot
        self.rid_in: dict[int, int] = {}                    # slot -> live rid
        self._resizing: tuple[CacheSize, Resize] | None = None   # (size before, resize) of the last plan

    # -- state --------------------------------------------------------------------------------------
    @property
    def n_active(self) -> int:
        return len(self.rid_in)

    @property
    def n_free(self) -> int:
        return self.size.slots - self.n_active

    def wants(self) -> int:
        """How many more requests the caller should submit before the next plan: enough to fill
        the free slots plus one prefill group of look-ahead (for same-length grouping)."""
        return max(0, self.n_free) + self.max_prefill_batch - len(self.waiting)

    def submit(self, rid: int, length: int, need: int) -> None:
        if need > self.max_len:
            raise ValueError(f"request {rid} needs {need} positions; the model has {self.max_len}")
        self.waiting.append(Request(rid, length, need))

    def release(self, rid: int) -> None:
        """A live request finished (or failed): its slot is free from the next plan on."""
        slot = self.slot_of.pop(rid)
        del self.rid_in[slot]

    def done(self) -> bool:
        return not self.waiting and not self.rid_in

    # -- the plan -----------------------------------------------------------------------------------
    def plan(self) -> StepPlan:
        self._resizing = None
        head = self.waiting[0] if self.waiting else None
        if head is not None and head.need > self.size.max_len:
            target = self._target(head.need)
            if self.n_active <= target.slots:
                moves = self._compact()
                resize = Resize(target, keep=self.n_active)
                self._resizing = (self.size, resize)
                self.size = target
                return StepPlan(moves=moves, resize=resize)
            # the longer cache holds fewer rows than are live: drain (no admission) until they fit
            return StepPlan(moves=self._compact(), decode=self._decode_rows())
        moves = self._compact()
        decode = self._decode_rows()
        groups = []
        while group := self._admit():
            groups.append(group)
        return StepPlan(moves=moves, decode=decode, prefill=tuple(groups))

    def resize_failed(self) -> bool:
        """The last plan's resize could not be allocated. Halve the slot count for the next try;
        False when it was already one slot (nothing smaller to try).

        A failed resize leaves each cache layer either in its old or its new shape, with the live
        rows intact in both, so the usable size is the smaller of the two in each dimension."""
        if self._resizing is None:
            raise RuntimeError("resize_failed() without a resize in the last plan")
        before, resize = self._resizing
        self._resizing = None
        self.size = CacheSize(min(before.slots, resize.size.slots), min(before.max_len, resize.size.max_len))
        if resize.size.slots <= 1:
            return False
        self.slot_cap = resize.size.slots // 2
        return True

    def _target(self, need: int) -> CacheSize:
        length = min(round_up(max(need, self.size.max_len), self.granule), self.max_len)
        slots = max(1, self.slots_for(length))
        if self.slot_cap is not None:
            slots = min(slots, self.slot_cap)
        return CacheSize(slots, length)

    def _decode_rows(self) -> tuple[int, ...]:
        """Live rids in slot order 0..n-1 (valid right after _compact())."""
        return tuple(self.rid_in[s] for s in range(self.n_active))

    def _compact(self) -> tuple[Move, ...]:
        """Moves that make the live slots exactly 0..n_active-1 (highest rows fill the holes)."""
        n = self.n_active
        holes = [s for s in range(n) if s not in self.rid_in]
        if not holes:
            return ()
        tails = sorted((s for s in self.rid_in if s >= n), reverse=True)
        moves = []
        for dst, src in zip(holes, tails):
            rid = self.rid_in.pop(src)
            self.rid_in[dst], self.slot_of[rid] = rid, dst
            moves.append(Move(src, dst))
        return tuple(moves)

    def _bucket(self, length: int) -> int:
        return -(-length // self.bucket)

    def _admit(self) -> tuple[Admission, ...]:
        """One prefill group: the FIFO head plus waiting requests of the same length bucket.

        Same-bucket grouping bounds right-padding waste to < bucket tokens per row; the head is
        always taken so no request waits forever behind others of a different length. Only
        requests the cache can hold are taken (a longer head is grown for by the next plan).
        """
        if not self.waiting or self.n_free <= 0 or self.waiting[0].need > self.size.max_len:
            return ()
        group = [self.waiting.popleft()]
        b = self._bucket(group[0].length)
        limit = min(self.n_free, self.max_prefill_batch)
        kept: deque[Request] = deque()
        while self.waiting and len(group) < limit:
            r = self.waiting.popleft()
            longest = max(r.length, max(g.length for g in group))
            if (self._bucket(r.length) == b and r.need <= self.size.max_len
                    and longest * (len(group) + 1) <= self.max_prefill_tokens):
                group.append(r)
            else:
                kept.append(r)
        self.waiting.extendleft(reversed(kept))
        free = [s for s in range(self.size.slots) if s not in self.rid_in]
        out = []
        for r, slot in zip(group, free):
            self.slot_of[r.rid], self.rid_in[slot] = slot, r.rid
            out.append(Admission(r.rid, slot, r.length))
        return tuple(out)
