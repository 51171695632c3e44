"""Issue 10's scenario, through the caption job: MiniCPM-V-2 (tiny checkpoint, greedy fp32) over a
folder of mixed photo sizes, small ones first and large ones later (later prompts carry more
slices, so the KV cache grows mid-run while rows finish at many different steps). The run with
--batch-size 6 must write exactly the captions of the run with --batch-size 1, for every image.

Staggered finishes come from a test-only stop set: tokens this tiny random model emits at
different steps for different images (its real EOS almost never comes); the test checks that
the finishes really are spread out before trusting the comparison.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from caption_helpers import caption, captions, rows
from stages.caption.engine import CaptionEngine

CKPT = Path(__file__).parent / "golden" / "minicpmv2-tiny" / "checkpoint"
# ten small photos (one 448^2 crop each) first, then 2-4 slices, then 6-9 slices: the prompt grows
# from 79 to 679 tokens after the first cache was sized, while earlier rows are still decoding
SIZES = [(160, 120), (300, 200), (420, 420), (200, 380), (256, 256), (400, 300), (320, 480), (440, 440),
         (120, 300), (380, 260), (640, 480), (500, 700), (900, 600), (700, 700), (1024, 768),
         (2000, 500), (1200, 1200), (1600, 1200), (3000, 1000), (2000, 2000)]
STOP = {307, 900, 986, 1021}          # with these, the 20 captions end after 12 different step counts


@pytest.fixture
def mixed_folder(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    lines = []
    for i, (w, h) in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"m{i:02d}.png")
        lines.append(f"m{i:02d}.png")
    (tmp_path / "manifest.txt").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_batch_6_equals_batch_1_with_growth_and_staggered_finishes(mixed_folder, monkeypatch):
    real_init = CaptionEngine.__init__

    def with_stop_set(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.eos = self.eos | STOP

    monkeypatch.setattr(CaptionEngine, "__init__", with_stop_set)
    runs = {}
    for batch in (1, 6):
        out = mixed_folder / f"batch{batch}"
        assert caption(manifest=mixed_folder / "manifest.txt", out=out, model=str(CKPT), max_new_tokens=16,
                       shard_size=5, dtype="float32", batch_size=batch, threads=1) == 0
        runs[batch] = out
    one, six = rows(runs[1]), rows(runs[6])
    assert all(r["status"] == "ok" for r in one)
    # the premise: prompts really grow along the run, and rows finish at many different steps
    prompts = [r["n_prompt_tokens"] for r in one]
    assert prompts[0] < 100 and max(prompts) > 600 and prompts.index(max(prompts)) > len(prompts) // 2
    finishes = {r["n_new_tokens"] for r in one}
    assert len(finishes) >= 4 and {r["finish_reason"] for r in one} == {"eos", "length"}, finishes
    assert captions(runs[6]) == captions(runs[1])
    assert six == one
