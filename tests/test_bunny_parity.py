"""Bunny parity against the reference's golden outputs on the tiny random checkpoint (fp32).

Component tests (pixels, vision feature, projector, ids, prefill logits) localise a mismatch;
the end-to-end tests require the 24 greedy tokens and the decoded text to be identical.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import BUNNY

QUESTION = "Describe this image in detail."
NAMES = ["rgb_640x480", "rgb_300x200", "rgb_1000x1000", "rgb_2000x500", "gray_480x640"]
TOL = dict(atol=1e-4, rtol=1e-4)


def _image(golden, name):
    return Image.open(BUNNY / golden["images"][name]["file"]).convert("RGB")


@pytest.mark.parametrize("name", NAMES)
def test_pixels(bunny_fp32, bunny_golden, bunny_tensors, name):
    g = bunny_golden["images"][name]
    proc = bunny_fp32.processor
    u8 = proc.square_u8(_image(bunny_golden, name))
    assert np.array_equal(u8, bunny_tensors[f"{name}.pixel_u8"].numpy())
    x = proc(_image(bunny_golden, name)).crops[0]
    assert tuple(x.shape) == tuple(g["pixel"]["shape"][1:])
    assert hashlib.sha256(np.ascontiguousarray(x.numpy()).tobytes()).hexdigest()[:16] == g["pixel"]["sha256_16_f32_chw"]
    assert x.double().sum().item() == pytest.approx(g["pixel"]["sum_f64"], abs=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_vision_and_projector(bunny_fp32, bunny_golden, bunny_tensors, name):
    x = bunny_fp32.processor(_image(bunny_golden, name)).crops[0][None]
    with torch.inference_mode():
        feat = bunny_fp32.model.vision_features(x)[0]
        proj = bunny_fp32.model.projector(feat)
    torch.testing.assert_close(feat, bunny_tensors[f"{name}.vision_features"], **TOL)
    torch.testing.assert_close(proj, bunny_tensors[f"{name}.projector_output"], **TOL)


def test_prompt_ids(bunny_fp32, bunny_golden):
    for name in NAMES:
        g = bunny_golden["images"][name]
        c0, c1 = bunny_fp32.prompts.chunk_ids(QUESTION)
        assert [c0, c1] == g["chunk_ids"]
        plan = bunny_fp32.prompts.build(QUESTION)
        assert len(plan.ids) == g["prefill_len"]
        (s, e), = plan.image_spans
        assert e - s == 729 and list(plan.ids[:s]) + [-200] + list(plan.ids[e:]) == g["input_ids"]


@pytest.mark.parametrize("name", NAMES)
def test_prefill_logits(bunny_fp32, bunny_golden, bunny_tensors, name):
    m = bunny_fp32.model
    px = bunny_fp32.processor(_image(bunny_golden, name))
    with torch.inference_mode():
        emb = m.prompt_embeds(bunny_fp32.prompts.build(QUESTION, px), m.encode_images([px])[0])
        logits = m.llm.logits(m.llm(emb[None], torch.arange(emb.shape[0])[None])[:, -1])[0]
    ref = bunny_tensors[f"{name}.prefill_logits_last"]
    assert (logits - ref).abs().max().item() <= 1e-4
    assert logits.argmax().item() == bunny_golden["images"][name]["prefill_argmax"]


def test_greedy_generation_matches_reference(bunny_fp32, bunny_golden):
    """All five images through the batched engine: 24 tokens and text identical."""
    from pipeline.config import DecodeConfig
    from stages.caption.engine import CaptionEngine, EngineOptions
    from helpers import features_for

    feats = features_for(bunny_fp32, BUNNY, bunny_golden, NAMES, QUESTION)
    out = {c.ref.key: c for c in CaptionEngine(bunny_fp32, DecodeConfig(max_new_tokens=24),
                                               EngineOptions(max_batch_size=8)).run(feats)}
    for name in NAMES:
        g = bunny_golden["images"][name]
        assert list(out[name].token_ids) == g["generated_ids"], name
        assert out[name].text == g["generated_text"], name
        assert out[name].finish == "length" and out[name].n_prompt == g["prefill_len"]


def test_decode_step_logits(bunny_fp32, bunny_golden, bunny_tensors):
    """Cached decode logits at steps 1 and 23 equal the reference's (teacher-forced on its tokens)."""
    from models.kv_cache import CacheShape, KVCache
    m, name = bunny_fp32.model, "rgb_640x480"
    g = bunny_golden["images"][name]
    px = bunny_fp32.processor(_image(bunny_golden, name))
    c = m.llm.cfg
    with torch.inference_mode():
        emb = m.prompt_embeds(bunny_fp32.prompts.build(QUESTION, px), m.encode_images([px])[0])
        L = emb.shape[0]
        cache = KVCache(CacheShape(c.n_layers, 1, c.n_kv_heads, L + 32, c.head_dim), torch.float32)
        m.llm(emb[None], torch.arange(L)[None], cache)
        for step in range(1, 24):
            tok = torch.tensor([g["generated_ids"][step - 1]])
            h = m.llm(m.llm.embed(tok)[:, None], torch.tensor([L + step - 1]), cache, kv_len=L + step)
            if step in (1, 23):
                logits = m.llm.logits(h[:, 0])[0]
                assert (logits - bunny_tensors[f"{name}.decode_logits_step{step}"]).abs().max().item() <= 1e-4
