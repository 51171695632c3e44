"""Pure-data planning for the caption engine: which waiting request goes into which KV slot.

No tensors here, so every property (each request admitted exactly once, FIFO head never starved,
prefill padding bounded, active slots kept contiguous) is testable in microseconds.

Slots 0..n_active-1 are the active rows. Keeping them contiguous lets the decode step run on a
view of the first n rows of the cache (no gather/copy); when a row finishes and nothing waits to
take its slot, the highest active row is moved into the hole (one cheap cache copy).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class Admission:
    rid: int
    slot: int
    length: int


@dataclass(frozen=True)
class Move:
    src: int
    dst: int


class SlotScheduler:
    def __init__(self, n_slots: int, bucket: int = 64, max_prefill_batch: int = 4,
                 max_prefill_tokens: int = 8192):
        if n_slots < 1:
            raise ValueError("need at least one slot")
        self.n_slots = n_slots
        self.bucket = bucket
        self.max_prefill_batch = max_prefill_batch
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[tuple[int, int]] = deque()    # (rid, prompt length), FIFO
        self.slot_of: dict[int, int] = {}                  # active rid -> slot
        self.rid_in: dict[int, int] = {}                   # slot -> active rid

    # -- state --------------------------------------------------------------------------------------
    @property
    def n_active(self) -> int:
        return len(self.rid_in)

    @property
    def n_free(self) -> int:
        return self.n_slots - self.n_active

    def submit(self, rid: int, length: int) -> None:
        self.waiting.append((rid, length))

    def _bucket(self, length: int) -> int:
        return -(-length // self.bucket)

    # -- planning -----------------------------------------------------------------------------------
    def admit(self) -> list[Admission]:
        """One prefill group: the FIFO head plus waiting requests of the same length bucket.

        Same-bucket grouping bounds right-padding waste to < bucket tokens per row; the head is
        always taken so no request waits forever behind others of a different length.
        """
        if not self.waiting or self.n_free == 0:
            return []
        head_rid, head_len = self.waiting.popleft()
        group = [(head_rid, head_len)]
        b = self._bucket(head_len)
        limit = min(self.n_free, self.max_prefill_batch)
        kept: deque[tuple[int, int]] = deque()
        while self.waiting and len(group) < limit:
            rid, length = self.waiting.popleft()
            longest = max(length, max(l for _, l in group))
            if self._bucket(length) == b and longest * (len(group) + 1) <= self.max_prefill_tokens:
                group.append((rid, length))
            else:
                kept.append((rid, length))
        self.waiting.extendleft(reversed(kept))
        free = sorted(set(range(self.n_slots)) - set(self.rid_in))
        out = []
        for (rid, length), slot in zip(group, free):
            self.slot_of[rid], self.rid_in[slot] = slot, rid
            out.append(Admission(rid, slot, length))
        return out

    def release(self, rid: int) -> None:
        slot = self.slot_of.pop(rid)
        del self.rid_in[slot]

    def compact(self) -> list[Move]:
        """Moves that make the active slots exactly 0..n_active-1 (highest rows fill the holes)."""
        moves = []
        n = self.n_active
        holes = sorted(s for s in range(n) if s not in self.rid_in)
        tails = sorted((s for s in self.rid_in if s >= n), reverse=True)
        for dst, src in zip(holes, tails):
            rid = self.rid_in.pop(src)
            self.rid_in[dst], self.slot_of[rid] = rid, dst
            moves.append(Move(src, dst))
        return moves

    def active_rids(self) -> list[int]:
        """Active request ids in slot order 0..n_active-1 (valid after compact())."""
        return [self.rid_in[s] for s in sorted(self.rid_in)]
