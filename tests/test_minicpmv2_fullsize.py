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
import time
from pathlib import Path

import pytest
import torch

from smoke import check, smoke

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "tests" / "golden" / "minicpmv2-tiny" / "checkpoint"
# 640x480: the source thumbnail + a 2x1 grid of slices; 213 prompt ids as in the golden case
EXPECT = dict(n_crops=3, grid=(2, 1), n_prompt=213)


def test_smoke_path_on_the_tiny_checkpoint():
    """bf16, the CPU fast paths included (fails on CPUs without AVX-512 until issue 11 lands)."""
    out = smoke(TINY, torch.bfloat16, n_new=4)
    check(out, **EXPECT)


def test_smoke_path_on_the_tiny_checkpoint_fp32():
    out = smoke(TINY, torch.float32, n_new=6)
    check(out, **EXPECT)
    assert (out.hidden, out.vocab) == (320, 1024)


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
    check(out, **EXPECT)
    assert (out.vocab, out.hidden) == (122753, 2304)
