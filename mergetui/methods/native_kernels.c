/*
 * Fused CPU loops for the task-vector merges (TIES, DARE and DELLA), called through ctypes.
 *
 * Why C: op by op in torch a TIES tensor is read and written some thirty times, and torch.compile,
 * which fuses the same ops, costs several seconds per process just to load its cached kernels. These
 * loops touch each element three or four times, need no runtime beyond libc, and compile in under a
 * second with the C compiler torch.compile would need anyway (see native.py for the build).
 *
 * Every function works on one range of a flat float32 tensor and keeps no state, so the Python side
 * splits tensors across threads (ctypes releases the GIL). The arithmetic is the op-by-op torch
 * path's, operation for operation, in float32 with no contraction into FMA (-ffp-contract=off): the
 * results are bit-identical, which the tests check.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define RADIX 65536
#define BLOCK 1024 /* elements per block of the fused loops: a few KiB per input, in L1 */

/* |x| as its bit pattern: for non-negative floats it orders like the values. */
static inline uint32_t magnitude_bits(float x) {
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    return bits & 0x7fffffffu;
}

/* delta[i] -= base[i] on [start, end), and the magnitude bits of every `step`-th element (counted
 * from 0, so that any split of the range samples the same elements) into sample[i / step]. */
void mt_subtract_and_sample(float *restrict delta, const float *restrict base, int64_t start,
                            int64_t end, int64_t step, uint32_t *restrict sample) {
    for (int64_t i = start; i < end; i++) delta[i] -= base[i];
    const int64_t first = (start + step - 1) / step * step;
    for (int64_t i = first; i < end; i += step) sample[i / step] = magnitude_bits(delta[i]);
}

/* On [start, end): how many magnitudes have a bit pattern above `pattern` and how many equal it
 * (added to counts[0] and counts[1]). */
void mt_count_pattern(const float *restrict values, int64_t start, int64_t end, uint32_t pattern,
                      int64_t *restrict counts) {
    int64_t above = 0, same = 0;
    for (int64_t i = start; i < end; i++) {
        const uint32_t bits = magnitude_bits(values[i]);
        above += bits > pattern;
        same += bits == pattern;
    }
    counts[0] += above;
    counts[1] += same;
}

/* The bin holding the k-th largest entry of a histogram whose `offset` entries lie above every
 * bin, and (in *above) how many entries lie above that bin. */
static int64_t bin_from_top(const int64_t *histogram, int64_t k, int64_t offset, int64_t *above) {
    int64_t seen = offset;
    for (int64_t bin = RADIX - 1; bin > 0; bin--) {
        if (seen + histogram[bin] >= k) {
            *above = seen;
            return bin;
        }
        seen += histogram[bin];
    }
    *above = seen;
    return 0;
}

/* The k-th largest (1 <= k <= n) of n values below 2^31, by a two-level 16-bit radix selection:
 * used on the 1-in-16 sample of magnitude bits. Returns -1 when out of memory. */
int64_t mt_kth_largest_bits(const uint32_t *restrict bits, int64_t n, int64_t k) {
    int64_t *histogram = calloc(RADIX, sizeof *histogram);
    if (histogram == NULL) return -1;
    for (int64_t i = 0; i < n; i++) histogram[bits[i] >> 16]++;
    int64_t above = 0;
    const uint32_t high = (uint32_t)bin_from_top(histogram, k, 0, &above);
    memset(histogram, 0, RADIX * sizeof *histogram);
    for (int64_t i = 0; i < n; i++) {
        if (bits[i] >> 16 == high) histogram[bits[i] & 0xffffu]++;
    }
    int64_t unused = 0;
    const uint32_t low = (uint32_t)bin_from_top(histogram, k, above, &unused);
    free(histogram);
    return (int64_t)((high << 16) | low);
}

/* Histogram of the top 16 magnitude bits on [start, end). */
void mt_top_histogram(const float *restrict values, int64_t start, int64_t end,
                      int64_t *restrict histogram) {
    for (int64_t i = start; i < end; i++) histogram[magnitude_bits(values[i]) >> 16]++;
}

/* On [start, end): a histogram of the low 16 bits of the magnitudes whose top 16 bits equal
 * `high` (counts[0..RADIX-1]), and how many have top 16 bits above it (added to counts[RADIX]). Few entries fall in one bucket
 * (a fraction of a percent), so runs of 64 are counted with vector code and only runs that hold
 * one are walked to update the histogram. */
void mt_bucket(const float *restrict values, int64_t start, int64_t end, uint32_t high,
               int64_t *restrict counts) {
    int64_t count = 0;
    for (int64_t run = start; run < end; run += 64) {
        const int64_t stop = end - run < 64 ? end : run + 64;
        uint32_t inside = 0;
        for (int64_t i = run; i < stop; i++) {
            const uint32_t top = magnitude_bits(values[i]) >> 16;
            count += top > high;
            inside += top == high;
        }
        if (inside == 0) continue;
        for (int64_t i = run; i < stop; i++) {
            const uint32_t bits = magnitude_bits(values[i]);
            if (bits >> 16 == high) counts[bits & 0xffffu]++;
        }
    }
    counts[RADIX] += count;
}

/* The top-16-bit bin, in [0, RADIX), of a float's order key: its bits for x >= +0, the magnitude
 * bits flipped below (so keys order like the values, signs included), as a signed 32-bit integer
 * shifted right by 16 and offset by half the radix (fusion.py's _order_keys and _top_bins). */
static inline uint32_t order_key(float x) {
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    return bits & 0x80000000u ? bits ^ 0x7fffffffu : bits;
}

static inline uint32_t key_top_bin(uint32_t key) { return (key >> 16) ^ 0x8000u; }

/* Histogram of the order keys' top-16-bit bins on [start, end). */
void mt_key_top_histogram(const float *restrict values, int64_t start, int64_t end,
                          int64_t *restrict histogram) {
    for (int64_t i = start; i < end; i++) histogram[key_top_bin(order_key(values[i]))]++;
}

/* On [start, end): a histogram of the low 16 bits of the order keys whose top-16-bit bin is
 * `bin` (counts[0..RADIX-1]; counts[RADIX] is left alone), runs of 64 skipped when none is in it,
 * as mt_bucket does. */
void mt_key_bucket(const float *restrict values, int64_t start, int64_t end, uint32_t bin,
                   int64_t *restrict counts) {
    for (int64_t run = start; run < end; run += 64) {
        const int64_t stop = end - run < 64 ? end : run + 64;
        uint32_t inside = 0;
        for (int64_t i = run; i < stop; i++) inside += key_top_bin(order_key(values[i])) == bin;
        if (inside == 0) continue;
        for (int64_t i = run; i < stop; i++) {
            const uint32_t key = order_key(values[i]);
            if (key_top_bin(key) == bin) counts[key & 0xffffu]++;
        }
    }
}

/* SCE's drop on [start, end): every task vector's entry becomes +0 where the kept variance is 0
 * (what torch's masked_fill_ gives; a NaN variance keeps the entry). masked_fill_ walks its mask
 * one element at a time; this loop vectorises. */
void mt_zero_where_zero(float *const *deltas, int32_t count, const float *restrict variance,
                        int64_t start, int64_t end) {
    for (int32_t k = 0; k < count; k++) {
        float *restrict delta = deltas[k];
        for (int64_t i = start; i < end; i++) delta[i] = variance[i] == 0.0f ? 0.0f : delta[i];
    }
}

/* How many magnitudes on [start, end) have exactly the bit pattern `pattern`. */
int64_t mt_count_equal(const float *restrict values, int64_t start, int64_t end,
                       uint32_t pattern) {
    int64_t count = 0;
    for (int64_t i = start; i < end; i++) count += magnitude_bits(values[i]) == pattern;
    return count;
}

/* The index just after the `wanted`-th magnitude equal to `pattern` at or after `start` (end when
 * there are fewer): entries tied at the TIES threshold are kept lowest index first. Whole blocks
 * are counted with the vectorised loop; only the block where the count runs out is walked. */
int64_t mt_tie_cutoff(const float *restrict values, int64_t start, int64_t end, uint32_t pattern,
                      int64_t wanted) {
    if (wanted <= 0) return start;
    for (int64_t block = start; block < end; block += BLOCK) {
        const int64_t stop = end - block < BLOCK ? end : block + BLOCK;
        const int64_t here = mt_count_equal(values, block, stop, pattern);
        if (here < wanted) {
            wanted -= here;
            continue;
        }
        for (int64_t i = block; i < stop; i++) {
            if (magnitude_bits(values[i]) == pattern && --wanted == 0) return i + 1;
        }
    }
    return end;
}

/* x where mask is all ones, +0.0 where it is zero: a select the compiler turns into a vector AND. */
static inline float masked(float x, uint32_t mask) {
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    bits &= mask;
    memcpy(&x, &bits, sizeof x);
    return x;
}

/* Breadcrumbs' rank window on [start, end) of a flat tensor, in place: an entry is kept when its
 * magnitude's pattern lies strictly between `low` and `high`, or equals one of them and its index
 * is in that bound's [from, to) (the equal entries whose rank by magnitude falls inside the window:
 * ranks of equal entries follow their index, so they are a range of indices, which RankWindow
 * finds with mt_tie_cutoff); every other entry becomes +0.0, as the torch path's masked_fill_.
 * The bounds are finite or infinite magnitudes, never NaN patterns (the caller checks). */
void mt_keep_window(float *restrict values, int64_t start, int64_t end, uint32_t low,
                    uint32_t high, int64_t low_from, int64_t low_to, int64_t high_from,
                    int64_t high_to) {
    for (int64_t i = start; i < end; i++) {
        const uint32_t bits = magnitude_bits(values[i]);
        const uint32_t inside = (uint32_t)(bits > low) & (uint32_t)(bits < high);
        const uint32_t at_low =
            (uint32_t)(bits == low) & (uint32_t)(i >= low_from) & (uint32_t)(i < low_to);
        const uint32_t at_high =
            (uint32_t)(bits == high) & (uint32_t)(i >= high_from) & (uint32_t)(i < high_to);
        values[i] = masked(values[i], 0u - (inside | at_low | at_high));
    }
}

/* TIES sign election on [start, end) for `models` task vectors, result into base:
 *   v_j = w_j * d_j where d_j is kept (|d_j| above its threshold, or equal to it before its tie
 *   cutoff), else 0; s = sign(sum_j v_j) with 0 counting as +; agreeing entries (v_j * s > 0) are
 *   summed, divided (normalize) by the sum of the agreeing models' weights (1 where none agrees),
 *   times lambda, plus base.
 * The deltas are only read. Written without branches in the
 * inner loops (masks instead of conditionals) so that they vectorise. */
void mt_ties_elect(float *restrict base, const float *const *deltas, int32_t models, int64_t start,
                   int64_t end, const uint32_t *thresholds, const int64_t *cutoffs,
                   const float *weights, int32_t normalize, float scale) {
    float total[BLOCK], mixed[BLOCK], divisor[BLOCK];
    float values[models][BLOCK]; /* models * 4 KiB: the kept, weighted entries of this block */
    for (int64_t block = start; block < end; block += BLOCK) {
        const int64_t count = end - block < BLOCK ? end - block : BLOCK;
        for (int32_t j = 0; j < models; j++) {
            const float *restrict d = deltas[j] + block;
            float *restrict v = values[j];
            const uint32_t threshold = thresholds[j];
            const int64_t cutoff = cutoffs[j] - block;
            const float weight = weights[j];
            for (int64_t i = 0; i < count; i++) {
                const uint32_t bits = magnitude_bits(d[i]);
                const uint32_t keep = (uint32_t)(bits > threshold) |
                                      ((uint32_t)(bits == threshold) & (uint32_t)(i < cutoff));
                v[i] = masked(d[i] * weight, 0u - keep);
            }
        }
        {
            const float *restrict v = values[0];
            for (int64_t i = 0; i < count; i++) total[i] = v[i];
        }
        for (int32_t j = 1; j < models; j++) {
            const float *restrict v = values[j];
            for (int64_t i = 0; i < count; i++) total[i] = total[i] + v[i];
        }
        for (int64_t i = 0; i < count; i++) {
            mixed[i] = 0.0f;
            divisor[i] = 0.0f;
        }
        for (int32_t j = 0; j < models; j++) {
            const float *restrict v = values[j];
            const float weight = weights[j];
            for (int64_t i = 0; i < count; i++) {
                const uint32_t positive = (uint32_t)(total[i] >= 0.0f);
                const uint32_t agree = (positive & (uint32_t)(v[i] > 0.0f)) |
                                       ((positive ^ 1u) & (uint32_t)(v[i] < 0.0f));
                mixed[i] = mixed[i] + masked(v[i], 0u - agree);
                divisor[i] = divisor[i] + masked(weight, 0u - agree);
            }
        }
        float *restrict out = base + block;
        if (normalize) {
            for (int64_t i = 0; i < count; i++) {
                const uint32_t none = (uint32_t)(divisor[i] == 0.0f);
                const float safe = masked(divisor[i], none - 1u) + masked(1.0f, 0u - none);
                out[i] = out[i] + scale * (mixed[i] / safe);
            }
        } else {
            for (int64_t i = 0; i < count; i++) out[i] = out[i] + scale * mixed[i];
        }
    }
}

/* Philox4x32-10 (Salmon et al., SC'11; Random123's philox4x32_R with R = 10), the counter-based
 * generator of DARE's and DELLA's drops; mergetui/methods/philox.py computes the same bits in torch
 * ops. Flat index i of a stream draws word i % 4 of the block for counter {i / 4 (low 64 bits), 0, 0}
 * under the stream's 64-bit key (low word first), as the float32 (word >> 8) * 2^-24. Each draw
 * depends only on (key, i), so any split of a range across threads gives the same bits. The rounds
 * run on LANES counters at a time, one array per word, so that the compiler vectorises them
 * (32 x 32 -> 64-bit products are one vector instruction on x86-64 and AArch64). */
#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u
#define PHILOX_W1 0xBB67AE85u
#define LANES 256

static void philox_rounds(uint32_t *restrict x0, uint32_t *restrict x1, uint32_t *restrict x2,
                          uint32_t *restrict x3, int64_t lanes, uint32_t k0, uint32_t k1) {
    for (int round = 0; round < 10; round++) {
        for (int64_t l = 0; l < lanes; l++) {
            const uint64_t p0 = (uint64_t)PHILOX_M0 * x0[l];
            const uint64_t p1 = (uint64_t)PHILOX_M1 * x2[l];
            const uint32_t y0 = (uint32_t)(p1 >> 32) ^ x1[l] ^ k0;
            const uint32_t y2 = (uint32_t)(p0 >> 32) ^ x3[l] ^ k1;
            x1[l] = (uint32_t)p1;
            x3[l] = (uint32_t)p0;
            x0[l] = y0;
            x2[l] = y2;
        }
        k0 += PHILOX_W0;
        k1 += PHILOX_W1;
    }
}

/* The uniforms of flat indices index .. index + n - 1 of stream `key` into out[0 .. n - 1]. */
static void philox_uniforms(float *restrict out, uint64_t key, uint64_t index, int64_t n) {
    uint32_t x0[LANES], x1[LANES], x2[LANES], x3[LANES], bits[4 * LANES];
    const uint32_t k0 = (uint32_t)key, k1 = (uint32_t)(key >> 32);
    while (n > 0) {
        const uint64_t counter = index >> 2;
        const int64_t skip = (int64_t)(index & 3u);
        int64_t lanes = (skip + n + 3) >> 2;
        if (lanes > LANES) lanes = LANES;
        for (int64_t l = 0; l < lanes; l++) {
            const uint64_t c = counter + (uint64_t)l;
            x0[l] = (uint32_t)c;
            x1[l] = (uint32_t)(c >> 32);
            x2[l] = 0;
            x3[l] = 0;
        }
        philox_rounds(x0, x1, x2, x3, lanes, k0, k1);
        for (int64_t l = 0; l < lanes; l++) {
            bits[4 * l] = x0[l];
            bits[4 * l + 1] = x1[l];
            bits[4 * l + 2] = x2[l];
            bits[4 * l + 3] = x3[l];
        }
        int64_t made = 4 * lanes - skip;
        if (made > n) made = n;
        for (int64_t t = 0; t < made; t++) out[t] = (float)(bits[skip + t] >> 8) * 0x1p-24f;
        out += made;
        index += (uint64_t)made;
        n -= made;
    }
}

/* Philox4x32-10 of one 128-bit counter (four words, low first) under a 64-bit key, in place: the
 * raw block, for the known-answer tests (the streams below only use counters below 2^64). */
void mt_philox4x32_10(uint32_t *words, uint64_t key) {
    philox_rounds(words, words + 1, words + 2, words + 3, 1, (uint32_t)key, (uint32_t)(key >> 32));
}

/* out[i] = the uniform of flat index offset + i of stream `key`, for i in [start, end). */
void mt_philox_uniform(float *restrict out, uint64_t key, int64_t offset, int64_t start,
                       int64_t end) {
    if (end > start) philox_uniforms(out + start, key, (uint64_t)(offset + start), end - start);
}

/* DARE's drop on [start, end) of a flat block whose element 0 is flat index `offset` of the tensor:
 * delta[i] is multiplied by 1 when the uniform of index offset + i is below `density`, else by 0
 * (as the torch path's mul_ by the mask: -0 and NaN as torch gives them). The uniforms are made
 * BLOCK at a time in a stack buffer that stays in L1: no tensor-sized buffer of draws. */
void mt_dare_drop(float *restrict delta, uint64_t key, int64_t offset, int64_t start, int64_t end,
                  float density) {
    float draws[BLOCK];
    for (int64_t block = start; block < end; block += BLOCK) {
        const int64_t count = end - block < BLOCK ? end - block : BLOCK;
        philox_uniforms(draws, key, (uint64_t)(offset + block), count);
        float *restrict d = delta + block;
        for (int64_t i = 0; i < count; i++) {
            const float keep = draws[i] < density ? 1.0f : 0.0f;
            d[i] = d[i] * keep;
        }
    }
}

/* DELLA's MagPrune on rows [row_start, row_end) of a rows x width matrix, in place. In each row the
 * entry of ascending magnitude rank r (equal magnitudes ranked in index order) is kept when
 * u_j < p(r), u_j the Philox uniform of flat index offset + row * width + j of stream `key` (offset:
 * the flat index of the matrix's first entry in the whole tensor), with p(r) = (r / (width - 1)) * 2 * epsilon + low (low = density - epsilon),
 * or p = density for a row of one entry; otherwise it is zeroed. The arithmetic is the torch path's
 * (della_prune_), operation for operation in float32. Ranks come from a stable LSD radix sort of
 * the 31-bit magnitude patterns (four 8-bit digits, all four histograms counted in one pass over
 * the row, a digit every key shares skipped), which costs a few passes over a row that stays in
 * cache, where a comparison sort costs log2(width). 8-bit digits keep the per-row histogram work
 * (clearing and prefix sums, 4 x 256 counts) small beside rows of a thousand entries; 11-bit ones
 * cleared and summed 3 x 2048 counts per row, more than the row itself.
 * Returns 0, or -1 when the scratch buffers cannot be allocated. */
#define DIGIT_BITS 8
#define DIGITS (1 << DIGIT_BITS)
#define DIGIT_PASSES 4
int64_t mt_della_rows(float *restrict delta, uint64_t key, int64_t offset, int64_t width,
                      int64_t row_start, int64_t row_end, float low, float epsilon, float density) {
    uint32_t *keys = malloc(2 * (size_t)width * sizeof *keys);
    uint32_t *order = malloc(2 * (size_t)width * sizeof *order);
    float *draws = malloc((size_t)width * sizeof *draws);
    float *keep_below = malloc((size_t)width * sizeof *keep_below);
    if (keys == NULL || order == NULL || draws == NULL || keep_below == NULL) {
        free(keys);
        free(order);
        free(draws);
        free(keep_below);
        return -1;
    }
    int64_t counts[DIGIT_PASSES][DIGITS];
    /* p(rank), the same for every row: made once (a division per entry was a fifth of the time) */
    const float span = (float)(width - 1);
    for (int64_t rank = 0; rank < width; rank++) {
        float p;
        if (width > 1) {
            p = (float)rank / span;
            p = p * 2.0f;
            p = p * epsilon;
            p = p + low;
        } else {
            p = density;
        }
        keep_below[rank] = p;
    }
    for (int64_t row = row_start; row < row_end; row++) {
        float *values = delta + row * width;
        philox_uniforms(draws, key, (uint64_t)(offset + row * width), width);
        uint32_t *key_in = keys, *key_out = keys + width;
        uint32_t *order_in = order, *order_out = order + width;
        memset(counts, 0, sizeof counts);
        for (int64_t j = 0; j < width; j++) {
            const uint32_t bits = magnitude_bits(values[j]);
            key_in[j] = bits;
            order_in[j] = (uint32_t)j;
            for (int pass = 0; pass < DIGIT_PASSES; pass++) {
                counts[pass][(bits >> (pass * DIGIT_BITS)) & (DIGITS - 1)]++;
            }
        }
        for (int pass = 0; pass < DIGIT_PASSES; pass++) {
            const int shift = pass * DIGIT_BITS;
            int64_t *digit_counts = counts[pass];
            if (digit_counts[(key_in[0] >> shift) & (DIGITS - 1)] == width) continue; /* alike */
            int64_t total = 0;
            for (int64_t d = 0; d < DIGITS; d++) {
                int64_t here = digit_counts[d];
                digit_counts[d] = total;
                total += here;
            }
            for (int64_t j = 0; j < width; j++) {
                int64_t at = digit_counts[(key_in[j] >> shift) & (DIGITS - 1)]++;
                key_out[at] = key_in[j];
                order_out[at] = order_in[j];
            }
            uint32_t *swap = key_in;
            key_in = key_out;
            key_out = swap;
            swap = order_in;
            order_in = order_out;
            order_out = swap;
        }
        for (int64_t rank = 0; rank < width; rank++) {
            /* multiplied by the mask as the torch path's mul_ is (-0, NaN alike), without a
             * branch: which entries are kept is random, so a branch mispredicts half the time */
            const uint32_t j = order_in[rank];
            const float keep = draws[j] < keep_below[rank] ? 1.0f : 0.0f;
            values[j] = values[j] * keep;
        }
    }
    free(keys);
    free(order);
    free(draws);
    free(keep_below);
    return 0;
}

/* Float64 sums of |x| (squares = 0) or of x * x rounded to float (squares = 1) over the chunks
 * [first, last) of a flat tensor of `count` entries cut into chunks of `chunk` entries (the last
 * one shorter), one sum per chunk into sums[c]. The order is fixed so that the torch path
 * (sums.py) reproduces it bit for bit: entry j of a chunk goes to lane j % SUM_LANES, each lane adds
 * its terms in index order starting from 0, and the lanes are then added 0, 1, ..., SUM_LANES - 1.
 * The lanes are independent, so the compiler vectorizes them without reassociating anything. */
#define SUM_LANES 8
static inline float sum_term(float x, int32_t squares) {
    if (squares) return x * x;
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    bits &= 0x7fffffffu;
    memcpy(&x, &bits, sizeof x);
    return x;
}

static double chunk_sum(const float *restrict values, int64_t n, int32_t squares) {
    double lanes[SUM_LANES] = {0};
    int64_t i = 0;
    if (squares) {
        for (; i + SUM_LANES <= n; i += SUM_LANES)
            for (int l = 0; l < SUM_LANES; l++) lanes[l] += (double)sum_term(values[i + l], 1);
    } else {
        for (; i + SUM_LANES <= n; i += SUM_LANES)
            for (int l = 0; l < SUM_LANES; l++) lanes[l] += (double)sum_term(values[i + l], 0);
    }
    for (int l = 0; i < n; i++, l++) lanes[l] += (double)sum_term(values[i], squares);
    double total = lanes[0];
    for (int l = 1; l < SUM_LANES; l++) total += lanes[l];
    return total;
}

void mt_chunk_sums(const float *restrict values, int64_t count, int64_t chunk, int64_t first,
                   int64_t last, int32_t squares, double *restrict sums) {
    for (int64_t c = first; c < last; c++) {
        const int64_t begin = c * chunk;
        const int64_t end = begin + chunk < count ? begin + chunk : count;
        sums[c] = chunk_sum(values + begin, end - begin, squares);
    }
}
