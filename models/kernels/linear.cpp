// Widening GEMM for fp32 inference on CPU: y[M, N] = x[M, K] @ W[N, K]^T (+ b), fp32 in and out,
// with W kept in the width the checkpoint stored it in (bf16 or fp16; fp32 also accepted) and
// widened to fp32 in registers. Upcasting a bf16/fp16 value to fp32 is exact, so this is the fp32
// computation over the checkpoint's values while reading half the weight bytes: batch-1 decode is
// bound by weight bandwidth, and that is where it doubles the speed of a dense fp32 weight.
//
// Layout: W is packed once at load time into panels of NR = 16 output columns,
//     wp[N/16][K][16]   (N padded to a multiple of 16 with zero rows),
// so the micro-kernel reads one contiguous 16-wide row of the panel per k and the whole weight is
// one forward stream. The micro-kernel keeps an MR x 16 tile of outputs in registers (MR = 4:
// 8 accumulators + 2 weight vectors + 1 broadcast of AVX2's 16 ymm registers) and does one
// FMA chain per output over k = 0..K-1 in order. So every output is computed the same way whatever
// M is and whichever tile its row lands in: a row's result is bitwise independent of the other
// rows of the batch (batched == alone), and of the thread count.
// Speed (Zen 3, one core): ~65 GFLOP/s at large M, about what MKL and oneDNN reach on this CPU.
//
// Parallel over panels (ATen's thread pool). Compiled per ISA (see models/kernels/build.py); this
// file needs AVX2 + FMA + F16C.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace vlmcap {
namespace {

constexpr int NR = 16;
constexpr int MR = 4;     // rows per micro-tile: 8 accumulators; 4x16 measured faster than 6x16 on Zen 3
constexpr int64_t MB = 256;   // rows per cache block of x

enum class W { F32, BF16, F16 };

// 16 consecutive weights of one panel row -> two fp32 vectors (lanes 0-7, 8-15).
template <W T>
inline void load16(const void* p, __m256& lo, __m256& hi);

template <>
inline void load16<W::F32>(const void* p, __m256& lo, __m256& hi) {
    const float* f = static_cast<const float*>(p);
    lo = _mm256_loadu_ps(f);
    hi = _mm256_loadu_ps(f + 8);
}

template <>
inline void load16<W::BF16>(const void* p, __m256& lo, __m256& hi) {
    // bf16 is the top half of an fp32: zero-extend to 32 bits and shift left by 16 (exact).
    const __m128i* q = static_cast<const __m128i*>(p);
    lo = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(q)), 16));
    hi = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(q + 1)), 16));
}

template <>
inline void load16<W::F16>(const void* p, __m256& lo, __m256& hi) {
    const __m128i* q = static_cast<const __m128i*>(p);
    lo = _mm256_cvtph_ps(_mm_loadu_si128(q));        // F16C: exact widening
    hi = _mm256_cvtph_ps(_mm_loadu_si128(q + 1));
}

template <W T>
constexpr int64_t elem_bytes() { return T == W::F32 ? 4 : 2; }

// c[R][16] = bias + sum_k x[r, k] * w[k, 0:16] for one panel; x rows are ldx apart.
// The accumulators are named variables, not an array: GCC keeps an array of __m256 in memory and
// stores it back on every k (measured: half the speed).
#define VLMCAP_ROWS(F) F(0) F(1) F(2) F(3)
template <W T, int R>
inline void tile(const float* x, int64_t ldx, const uint8_t* panel, int64_t K, const float* bias16,
                 float* c, int64_t ldc, int ncols) {
    static_assert(R >= 1 && R <= MR, "tile rows");
    __m256 b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps();
    if (bias16 != nullptr) {
        b0 = _mm256_loadu_ps(bias16);
        b1 = _mm256_loadu_ps(bias16 + 8);
    }
#define VLMCAP_DECL(r) __m256 a##r##0 = b0, a##r##1 = b1; const float* x##r = x + (r) * ldx;
    VLMCAP_ROWS(VLMCAP_DECL)
    constexpr int64_t row_bytes = NR * elem_bytes<T>();
    for (int64_t k = 0; k < K; ++k) {
        __m256 w0, w1;
        load16<T>(panel + k * row_bytes, w0, w1);
#define VLMCAP_STEP(r)                                               \
        if constexpr (R > (r)) {                                     \
            const __m256 xv = _mm256_broadcast_ss(x##r + k);         \
            a##r##0 = _mm256_fmadd_ps(xv, w0, a##r##0);              \
            a##r##1 = _mm256_fmadd_ps(xv, w1, a##r##1);              \
        }
        VLMCAP_ROWS(VLMCAP_STEP)
    }
    alignas(32) float tmp[NR];
#define VLMCAP_STORE(r)                                              \
    if constexpr (R > (r)) {                                         \
        if (ncols == NR) {                                           \
            _mm256_storeu_ps(c + (r) * ldc, a##r##0);                \
            _mm256_storeu_ps(c + (r) * ldc + 8, a##r##1);            \
        } else {                   /* the last, partial panel */     \
            _mm256_store_ps(tmp, a##r##0);                           \
            _mm256_store_ps(tmp + 8, a##r##1);                       \
            std::memcpy(c + (r) * ldc, tmp, sizeof(float) * ncols);  \
        }                                                            \
    }
    VLMCAP_ROWS(VLMCAP_STORE)
#undef VLMCAP_DECL
#undef VLMCAP_STEP
#undef VLMCAP_STORE
}
#undef VLMCAP_ROWS

template <W T>
void gemm(const float* x, int64_t M, int64_t K, const uint8_t* wp, const float* bias, int64_t N, float* y) {
    const int64_t panels = (N + NR - 1) / NR;
    const int64_t panel_bytes = K * NR * elem_bytes<T>();
    // Rows in blocks of MB so the block of x (MB x K fp32, <= ~4 MB) stays in cache while every
    // panel of the weight streams past it; decode batches are a single block.
    for (int64_t m0 = 0; m0 < M; m0 += MB) {
        const int64_t m1 = std::min(M, m0 + MB);
        // Grain: enough multiply-adds per task (~2^17) that a small layer runs on one thread —
        // waking the pool costs more than it saves there, and far more on a busy machine.
        const int64_t grain = std::max<int64_t>(4, (int64_t(1) << 17) / std::max<int64_t>(1, (m1 - m0) * K * NR));
        at::parallel_for(0, panels, grain, [&](int64_t p0, int64_t p1) {
            alignas(32) float bias_pad[NR];
            for (int64_t p = p0; p < p1; ++p) {
                const int64_t n0 = p * NR;
                const int ncols = static_cast<int>(std::min<int64_t>(NR, N - n0));
                const float* b16 = nullptr;
                if (bias != nullptr) {
                    std::fill(bias_pad, bias_pad + NR, 0.f);
                    std::memcpy(bias_pad, bias + n0, sizeof(float) * ncols);
                    b16 = bias_pad;
                }
                const uint8_t* panel = wp + p * panel_bytes;
                int64_t m = m0;
                for (; m + MR <= m1; m += MR)
                    tile<T, MR>(x + m * K, K, panel, K, b16, y + m * N + n0, N, ncols);
                const float* xm = x + m * K;
                float* ym = y + m * N + n0;
                switch (m1 - m) {
                    case 3: tile<T, 3>(xm, K, panel, K, b16, ym, N, ncols); break;
                    case 2: tile<T, 2>(xm, K, panel, K, b16, ym, N, ncols); break;
                    case 1: tile<T, 1>(xm, K, panel, K, b16, ym, N, ncols); break;
                    default: break;
                }
            }
        });
    }
}

}  // namespace

// x [M, K] fp32 contiguous; wp [ceil(N/16), K, 16] fp32|bf16|fp16 contiguous; bias [N] fp32 or
// None; returns [M, N] fp32.
torch::Tensor widening_linear(torch::Tensor x, torch::Tensor wp, c10::optional<torch::Tensor> bias, int64_t N) {
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
                "widening_linear: x must be a contiguous fp32 [M, K] matrix");
    TORCH_CHECK(wp.dim() == 3 && wp.size(2) == NR && wp.is_contiguous(), "widening_linear: bad weight panels");
    const int64_t M = x.size(0), K = x.size(1);
    TORCH_CHECK(wp.size(1) == K, "widening_linear: x has K=", K, " but the weight ", wp.size(1));
    TORCH_CHECK(wp.size(0) == (N + NR - 1) / NR, "widening_linear: panel count does not match N=", N);
    const float* b = nullptr;
    if (bias.has_value() && bias->defined()) {
        TORCH_CHECK(bias->scalar_type() == torch::kFloat32 && bias->is_contiguous() && bias->numel() == N,
                    "widening_linear: bias must be a contiguous fp32 [N] vector");
        b = bias->data_ptr<float>();
    }
    auto y = torch::empty({M, N}, x.options());
    if (M == 0) return y;
    const uint8_t* w = static_cast<const uint8_t*>(wp.data_ptr());
    switch (wp.scalar_type()) {
        case torch::kFloat32: gemm<W::F32>(x.data_ptr<float>(), M, K, w, b, N, y.data_ptr<float>()); break;
        case torch::kBFloat16: gemm<W::BF16>(x.data_ptr<float>(), M, K, w, b, N, y.data_ptr<float>()); break;
        case torch::kFloat16: gemm<W::F16>(x.data_ptr<float>(), M, K, w, b, N, y.data_ptr<float>()); break;
        default: TORCH_CHECK(false, "widening_linear: weights must be fp32, bf16 or fp16");
    }
    return y;
}

}  // namespace vlmcap
