// Decode attention on CPU: one query token per row against that row's KV-cache prefix.
//
// Why a kernel of our own: PyTorch's CPU paths for this shape (q_len = 1, many small batched
// GEMVs over a strided cache) run far below memory bandwidth — SDPA and bmm alike — so at batch
// 16 and an 800-token context the attention of one decode step costs several times the time it
// takes to read the cache. This kernel reads every K and V row of the prefix once, widens to fp32
// in registers, does an fp32 softmax and accumulation, and is parallel over (row, head).
//
// Shapes: q [B, H, D]; k, v [S, H, L, D] (rows 0..B-1 are the batch; any row/head/position
// strides, unit stride on D); lengths [B] (positions attended: 0..len-1). q/k/v are all fp32 or
// all bf16; the output has q's dtype.
//
// Variants by ISA (models/kernels/build.py compiles this file once per ISA): the AVX2 code below
// is the baseline; with AVX-512-BF16 the bf16 case uses dpbf16 dot products instead.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace vlmcap {
namespace {

inline float bf16_to_f32(uint16_t x) {
    const uint32_t u = static_cast<uint32_t>(x) << 16;
    float f;
    std::memcpy(&f, &u, sizeof(f));
    return f;
}

inline uint16_t f32_to_bf16(float f) {         // round to nearest even, as a bf16 cast does
    uint32_t u;
    std::memcpy(&u, &f, sizeof(u));
    return static_cast<uint16_t>((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

template <typename T> struct Lanes;
template <> struct Lanes<float> {
    static __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
    static float one(float v) { return v; }
};
template <> struct Lanes<uint16_t> {            // bf16 storage
    static __m256 load8(const uint16_t* p) {
        return _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
    }
    static float one(uint16_t v) { return bf16_to_f32(v); }
};

// s[t] = dot(q, k_t) for t < n; q is fp32. Four positions at a time with independent
// accumulators: one dot alone is a latency-bound FMA chain.
template <typename T>
void scores(const float* q, const T* k, int64_t ks, int64_t n, int64_t D, float* s) {
    int64_t t = 0;
    if (D % 8 == 0) {
        for (; t + 4 <= n; t += 4) {
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),
                   a3 = _mm256_setzero_ps();
            const T* k0 = k + t * ks;
            for (int64_t d = 0; d < D; d += 8) {
                const __m256 qv = _mm256_loadu_ps(q + d);
                a0 = _mm256_fmadd_ps(qv, Lanes<T>::load8(k0 + d), a0);
                a1 = _mm256_fmadd_ps(qv, Lanes<T>::load8(k0 + ks + d), a1);
                a2 = _mm256_fmadd_ps(qv, Lanes<T>::load8(k0 + 2 * ks + d), a2);
                a3 = _mm256_fmadd_ps(qv, Lanes<T>::load8(k0 + 3 * ks + d), a3);
            }
            s[t] = hsum(a0);
            s[t + 1] = hsum(a1);
            s[t + 2] = hsum(a2);
            s[t + 3] = hsum(a3);
        }
    }
    for (; t < n; ++t) {
        const T* kr = k + t * ks;
        float dot = 0.f;
        for (int64_t d = 0; d < D; ++d) dot += q[d] * Lanes<T>::one(kr[d]);
        s[t] = dot;
    }
}

// out[0:D] = sum_t p[t] * v_t[0:D]; accumulators stay in registers across t (64 lanes a pass).
template <typename T>
void weighted_sum(const float* p, const T* v, int64_t vs, int64_t n, int64_t D, float* out) {
    if (D % 8 == 0) {
        for (int64_t d0 = 0; d0 < D; d0 += 64) {
            const int w = (D - d0) < 64 ? static_cast<int>((D - d0) / 8) : 8;
            __m256 acc[8];
            for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
            for (int64_t t = 0; t < n; ++t) {
                const __m256 pv = _mm256_set1_ps(p[t]);
                const T* vr = v + t * vs + d0;
                for (int j = 0; j < w; ++j) acc[j] = _mm256_fmadd_ps(pv, Lanes<T>::load8(vr + 8 * j), acc[j]);
            }
            for (int j = 0; j < w; ++j) _mm256_storeu_ps(out + d0 + 8 * j, acc[j]);
        }
        return;
    }
    std::fill(out, out + D, 0.f);
    for (int64_t t = 0; t < n; ++t)
        for (int64_t d = 0; d < D; ++d) out[d] += p[t] * Lanes<T>::one(v[t * vs + d]);
}

#if defined(__AVX512F__) && defined(__AVX512BF16__)
// bf16 x bf16 dot products with dpbf16 (products exact in fp32, pairwise accumulation).
bool scores_dpbf16(const uint16_t* q, const uint16_t* k, int64_t ks, int64_t n, int64_t D, float* s) {
    if (D % 32 != 0) return false;
    int64_t t = 0;
    for (; t + 4 <= n; t += 4) {
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
        const uint16_t* k0 = k + t * ks;
        for (int64_t d = 0; d < D; d += 32) {
            __m512bh qv = (__m512bh)_mm512_loadu_si512(q + d);
            a0 = _mm512_dpbf16_ps(a0, qv, (__m512bh)_mm512_loadu_si512(k0 + d));
            a1 = _mm512_dpbf16_ps(a1, qv, (__m512bh)_mm512_loadu_si512(k0 + ks + d));
            a2 = _mm512_dpbf16_ps(a2, qv, (__m512bh)_mm512_loadu_si512(k0 + 2 * ks + d));
            a3 = _mm512_dpbf16_ps(a3, qv, (__m512bh)_mm512_loadu_si512(k0 + 3 * ks + d));
        }
        s[t] = _mm512_reduce_add_ps(a0);
        s[t + 1] = _mm512_reduce_add_ps(a1);
        s[t + 2] = _mm512_reduce_add_ps(a2);
        s[t + 3] = _mm512_reduce_add_ps(a3);
    }
    for (; t < n; ++t) {
        const uint16_t* kr = k + t * ks;
        float dot = 0.f;
        for (int64_t d = 0; d < D; ++d) dot += bf16_to_f32(q[d]) * bf16_to_f32(kr[d]);
        s[t] = dot;
    }
    return true;
}
#endif

// p[0:n] = softmax(scale * s[0:n]) in place.
void softmax(float* s, int64_t n, float scale) {
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t t = 0; t < n; ++t) {
        s[t] *= scale;                        // scale after the dot, in fp32
        m = s[t] > m ? s[t] : m;
    }
    float sum = 0.f;
    for (int64_t t = 0; t < n; ++t) {
        s[t] = std::exp(s[t] - m);
        sum += s[t];
    }
    const float inv = 1.f / sum;
    for (int64_t t = 0; t < n; ++t) s[t] *= inv;
}

template <typename T>
void run(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const int64_t* lp, float scale,
         torch::Tensor& out) {
    const int64_t B = q.size(0), H = q.size(1), D = q.size(2), L = k.size(2);
    const T* qd = reinterpret_cast<const T*>(q.data_ptr());
    const T* kd = reinterpret_cast<const T*>(k.data_ptr());
    const T* vd = reinterpret_cast<const T*>(v.data_ptr());
    T* od = reinterpret_cast<T*>(out.data_ptr());
    const int64_t qs0 = q.stride(0), qs1 = q.stride(1);
    const int64_t ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2);
    const int64_t vs0 = v.stride(0), vs1 = v.stride(1), vs2 = v.stride(2);
    // Grain: ~2^16 multiply-adds per task (two passes over len x D), so a short or tiny attention
    // runs on one thread instead of paying for waking the pool.
    int64_t total = 0;
    for (int64_t b = 0; b < B; ++b) total += lp[b];
    const int64_t per_item = std::max<int64_t>(1, 2 * D * total / B);
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / per_item);
    at::parallel_for(0, B * H, grain, [&](int64_t begin, int64_t end) {
        std::vector<float> acc(D), s(L), qf(D);
        for (int64_t i = begin; i < end; ++i) {
            const int64_t b = i / H, h = i % H, n = lp[b];
            const T* qp = qd + b * qs0 + h * qs1;
            const T* kp = kd + b * ks0 + h * ks1;
            bool done = false;
#if defined(__AVX512F__) && defined(__AVX512BF16__)
            if constexpr (std::is_same<T, uint16_t>::value) done = scores_dpbf16(qp, kp, ks2, n, D, s.data());
#endif
            if (!done) {
                for (int64_t d = 0; d < D; ++d) qf[d] = Lanes<T>::one(qp[d]);
                scores<T>(qf.data(), kp, ks2, n, D, s.data());
            }
            softmax(s.data(), n, scale);
            weighted_sum<T>(s.data(), vd + b * vs0 + h * vs1, vs2, n, D, acc.data());
            T* op = od + (b * H + h) * D;
            if constexpr (std::is_same<T, float>::value) {
                std::memcpy(op, acc.data(), sizeof(float) * D);
            } else {
                for (int64_t d = 0; d < D; ++d) op[d] = f32_to_bf16(acc[d]);
            }
        }
    });
}

}  // namespace

torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor lengths, double scale) {
    const auto dt = q.scalar_type();
    TORCH_CHECK((dt == torch::kBFloat16 || dt == torch::kFloat32) && k.scalar_type() == dt && v.scalar_type() == dt,
                "decode_attention: q, k, v must all be fp32 or all bf16");
    TORCH_CHECK(q.dim() == 3 && k.dim() == 4 && v.dim() == 4, "decode_attention: q [B,H,D], k/v [S,H,L,D]");
    TORCH_CHECK(q.stride(2) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "decode_attention: D must be contiguous");
    const int64_t B = q.size(0), H = q.size(1), D = q.size(2), L = k.size(2);
    TORCH_CHECK(k.size(0) >= B && k.size(1) == H && k.size(3) == D && v.sizes() == k.sizes(),
                "decode_attention: cache shape mismatch");
    auto len = lengths.to(torch::kLong).contiguous();
    TORCH_CHECK(len.numel() == B, "decode_attention: one length per row");
    const int64_t* lp = len.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) TORCH_CHECK(lp[b] >= 1 && lp[b] <= L, "decode_attention: bad length");
    auto out = torch::empty({B, H, D}, q.options());
    if (dt == torch::kFloat32) {
        run<float>(q, k, v, lp, static_cast<float>(scale), out);
    } else {
        run<uint16_t>(q, k, v, lp, static_cast<float>(scale), out);
    }
    return out;
}

}  // namespace vlmcap
