"""Our CPU kernels (models/kernels): the widening GEMM and decode attention, on generated inputs.

Each runs at the ISA level this CPU has (avx2 or avx512bf16), and the AVX2 build is also checked
on AVX-512 machines (the `isa` fixture), so every CI CPU exercises the AVX2 code. The fast path
must equal the plain path: the GEMM against a float64 reference, and bitwise batched == alone.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from models.kernels import build
from models.kernels.attention import decode_attention
from models.kernels.linear import WideningLinear, pack_panels, unpack_panels, widen_linears
from pipeline.device import ISA_LEVELS, cpu_info

NATIVE = cpu_info().native_isa
LEVELS = [lvl for lvl in ISA_LEVELS[1:] if ISA_LEVELS.index(lvl) <= ISA_LEVELS.index(NATIVE)]
pytestmark = pytest.mark.skipif(not LEVELS, reason=f"no AVX2 on this CPU ({cpu_info().describe()})")
PROFILE = settings(max_examples=40, deadline=None, derandomize=True,
                   suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module", params=LEVELS)
def ops(request):
    mod = build.load(request.param)
    if mod is None:
        pytest.fail(f"the {request.param} kernels did not build on a CPU that supports them")
    return mod


def _close_to_f64(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    # fp32 accumulation over K terms: error ~ K * eps * sum|x_k w_k|
    bound = 4 * x.shape[-1] * 2**-24 * (x.double().abs() @ w.double().abs().T) + 1e-30
    assert ((y.double() - ref).abs() <= bound + (0 if b is None else 2**-24 * b.double().abs())).all()


@PROFILE
@given(m=st.integers(1, 23), k=st.integers(1, 300), n=st.integers(1, 70), bias=st.booleans(),
       wdtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), seed=st.integers(0, 2**31 - 1))
def test_widening_linear_is_fp32_math_on_the_stored_weights(ops, m, k, n, bias, wdtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g).to(wdtype)
    b = torch.randn(n, generator=g) if bias else None
    x = torch.randn(m, k, generator=g)
    y = ops.widening_linear(x, pack_panels(w), b, n)
    assert y.shape == (m, n) and y.dtype == torch.float32
    _close_to_f64(y, x, w, b)
    # batched == alone, bitwise: every row is one FMA chain in the same order, whatever M is
    alone = torch.cat([ops.widening_linear(x[i:i + 1].contiguous(), pack_panels(w), b, n) for i in range(m)])
    assert torch.equal(y, alone)


def test_widening_linear_module_matches_nn_linear_and_unpacks(ops):
    torch.manual_seed(0)
    lin = nn.Linear(70, 37).to(torch.bfloat16)
    wide = WideningLinear(lin, ops)
    assert torch.equal(wide.dense_weight(), lin.weight.detach())
    assert torch.equal(unpack_panels(pack_panels(lin.weight.detach()), 37), lin.weight.detach())
    x = torch.randn(2, 5, 70)
    ref = F.linear(x.double(), lin.weight.double(), lin.bias.double()).float()
    torch.testing.assert_close(wide(x), ref, atol=1e-5, rtol=1e-5)
    seq = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 4).half())
    assert widen_linears(seq, ops) == {"float32": 1, "float16": 1}
    assert all(type(mod) is not nn.Linear for mod in seq.modules())


def test_widening_linear_rejects_bad_inputs(ops):
    w = pack_panels(torch.randn(16, 8))
    with pytest.raises(RuntimeError, match="fp32"):
        ops.widening_linear(torch.randn(2, 8).double(), w, None, 16)
    with pytest.raises(RuntimeError, match="K=9"):
        ops.widening_linear(torch.randn(2, 9), w, None, 16)
    with pytest.raises(RuntimeError, match="bf16"):
        ops.widening_linear(torch.randn(2, 8), pack_panels(torch.randn(16, 8).to(torch.int16)), None, 16)


# -- decode attention ----------------------------------------------------------------------------

def _sdpa(q, kc, vc, lengths):
    B, kv = q.shape[0], int(lengths.max())
    mask = (torch.arange(kv)[None, :] < lengths[:, None])[:, None, None, :]
    return F.scaled_dot_product_attention(q.double(), kc[:B, :, :kv].double(), vc[:B, :, :kv].double(),
                                          attn_mask=mask)


@PROFILE
@given(batch=st.integers(1, 5), heads=st.integers(1, 3), head_dim=st.sampled_from([8, 16, 33, 64, 80, 128]),
       extra_slots=st.integers(0, 2), cap=st.integers(1, 90), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       seed=st.integers(0, 2**31 - 1))
def test_decode_attention_matches_sdpa(ops, batch, heads, head_dim, extra_slots, cap, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    S, L = batch + extra_slots, cap
    kc = torch.randn(S, heads, L, head_dim, generator=g).to(dtype)
    vc = torch.randn(S, heads, L, head_dim, generator=g).to(dtype)
    q = torch.randn(batch, heads, 1, head_dim, generator=g).to(dtype)
    lengths = torch.randint(1, L + 1, (batch,), generator=g)
    out = decode_attention(ops)(q, kc, vc, lengths, head_dim ** -0.5)
    assert out.shape == (batch, heads, 1, head_dim) and out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.double(), _sdpa(q, kc, vc, lengths), atol=tol, rtol=tol)


def test_rows_only_see_their_own_prefix(ops):
    """Garbage beyond a row's length (a recycled slot) must not change its output."""
    for dtype in (torch.float32, torch.bfloat16):
        S, H, L, D = 2, 2, 16, 64
        kc = torch.randn(S, H, L, D).to(dtype)
        vc = torch.randn(S, H, L, D).to(dtype)
        q = torch.randn(2, H, 1, D).to(dtype)
        lengths = torch.tensor([5, 9])
        a = decode_attention(ops)(q, kc, vc, lengths, 0.125)
        kc[:, :, 10:] = 1e4
        vc[:, :, 10:] = float("nan")
        kc[0, :, 5:] = -7.0
        assert torch.equal(a, decode_attention(ops)(q, kc, vc, lengths, 0.125))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoder_with_kernel_matches_sdpa(ops, dtype):
    from models.decoder import Decoder, DecoderConfig
    from models.kv_cache import CacheShape, KVCache

    cfg = DecoderConfig(vocab_size=50, hidden_size=128, n_layers=2, n_heads=2, n_kv_heads=2, intermediate_size=64,
                        rms_eps=1e-6, rope_theta=1e4, max_position=128, qkv_bias=True)
    torch.manual_seed(0)
    m = Decoder(cfg).to(dtype).eval()
    ids = torch.randint(0, 50, (2, 12))
    outs = []
    for kernel in (None, decode_attention(ops)):
        m.decode_attention = kernel
        cache = KVCache(CacheShape(2, 2, 2, 32, 64), dtype)
        with torch.inference_mode():
            m(m.embed(ids[:, :10]), torch.arange(10).expand(2, -1), cache, slots=torch.tensor([0, 1]), kv_len=10)
            h = m(m.embed(ids[:, 10])[:, None], torch.tensor([10, 10]), cache, kv_len=32)
            outs.append(m.logits(h[:, 0]))
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.1, rtol=0.05)
    torch.testing.assert_close(outs[0], outs[1], **tol)
    assert outs[0].argmax(-1).equal(outs[1].argmax(-1))
