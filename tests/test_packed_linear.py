"""The oneDNN-packed bf16 Linear path matches nn.Linear (bitwise at decode sizes)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import BUNNY
from helpers import features_for
from models import packed_linear
from models.registry import load_model
from pipeline.config import DecodeConfig
from stages.caption.engine import CaptionEngine, EngineOptions

pytestmark = pytest.mark.skipif(not packed_linear.available(), reason="oneDNN linear packing unavailable")


@pytest.mark.parametrize("m", [1, 5, 70])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_equals_linear(m, bias):
    torch.manual_seed(0)
    lin = nn.Linear(96, 40, bias=bias).to(torch.bfloat16)
    x = torch.randn(2, m, 96).to(torch.bfloat16)
    packed = packed_linear.PackedLinear(lin, batch_hint=16)
    with torch.inference_mode():
        assert torch.equal(packed(x), lin(x))


def test_packed_model_generates_the_same_tokens(bunny_golden):
    names = ["rgb_640x480", "rgb_2000x500"]
    outs = []
    for pack in (False, True):
        lm = load_model(BUNNY / "checkpoint", torch.bfloat16, torch.device("cpu"), cpu_kernels=pack)
        assert any(isinstance(mod, packed_linear.PackedLinear) for mod in lm.model.modules()) == pack
        feats = features_for(lm, BUNNY, bunny_golden, names, "Describe this image in detail.")
        eng = CaptionEngine(lm, DecodeConfig(max_new_tokens=8), EngineOptions(max_batch_size=2))
        outs.append(({c.ref.key: c.token_ids for c in eng.run(feats)}, [f.prompt_embeds for f in feats]))
    assert outs[0][0] == outs[1][0]
    for a, b in zip(outs[0][1], outs[1][1]):
        # large-M GEMMs (729 vision tokens) may block the reduction differently: bf16 rounding only
        torch.testing.assert_close(a.float(), b.float(), atol=0.05, rtol=0.02)
