/* gyrfalcon CPU kernels for weight-only quantized linears (int8 rows, nf4/fp4 blocks of 64).
 *
 * Built at first use by gyrfalcon/kernels/cpu.py with the machine's compiler
 * (cc -O3 -march=native -fopenmp -shared -fPIC) and called through ctypes on tensor data pointers.
 *
 * Glossary
 *   N  output features (weight rows)     K  input features      KP  K rounded up to a multiple of 64
 *   B  input rows (1..8: decode and small batches; larger batches use the dequantize-by-tile path)
 *
 * Layouts (exactly the tensors gyrfalcon.quant stores, nothing is repacked):
 *   int8   w [N, K] int8, scale [N] fp32:                  W[n, k] = w[n, k] * scale[n]
 *   4-bit  packed [N, KP/2] uint8, bitsandbytes order:     byte j of a row = (q[2j] << 4) | q[2j+1]
 *          absmax per block of 64 along the row, either fp32 [N*KP/64] or double-quantized
 *          (uint8 [N*KP/64] through the 256-entry map `code2`, times absmax2[block / 256], plus `offset`):
 *                                                          W[n, k] = code[q[n, k]] * absmax[n, k / 64]
 *
 * Matrix-vector products (gemv_*): the activations are quantized per block of 64 to int16 (scale = block
 * absmax / 32767, so each element is within 1.5e-5 of the block's largest) and multiplied with
 * _mm256_madd_epi16 against the int8 weights (sign-extended) or the 4-bit codes expanded by a 16-entry pshufb
 * table to int16 (code * 8191, within 6.1e-5 of the code book value). Products are summed exactly in int32
 * within a block (8 products per lane: 8 * 127 * 32767 and 8 * 8191 * 32767 both stay below 2^31), and blocks
 * are summed in fp32 with their scales. The relative error against the exact fp32 product of the dequantized
 * weight is ~1e-4 (tests hold it to 2e-3 of the output scale), far below the quantization error itself.
 * The B input rows share one pass over the weights: the weight registers are decoded once per block.
 * With AVX-512 VNNI + BW (GF_AVX512) the same arithmetic runs on 512-bit registers: int8 weights sign-extended to
 * int16 (vpmovsxbw) and 4-bit codes looked up as int16 with vpermw, multiplied by vpdpwssd (4 products per int32
 * lane per block, the same exact integer sums), the stream prefetched PF_I8 / PF_Q4 bytes ahead. The 4-bit loop
 * is compute-bound (decode + multiply per 32 bytes; measured ~14 GB/s per thread from cache, int8 ~60 GB/s).
 *
 * Prefill tiles in bf16 (gf_dequant_bf16_*): the fp32 dequantized value rounded to nearest-even bf16 (int8: the
 * integer codes, exact), for oneDNN's bf16 matrix product on CPUs with native bf16 (see gyrfalcon/quant/linear.py).
 *
 * Dequantization (dequant_*) is exact fp32 (code book value times absmax, as the reference path computes it)
 * and is used by the caller to dequantize a tile of rows for an fp32 matrix product (prefill).
 *
 * Threads: OpenMP over output rows; the caller passes the thread count (torch's), and as torch's own OpenMP
 * runtime (libgomp.so.1) is the one loaded in the process, both share one thread pool.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define GF_AVX2 1
#else
#define GF_AVX2 0
#endif

/* AVX-512 with VNNI (vpdpwssd: 32 int16 products summed pairwise into 16 int32 lanes per instruction) and BW
 * (vpermw for the 4-bit code look-up): the matrix-vector kernels use 512-bit registers, one block of 64 weights
 * per register pair, and prefetch further ahead. The AVX2 paths stay as the fallback for other CPUs. */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define GF_AVX512 1
#else
#define GF_AVX512 0
#endif
/* Bytes ahead of the weight stream to prefetch in the AVX-512 paths (the hardware prefetcher alone lags). */
#ifndef PF_I8
#define PF_I8 16384
#endif
#ifndef PF_Q4
#define PF_Q4 1024
#endif
/* The same for the AVX2 paths (on a 2-core EPYC without AVX-512, 0 to 8 KB ahead were all within 10%). */
#ifndef PF_I8_AVX2
#define PF_I8_AVX2 2048
#endif
#ifndef PF_Q4_AVX2
#define PF_Q4_AVX2 1024
#endif

#define QB 64
#define XQMAX 32767.0f
#define CODE_SCALE 8191.0f
#define MAXB 8

int gf_simd(void) { return GF_AVX512 ? 2 : GF_AVX2; }
int gf_version(void) { return 4; }

/* Position p of a block in the 4-bit kernel's register order -> element index within the block (see gemv_q4). */
static int q4_perm(int p) {
#if GF_AVX512
    /* vpmovzxbw of a block's 32 bytes, then high nibbles (even elements) and low nibbles (odd elements). */
    return p < 32 ? 2 * p : 2 * (p - 32) + 1;
#endif
    int v = p / 16, i = p % 16, lane = i / 8, t = i % 8;
    int byte = lane * 16 + (v % 2) * 8 + t;
    return 2 * byte + (v >= 2 ? 1 : 0);
}

static inline float hsum(
#if GF_AVX2
    __m256 v
#else
    float v
#endif
) {
#if GF_AVX2
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
#else
    return v;
#endif
}

#if GF_AVX2
static inline float hsum_max(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

/* x [B, K] fp32 (row stride ldx) -> xq [B, KP] int16, xs [B, KP/64]. Padding elements are 0. With `permute`,
 * each block is stored in the 4-bit kernel's register order. Rounding: to nearest, ties to even. */
static void quantize_x(const float *x, int64_t ldx, int64_t B, int64_t K, int64_t KP, int permute, int16_t *xq,
                       float *xs) {
    int perm[QB];
    for (int p = 0; p < QB; p++) perm[p] = permute ? q4_perm(p) : p;
    int64_t nb = KP / QB;
    for (int64_t b = 0; b < B; b++) {
        const float *xr = x + b * ldx;
        for (int64_t j = 0; j < nb; j++) {
            float blk[QB] __attribute__((aligned(32)));
            int16_t qv[QB] __attribute__((aligned(32)));
            int64_t k0 = j * QB;
            if (k0 + QB <= K) {
                memcpy(blk, xr + k0, sizeof(blk));
            } else {
                for (int e = 0; e < QB; e++) blk[e] = (k0 + e < K) ? xr[k0 + e] : 0.f;
            }
            float amax = 0.f;
#if GF_AVX2
            const __m256 signbit = _mm256_set1_ps(-0.0f);
            __m256 m = _mm256_setzero_ps();
            for (int e = 0; e < QB; e += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(signbit, _mm256_load_ps(blk + e)));
            amax = hsum_max(m);
            float inv = amax > 0.f ? XQMAX / amax : 0.f;
            __m256 vinv = _mm256_set1_ps(inv);
            for (int e = 0; e < QB; e += 16) {
                __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_load_ps(blk + e), vinv));
                __m256i c = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_load_ps(blk + e + 8), vinv));
                __m256i pk = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, c), 0xD8);
                _mm256_store_si256((__m256i *)(qv + e), pk);
            }
#else
            for (int e = 0; e < QB; e++) {
                float a = fabsf(blk[e]);
                amax = a > amax ? a : amax;
            }
            float inv = amax > 0.f ? XQMAX / amax : 0.f;
            for (int e = 0; e < QB; e++) qv[e] = (int16_t)lrintf(blk[e] * inv);
#endif
            int16_t *dst = xq + b * KP + k0;
            if (permute) {
                for (int p = 0; p < QB; p++) dst[p] = qv[perm[p]];
            } else {
                memcpy(dst, qv, sizeof(qv));
            }
            xs[b * nb + j] = amax / XQMAX;
        }
    }
}

/* ------------------------------------------------------------------------------------------------------------ */
/* int8 rows */

#define GF_INLINE static inline __attribute__((always_inline))

GF_INLINE void gemv_i8_rows_t(const int8_t *w, const float *scale, const float *bias, int64_t n0, int64_t n1,
                              int64_t K, int64_t KP, const int16_t *xq, const float *xs, const int B, float *y,
                              int64_t ldy) {
    int64_t nfull = K / QB, nb = KP / QB;
    for (int64_t n = n0; n < n1; n++) {
        const int8_t *wr = w + n * K;
        float tot[MAXB];
#if GF_AVX512
        __m512 acc[MAXB];
        for (int b = 0; b < B; b++) acc[b] = _mm512_setzero_ps();
        for (int64_t j = 0; j < nfull; j++) {
            const int8_t *p = wr + j * QB;
            _mm_prefetch((const char *)(p + PF_I8), _MM_HINT_T0);
            __m512i w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(p)));
            __m512i w1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(p + 32)));
            for (int b = 0; b < B; b++) {
                const int16_t *xp = xq + b * KP + j * QB;
                __m512i s = _mm512_dpwssd_epi32(_mm512_setzero_si512(), w0, _mm512_loadu_si512(xp));
                s = _mm512_dpwssd_epi32(s, w1, _mm512_loadu_si512(xp + 32));
                acc[b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(xs[b * nb + j]), acc[b]);
            }
        }
        for (int b = 0; b < B; b++) tot[b] = _mm512_reduce_add_ps(acc[b]);
#elif GF_AVX2
        __m256 acc[MAXB];
        for (int b = 0; b < B; b++) acc[b] = _mm256_setzero_ps();
        for (int64_t j = 0; j < nfull; j++) {
            const int8_t *p = wr + j * QB;
            _mm_prefetch((const char *)(p + PF_I8_AVX2), _MM_HINT_T0); /* the hardware prefetcher alone lags */
            __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(p)));
            __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(p + 16)));
            __m256i w2 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(p + 32)));
            __m256i w3 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(p + 48)));
            for (int b = 0; b < B; b++) {
                const int16_t *xp = xq + b * KP + j * QB;
                __m256i s = _mm256_madd_epi16(w0, _mm256_loadu_si256((const __m256i *)(xp)));
                s = _mm256_add_epi32(s, _mm256_madd_epi16(w1, _mm256_loadu_si256((const __m256i *)(xp + 16))));
                s = _mm256_add_epi32(s, _mm256_madd_epi16(w2, _mm256_loadu_si256((const __m256i *)(xp + 32))));
                s = _mm256_add_epi32(s, _mm256_madd_epi16(w3, _mm256_loadu_si256((const __m256i *)(xp + 48))));
                acc[b] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(xs[b * nb + j]), acc[b]);
            }
        }
        for (int b = 0; b < B; b++) tot[b] = hsum(acc[b]);
#else
        for (int b = 0; b < B; b++) {
            float t = 0.f;
            for (int64_t j = 0; j < nfull; j++) {
                int32_t s = 0;
                for (int e = 0; e < QB; e++) s += (int32_t)wr[j * QB + e] * xq[b * KP + j * QB + e];
                t += (float)s * xs[b * nb + j];
            }
            tot[b] = t;
        }
#endif
        if (nfull < nb) { /* tail block, K % 64 elements */
            for (int b = 0; b < B; b++) {
                int32_t s = 0;
                for (int64_t k = nfull * QB; k < K; k++) s += (int32_t)wr[k] * xq[b * KP + k];
                tot[b] += (float)s * xs[b * nb + nfull];
            }
        }
        float sc = scale[n], bi = bias ? bias[n] : 0.f;
        for (int b = 0; b < B; b++) y[b * ldy + n] = tot[b] * sc + bi;
    }
}

/* One copy per batch size, so that B is a constant and the accumulators live in registers. */
#define GF_I8(b)                                                                                               \
    static __attribute__((noinline)) void gemv_i8_rows_##b(const int8_t *w, const float *scale, const float *bias, \
                                                             int64_t n0, int64_t n1, int64_t K, int64_t KP,     \
                                                             const int16_t *xq, const float *xs, float *y,      \
                                                             int64_t ldy) {                                     \
        gemv_i8_rows_t(w, scale, bias, n0, n1, K, KP, xq, xs, b, y, ldy);                                      \
    }
GF_I8(1) GF_I8(2) GF_I8(3) GF_I8(4) GF_I8(5) GF_I8(6) GF_I8(7) GF_I8(8)
#undef GF_I8

static void gemv_i8_rows(const int8_t *w, const float *scale, const float *bias, int64_t n0, int64_t n1, int64_t K,
                         int64_t KP, const int16_t *xq, const float *xs, int B, float *y, int64_t ldy) {
    switch (B) {
#define GF_CASE(b) \
    case b: gemv_i8_rows_##b(w, scale, bias, n0, n1, K, KP, xq, xs, y, ldy); break;
        GF_CASE(1) GF_CASE(2) GF_CASE(3) GF_CASE(4) GF_CASE(5) GF_CASE(6) GF_CASE(7) GF_CASE(8)
#undef GF_CASE
    }
}

/* y[b, n] = sum_k W[n, k] x[b, k] + bias[n], for b < B <= 8. */
void gf_gemv_i8(const int8_t *w, const float *scale, const float *bias, int64_t N, int64_t K, const float *x,
                int64_t ldx, int64_t B, float *y, int64_t ldy, int nthreads) {
    int64_t KP = (K + QB - 1) / QB * QB;
    int16_t *xq = (int16_t *)aligned_alloc(64, (size_t)(B * KP * 2 + 64) / 64 * 64);
    float *xs = (float *)malloc(sizeof(float) * (size_t)(B * KP / QB + 1));
    quantize_x(x, ldx, B, K, KP, 0, xq, xs);
    int64_t chunk = 16;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t c = 0; c < (N + chunk - 1) / chunk; c++) {
        int64_t n0 = c * chunk, n1 = n0 + chunk < N ? n0 + chunk : N;
        gemv_i8_rows(w, scale, bias, n0, n1, K, KP, xq, xs, (int)B, y, ldy);
    }
    free(xq);
    free(xs);
}

/* out [n1 - n0, K] fp32 = rows n0..n1 of W. */
void gf_dequant_i8(const int8_t *w, const float *scale, int64_t n0, int64_t n1, int64_t K, float *out,
                   int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = n0; n < n1; n++) {
        const int8_t *wr = w + n * K;
        float *o = out + (n - n0) * K;
        float s = scale[n];
        int64_t k = 0;
#if GF_AVX2
        __m256 vs = _mm256_set1_ps(s);
        for (; k + 8 <= K; k += 8) {
            __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(wr + k)));
            _mm256_storeu_ps(o + k, _mm256_mul_ps(_mm256_cvtepi32_ps(v), vs));
        }
#endif
        for (; k < K; k++) o[k] = (float)wr[k] * s;
    }
}

/* ------------------------------------------------------------------------------------------------------------ */
/* 4-bit blocks (nf4 / fp4) */

typedef struct {
    const uint8_t *packed;
    const float *absf;    /* fp32 absmax per block, or NULL when double-quantized */
    const uint8_t *absq;  /* uint8 absmax codes per block */
    const float *absmax2; /* fp32 per 256 blocks */
    const float *code2;   /* 256 entries */
    float offset;
} q4w;

static inline float block_absmax(const q4w *q, int64_t g) {
    if (q->absf) return q->absf[g];
    return q->code2[q->absq[g]] * q->absmax2[g / 256] + q->offset;
}

GF_INLINE void gemv_q4_rows_t(const q4w *q, const int16_t *code16, const float *code, const float *bias,
                              int64_t n0, int64_t n1, int64_t KP, const int16_t *xq, const float *xs, const int B,
                              float *y, int64_t ldy) {
    int64_t nb = KP / QB;
    (void)code;
#if GF_AVX2 && !GF_AVX512
    uint8_t tl[16], th[16];
    for (int i = 0; i < 16; i++) {
        tl[i] = (uint8_t)(code16[i] & 0xff);
        th[i] = (uint8_t)((code16[i] >> 8) & 0xff);
    }
    const __m256i tlo = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)tl));
    const __m256i thi = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)th));
    const __m256i m0f = _mm256_set1_epi8(0x0f);
#endif
    float sc[nb > 0 ? nb : 1]; /* this row's block scales (absmax; times the activation scale when B == 1) */
#if GF_AVX512
    int16_t tab16[32] = {0};
    for (int i = 0; i < 16; i++) tab16[i] = code16[i];
    const __m512i tab = _mm512_loadu_si512(tab16);
    const __m512i m0f16 = _mm512_set1_epi16(0x0f);
#endif
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *pr = q->packed + n * (KP / 2);
        float tot[MAXB];
#if GF_AVX512
        if (q->absf) {
            for (int64_t j = 0; j < nb; j++) sc[j] = q->absf[n * nb + j];
        } else {
            /* Double-quantized scales, 16 blocks at a time (done one by one, this took half of the loop's time):
             * code2[absq[g]] * absmax2[g / 256] + offset, the same fp32 operations as block_absmax. */
            int64_t j = 0;
            const int64_t g0 = n * nb;
            if (g0 + nb < ((int64_t)1 << 31)) {
                const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
                for (; j + 16 <= nb; j += 16) {
                    __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q->absq + g0 + j)));
                    __m512 c = _mm512_i32gather_ps(idx, q->code2, 4);
                    __m512i g = _mm512_add_epi32(_mm512_set1_epi32((int)(g0 + j)), iota);
                    __m512 a2 = _mm512_i32gather_ps(_mm512_srli_epi32(g, 8), q->absmax2, 4);
                    _mm512_storeu_ps(sc + j, _mm512_add_ps(_mm512_mul_ps(c, a2), _mm512_set1_ps(q->offset)));
                }
            }
            for (; j < nb; j++) sc[j] = block_absmax(q, g0 + j);
        }
        if (B == 1)
            for (int64_t j = 0; j < nb; j++) sc[j] *= xs[j];
        /* Two accumulators per input row (even and odd blocks, the loop unrolled by two): one chain of dependent
         * fused multiply-adds per row would cap the loop at one block per FMA latency. */
        __m512 accs[MAXB], acc1[MAXB];
        for (int b = 0; b < B; b++) accs[b] = acc1[b] = _mm512_setzero_ps();
#define GF_Q4_BLOCK(jj, ACC)                                                                                    \
    do {                                                                                                        \
        const uint8_t *p = pr + (jj) * (QB / 2);                                                                \
        __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)p));                          \
        __m512i ev = _mm512_permutexvar_epi16(_mm512_srli_epi16(bytes, 4), tab);   /* even elements */         \
        __m512i od = _mm512_permutexvar_epi16(_mm512_and_si512(bytes, m0f16), tab); /* odd elements */         \
        const float am = sc[jj];                                                                                \
        for (int b = 0; b < B; b++) {                                                                           \
            const int16_t *xp = xq + b * KP + (jj) * QB;                                                        \
            __m512i s = _mm512_dpwssd_epi32(_mm512_setzero_si512(), ev, _mm512_loadu_si512(xp));               \
            s = _mm512_dpwssd_epi32(s, od, _mm512_loadu_si512(xp + 32));                                        \
            const float f = B == 1 ? am : am * xs[b * nb + (jj)];                                               \
            ACC[b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(f), ACC[b]);                        \
        }                                                                                                       \
    } while (0)
        int64_t j = 0;
        for (; j + 2 <= nb; j += 2) {
            _mm_prefetch((const char *)(pr + j * (QB / 2) + PF_Q4), _MM_HINT_T0); /* one per 64-byte line */
            GF_Q4_BLOCK(j, accs);
            GF_Q4_BLOCK(j + 1, acc1);
        }
        if (j < nb) GF_Q4_BLOCK(j, accs);
#undef GF_Q4_BLOCK
        for (int b = 0; b < B; b++) accs[b] = _mm512_add_ps(accs[b], acc1[b]);
        for (int b = 0; b < B; b++) tot[b] = _mm512_reduce_add_ps(accs[b]) * (1.0f / CODE_SCALE);
#elif GF_AVX2
        if (q->absf) {
            for (int64_t j = 0; j < nb; j++) sc[j] = q->absf[n * nb + j];
        } else {
            /* Double-quantized scales 8 blocks at a time (two gathers), the same fp32 operations as block_absmax:
             * one by one they cost as much as the products for a row of 1024. */
            int64_t j = 0;
            const int64_t g0 = n * nb;
            if (g0 + nb < ((int64_t)1 << 31)) {
                const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
                for (; j + 8 <= nb; j += 8) {
                    __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q->absq + g0 + j)));
                    __m256 c = _mm256_i32gather_ps(q->code2, idx, 4);
                    __m256i g = _mm256_add_epi32(_mm256_set1_epi32((int)(g0 + j)), iota);
                    __m256 a2 = _mm256_i32gather_ps(q->absmax2, _mm256_srli_epi32(g, 8), 4);
                    _mm256_storeu_ps(sc + j, _mm256_add_ps(_mm256_mul_ps(c, a2), _mm256_set1_ps(q->offset)));
                }
            }
            for (; j < nb; j++) sc[j] = block_absmax(q, g0 + j);
        }
        if (B == 1)
            for (int64_t j = 0; j < nb; j++) sc[j] *= xs[j];
        /* Two accumulators per input row (even and odd blocks): one chain of dependent fused multiply-adds would
         * cap the loop at one block per FMA latency. */
        __m256 acc[MAXB], acc1[MAXB];
        for (int b = 0; b < B; b++) acc[b] = acc1[b] = _mm256_setzero_ps();
#define GF_Q4_BLOCK2(jj, ACC)                                                                                   \
    do {                                                                                                        \
        __m256i v = _mm256_loadu_si256((const __m256i *)(pr + (jj) * (QB / 2)));                               \
        __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m0f); /* even elements */                      \
        __m256i lo = _mm256_and_si256(v, m0f);                       /* odd elements */                       \
        __m256i hl = _mm256_shuffle_epi8(tlo, hi), hh = _mm256_shuffle_epi8(thi, hi);                          \
        __m256i ll = _mm256_shuffle_epi8(tlo, lo), lh = _mm256_shuffle_epi8(thi, lo);                          \
        __m256i w0 = _mm256_unpacklo_epi8(hl, hh), w1 = _mm256_unpackhi_epi8(hl, hh);                          \
        __m256i w2 = _mm256_unpacklo_epi8(ll, lh), w3 = _mm256_unpackhi_epi8(ll, lh);                          \
        const float am = sc[jj];                                                                                \
        for (int b = 0; b < B; b++) {                                                                           \
            const int16_t *xp = xq + b * KP + (jj) * QB;                                                        \
            __m256i s = _mm256_madd_epi16(w0, _mm256_loadu_si256((const __m256i *)(xp)));                       \
            s = _mm256_add_epi32(s, _mm256_madd_epi16(w1, _mm256_loadu_si256((const __m256i *)(xp + 16))));     \
            s = _mm256_add_epi32(s, _mm256_madd_epi16(w2, _mm256_loadu_si256((const __m256i *)(xp + 32))));     \
            s = _mm256_add_epi32(s, _mm256_madd_epi16(w3, _mm256_loadu_si256((const __m256i *)(xp + 48))));     \
            const float f = B == 1 ? am : am * xs[b * nb + (jj)];                                               \
            ACC[b] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(f), ACC[b]);                        \
        }                                                                                                       \
    } while (0)
        int64_t j = 0;
        for (; j + 2 <= nb; j += 2) {
            _mm_prefetch((const char *)(pr + j * (QB / 2) + PF_Q4_AVX2), _MM_HINT_T0); /* one per 64-byte line */
            GF_Q4_BLOCK2(j, acc);
            GF_Q4_BLOCK2(j + 1, acc1);
        }
        if (j < nb) GF_Q4_BLOCK2(j, acc);
#undef GF_Q4_BLOCK2
        for (int b = 0; b < B; b++) tot[b] = hsum(_mm256_add_ps(acc[b], acc1[b])) * (1.0f / CODE_SCALE);
#else
        (void)code16;
        for (int b = 0; b < B; b++) {
            float t = 0.f;
            for (int64_t j = 0; j < nb; j++) {
                float s = 0.f;
                for (int p = 0; p < QB; p++) {
                    int e = q4_perm(p);
                    uint8_t byte = pr[j * (QB / 2) + e / 2];
                    int qi = (e & 1) ? (byte & 15) : (byte >> 4);
                    s += code[qi] * (float)xq[b * KP + j * QB + p];
                }
                t += s * block_absmax(q, n * nb + j) * xs[b * nb + j];
            }
            tot[b] = t;
        }
#endif
        float bi = bias ? bias[n] : 0.f;
        for (int b = 0; b < B; b++) y[b * ldy + n] = tot[b] + bi;
    }
}

/* One non-inlined copy per batch size: B is a constant and each copy gets its own register allocation. */
#define GF_Q4(b)                                                                                              \
    static __attribute__((noinline)) void gemv_q4_rows_##b(const q4w *q, const int16_t *code16,              \
                                                             const float *code, const float *bias, int64_t n0, \
                                                             int64_t n1, int64_t KP, const int16_t *xq,        \
                                                             const float *xs, float *y, int64_t ldy) {         \
        gemv_q4_rows_t(q, code16, code, bias, n0, n1, KP, xq, xs, b, y, ldy);                                 \
    }
GF_Q4(1) GF_Q4(2) GF_Q4(3) GF_Q4(4) GF_Q4(5) GF_Q4(6) GF_Q4(7) GF_Q4(8)
#undef GF_Q4

static void gemv_q4_rows(const q4w *q, const int16_t *code16, const float *code, const float *bias, int64_t n0,
                         int64_t n1, int64_t KP, const int16_t *xq, const float *xs, int B, float *y, int64_t ldy) {
    switch (B) {
#define GF_CASE(b) \
    case b: gemv_q4_rows_##b(q, code16, code, bias, n0, n1, KP, xq, xs, y, ldy); break;
        GF_CASE(1) GF_CASE(2) GF_CASE(3) GF_CASE(4) GF_CASE(5) GF_CASE(6) GF_CASE(7) GF_CASE(8)
#undef GF_CASE
    }
}

/* y[b, n] = sum_k W[n, k] x[b, k] + bias[n] for b < B <= 8; x has K columns (K <= KP, the rest is padding). */
void gf_gemv_q4(const uint8_t *packed, const float *absf, const uint8_t *absq, const float *absmax2,
                const float *code2, float offset, const float *code, const float *bias, int64_t N, int64_t K,
                int64_t KP, const float *x, int64_t ldx, int64_t B, float *y, int64_t ldy, int nthreads) {
    q4w q = {packed, absf, absq, absmax2, code2, offset};
    int16_t code16[16];
    for (int i = 0; i < 16; i++) code16[i] = (int16_t)lrintf(code[i] * CODE_SCALE);
    int16_t *xq = (int16_t *)aligned_alloc(64, (size_t)(B * KP * 2 + 64) / 64 * 64);
    float *xs = (float *)malloc(sizeof(float) * (size_t)(B * KP / QB + 1));
    quantize_x(x, ldx, B, K, KP, 1, xq, xs);
    int64_t chunk = 16;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t c = 0; c < (N + chunk - 1) / chunk; c++) {
        int64_t n0 = c * chunk, n1 = n0 + chunk < N ? n0 + chunk : N;
        gemv_q4_rows(&q, code16, code, bias, n0, n1, KP, xq, xs, (int)B, y, ldy);
    }
    free(xq);
    free(xs);
}

/* out [n1 - n0, K] fp32 = rows n0..n1 of W (the first K of each row's KP columns). */
void gf_dequant_q4(const uint8_t *packed, const float *absf, const uint8_t *absq, const float *absmax2,
                   const float *code2, float offset, const float *code, int64_t n0, int64_t n1, int64_t K,
                   int64_t KP, float *out, int nthreads) {
    q4w q = {packed, absf, absq, absmax2, code2, offset};
    int64_t nb = KP / QB;
    float pairs[256][2] __attribute__((aligned(64)));
    for (int i = 0; i < 256; i++) {
        pairs[i][0] = code[i >> 4];
        pairs[i][1] = code[i & 15];
    }
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *pr = packed + n * (KP / 2);
        float *o = out + (n - n0) * K;
        for (int64_t j = 0; j < nb; j++) {
            float am = block_absmax(&q, n * nb + j);
            float lut[16];
            for (int i = 0; i < 16; i++) lut[i] = code[i] * am;
            int64_t k0 = j * QB;
#if GF_AVX2
            if (k0 + QB <= K) {
                /* (code[hi], code[lo]) of each byte from a 256-entry pair table, times absmax: the same fp32
                 * product as lut[] and the reference, 8 outputs per multiply. */
                const uint8_t *pb = pr + j * (QB / 2);
                __m256 va = _mm256_set1_ps(am);
                for (int e = 0; e < QB / 2; e += 4) {
                    __m128 p0 = _mm_castpd_ps(_mm_load_sd((const double *)pairs[pb[e]]));
                    p0 = _mm_loadh_pi(p0, (const __m64 *)pairs[pb[e + 1]]);
                    __m128 p1 = _mm_castpd_ps(_mm_load_sd((const double *)pairs[pb[e + 2]]));
                    p1 = _mm_loadh_pi(p1, (const __m64 *)pairs[pb[e + 3]]);
                    __m256 v = _mm256_insertf128_ps(_mm256_castps128_ps256(p0), p1, 1);
                    _mm256_storeu_ps(o + k0 + 2 * e, _mm256_mul_ps(v, va));
                }
                continue;
            }
#endif
            if (k0 + QB <= K) {
                for (int e = 0; e < QB / 2; e++) {
                    uint8_t byte = pr[j * (QB / 2) + e];
                    o[k0 + 2 * e] = lut[byte >> 4];
                    o[k0 + 2 * e + 1] = lut[byte & 15];
                }
            } else {
                for (int64_t k = k0; k < K; k++) {
                    uint8_t byte = pr[k / 2];
                    o[k] = lut[(k & 1) ? (byte & 15) : (byte >> 4)];
                }
            }
        }
    }
}

/* ------------------------------------------------------------------------------------------------------------ */
/* bf16 tiles for the prefill product on CPUs with native bf16 arithmetic (see gyrfalcon/quant/linear.py). */

/* fp32 -> bf16 bits, rounded to nearest even (weights are finite: no NaN handling needed). */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* out [n1 - n0, K] bf16 bits = rows n0..n1 of W, rounded to bf16. For int8 the codes themselves are written (every
 * integer in [-127, 127] is exact in bf16) and the caller applies the row scales to the product in fp32. */
void gf_dequant_bf16_i8(const int8_t *w, int64_t n0, int64_t n1, int64_t K, uint16_t *out, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = n0; n < n1; n++) {
        const int8_t *wr = w + n * K;
        uint16_t *o = out + (n - n0) * K;
        for (int64_t k = 0; k < K; k++) o[k] = f32_to_bf16((float)wr[k]); /* exact; the compiler vectorizes it */
    }
}

void gf_dequant_bf16_q4(const uint8_t *packed, const float *absf, const uint8_t *absq, const float *absmax2,
                        const float *code2, float offset, const float *code, int64_t n0, int64_t n1, int64_t K,
                        int64_t KP, uint16_t *out, int nthreads) {
    q4w q = {packed, absf, absq, absmax2, code2, offset};
    int64_t nb = KP / QB;
#if defined(__AVX512BW__)
    /* A full block: its 16 bf16 values (code * absmax, rounded as f32_to_bf16 does) become a word table; the 64
     * nibbles are looked up with vpermw (high nibbles = even elements, low = odd) and interleaved back. */
    const __m512 vcode = _mm512_loadu_ps(code);
    int16_t i0[32], i1[32];
    for (int j = 0; j < 32; j++) {
        i0[j] = (int16_t)((j & 1) ? 32 + j / 2 : j / 2);
        i1[j] = (int16_t)(16 + ((j & 1) ? 32 + j / 2 : j / 2));
    }
    const __m512i idx0 = _mm512_loadu_si512(i0), idx1 = _mm512_loadu_si512(i1);
#endif
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *pr = packed + n * (KP / 2);
        uint16_t *o = out + (n - n0) * K;
        for (int64_t j = 0; j < nb; j++) {
            float am = block_absmax(&q, n * nb + j);
#if defined(__AVX512BW__)
            if ((j + 1) * QB <= K) {
                __m512i u = _mm512_castps_si512(_mm512_mul_ps(vcode, _mm512_set1_ps(am)));
                __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
                __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), odd), 16);
                __m512i tab = _mm512_castsi256_si512(_mm512_cvtepi32_epi16(r)); /* words 0..15; 16..31 unused */
                __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(pr + j * (QB / 2))));
                __m512i ev = _mm512_permutexvar_epi16(_mm512_srli_epi16(bytes, 4), tab);
                __m512i od = _mm512_permutexvar_epi16(_mm512_and_si512(bytes, _mm512_set1_epi16(15)), tab);
                _mm512_storeu_si512(o + j * QB, _mm512_permutex2var_epi16(ev, idx0, od));
                _mm512_storeu_si512(o + j * QB + 32, _mm512_permutex2var_epi16(ev, idx1, od));
                continue;
            }
#endif
            uint16_t lut[16]; /* the fp32 product code * absmax of the reference path, then rounded to bf16 */
            for (int i = 0; i < 16; i++) lut[i] = f32_to_bf16(code[i] * am);
            int64_t k0 = j * QB, k1 = k0 + QB < K ? k0 + QB : K;
            for (int64_t k = k0; k < k1; k++) {
                uint8_t byte = pr[k / 2];
                o[k] = lut[(k & 1) ? (byte & 15) : (byte >> 4)];
            }
        }
    }
}

/* ------------------------------------------------------------------------------------------------------------ */
/* One entry point with the weight described once (a struct the caller keeps), so a call passes few arguments. */

typedef struct {
    int64_t kind; /* 0: int8 rows, 1: 4-bit blocks */
    int64_t N, K, KP;
    const void *w;        /* int8 [N, K] or packed uint8 [N, KP/2] */
    const float *scale;   /* int8: per-row scale; 4-bit: fp32 absmax per block (NULL when double-quantized) */
    const uint8_t *absq;  /* 4-bit, double-quantized: uint8 absmax codes */
    const float *absmax2; /* per 256 blocks */
    const float *code2;   /* 256-entry dynamic map */
    const float *code;    /* 16-entry code book */
    double offset;
} gf_weight;

void gf_gemv(const gf_weight *W, const float *bias, const float *x, int64_t ldx, int64_t B, float *y, int64_t ldy,
             int nthreads) {
    if (W->kind == 0)
        gf_gemv_i8((const int8_t *)W->w, W->scale, bias, W->N, W->K, x, ldx, B, y, ldy, nthreads);
    else
        gf_gemv_q4((const uint8_t *)W->w, W->scale, W->absq, W->absmax2, W->code2, (float)W->offset, W->code, bias,
                   W->N, W->K, W->KP, x, ldx, B, y, ldy, nthreads);
}

/* ------------------------------------------------------------------------------------------------------------ */
/* Two products in one parallel pass (a parallel Falcon layer's decode step; see gemv_f32.c's pair and sum). Each
 * output is computed by the same row routine as gf_gemv, so the results are those of two gf_gemv calls. */

typedef struct {
    const gf_weight *W;
    const float *bias;
    q4w q;
    int16_t code16[16];
    int16_t *xq; /* the input quantized for this weight's kind */
    float *xs;
    int owns_x;
} gf_call;

#define ROW_CHUNK 16

static int call_init(gf_call *c, const gf_weight *W, const float *bias, const float *x, int64_t ldx, int64_t B,
                     const gf_call *share) {
    c->W = W;
    c->bias = bias;
    if (W->kind != 0) {
        q4w q = {(const uint8_t *)W->w, W->scale, W->absq, W->absmax2, W->code2, (float)W->offset};
        c->q = q;
        for (int i = 0; i < 16; i++) c->code16[i] = (int16_t)lrintf(W->code[i] * CODE_SCALE);
    }
    if (share && share->W->kind == W->kind && share->W->KP == W->KP && share->W->K == W->K) {
        c->xq = share->xq; /* the same input, quantized the same way */
        c->xs = share->xs;
        c->owns_x = 0;
        return 0;
    }
    c->xq = (int16_t *)aligned_alloc(64, (size_t)(B * W->KP * 2 + 64) / 64 * 64);
    c->xs = (float *)malloc(sizeof(float) * (size_t)(B * W->KP / QB + 1));
    c->owns_x = 1;
    if (!c->xq || !c->xs) return -1;
    quantize_x(x, ldx, B, W->K, W->KP, W->kind != 0, c->xq, c->xs);
    return 0;
}

static void call_free(gf_call *c) {
    if (c->owns_x) {
        free(c->xq);
        free(c->xs);
    }
}

static void call_rows(const gf_call *c, int64_t n0, int64_t n1, int64_t B, float *y, int64_t ldy) {
    const gf_weight *W = c->W;
    if (W->kind == 0)
        gemv_i8_rows((const int8_t *)W->w, W->scale, c->bias, n0, n1, W->K, W->KP, c->xq, c->xs, (int)B, y, ldy);
    else
        gemv_q4_rows(&c->q, c->code16, W->code, c->bias, n0, n1, W->KP, c->xq, c->xs, (int)B, y, ldy);
}

/* y1 = x W1^T + b1 [B, N1], y2 = x W2^T + b2 [B, N2] (row strides N1, N2); x [B, K] (row stride ldx) quantized once
 * when both weights take it the same way. Returns 0, or -1 when a buffer cannot be allocated. */
int gf_gemv_pair(const gf_weight *W1, const float *b1, const gf_weight *W2, const float *b2, const float *x,
                 int64_t ldx, int64_t B, float *y1, float *y2, int nthreads) {
    gf_call c1 = {0}, c2 = {0};
    int err = call_init(&c1, W1, b1, x, ldx, B, NULL);
    if (!err) err = call_init(&c2, W2, b2, x, ldx, B, &c1);
    if (!err) {
        const int64_t m1 = (W1->N + ROW_CHUNK - 1) / ROW_CHUNK, m2 = (W2->N + ROW_CHUNK - 1) / ROW_CHUNK;
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t c = 0; c < m1 + m2; c++) {
            const gf_call *k = c < m1 ? &c1 : &c2;
            const int64_t n0 = (c < m1 ? c : c - m1) * ROW_CHUNK, N = k->W->N;
            call_rows(k, n0, n0 + ROW_CHUNK < N ? n0 + ROW_CHUNK : N, B, c < m1 ? y1 : y2, N);
        }
    }
    call_free(&c1);
    call_free(&c2);
    return err;
}

/* y = (x1 W1^T + b1) + (x2 W2^T + b2) + r, added in that order, [B, N] (row stride N; x1, x2 row strides K1, K2; r
 * may be NULL). Returns 0, or -1 when a buffer cannot be allocated. */
int gf_gemv_sum(const gf_weight *W1, const float *b1, const float *x1, const gf_weight *W2, const float *b2,
                const float *x2, const float *r, int64_t B, float *y, int nthreads) {
    const int64_t N = W1->N;
    gf_call c1 = {0}, c2 = {0};
    float *p = (float *)malloc(sizeof(float) * (size_t)(2 * B * N + 1)), *q = p ? p + B * N : NULL;
    int err = p ? call_init(&c1, W1, b1, x1, W1->K, B, NULL) : -1;
    if (!err) err = call_init(&c2, W2, b2, x2, W2->K, B, NULL);
    if (!err) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t c = 0; c < (N + ROW_CHUNK - 1) / ROW_CHUNK; c++) {
            const int64_t n0 = c * ROW_CHUNK, n1 = n0 + ROW_CHUNK < N ? n0 + ROW_CHUNK : N;
            call_rows(&c1, n0, n1, B, p, N);
            call_rows(&c2, n0, n1, B, q, N);
            for (int64_t b = 0; b < B; b++)
                for (int64_t n = n0; n < n1; n++) {
                    const float v = p[b * N + n] + q[b * N + n];
                    y[b * N + n] = r ? v + r[b * N + n] : v;
                }
        }
    }
    call_free(&c1);
    call_free(&c2);
    free(p);
    return err;
}
