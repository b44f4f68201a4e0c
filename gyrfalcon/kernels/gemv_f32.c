/* gyrfalcon CPU kernel for fp32 matrix-vector products: decoding with a full-precision nn.Linear.
 *
 * y[b, n] = sum_k W[n, k] * x[b, k] (+ bias[n]) for B = 1..16 input rows (1..8 without AVX2), W row-major [N, K]
 * (nn.Linear's weight, used in place). Built together with quant_cpu.c by gyrfalcon/kernels/cpu.py.
 *
 * Why not torch: decoding reads every weight once per token, so its speed is the memory bandwidth. On the AMD
 * EPYC machines we measure on, torch.mv / F.linear (MKL) stream a large fp32 matrix at ~18 GB/s while a plain read
 * reaches ~30 GB/s; for 2..8 rows MKL is slower still (3-6 GB/s). The kernel below reads each weight row exactly
 * once, front to back, with one sequential stream per thread (threads take contiguous halves of the rows), which
 * is what the hardware prefetchers follow best; the B input rows stay in L1/L2 and share each weight load.
 *
 * Instruction sets: AVX2 + FMA (8 lanes), 9..16 input rows two weight rows at a time; with AVX-512 (built with
 * -march=native on a CPU that has it) 5..16 input rows take three weight rows at a time (see the two
 * gemv_f32_tiles); without AVX2 plain C loops (correct, slower).
 *
 * Arithmetic: fp32 fused multiply-adds in 4 (B = 1) or B partial sums per row, reduced at the end; the order of
 * additions differs from MKL's, so results agree to the usual fp32 rounding (tests: 1e-5 relative to the output
 * scale), not bit for bit.
 */
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define GF_F32_AVX2 1
#else
#define GF_F32_AVX2 0
#endif

#define PREFETCH_AHEAD 16384

#if GF_F32_AVX2
static inline float hsum8_f32(__m256 v) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}
#endif

/* One row, one input vector: 4 independent accumulators of 8 lanes, so the FMA latency never stalls the stream. */
static inline float dot_row(const float *w, const float *x, int64_t K) {
    int64_t k = 0;
    float s = 0.0f;
#if GF_F32_AVX2
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (; k + 32 <= K; k += 32) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 8), _mm256_loadu_ps(x + k + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 16), _mm256_loadu_ps(x + k + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 24), _mm256_loadu_ps(x + k + 24), a3);
    }
    for (; k + 8 <= K; k += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), a0);
    s = hsum8_f32(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
#endif
    for (; k < K; k++) s += w[k] * x[k];
    return s;
}

/* One row, B input vectors: the weight chunk is loaded once and multiplied into B accumulators. B is a
 * compile-time constant at every call site (see the switch below), so the loops over b unroll into registers. */
static inline __attribute__((always_inline)) void dot_row_b(const float *w, const float *x, int64_t ldx,
                                                            int64_t K, const int B, float *out) {
    int64_t k = 0;
    float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
#if GF_F32_AVX2
    __m256 acc[8];
    for (int b = 0; b < B; b++) acc[b] = _mm256_setzero_ps();
    for (; k + 8 <= K; k += 8) {
        /* With B rows the stream is slower per byte, and the hardware prefetcher alone falls behind: ask for the
         * line PREFETCH_AHEAD bytes ahead (measured: B = 8 on a 65024 x 1024 matrix, 13 -> 43 GB/s). Past the
         * end of the matrix a prefetch is a no-op, never a fault. */
        if ((k & 15) == 0) _mm_prefetch((const char *)(w + k) + PREFETCH_AHEAD, _MM_HINT_T0);
        __m256 wv = _mm256_loadu_ps(w + k);
        for (int b = 0; b < B; b++) acc[b] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + b * ldx + k), acc[b]);
    }
    for (int b = 0; b < B; b++) s[b] = hsum8_f32(acc[b]);
#endif
    for (; k < K; k++)
        for (int b = 0; b < B; b++) s[b] += w[k] * x[b * ldx + k];
    for (int b = 0; b < B; b++) out[b] = s[b];
}

#if defined(__AVX512F__)
/* Two weight rows x B input rows (5..8) in AVX-512 registers (2 * 8 accumulators of the 32): each x load now
 * serves two weight rows. With 8 input rows of K >= 2048 the x rows no longer fit in L1, and reloading them for
 * every weight row made the pass L2-bound (measured on 8192 x 2048, B = 8: 21 -> 30 GB/s). */
static inline __attribute__((always_inline)) void dot_2rows_b(const float *w, const float *x, int64_t ldx,
                                                              int64_t K, const int B, float *out) {
    __m512 acc0[8], acc1[8];
    for (int b = 0; b < B; b++) acc0[b] = acc1[b] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        _mm_prefetch((const char *)(w + k) + PREFETCH_AHEAD, _MM_HINT_T0);
        _mm_prefetch((const char *)(w + K + k) + PREFETCH_AHEAD, _MM_HINT_T0);
        __m512 w0 = _mm512_loadu_ps(w + k), w1 = _mm512_loadu_ps(w + K + k);
        for (int b = 0; b < B; b++) {
            __m512 xv = _mm512_loadu_ps(x + b * ldx + k);
            acc0[b] = _mm512_fmadd_ps(w0, xv, acc0[b]);
            acc1[b] = _mm512_fmadd_ps(w1, xv, acc1[b]);
        }
    }
    for (int b = 0; b < B; b++) {
        float s0 = _mm512_reduce_add_ps(acc0[b]), s1 = _mm512_reduce_add_ps(acc1[b]);
        for (int64_t kk = k; kk < K; kk++) {
            s0 += w[kk] * x[b * ldx + kk];
            s1 += w[K + kk] * x[b * ldx + kk];
        }
        out[b] = s0;
        out[8 + b] = s1;
    }
}

/* Three weight rows x B input rows (up to 8): 3 * 8 accumulators + 3 weight vectors + 1 input vector = 28 of the 32
 * registers. Each input load now serves three weight rows, which is what bounds these rows' speed: the input rows
 * (8 x K floats) do not fit in L1 next to the weight stream. Measured against the two-row tile, 8 rows, 2 threads:
 * 4096 x 1024 0.70 -> 0.51 ms, 1024 x 4096 0.72 -> 0.54 ms, 65024 x 1024 14.7 -> 13.0 ms. */
static inline __attribute__((always_inline)) void dot_3rows_b(const float *w, const float *x, int64_t ldx,
                                                              int64_t K, const int B, float *out) {
    __m512 acc0[8], acc1[8], acc2[8];
    for (int b = 0; b < B; b++) acc0[b] = acc1[b] = acc2[b] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        _mm_prefetch((const char *)(w + k) + PREFETCH_AHEAD, _MM_HINT_T0);
        _mm_prefetch((const char *)(w + K + k) + PREFETCH_AHEAD, _MM_HINT_T0);
        _mm_prefetch((const char *)(w + 2 * K + k) + PREFETCH_AHEAD, _MM_HINT_T0);
        __m512 w0 = _mm512_loadu_ps(w + k), w1 = _mm512_loadu_ps(w + K + k), w2 = _mm512_loadu_ps(w + 2 * K + k);
        for (int b = 0; b < B; b++) {
            __m512 xv = _mm512_loadu_ps(x + b * ldx + k);
            acc0[b] = _mm512_fmadd_ps(w0, xv, acc0[b]);
            acc1[b] = _mm512_fmadd_ps(w1, xv, acc1[b]);
            acc2[b] = _mm512_fmadd_ps(w2, xv, acc2[b]);
        }
    }
    for (int b = 0; b < B; b++) {
        float s0 = _mm512_reduce_add_ps(acc0[b]), s1 = _mm512_reduce_add_ps(acc1[b]);
        float s2 = _mm512_reduce_add_ps(acc2[b]);
        for (int64_t kk = k; kk < K; kk++) {
            s0 += w[kk] * x[b * ldx + kk];
            s1 += w[K + kk] * x[b * ldx + kk];
            s2 += w[2 * K + kk] * x[b * ldx + kk];
        }
        out[b] = s0;
        out[8 + b] = s1;
        out[16 + b] = s2;
    }
}

/* One tile: weight rows n .. n + rows - 1 (rows <= 3) against nb <= 8 input rows, results in out[8 * r + b]. nb is
 * a compile-time constant in each case of the switch, so every tile routine keeps its accumulators in registers. */
static inline void dot_tile(const float *w, int rows, int64_t K, const float *x, int64_t ldx, int nb, float *out) {
#define GF_TILE_CASE(NB)                                                                                           \
    case NB:                                                                                                       \
        if (rows == 3)                                                                                             \
            dot_3rows_b(w, x, ldx, K, NB, out);                                                                    \
        else if (rows == 2)                                                                                        \
            dot_2rows_b(w, x, ldx, K, NB, out);                                                                    \
        else                                                                                                       \
            dot_row_b(w, x, ldx, K, NB, out);                                                                      \
        break;
    switch (nb) {
        GF_TILE_CASE(1) GF_TILE_CASE(2) GF_TILE_CASE(3) GF_TILE_CASE(4)
        GF_TILE_CASE(5) GF_TILE_CASE(6) GF_TILE_CASE(7) GF_TILE_CASE(8)
    }
#undef GF_TILE_CASE
}

/* 5..16 input rows: three weight rows at a time; above 8 input rows (a server's decode batch) the input rows go in
 * groups of 8 through the same tile, which streams from memory for the first group and is re-read from L1/L2 for
 * the next, so the matrix is still read from memory once per call. */
static void gemv_f32_tiles(const float *w, const float *bias, int64_t n0, int64_t n1, int64_t K, const float *x,
                           int64_t ldx, int64_t B, float *y, int64_t ldy) {
    for (int64_t n = n0; n < n1; n += 3) {
        const int rows = n1 - n < 3 ? (int)(n1 - n) : 3;
        for (int64_t g = 0; g < B; g += 8) {
            const int nb = B - g < 8 ? (int)(B - g) : 8;
            float out[24];
            dot_tile(w + n * K, rows, K, x + g * ldx, ldx, nb, out);
            for (int r = 0; r < rows; r++)
                for (int b = 0; b < nb; b++) y[(g + b) * ldy + n + r] = out[8 * r + b] + (bias ? bias[n + r] : 0.0f);
        }
    }
}
#define GF_F32_MAX_ROWS 16
#define GF_F32_TILES_ABOVE 4
#endif

#if GF_F32_AVX2 && !defined(__AVX512F__)
/* AVX2 (16 registers), 9..16 input rows (a server's decode batch): R <= 2 weight rows x NB <= 4
 * input rows in registers. Measured on a 2-core EPYC (Zen 3) over the 250M model's 65 matrices, 16 rows: 112 ms,
 * oneDNN 126 ms; with 3 weight rows (12 accumulators) GCC runs out of registers and reloads the inputs (118 ms).
 * For 5..8 rows this tile was no faster than dot_row_b (8 rows: 55 vs 57 ms; 5 rows: 46 vs 41 ms), which they keep. */
static inline __attribute__((always_inline)) void dot_rows_avx2(const float *w, int64_t K, const float *x,
                                                                int64_t ldx, const int R, const int NB, float *out) {
    __m256 acc[2][4];
    for (int r = 0; r < R; r++)
        for (int b = 0; b < NB; b++) acc[r][b] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 wv[2];
        for (int r = 0; r < R; r++) {
            if ((k & 15) == 0) _mm_prefetch((const char *)(w + r * K + k) + PREFETCH_AHEAD, _MM_HINT_T0);
            wv[r] = _mm256_loadu_ps(w + r * K + k);
        }
        for (int b = 0; b < NB; b++) {
            const __m256 xv = _mm256_loadu_ps(x + b * ldx + k);
            for (int r = 0; r < R; r++) acc[r][b] = _mm256_fmadd_ps(wv[r], xv, acc[r][b]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int b = 0; b < NB; b++) {
            float t = hsum8_f32(acc[r][b]);
            for (int64_t kk = k; kk < K; kk++) t += w[r * K + kk] * x[b * ldx + kk];
            out[4 * r + b] = t;
        }
}

/* 9..16 input rows: two weight rows at a time against the input rows in groups of 4; the weight rows
 * stream from memory for the first group and are re-read from L1/L2 for the others, so the matrix is still read
 * from memory once per call. */
static void gemv_f32_tiles(const float *w, const float *bias, int64_t n0, int64_t n1, int64_t K, const float *x,
                           int64_t ldx, int64_t B, float *y, int64_t ldy) {
    for (int64_t n = n0; n < n1; n += 2) {
        const int rows = n1 - n < 2 ? (int)(n1 - n) : 2;
        for (int64_t g = 0; g < B; g += 4) {
            const int nb = B - g < 4 ? (int)(B - g) : 4;
            float out[8];
#define GF_T(R, NB)                                                                                                \
    case (R) * 8 + (NB): dot_rows_avx2(w + n * K, K, x + g * ldx, ldx, R, NB, out); break;
            switch (rows * 8 + nb) {
                GF_T(1, 1) GF_T(1, 2) GF_T(1, 3) GF_T(1, 4)
                GF_T(2, 1) GF_T(2, 2) GF_T(2, 3) GF_T(2, 4)
            }
#undef GF_T
            for (int r = 0; r < rows; r++)
                for (int b = 0; b < nb; b++) y[(g + b) * ldy + n + r] = out[4 * r + b] + (bias ? bias[n + r] : 0.0f);
        }
    }
}
#define GF_F32_MAX_ROWS 16
#define GF_F32_TILES_ABOVE 8
#endif

#define GF_GEMV_F32_B(B)                                                                                           \
    static void gemv_f32_b##B(const float *w, const float *bias, int64_t n0, int64_t n1, int64_t K, const float *x, \
                              int64_t ldx, float *y, int64_t ldy) {                                                  \
        for (int64_t n = n0; n < n1; n++) {                                                                          \
            float out[8];                                                                                            \
            dot_row_b(w + n * K, x, ldx, K, B, out);                                                                 \
            float bn = bias ? bias[n] : 0.0f;                                                                        \
            for (int b = 0; b < B; b++) y[b * ldy + n] = out[b] + bn;                                                \
        }                                                                                                            \
    }
GF_GEMV_F32_B(2)
GF_GEMV_F32_B(3)
GF_GEMV_F32_B(4)
#if !defined(__AVX512F__)
GF_GEMV_F32_B(5)
GF_GEMV_F32_B(6)
GF_GEMV_F32_B(7)
GF_GEMV_F32_B(8)
#endif

static void gemv_f32_b1(const float *w, const float *bias, int64_t n0, int64_t n1, int64_t K, const float *x,
                        float *y) {
    for (int64_t n = n0; n < n1; n++) y[n] = dot_row(w + n * K, x, K) + (bias ? bias[n] : 0.0f);
}

#if !defined(GF_F32_TILES_ABOVE)
#define GF_F32_MAX_ROWS 8
#endif

int gf_gemv_f32_max_rows(void) { return GF_F32_MAX_ROWS; }

/* Rows n0..n1 of y = x W^T + bias, on the calling thread. Every output element is computed by the same routine
 * whichever range it falls in, as long as n0 is a multiple of ROW_ALIGN (the tiles take 2 or 3 weight rows). */
#define ROW_ALIGN 6
static void gemv_f32_rows(const float *w, const float *bias, int64_t n0, int64_t n1, int64_t K, const float *x,
                          int64_t ldx, int64_t B, float *y, int64_t ldy) {
    if (n1 <= n0) return;
#if defined(GF_F32_TILES_ABOVE)
    if (B > GF_F32_TILES_ABOVE) {
        gemv_f32_tiles(w, bias, n0, n1, K, x, ldx, B, y, ldy);
        return;
    }
#endif
    switch (B) {
    case 1: gemv_f32_b1(w, bias, n0, n1, K, x, y); break;
    case 2: gemv_f32_b2(w, bias, n0, n1, K, x, ldx, y, ldy); break;
    case 3: gemv_f32_b3(w, bias, n0, n1, K, x, ldx, y, ldy); break;
    case 4: gemv_f32_b4(w, bias, n0, n1, K, x, ldx, y, ldy); break;
#if !defined(__AVX512F__)
    case 5: gemv_f32_b5(w, bias, n0, n1, K, x, ldx, y, ldy); break;
    case 6: gemv_f32_b6(w, bias, n0, n1, K, x, ldx, y, ldy); break;
    case 7: gemv_f32_b7(w, bias, n0, n1, K, x, ldx, y, ldy); break;
    default: gemv_f32_b8(w, bias, n0, n1, K, x, ldx, y, ldy); break;
#endif
    }
}

/* This thread's share [*a, *b) of `total` rows: contiguous, in multiples of ROW_ALIGN (one sequential stream per
 * thread, which the hardware prefetchers follow best). */
static void thread_rows(int64_t total, int64_t *a, int64_t *b) {
#ifdef _OPENMP
    int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
#else
    int64_t t = 0, nt = 1;
#endif
    int64_t units = (total + ROW_ALIGN - 1) / ROW_ALIGN, per = units / nt, extra = units % nt;
    int64_t u0 = t * per + (t < extra ? t : extra), u1 = u0 + per + (t < extra ? 1 : 0);
    *a = u0 * ROW_ALIGN < total ? u0 * ROW_ALIGN : total;
    *b = u1 * ROW_ALIGN < total ? u1 * ROW_ALIGN : total;
}

/* w [N, K] (row stride K), x [B, K] (row stride ldx), y [B, N] (row stride ldy); 1 <= B <= gf_gemv_f32_max_rows(). */
void gf_gemv_f32(const float *w, const float *bias, int64_t N, int64_t K, const float *x, int64_t ldx, int64_t B,
                 float *y, int64_t ldy, int nthreads) {
#pragma omp parallel num_threads(nthreads)
    {
        int64_t a, b;
        thread_rows(N, &a, &b);
        gemv_f32_rows(w, bias, a, b, K, x, ldx, B, y, ldy);
    }
}

/* Two products of one input in one parallel pass: y1 = x W1^T + b1 ([B, N1]) and y2 = x W2^T + b2 ([B, N2]), each
 * exactly as gf_gemv_f32 computes it. A decode step of the parallel Falcon layouts feeds one normalized input to
 * query_key_value and dense_h_to_4h; one call instead of two halves the thread start-ups and Python calls. The
 * rows of the two matrices are split between the threads as one list (W1's, then W2's). */
void gf_gemv_f32_pair(const float *w1, const float *b1, int64_t N1, const float *w2, const float *b2, int64_t N2,
                      int64_t K, const float *x, int64_t ldx, int64_t B, float *y1, float *y2, int nthreads) {
    const int64_t N1a = (N1 + ROW_ALIGN - 1) / ROW_ALIGN * ROW_ALIGN; /* W2's rows start on an aligned unit */
#pragma omp parallel num_threads(nthreads)
    {
        int64_t a, b;
        thread_rows(N1a + N2, &a, &b);
        gemv_f32_rows(w1, b1, a < N1 ? a : N1, b < N1 ? b : N1, K, x, ldx, B, y1, N1);
        gemv_f32_rows(w2, b2, a > N1a ? a - N1a : 0, b > N1a ? b - N1a : 0, K, x, ldx, B, y2, N2);
    }
}

/* Rows of one thread's share handled together in gf_gemv_f32_sum (its scratch: 2 x 16 x SUM_CHUNK floats). */
#define SUM_CHUNK 48

/* y = (x1 W1^T + b1) + (x2 W2^T + b2) + r, added in that order, [B, N] (all row strides: the widths): the output
 * projections of a parallel Falcon layer's MLP (W1: dense_4h_to_h) and attention (W2: dense) and the residual,
 * which the reference adds as (mlp + attn) + x. Each product is computed as gf_gemv_f32 does. r may be NULL. */
void gf_gemv_f32_sum(const float *w1, const float *b1, int64_t K1, const float *x1, const float *w2,
                     const float *b2, int64_t K2, const float *x2, const float *r, int64_t N, int64_t B, float *y,
                     int nthreads) {
#pragma omp parallel num_threads(nthreads)
    {
        int64_t a, b;
        thread_rows(N, &a, &b);
        float p[16 * SUM_CHUNK], q[16 * SUM_CHUNK];
        for (int64_t c = a; c < b; c += SUM_CHUNK) {
            const int64_t n = b - c < SUM_CHUNK ? b - c : SUM_CHUNK;
            /* The chunk's rows as rows 0..n of a product whose output row stride is SUM_CHUNK. */
            gemv_f32_rows(w1 + c * K1, b1 ? b1 + c : NULL, 0, n, K1, x1, K1, B, p, SUM_CHUNK);
            gemv_f32_rows(w2 + c * K2, b2 ? b2 + c : NULL, 0, n, K2, x2, K2, B, q, SUM_CHUNK);
            for (int64_t i = 0; i < B; i++)
                for (int64_t j = 0; j < n; j++) {
                    float v = p[i * SUM_CHUNK + j] + q[i * SUM_CHUNK + j];
                    y[i * N + c + j] = r ? v + r[i * N + c + j] : v;
                }
        }
    }
}
