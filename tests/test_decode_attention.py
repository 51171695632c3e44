"""The compiled CPU decode-attention kernel equals SDPA (bf16 rounding) and is used by the decoder."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import decode_attention as da

pytestmark = pytest.mark.skipif(da.load() is None, reason="no C++ toolchain for the kernel here")


def _sdpa(q, kc, vc, lengths):
    B, kv = q.shape[0], int(lengths.max())
    mask = (torch.arange(kv)[None, :] < lengths[:, None])[:, None, None, :]
    return F.scaled_dot_product_attention(q.float(), kc[:B, :, :kv].float(), vc[:B, :, :kv].float(), attn_mask=mask)


@pytest.mark.parametrize("head_dim", [64, 128, 80, 33])        # AVX-512 paths and the scalar fallback
@pytest.mark.parametrize("batch", [1, 3])
def test_kernel_matches_sdpa(head_dim, batch):
    torch.manual_seed(head_dim + batch)
    S, H, L = 4, 3, 70
    kc = torch.randn(S, H, L, head_dim).to(torch.bfloat16)
    vc = torch.randn(S, H, L, head_dim).to(torch.bfloat16)
    q = torch.randn(batch, H, 1, head_dim).to(torch.bfloat16)
    lengths = torch.tensor([1, 37, 70][:batch] if batch <= 3 else [5] * batch)
    out = da.decode_attention(q, kc, vc, lengths, head_dim ** -0.5)
    ref = _sdpa(q, kc, vc, lengths)
    assert out.shape == (batch, H, 1, head_dim) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def test_rows_only_see_their_own_prefix():
    """Garbage beyond a row's length (a recycled slot) must not change its output."""
    S, H, L, D = 2, 2, 16, 64
    kc = torch.randn(S, H, L, D).to(torch.bfloat16)
    vc = torch.randn(S, H, L, D).to(torch.bfloat16)
    q = torch.randn(2, H, 1, D).to(torch.bfloat16)
    lengths = torch.tensor([5, 9])
    a = da.decode_attention(q, kc, vc, lengths, 0.125)
    kc[:, :, 10:] = 1e4
    vc[:, :, 10:] = float("nan")
    kc[0, :, 5:] = -7.0
    b = da.decode_attention(q, kc, vc, lengths, 0.125)
    assert torch.equal(a, b)


def test_decoder_uses_kernel_and_matches_sdpa():
    from models.decoder import Decoder, DecoderConfig
    from models.kv_cache import CacheShape, KVCache

    cfg = DecoderConfig(vocab_size=50, hidden_size=128, n_layers=2, n_heads=2, n_kv_heads=2, intermediate_size=64,
                        rms_eps=1e-6, rope_theta=1e4, max_position=128, qkv_bias=True)
    torch.manual_seed(0)
    m = Decoder(cfg).to(torch.bfloat16).eval()
    ids = torch.randint(0, 50, (2, 12))
    outs = []
    for kernel in (None, da.decode_attention):
        m.decode_attention = kernel
        cache = KVCache(CacheShape(2, 2, 2, 32, 64), torch.bfloat16)
        with torch.inference_mode():
            m(m.embed(ids[:, :10]), torch.arange(10).expand(2, -1), cache, slots=torch.tensor([0, 1]), kv_len=10)
            h = m(m.embed(ids[:, 10])[:, None], torch.tensor([10, 10]), cache, kv_len=32)
            outs.append(m.logits(h[:, 0]))
    torch.testing.assert_close(outs[0], outs[1], atol=0.1, rtol=0.05)
    assert outs[0].argmax(-1).equal(outs[1].argmax(-1))
