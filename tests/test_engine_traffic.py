"""Differential property test of the caption engine under generated traffic.

Every request decoded in a stream (continuous batching, staggered finishes, a cache that grows as
longer prompts arrive, slot counts re-planned against a memory budget, an allocation failure
injected mid-run) must produce exactly the tokens it produces decoded alone.

Traffic: streams of 20-60 requests drawn from a pool whose prompt lengths span the family's range
(MiniCPM-V-2: 1 to 10 crops' worth of image tokens; Bunny: short to very long questions), in
arbitrary or ascending length order (small first, large later: the growth case); rows finish at
varied steps through a test-only stop set of tokens the tiny models emit; greedy or seeded
sampling; 1-8 slots; small memory budgets so growth shrinks the slot count.

The models load as `pipeline caption` loads them on this machine (with its CPU kernels for the
linear layers and decode attention where they apply). The pool's prompt embeddings are the
family's real text embeddings with seeded random image features spliced in (running the ViT
would only cost time: the engine sees embeddings). The "alone" reference of each pool item is
decoded once without stops; with a stop set S the alone result is that sequence cut after its
first token in S, which is exactly what decoding alone with S does. Default run: a fixed seed and a few examples per family; `-m slow` runs many more.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from models import kv_cache
from models.base import PixelInputs
from pipeline.config import DecodeConfig
from pipeline.records import Failed, ImageRef
from stages.records import VisionFeatures
from stages.caption.engine import CaptionEngine, EngineOptions

GOLDEN = Path(__file__).parent / "golden"
N_NEW = 12                               # tokens per request (references and streams)
POOL = 24                                # distinct prompts per family
GREEDY = DecodeConfig(max_new_tokens=N_NEW)
SAMPLED = DecodeConfig(max_new_tokens=N_NEW, temperature=1.0, top_k=50, top_p=0.9, repetition_penalty=1.1, seed=7)

# MiniCPM-V-2 slice grids (cols, rows): every crop count 1 (no slices) .. 10 (source + 9 slices)
GRIDS = [None, (2, 1), (1, 2), (3, 1), (2, 2), (5, 1), (3, 2), (2, 3), (7, 1), (4, 2), (2, 4), (3, 3), (1, 9)]


@dataclass(frozen=True)
class Item:
    key: str
    embeds: torch.Tensor                 # [L, hidden] prefill embeddings


@cache
def _loaded(family: str):
    """The model as `pipeline caption` loads it here: with this CPU's kernels where they apply."""
    from models.registry import load_model
    from pipeline.device import cpu_kernels
    folder = {"bunny": "bunny-tiny", "minicpmv2": "minicpmv2-tiny"}[family]
    cpu = torch.device("cpu")
    return load_model(GOLDEN / folder / "checkpoint", torch.float32, cpu, kernels=cpu_kernels(cpu, torch.float32))


@cache
def _pool(family: str) -> tuple[Item, ...]:
    loaded = _loaded(family)
    hidden = loaded.model.llm.cfg.hidden_size
    g = torch.Generator().manual_seed(1234)
    items = []
    for i in range(POOL):
        if family == "bunny":
            # 1 .. ~1000 question tokens on top of the 729 image tokens (the prompt cap is 2048)
            question = "Describe this image." if i % 6 == 0 else "What is shown here, and why? " * (i * 6)
            plan = loaded.prompts.build(question, None)
        else:
            grid = GRIDS[i % len(GRIDS)]
            crops = 1 + (grid[0] * grid[1] if grid else 0)
            plan = loaded.prompts.build("Describe this image." + " Be precise." * (i // 4),
                                        PixelInputs(tuple(torch.zeros(1) for _ in range(crops)), grid))
        n_image = sum(e - s for s, e in plan.image_spans)
        features = torch.randn(n_image, hidden, generator=g) * 0.5
        with torch.inference_mode():
            items.append(Item(f"{family}-{i}", loaded.model.prompt_embeds(plan, features)))
    return tuple(items)


@cache
def _alone(family: str, sampled: bool) -> tuple[tuple[int, ...], ...]:
    """Each pool item decoded alone (one slot), N_NEW tokens, no stop tokens."""
    decode = DecodeConfig(**{**(SAMPLED if sampled else GREEDY).__dict__, "ignore_eos": True})
    out = []
    for i, item in enumerate(_pool(family)):
        eng = CaptionEngine(_loaded(family), decode, EngineOptions(max_batch_size=1))
        (cap,) = eng.run([_features(item, i)])
        out.append(cap.token_ids)
    return tuple(out)


def _features(item: Item, index: int) -> VisionFeatures:
    return VisionFeatures(ImageRef(item.key, item.key, item.key, 0, index), item.embeds, 1, 1, 0.0, 0.0)


def _cut(tokens: tuple[int, ...], stop: frozenset[int]) -> tuple[int, ...]:
    for n, t in enumerate(tokens):
        if t in stop:
            return tokens[: n + 1]
    return tokens


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: the tiny models gain nothing from more, and the CI machine is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@st.composite
def traffic(draw, family: str):
    pool = _pool(family)
    rnd = draw(st.randoms(use_true_random=False))     # uniform variety (hypothesis' lists lean on zeros)
    order = rnd.choices(range(len(pool)), k=rnd.randint(20, 60))
    if draw(st.booleans()):             # small prompts first, large ones later: the cache must grow mid-run
        order.sort(key=lambda i: pool[i].embeds.shape[0])
    sampled = draw(st.booleans())
    # stop tokens: ones that only some sequences emit, at varied steps (a token every sequence
    # starts with would end them all at once, on the same step)
    seqs = _alone(family, sampled)
    seen = Counter(t for seq in seqs for t in set(seq))
    rare = sorted(t for t, n in seen.items() if n <= len(seqs) // 3)
    stop = frozenset(rnd.sample(rare, rnd.randint(2, 8)))
    slots = draw(st.integers(1, 8))
    # budget in "slots of 256 positions": growth to longer prompts re-plans to fewer slots
    budget_slots = draw(st.one_of(st.none(), st.integers(1, 16)))
    opts = dict(max_batch_size=slots, max_prefill_batch=draw(st.integers(1, 4)),
                kv_bucket=draw(st.sampled_from([1, 16, 64])))
    fail_at = draw(st.one_of(st.none(), st.integers(1, 6)))   # the k-th cache tensor allocation fails once
    return order, sampled, stop, opts, budget_slots, fail_at


def _budget_gib(family: str, budget_slots: int | None) -> float | None:
    if budget_slots is None:
        return None
    from stages.caption import memory
    c = _loaded(family).model.llm.cfg
    per_slot = 2 * c.n_layers * c.n_kv_heads * 256 * c.head_dim * 4               # fp32 KV at 256 positions
    return (budget_slots + 0.5) * per_slot * memory.ACTIVATION_ALLOWANCE / 2**30


def _check(family: str, case, monkeypatch) -> None:
    order, sampled, stop, opts, budget_slots, fail_at = case
    pool = _pool(family)
    alone = _alone(family, sampled)
    calls = {"n": 0}
    real_alloc = kv_cache.allocate

    def flaky_alloc(dims, dtype, device):
        calls["n"] += dims[0] * dims[2] > 0                 # count real (non-empty) allocations
        if calls["n"] == fail_at and dims[0] * dims[2] > 0:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")
        return real_alloc(dims, dtype, device)

    monkeypatch.setattr(kv_cache, "allocate", flaky_alloc)
    eng = CaptionEngine(_loaded(family), SAMPLED if sampled else GREEDY,
                        EngineOptions(memory_budget_gib=_budget_gib(family, budget_slots), **opts))
    eng.eos = set(stop)                          # test-only stop set: rows finish at varied steps
    feats = [_features(pool[i], pos) for pos, i in enumerate(order)]
    got = {}
    for cap in eng.run(feats):
        assert not isinstance(cap, Failed), cap
        assert cap.ref.index not in got, "a request came back twice"
        got[cap.ref.index] = cap
    assert sorted(got) == list(range(len(order))), "requests lost"
    for pos, i in enumerate(order):
        want = _cut(alone[i], stop)
        assert got[pos].token_ids == want, (f"request {pos} (pool item {i}, {pool[i].embeds.shape[0]} prompt tokens) "
                                            f"differs from alone: {got[pos].token_ids} != {want}")
        assert got[pos].finish == ("eos" if want[-1] in stop else "length")
    # what the example exercised (pytest --hypothesis-show-statistics)
    event(f"cache resizes: {getattr(eng.stats, 'resizes', '?')}, allocation failures: {eng.stats.oom_retries}")
    event(f"distinct caption lengths: {min(len({c.n_new for c in got.values()}), 6)}+")
    event(f"slots {eng.stats.slots} at the end, {opts['max_batch_size']} asked")
    monkeypatch.undo()


# no shrinking: each example costs seconds, and the printed failing example is enough to replay
FAST = settings(max_examples=6, derandomize=True, deadline=None, database=None, print_blob=True,
                phases=[Phase.explicit, Phase.generate], report_multiple_bugs=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])
SLOW = settings(FAST, max_examples=60, derandomize=False)


@FAST
@given(case=traffic("bunny"))
def test_bunny_stream_equals_alone(case, monkeypatch):
    _check("bunny", case, monkeypatch)


@FAST
@given(case=traffic("minicpmv2"))
def test_minicpmv2_stream_equals_alone(case, monkeypatch):
    _check("minicpmv2", case, monkeypatch)


@pytest.mark.slow
@SLOW
@given(case=traffic("bunny"))
def test_bunny_stream_equals_alone_many(case, monkeypatch):
    _check("bunny", case, monkeypatch)


@pytest.mark.slow
@SLOW
@given(case=traffic("minicpmv2"))
def test_minicpmv2_stream_equals_alone_many(case, monkeypatch):
    _check("minicpmv2", case, monkeypatch)
