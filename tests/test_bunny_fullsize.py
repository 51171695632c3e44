"""Bunny smoke run (tests/smoke.py): on the tiny golden checkpoint in the default suite, and at
full size (random weights with the real Bunny-v1_0-2B-zh dims, original format, bf16; ~5 GB RAM,
minutes on 2 cores) with `pytest -m slow`. Load time and tokens/s are logged (-o log_cli=true).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

from smoke import check, smoke

log = logging.getLogger(__name__)
TINY = Path(__file__).resolve().parent / "golden" / "bunny-tiny" / "checkpoint"
CACHE = os.environ.get("VLM_RANDOM_CKPT_DIR", os.path.expanduser("~/.cache/vlm-caption-pipeline/random"))
# one 384x384 crop (padded square), 729 image slots + the card template around the question
EXPECT = dict(n_crops=1, grid=None, n_prompt=769)


def test_smoke_path_on_the_tiny_checkpoint():
    out = smoke(TINY, torch.float32, n_new=6)
    check(out, **EXPECT)
    assert (out.hidden, out.vocab) == (128, 1000)


@pytest.mark.slow
def test_bunny_full_size_random_weights_captions_in_bf16(caplog):
    from models.random_checkpoint import write_random_checkpoint

    caplog.set_level(logging.INFO)
    path = write_random_checkpoint("bunny", os.path.join(CACHE, "bunny"))
    out = smoke(path, torch.bfloat16, n_new=32)
    check(out, **EXPECT)
    assert (out.hidden, out.vocab) == (2048, 151646)
