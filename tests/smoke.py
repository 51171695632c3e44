"""One smoke run for both families, at any size: the full-size slow tests (random weights, real
dims) and the tiny-checkpoint tests of the default suite call the same function and check the
same properties, so the slow run adds only the scale.

What it asserts (each can fail; none is "a string came back"):
- the prompt has one image span per crop of query size, and the encoder's features fill exactly
  those slots: [sum of span lengths, hidden], finite, in the model dtype;
- the pipeline's engine (continuous batching, KV cache, the device's fast paths) decodes n_new
  greedy tokens, every id inside the vocabulary;
- cache consistency: one uncached forward over prompt + generated tokens gives, at every step,
  the generated token as its argmax up to the dtype's rounding (a wrong cache position, mask or
  kernel makes the cached path pick tokens the model does not rank first);
- the text is the prompt builder's decoding of those ids.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)

QUESTION = "Describe this image in detail."


def image_640x480() -> Image.Image:
    """A deterministic non-flat RGB test image: a smooth gradient plus seeded noise."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:480, 0:640]
    base = np.stack([x * 255 / 639, y * 255 / 479, (x + y) * 255 / 1118], axis=-1)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8), "RGB")


@dataclass(frozen=True)
class Smoke:
    family: str
    n_crops: int
    grid: tuple[int, int] | None
    n_prompt: int
    vocab: int
    hidden: int
    ids: tuple[int, ...]
    text: str
    worst_margin: float          # max over steps of (top uncached logit - the generated token's), >= 0
    tolerance: float             # what the dtype's rounding allows for that margin
    load_s: float
    vision_s: float
    prefill_s: float
    decode_tok_s: float


def _tolerance(dtype: torch.dtype, logits: torch.Tensor) -> float:
    """Cached and uncached paths round differently (kernels, accumulation order): about 1e-5 of
    the logit scale in fp32, a few bf16/fp16 ulps of it in half precision."""
    scale = float(logits.abs().max())
    return (1e-5 if dtype == torch.float32 else 2 ** -6) * max(scale, 1.0)


def smoke(ckpt: str | Path, dtype: torch.dtype, n_new: int) -> Smoke:
    from models.registry import load_model
    from pipeline.config import DecodeConfig
    from pipeline.device import cpu_kernels
    from pipeline.records import ImageRef
    from stages.records import ImageInputs
    from stages.caption.engine import CaptionEngine, EngineOptions
    from stages.encode import VisionEncoder

    cpu = torch.device("cpu")
    t0 = time.perf_counter()
    lm = load_model(ckpt, dtype, cpu, kernels=cpu_kernels(cpu, dtype))   # the pipeline's load path
    load_s = time.perf_counter() - t0
    m, cfg = lm.model, lm.model.llm.cfg

    px = lm.processor(image_640x480())
    plan = lm.prompts.build(QUESTION, px)
    spans = plan.image_spans
    n_slots = sum(e - s for s, e in spans)
    assert len(spans) == len(px.crops) and len({e - s for s, e in spans}) == 1
    assert all(0 < s < e <= len(plan.ids) for s, e in spans)

    t0 = time.perf_counter()
    (feats,) = m.encode_images([px])
    vision_s = time.perf_counter() - t0
    assert tuple(feats.shape) == (n_slots, cfg.hidden_size) and feats.dtype == dtype
    assert bool(torch.isfinite(feats).all())

    (vf,) = VisionEncoder(lm)([ImageInputs(ImageRef("smoke", "smoke", "smoke"), px, plan, 640, 480, 0.0)])
    engine = CaptionEngine(lm, DecodeConfig(max_new_tokens=n_new, ignore_eos=True), EngineOptions(max_batch_size=1))
    (cap,) = list(engine.run([vf]))
    ids = tuple(cap.token_ids)
    assert cap.n_new == len(ids) == n_new and cap.n_prompt == len(plan.ids)
    assert all(0 <= i < cfg.vocab_size for i in ids)
    assert cap.text == lm.prompts.decode(list(ids))

    # one uncached causal forward over prompt + generated tokens (teacher forcing)
    with torch.inference_mode():
        emb = torch.cat([vf.prompt_embeds, m.llm.embed(torch.tensor(ids[:-1], device=vf.prompt_embeds.device))])
        L = len(plan.ids)
        hidden = m.llm(emb[None], torch.arange(emb.shape[0])[None])[0, L - 1:]          # [n_new, hidden]
        logits = m.llm.logits(hidden)                                                   # [n_new, vocab] fp32
    chosen = logits[torch.arange(n_new), torch.tensor(ids)]
    margin = float((logits.max(-1).values - chosen).max())
    return Smoke(family=lm.family, n_crops=len(px.crops), grid=px.grid, n_prompt=len(plan.ids), vocab=cfg.vocab_size,
                 hidden=cfg.hidden_size, ids=ids, text=cap.text, worst_margin=margin,
                 tolerance=_tolerance(dtype, logits), load_s=load_s, vision_s=vision_s,
                 prefill_s=engine.stats.prefill_s,
                 decode_tok_s=(n_new - 1) / engine.stats.decode_s if engine.stats.decode_s > 0 else float("inf"))


def check(out: Smoke, *, n_crops: int, grid: tuple[int, int] | None, n_prompt: int) -> None:
    """The per-family expectations (same for the tiny and the full-size checkpoint: the prompt
    and the slicing depend on the image and the template, not on the weights)."""
    assert (out.n_crops, out.grid, out.n_prompt) == (n_crops, grid, n_prompt)
    assert 0.0 <= out.worst_margin <= out.tolerance, (out.worst_margin, out.tolerance)
    log.info("%s smoke: load %.1f s, vision %.2f s (%d crops), prefill %.2f s (%d tokens), decode %.2f tokens/s",
             out.family, out.load_s, out.vision_s, out.n_crops, out.prefill_s, out.n_prompt, out.decode_tok_s)
