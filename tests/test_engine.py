"""Batch invariance of the caption engine on the golden Bunny images (fp32, greedy).

A caption must be identical whether decoded alone, in a right-padded prefill batch with longer
and shorter neighbours, or after slot refill (continuous batching).
"""

from __future__ import annotations

import torch

from conftest import BUNNY
from helpers import features_for
from pipeline.config import DecodeConfig
from stages.caption.engine import CaptionEngine, EngineOptions

NAMES = ["rgb_640x480", "rgb_300x200", "rgb_1000x1000", "rgb_2000x500", "gray_480x640"]
# different questions give different prompt lengths, so prefill batches are padded
QUESTIONS = {"rgb_640x480": "Describe this image in detail.",
             "rgb_300x200": "What?",
             "rgb_1000x1000": "Describe every object in this image in great detail, one by one, with colours.",
             "rgb_2000x500": "Describe this image.",
             "gray_480x640": "Is it day or night in this picture, and why do you think so?"}


def _run(loaded, feats, **opts):
    eng = CaptionEngine(loaded, DecodeConfig(max_new_tokens=12), EngineOptions(**opts))
    return {c.ref.key: c.token_ids for c in eng.run(feats)}, eng.stats


def test_alone_equals_padded_batch_equals_refill(bunny_fp32, bunny_golden):
    feats = features_for(bunny_fp32, BUNNY, bunny_golden, NAMES, "", QUESTIONS)
    assert len({f.prompt_embeds.shape[0] for f in feats}) == 5            # really different lengths
    alone = {}
    for f in feats:
        out, _ = _run(bunny_fp32, [f], max_batch_size=1)
        alone.update(out)
    # one padded prefill group (bucket wide enough for all lengths), all decoded together
    batched, st = _run(bunny_fp32, feats, max_batch_size=8, max_prefill_batch=8, kv_bucket=1024)
    assert st.decode_steps == 11
    # two slots for five requests: slots get refilled as rows finish
    refill, st2 = _run(bunny_fp32, feats, max_batch_size=2, max_prefill_batch=2)
    assert st2.slots == 2 and st2.requests == 5
    assert batched == alone and refill == alone


def test_eos_and_ignore_eos(bunny_fp32, bunny_golden):
    """With the golden first token declared EOS, generation stops after 1 token unless ignore_eos."""
    feats = features_for(bunny_fp32, BUNNY, bunny_golden, ["rgb_640x480"], "Describe this image in detail.")
    first = bunny_golden["images"]["rgb_640x480"]["generated_ids"][0]
    prompts = bunny_fp32.prompts
    saved = prompts.eos_token_ids
    try:
        prompts.eos_token_ids = (first,)
        stop = list(CaptionEngine(bunny_fp32, DecodeConfig(max_new_tokens=8)).run(feats))[0]
        keep = list(CaptionEngine(bunny_fp32, DecodeConfig(max_new_tokens=8, ignore_eos=True)).run(feats))[0]
    finally:
        prompts.eos_token_ids = saved
    assert stop.finish == "eos" and stop.n_new == 1
    assert keep.finish == "length" and keep.n_new == 8


def test_sampling_is_seeded_per_request(bunny_fp32, bunny_golden):
    feats = features_for(bunny_fp32, BUNNY, bunny_golden, NAMES, "Describe this image in detail.")
    cfg = DecodeConfig(max_new_tokens=10, temperature=1.0, top_k=50, top_p=0.9, repetition_penalty=1.1, seed=7)
    a = {c.ref.key: c.token_ids for c in CaptionEngine(bunny_fp32, cfg, EngineOptions(max_batch_size=5)).run(feats)}
    b = {c.ref.key: c.token_ids for c in CaptionEngine(bunny_fp32, cfg, EngineOptions(max_batch_size=1)).run(feats)}
    c = {k.ref.key: k.token_ids for k in CaptionEngine(bunny_fp32, DecodeConfig(**{**cfg.__dict__, "seed": 8}),
                                                        EngineOptions(max_batch_size=5)).run(feats)}
    assert a == b            # independent of batching
    assert a != c            # but the seed matters
    greedy = {k.ref.key: k.token_ids for k in CaptionEngine(bunny_fp32, DecodeConfig(max_new_tokens=10)).run(feats)}
    assert a != greedy


def test_failed_records_pass_through(bunny_fp32, bunny_golden):
    from pipeline.records import Failed, ImageRef
    feats = features_for(bunny_fp32, BUNNY, bunny_golden, ["rgb_640x480"], "Describe this image in detail.")
    bad = Failed(ImageRef("x", "x.jpg", "/nope/x.jpg"), "preprocess", "missing", "no such file")
    out = list(CaptionEngine(bunny_fp32, DecodeConfig(max_new_tokens=2)).run([bad, *feats]))
    assert out[0] is bad and out[1].ref.key == "rgb_640x480"
    assert torch.is_tensor(feats[0].prompt_embeds)


def test_memory_budget_sizes_the_slots_and_oom_halves_them(bunny_fp32, bunny_golden, monkeypatch):
    from models import kv_cache
    from stages.caption import memory

    feats = features_for(bunny_fp32, BUNNY, bunny_golden, NAMES, "Describe this image in detail.")
    c = bunny_fp32.model.llm.cfg
    per_slot = 2 * c.n_layers * c.n_kv_heads * 1024 * c.head_dim * 4          # fp32 KV at 1024 positions
    opts = EngineOptions(max_batch_size=16, memory_budget_gib=3.2 * per_slot * memory.ACTIVATION_ALLOWANCE / 2**30)
    assert memory.plan_slots(per_slot, opts, torch.device("cpu")) == 3

    real = kv_cache.allocate

    def flaky(dims, dtype, device):         # "allocation fails" above 2 slots
        if dims[0] > 2:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")
        return real(dims, dtype, device)

    monkeypatch.setattr(kv_cache, "allocate", flaky)
    eng = CaptionEngine(bunny_fp32, DecodeConfig(max_new_tokens=6), EngineOptions(max_batch_size=8))
    out = {r.ref.key: r.token_ids for r in eng.run(feats)}
    assert eng.stats.slots == 2 and eng.stats.oom_retries == 2              # 8 -> 4 -> 2
    ref = {r.ref.key: r.token_ids for r in CaptionEngine(bunny_fp32, DecodeConfig(max_new_tokens=6)).run(feats)}
    assert out == ref
