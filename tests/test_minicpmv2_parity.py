"""MiniCPM-V-2 parity against the reference's golden outputs on the tiny random checkpoint (fp32).

The golden data (tests/golden/minicpmv2-tiny, see its README) was produced by the original remote
code. Component tests (slicing, pixels, ids, ViT, resampler, embeddings, logits) localise a
mismatch; the end-to-end test requires the 24 greedy tokens and the decoded answer to be identical,
generated through the decoder's KV cache (prefill T>1, then T==1 steps).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import FP32_PATHS, load_fp32
from models.kv_cache import CacheShape, KVCache

ROOT = Path(__file__).parent / "golden" / "minicpmv2-tiny"
GOLDEN = json.loads((ROOT / "expected.json").read_text())
CASES = {c["name"]: c for c in GOLDEN["cases"]}
QUESTION = GOLDEN["question"]
TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def tensors() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(ROOT / "expected.safetensors"))


@pytest.fixture(scope="module", params=FP32_PATHS)
def loaded(request):
    return load_fp32(ROOT / "checkpoint", request.param)


def _image(case: dict) -> Image.Image:
    path = ROOT / case["image_file"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == case["image_sha256"]
    img = Image.open(path)
    assert img.mode == case["image_mode_on_disk"]
    return img.convert("RGB")          # as the reference run (and our pipeline) does


@pytest.fixture(scope="module")
def prepared(loaded):
    """name -> (PixelInputs, PromptPlan), computed once."""
    out = {}
    for name, case in CASES.items():
        px = loaded.processor(_image(case))
        out[name] = (px, loaded.prompts.build(QUESTION, px))
    return out


def test_golden_cover_every_slicing_kind():
    grids = {tuple(c["grid"]) if c["grid"] else None for c in CASES.values()}
    assert grids == {None, (2, 1), (1, 2), (2, 2), (4, 1)}
    assert any(c["image_mode_on_disk"] == "L" for c in CASES.values())


@pytest.mark.parametrize("name", CASES)
def test_slices_and_pixels(prepared, name):
    case = CASES[name]
    px, _ = prepared[name]
    assert px.grid == (tuple(case["grid"]) if case["grid"] else None)
    assert len(px.crops) == len(case["slices"])
    for crop, s in zip(px.crops, case["slices"]):
        assert crop.dtype == torch.float32
        assert [1, *crop.shape] == s["pixel_shape"]
        assert tuple(s["tgt_size_hw"]) == (crop.shape[1] // 14, crop.shape[2] // 14)
        assert crop.double().sum().item() == pytest.approx(s["pixel_sum_f64"], abs=1e-3)
        torch.testing.assert_close(crop.flatten()[:16], torch.tensor(s["pixel_first16"]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", CASES)
def test_prompt_ids_and_image_bound(loaded, prepared, name):
    case = CASES[name]
    px, plan = prepared[name]
    assert loaded.prompts.text(QUESTION, px) == case["prompt"]
    assert list(plan.ids) == case["input_ids"]
    assert [list(s) for s in plan.image_spans] == case["image_bound"]


@pytest.mark.parametrize("name", CASES)
def test_vit_and_resampler_per_slice(loaded, prepared, tensors, name):
    px, _ = prepared[name]
    m = loaded.model
    with torch.inference_mode():
        for j, crop in enumerate(px.crops):
            vit = m.vision(crop[None])[0]
            torch.testing.assert_close(vit, tensors[f"{name}.slice{j}.vit"], **TOL)
            res = m.resampler(vit[None], (crop.shape[1] // 14, crop.shape[2] // 14))[0]
            torch.testing.assert_close(res, tensors[f"{name}.slice{j}.resampler"], **TOL)


@pytest.mark.parametrize("name", CASES)
def test_inputs_embeds_and_prefill_logits(loaded, prepared, tensors, name):
    px, plan = prepared[name]
    m = loaded.model
    with torch.inference_mode():
        (feats,) = m.encode_images([px])
        assert feats.shape == (64 * len(px.crops), m.cfg.llm.hidden_size)
        emb = m.prompt_embeds(plan, feats)
        torch.testing.assert_close(emb, tensors[f"{name}.inputs_embeds"], **TOL)
        L = emb.shape[0]
        logits = m.llm.logits(m.llm(emb[None], torch.arange(L)[None])[:, -1])[0]
    want = tensors[f"{name}.prefill_logits"]
    torch.testing.assert_close(logits, want, **TOL)
    assert int(logits.argmax()) == int(want.argmax()) == CASES[name]["generated_ids"][0]


def greedy(model, emb: torch.Tensor, n_new: int) -> tuple[list[int], dict[int, torch.Tensor]]:
    """Greedy tokens through the KV cache: prefill (T>1) then T==1 steps. Returns ids, logits per step."""
    llm = model.llm
    L = emb.shape[0]
    cache = KVCache(CacheShape(llm.cfg.n_layers, 1, llm.cfg.n_kv_heads, L + n_new, llm.cfg.head_dim), emb.dtype)
    ids, step_logits = [], {}
    logits = llm.logits(llm(emb[None], torch.arange(L)[None], cache)[:, -1])[0]            # [V]
    for k in range(n_new):
        step_logits[k] = logits
        ids.append(int(logits.argmax()))
        if k == n_new - 1:
            break
        pos = L + k
        h = llm(llm.embed(torch.tensor([[ids[-1]]])), torch.tensor([pos]), cache, kv_len=pos + 1)
        logits = llm.logits(h[:, -1])[0]
    return ids, step_logits


@pytest.mark.parametrize("name", CASES)
def test_greedy_generation_token_identical(loaded, prepared, tensors, name):
    case = CASES[name]
    px, plan = prepared[name]
    with torch.inference_mode():
        emb = loaded.model.prompt_embeds(plan, loaded.model.encode_images([px])[0])
        ids, step_logits = greedy(loaded.model, emb, GOLDEN["generation"]["max_new_tokens"])
    for k in GOLDEN["generation"]["logit_steps_saved"]:
        torch.testing.assert_close(step_logits[k], tensors[f"{name}.step{k}_logits"], **TOL)
    assert ids == case["generated_ids"]
    assert case["raw_output_ids"] == [1, *ids]     # transformers 4.36 put BOS in front of the output
    assert loaded.prompts.decode(ids) == case["answer"]
    assert loaded.prompts.decode(case["raw_output_ids"]) == case["answer"]


def test_encode_images_batches_equal_shapes_and_keeps_order(loaded, prepared, tensors):
    """img2 (5 crops of 448x448) and img3 (224x896 + 4 of 448x448) share one ViT call for 8
    crops; chunking at 3 crops per call must not change which feature goes where."""
    names = ["img3_2000x500", "img2_1000x1000", "img0_640x480"]
    m = loaded.model
    old = m.max_crops_per_call
    try:
        m.max_crops_per_call = 3
        feats = m.encode_images([prepared[n][0] for n in names])
    finally:
        m.max_crops_per_call = old
    for n, f in zip(names, feats):
        want = torch.cat([tensors[f"{n}.slice{j}.resampler"] for j in range(len(CASES[n]["slices"]))])
        torch.testing.assert_close(f, want, **TOL)
    assert m.encode_images([]) == []


def test_caption_engine_reproduces_the_golden_captions(loaded):
    """Through the pipeline's engine (vision stage + continuous batching over the slot cache):
    alone, in one padded batch, and with slot refill, every case gives the golden ids and text."""
    from helpers import features_for
    from pipeline.config import DecodeConfig
    from stages.caption.engine import CaptionEngine, EngineOptions

    files = [c["image_file"] for c in CASES.values()]
    feats = features_for(loaded, ROOT, {}, files, QUESTION)
    for opts in (dict(max_batch_size=1), dict(max_batch_size=8, max_prefill_batch=8, kv_bucket=1024),
                 dict(max_batch_size=2, max_prefill_batch=2)):
        engine = CaptionEngine(loaded, DecodeConfig(max_new_tokens=24), EngineOptions(**opts))
        got = {c.ref.key: c for c in engine.run(feats)}
        for case in CASES.values():
            cap = got[case["image_file"]]
            assert list(cap.token_ids) == case["generated_ids"], (opts, case["name"])
            assert cap.text == case["answer"], (opts, case["name"])
