/*
 * Fused CPU loops for the task-vector merges (TIES and DARE-TIES), called through ctypes.
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
#include <string.h>

#define RADIX 65536
#define BLOCK 1024

/* |x| as its bit pattern: for non-negative floats it orders like the values. */
static inline uint32_t magnitude_bits(float x) {
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    return bits & 0x7fffffffu;
}

/* delta[i] -= base[i] on [start, end), and count the top 16 magnitude bits of every `step`-th
 * element (counted from 0, so that any split of the range samples the same elements). */
void mt_subtract_and_sample(float *restrict delta, const float *restrict base, int64_t start,
                            int64_t end, int64_t step, int64_t *restrict histogram) {
    for (int64_t i = start; i < end; i++) delta[i] -= base[i];
    int64_t first = (start + step - 1) / step * step;
    for (int64_t i = first; i < end; i += step) histogram[magnitude_bits(delta[i]) >> 16]++;
}

/* Histogram of the top 16 magnitude bits on [start, end). */
void mt_top_histogram(const float *restrict values, int64_t start, int64_t end,
                      int64_t *restrict histogram) {
    for (int64_t i = start; i < end; i++) histogram[magnitude_bits(values[i]) >> 16]++;
}

/* On [start, end): how many magnitudes have top 16 bits above `high` (added to *above), and a
 * histogram of the low 16 bits of those whose top 16 bits equal it. */
void mt_bucket(const float *restrict values, int64_t start, int64_t end, uint32_t high,
               int64_t *restrict above, int64_t *restrict low_histogram) {
    int64_t count = 0;
    for (int64_t i = start; i < end; i++) {
        uint32_t bits = magnitude_bits(values[i]);
        uint32_t top = bits >> 16;
        count += top > high;
        if (top == high) low_histogram[bits & 0xffffu]++;
    }
    *above += count;
}

/* How many magnitudes on [start, end) have exactly the bit pattern `pattern`. */
int64_t mt_count_equal(const float *restrict values, int64_t start, int64_t end,
                       uint32_t pattern) {
    int64_t count = 0;
    for (int64_t i = start; i < end; i++) count += magnitude_bits(values[i]) == pattern;
    return count;
}

/* The index just after the `wanted`-th magnitude equal to `pattern` at or after `start` (end when
 * there are fewer): entries tied at the TIES threshold are kept lowest index first. */
int64_t mt_tie_cutoff(const float *restrict values, int64_t start, int64_t end, uint32_t pattern,
                      int64_t wanted) {
    if (wanted <= 0) return start;
    for (int64_t i = start; i < end; i++) {
        if (magnitude_bits(values[i]) == pattern && --wanted == 0) return i + 1;
    }
    return end;
}

/* TIES sign election on [start, end) for `models` task vectors, result into base:
 *   v_j = w_j * d_j where d_j is kept (|d_j| above its threshold, or equal to it before its tie
 *   cutoff), else 0; s = sign(sum_j v_j) with 0 counting as +; agreeing entries (v_j * s > 0) are
 *   summed, divided (normalize) by the sum of the agreeing models' weights (1 where none agrees),
 *   times lambda, plus base.
 * The deltas are overwritten with v_j (the caller owns them). */
void mt_ties_elect(float *restrict base, float *const *deltas, int32_t models, int64_t start,
                   int64_t end, const uint32_t *thresholds, const int64_t *cutoffs,
                   const float *weights, int32_t normalize, float scale) {
    float total[BLOCK], mixed[BLOCK], divisor[BLOCK];
    for (int64_t block = start; block < end; block += BLOCK) {
        int64_t count = end - block < BLOCK ? end - block : BLOCK;
        for (int32_t j = 0; j < models; j++) {
            float *restrict d = deltas[j] + block;
            const uint32_t threshold = thresholds[j];
            const int64_t cutoff = cutoffs[j] - block;
            const float weight = weights[j];
            for (int64_t i = 0; i < count; i++) {
                uint32_t bits = magnitude_bits(d[i]);
                int keep = bits > threshold || (bits == threshold && i < cutoff);
                float value = keep ? d[i] * weight : 0.0f;
                d[i] = value;
                total[i] = j == 0 ? value : total[i] + value;
            }
        }
        for (int64_t i = 0; i < count; i++) {
            mixed[i] = 0.0f;
            divisor[i] = 0.0f;
        }
        for (int32_t j = 0; j < models; j++) {
            const float *restrict d = deltas[j] + block;
            const float weight = weights[j];
            for (int64_t i = 0; i < count; i++) {
                int agree = total[i] >= 0.0f ? d[i] > 0.0f : d[i] < 0.0f;
                mixed[i] += agree ? d[i] : 0.0f;
                divisor[i] += agree ? weight : 0.0f;
            }
        }
        float *restrict out = base + block;
        for (int64_t i = 0; i < count; i++) {
            float value = mixed[i];
            if (normalize) value = value / (divisor[i] == 0.0f ? 1.0f : divisor[i]);
            out[i] = out[i] + scale * value;
        }
    }
}
