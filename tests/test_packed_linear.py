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

from pipeline.device import CpuKernels, cpu_info

needs_native_bf16 = pytest.mark.skipif(
    not (packed_linear.available() and cpu_info().native_bf16),
    reason=f"oneDNN's bf16 weight reorder needs native bf16 (AVX-512 BF16); this CPU: {cpu_info().describe()}")


def test_packing_falls_back_to_linear_where_onednn_refuses(monkeypatch, caplog):
    """Runs on every CPU: where the reorder is refused (plain AVX2, or simulated on AVX-512) the
    model keeps nn.Linear, with one warning, instead of failing to load."""
    if cpu_info().native_bf16:
        def refuse(self, linear, batch_hint):
            raise RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx_ne_convert")
        monkeypatch.setattr(packed_linear.PackedLinear, "__init__", refuse)
    m = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 8)).to(torch.bfloat16)
    assert packed_linear.pack_linears(m) == 0
    assert [type(x) for x in m] == [nn.Linear, nn.Linear]
    assert sum("packing unavailable" in r.message for r in caplog.records) == 1


@needs_native_bf16
@pytest.mark.parametrize("m", [1, 5, 70])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_equals_linear(m, bias):
    torch.manual_seed(0)
    lin = nn.Linear(96, 40, bias=bias).to(torch.bfloat16)
    x = torch.randn(2, m, 96).to(torch.bfloat16)
    packed = packed_linear.PackedLinear(lin, batch_hint=16)
    with torch.inference_mode():
        assert torch.equal(packed(x), lin(x))


@needs_native_bf16
def test_packed_model_generates_the_same_tokens(bunny_golden):
    names = ["rgb_640x480", "rgb_2000x500"]
    outs = []
    for pack in (False, True):
        kernels = CpuKernels(isa=cpu_info().isa, linear="onednn-bf16", attention="sdpa") if pack else None
        lm = load_model(BUNNY / "checkpoint", torch.bfloat16, torch.device("cpu"), kernels=kernels)
        assert any(isinstance(mod, packed_linear.PackedLinear) for mod in lm.model.modules()) == pack
        feats = features_for(lm, BUNNY, bunny_golden, names, "Describe this image in detail.")
        eng = CaptionEngine(lm, DecodeConfig(max_new_tokens=8), EngineOptions(max_batch_size=2))
        outs.append(({c.ref.key: c.token_ids for c in eng.run(feats)}, [f.prompt_embeds for f in feats]))
    assert outs[0][0] == outs[1][0]
    for a, b in zip(outs[0][1], outs[1][1]):
        # large-M GEMMs (729 vision tokens) may block the reduction differently: bf16 rounding only
        torch.testing.assert_close(a.float(), b.float(), atol=0.05, rtol=0.02)
