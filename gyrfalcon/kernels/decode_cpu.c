/* gyrfalcon CPU kernels for the small per-token operations of a decode step (fp32), between the linears.
 *
 * Why: at one token a row, the work between two matrix-vector products is tiny (a 250M Falcon attends 16 heads of
 * 64 over a few hundred keys), but in torch it is a dozen operator calls per layer (rotary: mul, roll, mul, add;
 * the cache write; a gather of the cached keys from the block pool; baddbmm, softmax, bmm; GELU), each with
 * microseconds of dispatch, and some slow for their size (erf-GELU of 4096 values: ~14 us; a 16 x 64 x 200 baddbmm
 * through MKL: ~18 us). Measured on the 250M model that was 3-4 ms a token: a quarter of a 4-bit decode step.
 *
 *   gf_attn_decode   rotary + cache write + attention of one new token per row, reading keys and values where they
 *                    lie (a contiguous KVCache or the engine's block pool), no gather
 *   gf_gelu          exact (erf) GELU in place
 *
 * Both have a torch reference in the model code (gyrfalcon/models/falcon.py), which also runs whenever these do
 * not apply; tests/test_decode_kernels.py holds the two together.
 *
 * Arithmetic. Rotary: x * cos + roll(x, d/2) * sin_signed with each product and the sum rounded to fp32 (built
 * with -ffp-contract=off), bit for bit what the torch reference computes. Attention: q.k in fp32 with 16-lane
 * partial sums, times 1/sqrt(d); softmax with the row maximum subtracted, exp by a degree-6 polynomial on
 * [-ln2/2, ln2/2] (within 2 ulp of expf); the weighted sum of values divided by the sum of weights at the end.
 * GELU: x * 0.5 * (1 + erf(x / sqrt 2)) with erf by Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7, the
 * formula torch's own vectorized erf uses), so results agree with torch to a few fp32 ulps, not bit for bit.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
/* 8-lane AVX2 code on every x86 CPU that has it, AVX-512 ones included: a head of 64 is 8 registers either way,
 * and one code path is one path to test. */
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
/* 8 lanes */
#define GF_VL 8
typedef __m256 vf;
typedef __m256i vi;
#define v_load _mm256_loadu_ps
#define v_store _mm256_storeu_ps
#define v_set1 _mm256_set1_ps
#define v_zero _mm256_setzero_ps
#define v_add _mm256_add_ps
#define v_sub _mm256_sub_ps
#define v_mul _mm256_mul_ps
#define v_div _mm256_div_ps
#define v_fmadd _mm256_fmadd_ps
#define v_min _mm256_min_ps
#define v_max _mm256_max_ps
static inline float v_sum(vf v) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}
#define v_round(x) _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define v_cvt_i _mm256_cvtps_epi32
#define vi_add _mm256_add_epi32
#define vi_set1 _mm256_set1_epi32
#define vi_sll _mm256_slli_epi32
#define v_as_i _mm256_castps_si256
#define vi_as_f _mm256_castsi256_ps
#define vi_and _mm256_and_si256
#define vi_or _mm256_or_si256
#define vi_andnot _mm256_andnot_si256
static inline vf v_zero_below(vf y, vf x, vf lo) { return _mm256_and_ps(y, _mm256_cmp_ps(x, lo, _CMP_GE_OQ)); }
#else
#define GF_VL 0
#endif

/* Below this many multiply-adds (scores + weighted values, all rows and heads) attention runs on the calling
 * thread: waking a second thread costs more than it saves, and on a busy host can cost milliseconds. */
#define ATTN_PARALLEL_WORK (1 << 20)

/* ---- exp, erf ------------------------------------------------------------------------------------------------ */

#if GF_VL
/* exp(x): 2^n * p(r), x = n ln2 + r (ln2 in two parts), p the Cephes expf polynomial; x below -87.33 gives 0. */
static inline vf v_exp(vf x) {
    const vf lo = v_set1(-87.33654f), hi = v_set1(88.0f);
    vf xc = v_min(v_max(x, lo), hi);
    vf n = v_round(v_mul(xc, v_set1(1.44269504088896341f)));
    vf r = v_sub(xc, v_mul(n, v_set1(0.693359375f)));
    r = v_sub(r, v_mul(n, v_set1(-2.12194440e-4f)));
    vf p = v_set1(1.9875691500E-4f);
    p = v_fmadd(p, r, v_set1(1.3981999507E-3f));
    p = v_fmadd(p, r, v_set1(8.3334519073E-3f));
    p = v_fmadd(p, r, v_set1(4.1665795894E-2f));
    p = v_fmadd(p, r, v_set1(1.6666665459E-1f));
    p = v_fmadd(p, r, v_set1(5.0000001201E-1f));
    p = v_add(v_fmadd(p, v_mul(r, r), r), v_set1(1.0f));
    /* n in [-126, 128]: 2^n as the float with exponent field n + 127 (2^128 -> inf, only past hi) */
    vf scale = vi_as_f(vi_sll(vi_add(v_cvt_i(n), vi_set1(127)), 23));
    return v_zero_below(v_mul(p, scale), x, lo);
}

/* erf(x) = sign(x) (1 - t (a1 + t (a2 + ...)) exp(-x^2)), t = 1 / (1 + p |x|). */
static inline vf v_erf(vf x) {
    const vf one = v_set1(1.0f);
    const vi sign_bit = vi_set1((int)0x80000000u);
    vf ax = vi_as_f(vi_andnot(sign_bit, v_as_i(x)));
    vf t = v_div(one, v_fmadd(v_set1(0.3275911f), ax, one));
    vf r = v_set1(1.061405429f);
    r = v_fmadd(r, t, v_set1(-1.453152027f));
    r = v_fmadd(r, t, v_set1(1.421413741f));
    r = v_fmadd(r, t, v_set1(-0.284496736f));
    r = v_fmadd(r, t, v_set1(0.254829592f));
    vf e = v_exp(v_sub(v_zero(), v_mul(ax, ax)));
    vf y = v_sub(one, v_mul(v_mul(r, t), e));
    return vi_as_f(vi_or(v_as_i(y), vi_and(v_as_i(x), sign_bit)));
}
#endif

/* ---- GELU ----------------------------------------------------------------------------------------------------- */

void gf_gelu(float *x, int64_t n) {
    int64_t i = 0;
#if GF_VL
    const vf half = v_set1(0.5f), one = v_set1(1.0f), alpha = v_set1(0.70710678118654752f);
    for (; i + GF_VL <= n; i += GF_VL) {
        vf v = v_load(x + i);
        v_store(x + i, v_mul(v_mul(v, half), v_add(one, v_erf(v_mul(v, alpha)))));
    }
    if (i < n) { /* the tail through a padded copy, so it is computed exactly like the rest */
        float buf[GF_VL] = {0};
        memcpy(buf, x + i, sizeof(float) * (size_t)(n - i));
        vf v = v_load(buf);
        v_store(buf, v_mul(v_mul(v, half), v_add(one, v_erf(v_mul(v, alpha)))));
        memcpy(x + i, buf, sizeof(float) * (size_t)(n - i));
        i = n;
    }
#endif
    for (; i < n; i++) x[i] = x[i] * 0.5f * (1.0f + erff(x[i] * 0.70710678118654752f));
}

/* ---- decode attention ------------------------------------------------------------------------------------------ */

static inline float dot(const float *a, const float *b, int64_t n) {
    int64_t i = 0;
    float s = 0.0f;
#if GF_VL
    vf acc0 = v_zero(), acc1 = v_zero();
    for (; i + 2 * GF_VL <= n; i += 2 * GF_VL) {
        acc0 = v_fmadd(v_load(a + i), v_load(b + i), acc0);
        acc1 = v_fmadd(v_load(a + i + GF_VL), v_load(b + i + GF_VL), acc1);
    }
    for (; i + GF_VL <= n; i += GF_VL) acc0 = v_fmadd(v_load(a + i), v_load(b + i), acc0);
    s = v_sum(v_add(acc0, acc1));
#endif
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* out[i] += w * v[i] */
static inline void axpy(float *out, float w, const float *v, int64_t n) {
    int64_t i = 0;
#if GF_VL
    const vf ww = v_set1(w);
    for (; i + GF_VL <= n; i += GF_VL) v_store(out + i, v_fmadd(ww, v_load(v + i), v_load(out + i)));
#endif
    for (; i < n; i++) out[i] += w * v[i];
}

/* dst = x * cos + roll(x, d/2) * sin_signed (sin_signed = [-sin, sin] over the two halves). */
static inline void rope(const float *x, const float *cs, const float *sn, float *dst, int64_t d) {
    const int64_t half = d / 2;
    for (int64_t i = 0; i < d; i++) {
        float a = x[i] * cs[i];
        float b = x[i < half ? i + half : i - half] * sn[i];
        dst[i] = a + b;
    }
}

/* Where the cache keeps position s of row b, KV head g: the row's block table maps s to a block, blocks hold
 * `bs` consecutive positions, a position's slot is `slot_stride` floats, a head `head_stride` floats into it.
 * The engine's pool: tables = block ids, slot_stride = G * d, head_stride = d. A contiguous KVCache
 * [B, G, cap, d]: one block of cap positions a row, table[b] = {b * G}, slot_stride = d, head_stride = cap * d. */
typedef struct {
    const int64_t *tables;
    int64_t ldt, bs, slot_stride, head_stride;
} kv_addr;

static inline int64_t kv_offset(const kv_addr *a, int64_t b, int64_t g, int64_t s) {
    return (a->tables[b * a->ldt + s / a->bs] * a->bs + s % a->bs) * a->slot_stride + g * a->head_stride;
}

#if GF_VL
/* dst[j] = q . k_j * scale for 8 keys k_j = kp + j * step: q is loaded once for the 8, and the 8 sums leave their
 * registers through one horizontal-add tree (a horizontal sum per key costs more than its 64 products). */
static inline void scores8(const float *q, const float *kp, int64_t step, int64_t d, float scale, float *dst) {
    vf acc[8];
    for (int j = 0; j < 8; j++) acc[j] = v_zero();
    int64_t c = 0;
    for (; c + 8 <= d; c += 8) {
        const vf qv = v_load(q + c);
        for (int j = 0; j < 8; j++) acc[j] = v_fmadd(qv, v_load(kp + j * step + c), acc[j]);
    }
    __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
    __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(acc[4], acc[5]), _mm256_hadd_ps(acc[6], acc[7]));
    __m256 r = _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
    float tmp[8];
    _mm256_storeu_ps(tmp, r);
    for (int j = 0; j < 8; j++) {
        float t = tmp[j];
        for (int64_t cc = c; cc < d; cc++) t += q[cc] * kp[j * step + cc];
        dst[j] = t * scale;
    }
}
#endif

/* The positions 0..L-1 of a row lie in runs: block `blk` of the row's table holds positions blk * bs ... */
#define FOR_RUNS(a, table, L, BASE, STORE, N, S0, ...)                                                           \
    for (int64_t S0 = 0, blk_ = 0; S0 < (L); S0 += (a)->bs, blk_++) {                                         \
        const int64_t N = (L) - S0 < (a)->bs ? (L) - S0 : (a)->bs;                                            \
        const float *BASE = (STORE) + (table)[blk_] * (a)->bs * (a)->slot_stride;                            \
        __VA_ARGS__                                                                                           \
    }

/* nh query heads of one row that share KV head g: scores over positions 0..L-1, softmax, weighted values.
 * q: the rotated queries [nh, d]; sc: scratch [nh, L]; out: [nh, d]. The heads are the inner loop: each block of
 * keys or values is read from memory once for all of them and reused from L1 (the cached keys and values of one
 * head of a long row do not fit in L1/L2, and reading them once per query head made the kernel cache-bound). */
static void attend_group(const float *q, int64_t nh, const float *ks, const float *vs, const kv_addr *a, int64_t b,
                         int64_t g, int64_t L, int64_t d, float scale, float *sc, float *out) {
    const int64_t *table = a->tables + b * a->ldt;
    const int64_t head = g * a->head_stride, step = a->slot_stride;
    FOR_RUNS(a, table, L, kbase, ks, n, s0, {
        const float *kp = kbase + head;
        int64_t i = 0;
#if GF_VL
        for (; i + 8 <= n; i += 8)
            for (int64_t hh = 0; hh < nh; hh++) scores8(q + hh * d, kp + i * step, step, d, scale, sc + hh * L + s0 + i);
#endif
        for (; i < n; i++)
            for (int64_t hh = 0; hh < nh; hh++) sc[hh * L + s0 + i] = dot(q + hh * d, kp + i * step, d) * scale;
    })
    float inv[nh > 0 ? nh : 1];
    for (int64_t hh = 0; hh < nh; hh++) { /* softmax numerators in place, and 1 / their sum */
        float *r = sc + hh * L;
        float mx = -INFINITY;
        for (int64_t s = 0; s < L; s++) mx = r[s] > mx ? r[s] : mx;
        float sum = 0.0f;
        int64_t s = 0;
#if GF_VL
        const vf m = v_set1(mx);
        vf acc = v_zero();
        for (; s + GF_VL <= L; s += GF_VL) {
            vf e = v_exp(v_sub(v_load(r + s), m));
            v_store(r + s, e);
            acc = v_add(acc, e);
        }
        sum = v_sum(acc);
#endif
        for (; s < L; s++) {
            r[s] = expf(r[s] - mx);
            sum += r[s];
        }
        inv[hh] = 1.0f / sum;
    }
    memset(out, 0, sizeof(float) * (size_t)(nh * d));
#if GF_VL
    if (d == 64) { /* the common head size: a head's 64 sums stay in 8 registers over a block of 8 positions */
        FOR_RUNS(a, table, L, vbase, vs, n, s0, {
            const float *vp = vbase + head;
            for (int64_t i0 = 0; i0 < n; i0 += 8) {
                const int64_t m = n - i0 < 8 ? n - i0 : 8;
                for (int64_t hh = 0; hh < nh; hh++) {
                    float *o = out + hh * 64;
                    const float *w = sc + hh * L + s0 + i0;
                    vf o0 = v_load(o), o1 = v_load(o + 8), o2 = v_load(o + 16), o3 = v_load(o + 24);
                    vf o4 = v_load(o + 32), o5 = v_load(o + 40), o6 = v_load(o + 48), o7 = v_load(o + 56);
                    for (int64_t j = 0; j < m; j++) {
                        const float *x = vp + (i0 + j) * step;
                        const vf wj = v_set1(w[j]);
                        o0 = v_fmadd(wj, v_load(x), o0);
                        o1 = v_fmadd(wj, v_load(x + 8), o1);
                        o2 = v_fmadd(wj, v_load(x + 16), o2);
                        o3 = v_fmadd(wj, v_load(x + 24), o3);
                        o4 = v_fmadd(wj, v_load(x + 32), o4);
                        o5 = v_fmadd(wj, v_load(x + 40), o5);
                        o6 = v_fmadd(wj, v_load(x + 48), o6);
                        o7 = v_fmadd(wj, v_load(x + 56), o7);
                    }
                    v_store(o, o0), v_store(o + 8, o1), v_store(o + 16, o2), v_store(o + 24, o3);
                    v_store(o + 32, o4), v_store(o + 40, o5), v_store(o + 48, o6), v_store(o + 56, o7);
                }
            }
        })
    } else
#endif
    {
        FOR_RUNS(a, table, L, vbase, vs, n, s0, {
            const float *vp = vbase + head;
            for (int64_t i = 0; i < n; i++)
                for (int64_t hh = 0; hh < nh; hh++) axpy(out + hh * d, sc[hh * L + s0 + i], vp + i * step, d);
        })
    }
    for (int64_t hh = 0; hh < nh; hh++)
        for (int64_t i = 0; i < d; i++) out[hh * d + i] *= inv[hh];
}

/* One new token per row. qkv [B, ldqkv]: per KV group g, (H/G) query heads then the key then the value, d each
 * (multi-query: G = 1; Falcon-RW's per-head [q, k, v]: G = H). cos/sin_signed [positions, d]. lengths[b]: tokens
 * row b had cached, i.e. the new token's position. The new (rotated) key and the value are written at that position
 * of k/v; every query head attends positions 0..lengths[b]; out [B, H * d] (row stride ldo).
 * Returns 0, or -1 when scratch memory cannot be allocated. */
int gf_attn_decode(const float *qkv, int64_t ldqkv, int64_t B, int64_t H, int64_t G, int64_t d, const float *cos,
                   const float *sin, const int64_t *lengths, const int64_t *tables, int64_t ldt, int64_t bs,
                   int64_t slot_stride, int64_t head_stride, float *k, float *v, float *out, int64_t ldo,
                   float scale, int nthreads) {
    const kv_addr a = {tables, ldt, bs, slot_stride, head_stride};
    const int64_t hg = H / G;
    int64_t maxL = 0, work = 0;
    for (int64_t b = 0; b < B; b++) {
        const int64_t p = lengths[b];
        const float *row = qkv + b * ldqkv;
        for (int64_t g = 0; g < G; g++) {
            const float *grp = row + g * (hg + 2) * d;
            const int64_t off = kv_offset(&a, b, g, p);
            rope(grp + hg * d, cos + p * d, sin + p * d, k + off, d);
            memcpy(v + off, grp + (hg + 1) * d, sizeof(float) * (size_t)d);
        }
        if (p + 1 > maxL) maxL = p + 1;
        work += (p + 1) * H * d * 2;
    }
    /* Work items: (row, KV group, a chunk of the group's query heads). The heads of a group are split only as far
     * as needed to give every thread work (each chunk reads the group's keys and values once). */
    const int threads = nthreads > 1 && work >= ATTN_PARALLEL_WORK && B * H > 1 ? nthreads : 1;
    int64_t per = hg;
    if (threads > 1 && B * G < threads) {
        const int64_t want = (threads + B * G - 1) / (B * G); /* chunks per group */
        per = (hg + want - 1) / want;
    }
    const int64_t chunks = (hg + per - 1) / per, items = B * G * chunks;
    /* per thread: the scores of `per` heads (per * maxL) and their rotated queries (per * d) */
    const int64_t each = per * (maxL + d);
    float *scratch = (float *)malloc(sizeof(float) * (size_t)(threads * each));
    if (scratch == NULL) return -1;
#pragma omp parallel for if (threads > 1) num_threads(threads) schedule(static)
    for (int64_t item = 0; item < items; item++) {
        int tid = 0;
#ifdef _OPENMP
        tid = omp_get_thread_num();
#endif
        float *sc = scratch + tid * each, *qr = sc + per * maxL;
        const int64_t b = item / (G * chunks), g = item / chunks % G, c = item % chunks;
        const int64_t i0 = c * per, nh = hg - i0 < per ? hg - i0 : per;
        const int64_t p = lengths[b];
        const float *grp = qkv + b * ldqkv + g * (hg + 2) * d;
        for (int64_t i = 0; i < nh; i++) rope(grp + (i0 + i) * d, cos + p * d, sin + p * d, qr + i * d, d);
        attend_group(qr, nh, k, v, &a, b, g, p + 1, d, scale, sc, out + b * ldo + (g * hg + i0) * d);
    }
    free(scratch);
    return 0;
}
