/* Selective scan for CPUs with the semantics of mamba_ssm's selective_scan_fn, one (batch, channel)
 * row at a time, sequentially along the sequence:
 *
 *   dt_t = softplus?(delta_t + delta_bias),  h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t,  h_{-1} = 0,
 *   y_t = (<C_t, h_t> + D u_t) * silu(z_t).
 *
 * B and C come transposed to (batch, groups, L, N) so that the loop over the N states reads contiguous
 * memory and vectorises, the exponential included (libmvec's SIMD expf/exp under -ffast-math).
 * D, z and delta_bias may be NULL. Rows [row_begin, row_end) of the flattened (batch, dim) grid are
 * scanned, so that callers can split the rows among threads. Returns 0, or 1 when out of memory.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define DEFINE_SCAN(NAME, T, EXP, LOG1P)                                                             \
    int NAME(const T *u, const T *delta, const T *A, const T *Bt, const T *Ct, const T *D,           \
             const T *z, const T *delta_bias, T *y, int64_t dim, int64_t groups, int64_t N, int64_t L, \
             int64_t softplus, int64_t row_begin, int64_t row_end)                                    \
    {                                                                                                 \
        T *dts = malloc(L * sizeof(T)), *h = malloc(N * sizeof(T));                                   \
        if (!dts || !h) {                                                                             \
            free(dts);                                                                                \
            free(h);                                                                                  \
            return 1;                                                                                 \
        }                                                                                             \
        const int64_t heads = dim / groups;                                                           \
        for (int64_t r = row_begin; r < row_end; ++r) {                                               \
            const int64_t b = r / dim, d = r % dim, g = d / heads;                                    \
            const T *ur = u + r * L, *dr = delta + r * L, *Ad = A + d * N;                            \
            const T *Bg = Bt + (b * groups + g) * L * N, *Cg = Ct + (b * groups + g) * L * N;         \
            const T bias = delta_bias ? delta_bias[d] : 0, skip = D ? D[d] : 0;                       \
            T *yr = y + r * L;                                                                        \
            /* Element-wise parts in their own loops, which vectorise; only the recurrence is serial. \
               softplus as torch.nn.functional.softplus, with its default threshold of 20. */         \
            _Pragma("omp simd") for (int64_t t = 0; t < L; ++t)                                       \
            {                                                                                         \
                const T dt = dr[t] + bias;                                                            \
                dts[t] = softplus && dt <= 20 ? LOG1P(EXP(dt)) : dt;                                  \
            }                                                                                         \
            for (int64_t n = 0; n < N; ++n)                                                           \
                h[n] = 0;                                                                             \
            for (int64_t t = 0; t < L; ++t) {                                                         \
                const T dt = dts[t], du = dt * ur[t];                                                 \
                const T *Bn = Bg + t * N, *Cn = Cg + t * N;                                           \
                T acc = 0;                                                                            \
                _Pragma("omp simd reduction(+ : acc)") for (int64_t n = 0; n < N; ++n)                \
                {                                                                                     \
                    h[n] = EXP(dt * Ad[n]) * h[n] + du * Bn[n];                                       \
                    acc += h[n] * Cn[n];                                                              \
                }                                                                                     \
                yr[t] = acc + skip * ur[t];                                                           \
            }                                                                                         \
            if (z) {                                                                                  \
                const T *zr = z + r * L;                                                              \
                _Pragma("omp simd") for (int64_t t = 0; t < L; ++t) yr[t] *= zr[t] / (1 + EXP(-zr[t])); \
            }                                                                                         \
        }                                                                                             \
        free(dts);                                                                                    \
        free(h);                                                                                      \
        return 0;                                                                                     \
    }

DEFINE_SCAN(dsm_selective_scan_f32, float, expf, log1pf)
DEFINE_SCAN(dsm_selective_scan_f64, double, exp, log1p)
