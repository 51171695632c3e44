"""The caption engine: continuous batching over a KV cache of slots, executing the scheduler's plans.

Requests are prefill embeddings (text + image features). Each step the scheduler
(stages/caption/scheduler.py, pure data) returns one StepPlan and this module only executes it,
in order: compaction moves, a cache resize (growth keeps every live row), one decode step over
the live rows (slots 0..n-1, a view of the cache), then right-padded prefill groups into the free
slots (causal attention means a real token never sees a pad; each row's logits are taken at its
own last position). Finished rows are released and yielded; the caller restores order by key.

Failures (stages/faults.py): an OOM, device or driver error propagates (the stream dies, its
shards stay uncommitted, exit 1). Any other error in a prefill group or decode step is retried
one row at a time; a row that fails alone becomes that image's `caption_error` row and its
neighbours go on. A row whose logits are not finite fails the same way (its cache row is zeroed
so nothing of it outlives it). Every device call runs under the watchdog (stages/watchdog.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch

from models.base import LoadedModel
from models.kv_cache import CacheShape, KVCache
from pipeline.config import BatchConfig, DecodeConfig
from pipeline.records import Caption, Failed
from stages import faults
from stages.caption import memory
from stages.caption.sampling import choose, request_generator
from stages.caption.scheduler import CacheSize, Resize, SlotScheduler, StepPlan, round_up
from stages.records import VisionFeatures
from stages.watchdog import guard

log = logging.getLogger(__name__)


EngineOptions = BatchConfig     # max_batch_size, memory_budget_gib, slot_cap, kv_bucket, max_prefill_batch, cache_granule


@dataclass
class EngineStats:
    requests: int = 0
    new_tokens: int = 0
    prompt_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    slots: int = 0
    oom_retries: int = 0
    resizes: int = 0
    failed: int = 0


@dataclass
class _Row:
    feat: VisionFeatures
    n_prompt: int
    pos: int = 0                           # next cache position to write (= current length)
    tokens: list[int] = field(default_factory=list)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    generator: torch.Generator | None = None
    finish: str | None = None              # "eos" | "length" | "error"
    error: str | None = None


class CaptionEngine:
    def __init__(self, loaded: LoadedModel, decode: DecodeConfig, options: EngineOptions = EngineOptions()):
        self.loaded = loaded
        self.llm = loaded.model.llm
        self.decode = decode
        self.options = options
        self.eos = set(loaded.prompts.eos_token_ids)
        self.stats = EngineStats()
        self.device = self.llm.embed_tokens.weight.device
        self.dtype = self.llm.embed_tokens.weight.dtype
        self.cache = KVCache(self._shape(0, 0), self.dtype, self.device)     # sized by the first plan
        self.streak = faults.FailureStreak("captioning")
        self._budget: int | None = None

    # -- cache ---------------------------------------------------------------------------------------
    def _shape(self, slots: int, max_len: int) -> CacheShape:
        c = self.llm.cfg
        return CacheShape(c.n_layers, slots, c.n_kv_heads, max_len, c.head_dim)

    def _slots_for(self, max_len: int) -> int:
        """Slots of max_len positions within the budget (fixed when first asked: see memory.py)."""
        if self._budget is None:
            self._budget = memory.budget_bytes(self.options, self.device)
        return memory.plan_slots(self._shape(1, max_len).nbytes(self.dtype), self.options, self.device, self._budget)

    def _resize(self, rz: Resize, sched: SlotScheduler) -> None:
        size = rz.size
        try:
            with guard("KV cache allocation"):
                self.cache.resize(size.slots, size.max_len, rz.keep)
        except (RuntimeError, MemoryError) as e:
            if not faults.is_oom(e) or not sched.resize_failed():
                raise
            self.stats.oom_retries += 1
            log.warning("KV cache allocation of %d slots x %d positions failed (%s); retrying with %d slots",
                        size.slots, size.max_len, e, sched.slot_cap)
            return
        self.stats.slots = size.slots
        self.stats.resizes += 1
        log.info("KV cache: %d slots x %d positions (%.2f GiB)%s", size.slots, size.max_len,
                 self.cache.shape.nbytes(self.dtype) / 2**30, f", {rz.keep} live rows kept" if rz.keep else "")
        cap = self.options.max_batch_size
        if cap and size.slots < cap:
            log.warning("memory budget fits %d slots of %d positions, fewer than --max-batch-size %d",
                        size.slots, size.max_len, cap)

    # -- steps ---------------------------------------------------------------------------------------
    def _sample(self, logits: torch.Tensor, rows: list[_Row]) -> list[int]:
        history = [r.tokens for r in rows] if self.decode.repetition_penalty != 1.0 else None
        gens = [r.generator for r in rows] if not self.decode.greedy else None
        return choose(logits, self.decode, history, gens).tolist()   # the one host sync per step

    def _prefill(self, group: list[tuple[int, _Row]]) -> None:
        """Right-padded batched prefill of rows into their slots; appends each row's first token."""
        t0 = time.perf_counter()
        lengths = [r.n_prompt for _, r in group]
        T, H = max(lengths), self.llm.cfg.hidden_size
        x = torch.zeros(len(group), T, H, dtype=self.dtype, device=self.device)           # [B, T, H]
        for i, (_, r) in enumerate(group):
            x[i, : r.n_prompt] = r.feat.prompt_embeds.to(self.device, self.dtype)
        positions = torch.arange(T, device=self.device).expand(len(group), T)
        slots = torch.tensor([s for s, _ in group], device=self.device)
        with torch.inference_mode():
            hidden = self.llm(x, positions, self.cache, slots=slots, kv_len=T)             # [B, T, H]
            last = hidden[torch.arange(len(group)), torch.tensor(lengths) - 1]           # [B, H]
            toks = self._sample(self.llm.logits(last), [r for _, r in group])
        dt = time.perf_counter() - t0
        for (slot, r), tok in zip(group, toks):
            r.pos = r.n_prompt
            r.prefill_s = dt / len(group)
            self._append(r, tok, slot)
        self.stats.prefill_s += dt
        self.stats.prompt_tokens += sum(lengths)

    def _decode_step(self, rows: list[_Row], slots: list[int] | None = None) -> None:
        """One token for each row; rows[i] lives in slot i (a view), or in slots[i] when given."""
        t0 = time.perf_counter()
        n = len(rows)
        tokens = torch.tensor([r.tokens[-1] for r in rows], device=self.device)
        positions = torch.tensor([r.pos for r in rows], device=self.device)
        kv_len = min(round_up(max(r.pos for r in rows) + 1, self.options.kv_bucket), self.cache.max_len)
        where = None if slots is None else torch.tensor(slots, device=self.device)
        with torch.inference_mode():
            x = self.llm.embed(tokens)[:, None]                                             # [n, 1, H]
            hidden = self.llm(x, positions, self.cache, slots=where, kv_len=kv_len)         # [n, 1, H]
            toks = self._sample(self.llm.logits(hidden[:, 0]), rows)
        dt = time.perf_counter() - t0
        for i, (r, tok) in enumerate(zip(rows, toks)):
            r.pos += 1
            r.decode_s += dt / n
            self._append(r, tok, i if slots is None else slots[i])
        self.stats.decode_s += dt
        self.stats.decode_steps += 1

    def _append(self, r: _Row, tok: int, slot: int) -> None:
        if tok < 0:
            self._fail(r, slot, f"the model produced non-finite logits at new token {len(r.tokens) + 1} "
                                "(a numeric overflow in this dtype, or a corrupt input)")
            return
        r.tokens.append(tok)
        self.stats.new_tokens += 1
        if tok in self.eos and not self.decode.ignore_eos:
            r.finish = "eos"
        elif len(r.tokens) >= self.decode.max_new_tokens:
            r.finish = "length"
        if r.finish:
            self.streak.ok()

    def _fail(self, r: _Row, slot: int, error: str) -> None:
        """This row (alone) failed: it becomes an error row; nothing of it stays in the cache."""
        log.warning("captioning %s failed: %s", r.feat.ref.path, error)
        r.finish, r.error = "error", error
        self.cache.clear(slot)
        self.stats.failed += 1
        self.streak.failed(error)          # too many in a row: the device, not the images (raises)

    # -- failure isolation ---------------------------------------------------------------------------
    def _isolated(self, what: str, batch: list[tuple[int, _Row]], run) -> None:
        """run(batch) of (slot, row); on an error that is not infrastructure, run each row alone
        instead and fail the rows whose error recurs alone. The batch exception is always logged."""
        try:
            with guard(what):
                run(batch)
            return
        except Exception as e:  # noqa: BLE001 - classified here
            if faults.is_infrastructure(e):
                raise
            if len(batch) == 1:
                self._fail(batch[0][1], batch[0][0], f"{type(e).__name__}: {e}")
                return
            log.warning("%s of %d rows failed (%s: %s); retrying each row alone", what, len(batch),
                        type(e).__name__, e, exc_info=True)
        for slot, row in batch:
            try:
                with guard(what):
                    run([(slot, row)])
            except Exception as e:  # noqa: BLE001 - classified here
                if faults.is_infrastructure(e):
                    raise
                self._fail(row, slot, f"{type(e).__name__}: {e}")

    def _execute(self, plan: StepPlan, sched: SlotScheduler, rows: dict[int, _Row]) -> list[int]:
        """Run one plan; returns the rids that finished (or failed) in it."""
        for mv in plan.moves:
            self.cache.move(mv.src, mv.dst)
        if plan.resize is not None:
            self._resize(plan.resize, sched)
            return []
        if plan.decode:
            live = [(i, rows[rid]) for i, rid in enumerate(plan.decode)]
            self._isolated("decode step", live, self._decode_batch)
        for group in plan.prefill:
            self._isolated("prefill", [(a.slot, rows[a.rid]) for a in group], self._prefill)
        admitted = (a.rid for group in plan.prefill for a in group)
        return [rid for rid in (*plan.decode, *admitted) if rows[rid].finish]

    def _decode_batch(self, live: list[tuple[int, _Row]]) -> None:
        rows = [r for _, r in live]
        if len(live) > 1 or live[0][0] == 0:
            self._decode_step(rows)                       # slots 0..n-1: the view path
        else:
            self._decode_step(rows, [live[0][0]])          # one row retried alone in its slot

    def _result(self, r: _Row) -> Caption | Failed:
        f = r.feat
        if r.error is not None:
            return Failed(f.ref, "caption", "caption_error", r.error)
        return Caption(ref=f.ref, text=self.loaded.prompts.decode(r.tokens), token_ids=tuple(r.tokens),
                       n_prompt=r.n_prompt, n_new=len(r.tokens), finish=r.finish or "length", width=f.width,
                       height=f.height, preprocess_s=f.preprocess_s, encode_s=f.encode_s,
                       prefill_s=r.prefill_s, decode_s=r.decode_s)

    # -- the loop ------------------------------------------------------------------------------------
    def run(self, items: Iterable[VisionFeatures | Failed]) -> Iterator[Caption | Failed]:
        """Caption a stream; Failed records pass straight through. Yields as rows finish."""
        if self.decode.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        max_ctx = self.llm.cfg.max_position
        sched = SlotScheduler(self._slots_for, max_ctx, self.options.cache_granule, self.options.kv_bucket,
                              self.options.max_prefill_batch, size=CacheSize(self.cache.slots, self.cache.max_len))
        rows: dict[int, _Row] = {}
        source = iter(items)
        next_rid = 0
        exhausted = False
        while True:
            # intake: enough requests to fill the free slots, plus one group of look-ahead
            while not exhausted and sched.wants() > 0:
                item = next(source, None)
                if item is None:
                    exhausted = True
                elif isinstance(item, Failed):
                    yield item
                else:
                    n_prompt = int(item.prompt_embeds.shape[0])
                    need = n_prompt + self.decode.max_new_tokens
                    if need > max_ctx:
                        yield Failed(item.ref, "caption", "too_long",
                                     f"sequence of {need} tokens exceeds the model's {max_ctx} positions")
                        continue
                    r = _Row(feat=item, n_prompt=n_prompt)
                    if not self.decode.greedy:
                        r.generator = request_generator(self.decode.seed, item.ref.key)
                    rows[next_rid] = r
                    sched.submit(next_rid, n_prompt, need)
                    self.stats.requests += 1
                    next_rid += 1
            plan = sched.plan()
            if plan.idle:
                if exhausted:
                    return
                continue
            for rid in self._execute(plan, sched, rows):
                sched.release(rid)
                yield self._result(rows.pop(rid))
