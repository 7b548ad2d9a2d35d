/* Guided feature diffusion of DQR for CPUs, channels last: features (B, S0, S1, S2, C), neighbour
 * values (B, S0, S1, S2, K) with K = k0 * k1 * k2 neighbours in itertools.product order of the
 * offsets (a 2d map is S0 = 1, k0 = 1). Every position reads its neighbours' C-vectors straight from
 * the feature map, so nothing of size K * C per position is ever formed and each step is one pass.
 * Out-of-image neighbours are skipped: their cosine is written as 0 (the caller masks them) and they
 * add nothing to the weighted sum (their weight is 0). Slices [slice_begin, slice_end) of the
 * flattened (B, S0) grid are processed, so that callers can split them among threads.
 */
#include <stdint.h>

#define DEFINE_DIFFUSION(SUFFIX, T)                                                                   \
    /* cosine[i, k] = <phi_i, phi_j(k)> of unit vectors phi */                                        \
    void dsm_neighbour_cosine_##SUFFIX(const T *phi, T *cosine, int64_t S0, int64_t S1, int64_t S2,   \
                                       int64_t C, int64_t k0, int64_t k1, int64_t k2,                 \
                                       int64_t slice_begin, int64_t slice_end)                        \
    {                                                                                                 \
        const int64_t K = k0 * k1 * k2;                                                               \
        for (int64_t slice = slice_begin; slice < slice_end; ++slice) {                               \
            const int64_t b = slice / S0, s0 = slice % S0;                                            \
            for (int64_t s1 = 0; s1 < S1; ++s1)                                                       \
                for (int64_t s2 = 0; s2 < S2; ++s2) {                                                 \
                    const int64_t i = ((b * S0 + s0) * S1 + s1) * S2 + s2;                            \
                    const T *pi = phi + i * C;                                                        \
                    T *out = cosine + i * K;                                                          \
                    int64_t k = 0;                                                                    \
                    for (int64_t a = 0; a < k0; ++a)                                                  \
                        for (int64_t c = 0; c < k1; ++c)                                              \
                            for (int64_t e = 0; e < k2; ++e, ++k) {                                   \
                                const int64_t z = s0 + a - k0 / 2, y = s1 + c - k1 / 2;               \
                                const int64_t x = s2 + e - k2 / 2;                                    \
                                T dot = 0;                                                            \
                                if (z >= 0 && z < S0 && y >= 0 && y < S1 && x >= 0 && x < S2) {       \
                                    const T *pj = phi + (((b * S0 + z) * S1 + y) * S2 + x) * C;       \
                                    _Pragma("omp simd reduction(+ : dot)")                            \
                                    for (int64_t ch = 0; ch < C; ++ch)                                \
                                        dot += pi[ch] * pj[ch];                                       \
                                }                                                             \
                                out[k] = dot;                                                         \
                            }                                                                         \
                }                                                                                     \
        }                                                                                             \
    }                                                                                                 \
                                                                                                      \
    /* out_i = f_i + step * (sum_k w_ik f_j(k) - f_i sum_k w_ik) */                                   \
    void dsm_diffusion_step_##SUFFIX(const T *f, const T *w, T step, T *out, int64_t S0, int64_t S1,  \
                                     int64_t S2, int64_t C, int64_t k0, int64_t k1, int64_t k2,       \
                                     int64_t slice_begin, int64_t slice_end)                          \
    {                                                                                                 \
        const int64_t K = k0 * k1 * k2;                                                               \
        for (int64_t slice = slice_begin; slice < slice_end; ++slice) {                               \
            const int64_t b = slice / S0, s0 = slice % S0;                                            \
            for (int64_t s1 = 0; s1 < S1; ++s1)                                                       \
                for (int64_t s2 = 0; s2 < S2; ++s2) {                                                 \
                    const int64_t i = ((b * S0 + s0) * S1 + s1) * S2 + s2;                            \
                    const T *fi = f + i * C, *wi = w + i * K;                                         \
                    T *oi = out + i * C;                                                              \
                    T total = 0;                                                                      \
                    for (int64_t k = 0; k < K; ++k)                                                   \
                        total += wi[k];                                                               \
                    _Pragma("omp simd") for (int64_t ch = 0; ch < C; ++ch) oi[ch] = 0;                \
                    int64_t k = 0;                                                                    \
                    for (int64_t a = 0; a < k0; ++a)                                                  \
                        for (int64_t c = 0; c < k1; ++c)                                              \
                            for (int64_t e = 0; e < k2; ++e, ++k) {                                   \
                                const int64_t z = s0 + a - k0 / 2, y = s1 + c - k1 / 2;               \
                                const int64_t x = s2 + e - k2 / 2;                                    \
                                if (z >= 0 && z < S0 && y >= 0 && y < S1 && x >= 0 && x < S2) {       \
                                    const T *fj = f + (((b * S0 + z) * S1 + y) * S2 + x) * C;         \
                                    const T wk = wi[k];                                               \
                                    _Pragma("omp simd") for (int64_t ch = 0; ch < C; ++ch)            \
                                        oi[ch] += wk * fj[ch];                                        \
                                }                                                                     \
                            }                                                                         \
                    _Pragma("omp simd") for (int64_t ch = 0; ch < C; ++ch)                            \
                        oi[ch] = fi[ch] + step * (oi[ch] - fi[ch] * total);                           \
                }                                                                                     \
        }                                                                                             \
    }

DEFINE_DIFFUSION(f32, float)
DEFINE_DIFFUSION(f64, double)
