"""The KV-cached path equals a full forward without cache, for both decoder knob sets."""

from __future__ import annotations

import pytest
import torch

from models.decoder import Decoder, DecoderConfig, residual_scale
from models.kv_cache import CacheShape, KVCache

QWEN = DecoderConfig(vocab_size=97, hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=4, intermediate_size=96,
                     rms_eps=1e-6, rope_theta=1e6, max_position=256, qkv_bias=True)
MINICPM = DecoderConfig(vocab_size=97, hidden_size=80, n_layers=3, n_heads=5, n_kv_heads=5, intermediate_size=96,
                        rms_eps=1e-5, rope_theta=1e4, max_position=256, rope_fp32=True, scale_emb=12.0,
                        residual_scale=residual_scale(1.4, 3), logit_divisor=80 / 64)


def _model(cfg: DecoderConfig) -> Decoder:
    torch.manual_seed(0)
    m = Decoder(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2)
    return m.eval()


@pytest.mark.parametrize("cfg", [QWEN, MINICPM], ids=["qwen2", "minicpm"])
def test_prefill_plus_cached_steps_equals_full_forward(cfg):
    m = _model(cfg)
    L, N = 11, 6
    ids = torch.randint(0, cfg.vocab_size, (1, L + N))
    with torch.inference_mode():
        full = m.logits(m(m.embed(ids), torch.arange(L + N)[None]))[0]                 # [L+N, V]
        cache = KVCache(CacheShape(cfg.n_layers, 1, cfg.n_kv_heads, 64, cfg.head_dim), torch.float32)
        pre = m.logits(m(m.embed(ids[:, :L]), torch.arange(L)[None], cache))[0]
        torch.testing.assert_close(pre, full[:L], atol=1e-5, rtol=1e-5)
        for t in range(N):
            pos = L + t
            h = m(m.embed(ids[:, pos])[:, None], torch.tensor([pos]), cache, kv_len=32)
            torch.testing.assert_close(m.logits(h[:, 0])[0], full[pos], atol=1e-5, rtol=1e-5)


def test_batched_decode_rows_at_different_positions():
    """Two rows of different lengths decoded in one step equal each row decoded alone."""
    cfg = QWEN
    m = _model(cfg)
    lens = [5, 9]
    seqs = [torch.randint(0, cfg.vocab_size, (n + 1,)) for n in lens]
    with torch.inference_mode():
        cache = KVCache(CacheShape(cfg.n_layers, 2, cfg.n_kv_heads, 32, cfg.head_dim), torch.float32)
        x = torch.zeros(2, max(lens), cfg.hidden_size)
        for i, (n, s) in enumerate(zip(lens, seqs)):
            x[i, :n] = m.embed(s[:n])
        m(x, torch.arange(max(lens)).expand(2, -1), cache, slots=torch.tensor([0, 1]))
        last = torch.stack([s[-1] for s in seqs])
        h = m(m.embed(last)[:, None], torch.tensor(lens), cache, kv_len=16)
        batched = m.logits(h[:, 0])
        for i, s in enumerate(seqs):
            alone = m.logits(m(m.embed(s)[None], torch.arange(len(s))[None]))[0, -1]
            torch.testing.assert_close(batched[i], alone, atol=1e-5, rtol=1e-5)


def test_mup_knobs_change_the_output():
    """Guard against knobs silently ignored: MiniCPM scales must matter."""
    m = _model(MINICPM)
    plain = Decoder(DecoderConfig(**{**MINICPM.__dict__, "scale_emb": 1.0, "residual_scale": 1.0, "logit_divisor": 1.0}))
    plain.load_state_dict(m.state_dict())
    ids = torch.randint(0, 97, (1, 7))
    with torch.inference_mode():
        a = m.logits(m(m.embed(ids), torch.arange(7)[None]))
        b = plain.logits(plain(plain.embed(ids), torch.arange(7)[None]))
    assert (a - b).abs().max() > 1e-2
