"""The caption engine: continuous batching over a preallocated KV cache.

Requests are prefill embeddings (text + image features). The scheduler (pure data) admits
waiting requests into free slots in same-length groups; a group is prefilled in one right-padded
batch (causal attention means a real token never sees a pad, and each row's logits are taken at
its own last position). Then one decode step runs all active slots at once, each row at its own
position with a mask over its own cache length. When a row finishes (EOS or max tokens) its slot
is refilled from the queue, so the batch stays full while work remains; results are yielded as
rows finish and the caller restores order by key/index.
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
from stages.caption import memory
from stages.caption.sampling import choose, request_generator
from stages.caption.scheduler import SlotScheduler
from stages.records import VisionFeatures

log = logging.getLogger(__name__)


EngineOptions = BatchConfig     # max_batch_size, memory_budget_gib, slot_cap, kv_bucket, max_prefill_batch


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


@dataclass
class _Row:
    feat: VisionFeatures
    n_prompt: int
    pos: int = 0                           # next cache position to write (= current length)
    tokens: list[int] = field(default_factory=list)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    generator: torch.Generator | None = None
    finish: str | None = None


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


class CaptionEngine:
    def __init__(self, loaded: LoadedModel, decode: DecodeConfig, options: EngineOptions = EngineOptions()):
        self.loaded = loaded
        self.llm = loaded.model.llm
        self.decode = decode
        self.options = options
        self.eos = set(loaded.prompts.eos_token_ids)
        self.stats = EngineStats()
        self.cache: KVCache | None = None
        self.device = self.llm.embed_tokens.weight.device
        self.dtype = self.llm.embed_tokens.weight.dtype

    # -- cache ---------------------------------------------------------------------------------------
    def _shape(self, slots: int, max_len: int) -> CacheShape:
        c = self.llm.cfg
        return CacheShape(c.n_layers, slots, c.n_kv_heads, max_len, c.head_dim)

    def _ensure_cache(self, need_len: int, n_active: int) -> None:
        """Allocate (or grow, keeping the active rows) a cache that holds need_len positions."""
        max_ctx = self.llm.cfg.max_position
        if need_len > max_ctx:
            raise ValueError(f"sequence of {need_len} tokens exceeds the model's {max_ctx} positions")
        if self.cache is not None and self.cache.max_len >= need_len:
            return
        max_len = min(_round_up(need_len, 256), max_ctx)
        if self.cache is None:
            slots = memory.plan_slots(self._shape(1, max_len).nbytes(self.dtype), self.options, self.device)
            while True:
                try:
                    self.cache = KVCache(self._shape(slots, max_len), self.dtype, self.device)
                    break
                except (RuntimeError, MemoryError) as e:   # allocation failure: halve and retry
                    if slots == 1 or not memory.is_oom(e):
                        raise
                    slots //= 2
                    self.stats.oom_retries += 1
                    log.warning("KV cache allocation failed; retrying with %d slots", slots)
            self.stats.slots = slots
            log.info("KV cache: %d slots x %d positions (%.2f GiB)", slots, max_len,
                     self.cache.shape.nbytes(self.dtype) / 2**30)
            return
        old = self.cache
        new = KVCache(self._shape(old.slots, max_len), self.dtype, self.device)
        for layer in range(old.shape.n_layers):
            new.k[layer][:n_active, :, :old.max_len] = old.k[layer][:n_active]
            new.v[layer][:n_active, :, :old.max_len] = old.v[layer][:n_active]
        self.cache = new
        log.info("KV cache grown to %d positions", max_len)

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
        for (_, r), tok in zip(group, toks):
            r.pos = r.n_prompt
            r.prefill_s = dt / len(group)
            self._append(r, tok)
        self.stats.prefill_s += dt
        self.stats.prompt_tokens += sum(lengths)

    def _decode_step(self, rows: list[_Row]) -> None:
        """One token for each active row; rows[i] lives in slot i."""
        t0 = time.perf_counter()
        n = len(rows)
        tokens = torch.tensor([r.tokens[-1] for r in rows], device=self.device)
        positions = torch.tensor([r.pos for r in rows], device=self.device)
        kv_len = min(_round_up(max(r.pos for r in rows) + 1, self.options.kv_bucket), self.cache.max_len)
        with torch.inference_mode():
            x = self.llm.embed(tokens)[:, None]                                             # [n, 1, H]
            hidden = self.llm(x, positions, self.cache, kv_len=kv_len)                      # [n, 1, H]
            toks = self._sample(self.llm.logits(hidden[:, 0]), rows)
        dt = time.perf_counter() - t0
        for r, tok in zip(rows, toks):
            r.pos += 1
            r.decode_s += dt / n
            self._append(r, tok)
        self.stats.decode_s += dt
        self.stats.decode_steps += 1

    def _append(self, r: _Row, tok: int) -> None:
        r.tokens.append(tok)
        self.stats.new_tokens += 1
        if tok in self.eos and not self.decode.ignore_eos:
            r.finish = "eos"
        elif len(r.tokens) >= self.decode.max_new_tokens:
            r.finish = "length"

    def _move(self, src: int, dst: int) -> None:
        for layer in range(self.cache.shape.n_layers):
            self.cache.k[layer][dst] = self.cache.k[layer][src]
            self.cache.v[layer][dst] = self.cache.v[layer][src]

    def _result(self, r: _Row) -> Caption:
        f = r.feat
        return Caption(ref=f.ref, text=self.loaded.prompts.decode(r.tokens), token_ids=tuple(r.tokens),
                       n_prompt=r.n_prompt, n_new=len(r.tokens), finish=r.finish or "length", width=f.width,
                       height=f.height, preprocess_s=f.preprocess_s, encode_s=f.encode_s,
                       prefill_s=r.prefill_s, decode_s=r.decode_s)

    # -- the loop ------------------------------------------------------------------------------------
    def run(self, items: Iterable[VisionFeatures | Failed]) -> Iterator[Caption | Failed]:
        """Caption a stream; Failed records pass straight through. Yields as rows finish."""
        if self.decode.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        source = iter(items)
        rows: dict[int, _Row] = {}
        sched: SlotScheduler | None = None
        next_rid = 0
        exhausted = False
        while True:
            # Pull just enough input to fill free slots (plus one group of look-ahead for grouping).
            want = (sched.n_free + self.options.max_prefill_batch) if sched else 1
            while not exhausted and (sched is None or len(sched.waiting) < want):
                try:
                    item = next(source)
                except StopIteration:
                    exhausted = True
                    break
                if isinstance(item, Failed):
                    yield item
                    continue
                n_prompt = int(item.prompt_embeds.shape[0])
                try:
                    self._ensure_cache(n_prompt + self.decode.max_new_tokens, sched.n_active if sched else 0)
                except ValueError as e:
                    yield Failed(item.ref, "caption", "too_long", str(e))
                    continue
                if sched is None:
                    sched = SlotScheduler(self.cache.slots, self.options.kv_bucket, self.options.max_prefill_batch)
                r = _Row(feat=item, n_prompt=n_prompt)
                if not self.decode.greedy:
                    r.generator = request_generator(self.decode.seed, item.ref.key)
                rows[next_rid] = r
                sched.submit(next_rid, n_prompt)
                self.stats.requests += 1
                next_rid += 1
                want = sched.n_free + self.options.max_prefill_batch
            if sched is None or (not rows):
                if exhausted:
                    return
                continue
            # Admit and prefill while slots are free.
            while True:
                group = sched.admit()
                if not group:
                    break
                self._prefill([(a.slot, rows[a.rid]) for a in group])
                for a in group:
                    if rows[a.rid].finish:
                        sched.release(a.rid)
                        yield self._result(rows.pop(a.rid))
            for mv in sched.compact():
                self._move(mv.src, mv.dst)
            active = sched.active_rids()
            if not active:
                if exhausted and not sched.waiting:
                    return
                continue
            self._decode_step([rows[rid] for rid in active])
            for rid in active:
                if rows[rid].finish:
                    sched.release(rid)
                    yield self._result(rows.pop(rid))
