"""Full-size MiniCPM-V-2 smoke run on random weights with the real dims (3.43B params, bf16).

`pytest -m slow tests/test_minicpmv2_fullsize.py` (needs ~7 GB of free RAM plus ~7 GB while the
random checkpoint is first written, and minutes). The checkpoint goes to
$MINICPMV2_RANDOM_CKPT or <repo>/random-checkpoints/minicpmv2-bf16 and is reused when complete.
The same smoke function runs on the tiny golden checkpoint in the default (fast) test set, so the
slow run only adds the scale.
"""

from __future__ import annotations

import logging
import os
import resource
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.kv_cache import CacheShape, KVCache

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "tests" / "golden" / "minicpmv2-tiny" / "checkpoint"
QUESTION = "Describe this image in detail."


def _image_640x480() -> Image.Image:
    """A deterministic non-flat RGB test image: a smooth gradient plus seeded noise."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:480, 0:640]
    base = np.stack([x * 255 / 639, y * 255 / 479, (x + y) * 255 / 1118], axis=-1)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8), "RGB")


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20      # Linux: KiB


def smoke(ckpt: Path, dtype: torch.dtype, n_new: int) -> dict:
    """Load, caption one 640x480 image greedily through the KV cache; return timings and shapes."""
    from models.registry import load_model
    from pipeline.device import cpu_kernels

    t0 = time.perf_counter()
    cpu = torch.device("cpu")
    lm = load_model(ckpt, dtype, cpu, kernels=cpu_kernels(cpu, dtype))   # the pipeline's load path
    load_s = time.perf_counter() - t0
    m, cfg = lm.model, lm.model.cfg.llm

    px = lm.processor(_image_640x480())
    plan = lm.prompts.build(QUESTION, px)
    t0 = time.perf_counter()
    (feats,) = m.encode_images([px])
    vision_s = time.perf_counter() - t0

    with torch.inference_mode():
        emb = m.prompt_embeds(plan, feats)
        L = emb.shape[0]
        cache = KVCache(CacheShape(cfg.n_layers, 1, cfg.n_kv_heads, L + n_new, cfg.head_dim), dtype)
        t0 = time.perf_counter()
        logits = m.llm.logits(m.llm(emb[None], torch.arange(L)[None], cache)[:, -1])[0]
        prefill_s = time.perf_counter() - t0
        finite = bool(torch.isfinite(logits).all())
        ids = [int(logits.argmax())]
        t0 = time.perf_counter()
        for k in range(n_new - 1):
            pos = L + k
            h = m.llm(m.llm.embed(torch.tensor([[ids[-1]]])), torch.tensor([pos]), cache, kv_len=pos + 1)
            logits = m.llm.logits(h[:, -1])[0]
            finite &= bool(torch.isfinite(logits).all())
            ids.append(int(logits.argmax()))
        decode_s = time.perf_counter() - t0
    text = lm.prompts.decode(ids)
    out = dict(load_s=load_s, peak_rss_gib=_peak_rss_gib(), vision_s=vision_s, prefill_s=prefill_s,
               decode_tok_s=(n_new - 1) / decode_s if decode_s > 0 else float("inf"),
               n_crops=len(px.crops), grid=px.grid, n_prompt=L, feats_shape=tuple(feats.shape),
               feats_dtype=feats.dtype, feats_finite=bool(torch.isfinite(feats).all()), logits_finite=finite,
               ids=ids, text=text, vocab=cfg.vocab_size, hidden=cfg.hidden_size)
    log.info("MiniCPM-V-2 %s smoke: load %.1fs, peak RSS %.2f GiB, vision %.2fs (%d crops), prefill %.2fs "
             "(%d tokens), decode %.2f tokens/s", ckpt.name, load_s, out["peak_rss_gib"], vision_s,
             out["n_crops"], prefill_s, L, out["decode_tok_s"])
    return out


def _check(out: dict, n_new: int) -> None:
    assert out["n_crops"] == 3 and out["grid"] == (2, 1)
    assert out["n_prompt"] == 213                       # as the golden 640x480 case with this question
    assert out["feats_shape"] == (192, out["hidden"])
    assert out["feats_finite"] and out["logits_finite"]
    assert len(out["ids"]) == n_new and all(0 <= i < out["vocab"] for i in out["ids"])
    assert isinstance(out["text"], str)


def test_smoke_path_on_the_tiny_checkpoint():
    out = smoke(TINY, torch.bfloat16, n_new=4)
    _check(out, 4)
    assert out["feats_dtype"] == torch.bfloat16


@pytest.mark.slow
def test_fullsize_random_checkpoint_bf16(caplog):
    from models.random_checkpoint import write_random_checkpoint

    caplog.set_level(logging.INFO)
    ckpt = Path(os.environ.get("MINICPMV2_RANDOM_CKPT",
                               Path("~/.cache/vlm-caption-pipeline/random/minicpmv2").expanduser()))
    t0 = time.perf_counter()
    write_random_checkpoint("minicpmv2", ckpt, dtype=torch.bfloat16, seed=0)
    log.info("random checkpoint ready in %.1fs at %s", time.perf_counter() - t0, ckpt)
    out = smoke(ckpt, torch.bfloat16, n_new=16)
    _check(out, 16)
    assert out["vocab"] == 122753 and out["hidden"] == 2304
    assert out["feats_dtype"] == torch.bfloat16
