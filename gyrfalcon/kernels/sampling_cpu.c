/* gyrfalcon CPU kernel for nucleus (top-p) filtering: which tokens of a row top-p drops, without torch.sort.
 *
 * The reference (gyrfalcon/runtime/sampling.py, filter_top_k_top_p) sorts the row's logits in descending order,
 * ties by token id (a stable sort), takes the probabilities in that order, and drops a token when
 * cumsum(p) - p >= top_p in fp32, never the first. torch.sort of a 65,024-token row takes ~2.8 ms on the 2-core
 * machine we measure on, and a random or high-temperature model's nucleus is most of the vocabulary, so the
 * reference sorts whole rows: 16 rows were ~45 ms of a server's decode step. This kernel gives the same mask
 * bit for bit from a stable LSD radix sort (3 passes of 11 bits over 32-bit keys):
 *
 *   - key: the logit's bits mapped so that unsigned order is float order (negatives flipped, positives with the
 *     sign bit set), -0.0 taken as +0.0 (torch compares them equal), then inverted for descending order. LSD radix
 *     sort is stable, so equal logits stay in token-id order, as torch's stable sort leaves them.
 *   - cumsum: torch's CPU cumsum of fp32 accumulates in double and rounds each prefix to fp32; so does this.
 *   - the comparison: (fp32 prefix - fp32 p) >= (fp32) top_p, the comparison of an fp32 tensor with a Python
 *     float.
 * tests/test_sampling.py holds kernel and reference together on rows with ties, signed zeros and -inf.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define RADIX_BITS 11
#define RADIX (1 << RADIX_BITS)

static inline uint32_t desc_key(float f) {
    uint32_t u;
    if (f == 0.0f) f = 0.0f; /* -0.0 == +0.0 */
    memcpy(&u, &f, 4);
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u); /* ascending unsigned order = ascending float order */
    return ~u;                                        /* descending */
}

/* Sort one row: order[i] = token id of rank i (descending logit, ties by id). keys/tmp scratch of V entries. */
static void sort_desc(const float *logits, int64_t V, uint32_t *keys, uint32_t *keys2, int32_t *order,
                      int32_t *order2) {
    for (int64_t i = 0; i < V; i++) {
        keys[i] = desc_key(logits[i]);
        order[i] = (int32_t)i;
    }
    int64_t count[RADIX];
    for (int shift = 0; shift < 32; shift += RADIX_BITS) {
        memset(count, 0, sizeof(count));
        for (int64_t i = 0; i < V; i++) count[(keys[i] >> shift) & (RADIX - 1)]++;
        int64_t sum = 0;
        for (int d = 0; d < RADIX; d++) {
            int64_t c = count[d];
            count[d] = sum;
            sum += c;
        }
        for (int64_t i = 0; i < V; i++) {
            int64_t pos = count[(keys[i] >> shift) & (RADIX - 1)]++;
            keys2[pos] = keys[i];
            order2[pos] = order[i];
        }
        uint32_t *tk = keys;
        keys = keys2;
        keys2 = tk;
        int32_t *to = order;
        order = order2;
        order2 = to;
    }
    /* Three passes: the result is in the scratch buffers; copy back so the caller's `order` holds it. */
    memcpy(order2, order, sizeof(int32_t) * (size_t)V);
}

/* drop[r * V + v] = 1 where top-p drops token v of row r, else 0. logits, probs: [rows, V] row-major fp32;
 * top_p: [rows]. Returns 0, or -1 when scratch memory cannot be allocated (nothing written then). */
int gf_top_p_drop(const float *logits, const float *probs, int64_t rows, int64_t V, const float *top_p,
                  uint8_t *drop, int nthreads) {
    int failed = 0;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1) reduction(| : failed)
    for (int64_t r = 0; r < rows; r++) {
        uint32_t *keys = malloc(sizeof(uint32_t) * 2 * (size_t)V);
        int32_t *order = malloc(sizeof(int32_t) * 2 * (size_t)V);
        if (!keys || !order) {
            free(keys);
            free(order);
            failed = 1;
            continue;
        }
        sort_desc(logits + r * V, V, keys, keys + V, order, order + V);
        const float *p = probs + r * V;
        uint8_t *d = drop + r * V;
        const float limit = top_p[r];
        double acc = 0.0;
        for (int64_t i = 0; i < V; i++) {
            const int32_t t = order[i];
            const float pi = p[t];
            acc += (double)pi;
            const float before = (float)acc - pi;
            d[t] = i > 0 && before >= limit;
        }
        free(keys);
        free(order);
    }
    return failed ? -1 : 0;
}
