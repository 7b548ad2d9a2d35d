/* Selective scan with gradients for CPUs: the core recurrence of mamba_ssm's selective_scan_fn,
 *
 *   h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t,  h_{-1} = 0,  y_t = <C_t, h_t>,
 *
 * (delta bias, softplus, D and the z gate are element-wise and stay in PyTorch's autograd), one
 * (batch, channel) row at a time. The forward pass also stores the state entering every chunk of K
 * steps; the backward pass walks the chunks from last to first, recomputes the K states of a chunk
 * from its stored entry state into a small buffer (as mamba's CUDA kernel recomputes rather than
 * stores the L x N states) and runs the adjoint recurrence
 *
 *   g_t = C_t dy_t + exp(dt_{t+1} A) g_{t+1},
 *   du_t = dt_t <g_t, B_t>,  ddt_t = <g_t, A exp(dt_t A) h_{t-1} + u_t B_t>,
 *   dA += dt_t g_t exp(dt_t A) h_{t-1},  dB_t += dt_t u_t g_t,  dC_t += dy_t h_t.
 *
 * B, C, dB, dC come transposed to (batch, groups, L, N) so the loops over the N states read contiguous
 * memory and vectorise. dA, dB and dC are accumulated into buffers private to the caller's thread
 * (rows of one group or channel can be split among threads); the caller sums them. Rows
 * [row_begin, row_end) of the flattened (batch, dim) grid are processed. Returns 0, or 1 when out of
 * memory.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define DEFINE_TRAIN_SCAN(SUFFIX, T, EXP)                                                                \
    int dsm_scan_fwd_##SUFFIX(const T *u, const T *delta, const T *A, const T *Bt, const T *Ct, T *y, T *states,  \
                   int64_t dim, int64_t groups, int64_t N, int64_t L, int64_t K, int64_t row_begin,     \
                   int64_t row_end)                                                                     \
    {                                                                                                   \
        T *h = malloc(N * sizeof(T));                                                                   \
        if (!h)                                                                                         \
            return 1;                                                                                   \
        const int64_t heads = dim / groups, n_chunks = (L + K - 1) / K;                                 \
        for (int64_t r = row_begin; r < row_end; ++r) {                                                 \
            const int64_t b = r / dim, d = r % dim, g = d / heads;                                      \
            const T *ur = u + r * L, *dr = delta + r * L, *Ad = A + d * N;                              \
            const T *Bg = Bt + (b * groups + g) * L * N, *Cg = Ct + (b * groups + g) * L * N;           \
            T *yr = y + r * L, *sr = states + r * n_chunks * N;                                         \
            for (int64_t n = 0; n < N; ++n)                                                             \
                h[n] = 0;                                                                               \
            for (int64_t t = 0; t < L; ++t) {                                                           \
                if (t % K == 0)                                                                         \
                    for (int64_t n = 0; n < N; ++n)                                                     \
                        sr[(t / K) * N + n] = h[n];                                                     \
                const T dt = dr[t], du = dt * ur[t];                                                    \
                const T *Bn = Bg + t * N, *Cn = Cg + t * N;                                             \
                T acc = 0;                                                                              \
                _Pragma("omp simd reduction(+ : acc)") for (int64_t n = 0; n < N; ++n)                  \
                {                                                                                       \
                    h[n] = EXP(dt * Ad[n]) * h[n] + du * Bn[n];                                         \
                    acc += h[n] * Cn[n];                                                                \
                }                                                                                       \
                yr[t] = acc;                                                                            \
            }                                                                                           \
        }                                                                                               \
        free(h);                                                                                        \
        return 0;                                                                                       \
    }                                                                                                   \
                                                                                                        \
    int dsm_scan_bwd_##SUFFIX(const T *u, const T *delta, const T *A, const T *Bt, const T *Ct, const T *states,  \
                   const T *dy, T *du, T *ddelta, T *dA, T *dBt, T *dCt, int64_t dim, int64_t groups,   \
                   int64_t N, int64_t L, int64_t K, int64_t row_begin, int64_t row_end)                 \
    {                                                                                                   \
        /* hs: the states of one chunk, one row of N per step; g: the adjoint state; dAr: row's dA */   \
        T *hs = malloc(K * N * sizeof(T)), *g = malloc(N * sizeof(T)), *dAr = malloc(N * sizeof(T));   \
        if (!hs || !g || !dAr) {                                                                        \
            free(hs);                                                                                   \
            free(g);                                                                                    \
            free(dAr);                                                                                  \
            return 1;                                                                                   \
        }                                                                                               \
        const int64_t heads = dim / groups, n_chunks = (L + K - 1) / K;                                 \
        for (int64_t r = row_begin; r < row_end; ++r) {                                                 \
            const int64_t b = r / dim, d = r % dim, gi = d / heads;                                     \
            const T *ur = u + r * L, *dr = delta + r * L, *Ad = A + d * N, *dyr = dy + r * L;           \
            const int64_t goff = (b * groups + gi) * L * N;                                             \
            const T *Bg = Bt + goff, *Cg = Ct + goff, *sr = states + r * n_chunks * N;                  \
            T *dBg = dBt + goff, *dCg = dCt + goff, *dur = du + r * L, *ddr = ddelta + r * L;           \
            for (int64_t n = 0; n < N; ++n)                                                             \
                g[n] = dAr[n] = 0;                                                                      \
            for (int64_t c = n_chunks - 1; c >= 0; --c) {                                               \
                const int64_t t0 = c * K, t1 = t0 + K < L ? t0 + K : L;                                 \
                const T *prev = sr + c * N;                                                             \
                for (int64_t t = t0; t < t1; ++t) {                                                     \
                    const T dt = dr[t], dut = dt * ur[t];                                               \
                    const T *Bn = Bg + t * N;                                                           \
                    T *hn = hs + (t - t0) * N;                                                          \
                    _Pragma("omp simd") for (int64_t n = 0; n < N; ++n) hn[n] =                         \
                        EXP(dt * Ad[n]) * prev[n] + dut * Bn[n];                                        \
                    prev = hn;                                                                          \
                }                                                                                       \
                for (int64_t t = t1 - 1; t >= t0; --t) {                                                \
                    const T dt = dr[t], ut = ur[t], dyt = dyr[t];                                       \
                    const T *Bn = Bg + t * N, *Cn = Cg + t * N, *hn = hs + (t - t0) * N;                \
                    const T *hp = t > t0 ? hn - N : sr + c * N;                                         \
                    T *dBn = dBg + t * N, *dCn = dCg + t * N;                                           \
                    T acc_u = 0, acc_dt = 0;                                                            \
                    _Pragma("omp simd reduction(+ : acc_u, acc_dt)") for (int64_t n = 0; n < N; ++n)    \
                    {                                                                                   \
                        const T a = EXP(dt * Ad[n]);                                                    \
                        const T gn = g[n] + Cn[n] * dyt;                                                \
                        dCn[n] += dyt * hn[n];                                                          \
                        dBn[n] += gn * dt * ut;                                                         \
                        acc_u += gn * Bn[n];                                                            \
                        acc_dt += gn * (Ad[n] * a * hp[n] + ut * Bn[n]);                                \
                        dAr[n] += gn * dt * a * hp[n];                                                  \
                        g[n] = gn * a;                                                                  \
                    }                                                                                   \
                    dur[t] = dt * acc_u;                                                                \
                    ddr[t] = acc_dt;                                                                    \
                }                                                                                       \
            }                                                                                           \
            for (int64_t n = 0; n < N; ++n)                                                             \
                dA[d * N + n] += dAr[n];                                                                \
        }                                                                                               \
        free(hs);                                                                                       \
        free(g);                                                                                        \
        free(dAr);                                                                                      \
        return 0;                                                                                       \
    }

DEFINE_TRAIN_SCAN(f32, float, expf)
DEFINE_TRAIN_SCAN(f64, double, exp)
