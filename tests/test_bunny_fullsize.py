"""Full-size Bunny smoke (slow: ~5 GB RAM, a few minutes on 2 cores): `pytest -m slow`.

A random-weight checkpoint with the real Bunny-v1_0-2B-zh dims, written in the original format
(fp16 safetensors, original names), loads strictly and captions one image in bf16. Load time, peak
RSS and tokens/s are logged (run with -s -o log_cli=true to see them).
"""

from __future__ import annotations

import logging
import os
import time

import pytest
import torch
from PIL import Image

from models.random_checkpoint import write_random_checkpoint
from models.registry import load_model
from pipeline import device as dev
from pipeline.config import DecodeConfig
from pipeline.records import ImageRef
from stages.caption.engine import CaptionEngine, EngineOptions
from stages.encode import VisionEncoder
from stages.records import ImageInputs

log = logging.getLogger(__name__)
CACHE = os.environ.get("VLM_RANDOM_CKPT_DIR", os.path.expanduser("~/.cache/vlm-caption-pipeline/random"))


@pytest.mark.slow
def test_bunny_full_size_random_weights_captions_in_bf16():
    path = write_random_checkpoint("bunny", os.path.join(CACHE, "bunny"))
    t0 = time.perf_counter()
    lm = load_model(path, torch.bfloat16, torch.device("cpu"), kernels=dev.cpu_kernels(torch.device("cpu"),
                                                                                      torch.bfloat16))
    load_s = time.perf_counter() - t0
    c = lm.model.llm.cfg
    assert (c.hidden_size, c.n_layers, c.vocab_size, len(lm.model.vision.blocks)) == (2048, 24, 151646, 26)
    img = Image.new("RGB", (640, 480), (200, 120, 40))
    px = lm.processor(img)
    plan = lm.prompts.build("Describe this image in detail.", px)
    t1 = time.perf_counter()
    feats = VisionEncoder(lm)([ImageInputs(ImageRef("a", "a", "a"), px, plan, 640, 480, 0.0)])
    vision_s = time.perf_counter() - t1
    eng = CaptionEngine(lm, DecodeConfig(max_new_tokens=32, ignore_eos=True), EngineOptions(max_batch_size=1))
    cap = list(eng.run(feats))[0]
    assert cap.n_new == 32 and cap.n_prompt == len(plan.ids)
    assert all(0 <= t < c.vocab_size for t in cap.token_ids)
    tok_s = (cap.n_new - 1) / eng.stats.decode_s
    log.warning("bunny full size: load %.1f s, vision %.2f s, prefill %.2f s (%d tokens), decode %.1f tokens/s, "
                "peak RSS %.2f GiB", load_s, vision_s, eng.stats.prefill_s, cap.n_prompt, tok_s,
                dev.peak_rss_bytes() / 2**30)
