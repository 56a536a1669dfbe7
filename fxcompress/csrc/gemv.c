/* Weight-only int8 and int4 matrix-vector products for decoding, on AVX-512 VNNI.
 *
 * Why: decoding one token multiplies each weight matrix by one activation
 * row, so its speed is the rate at which the weights stream from memory.
 * Converting every int8 weight to float for an FMA costs more instructions
 * than memory allows; VNNI's vpdpbusd multiplies 64 unsigned bytes by 64
 * signed bytes and sums them into 16 int32 lanes in one instruction. So the
 * float activation row is written once, per call, as D unsigned byte "digits"
 * of a fixed-point integer, and each weight row is multiplied by each digit
 * row with vpdpbusd:
 *
 *   step = max|x| / (2^(8D-1) - 1),   u[k] = round(x[k] / step) + 2^(8D-1)   (0 < u < 2^8D)
 *   u[k] = sum_d digit_d[k] << 8d
 *   y[n] = scale[n] * step * (sum_d (sum_k digit_d[k] w[n,k]) << 8d  -  2^(8D-1) * sum_k w[n,k])
 *
 * The last sum (the row's weight total) is precomputed once per weight. The
 * integer arithmetic is exact; the only rounding is x's to the fixed-point grid
 * (relative to the row's largest magnitude: 2^-16 with D = 2, 2^-24 with D = 3)
 * and float32's rounding of the result.
 *
 * int4 (fxc_gemv_int4) runs the same way with the operands' roles swapped:
 * the weight codes q (0..15, two per byte) are vpdpbusd's unsigned operand and
 * the activation is written as signed, balanced digits e_d in [-128, 127]
 * (x_int = sum_d e_d << 8d, |x_int| <= 127 << 8(D-1)), so no offset term
 * arises. Each weight is q * scale_g + bias_g in its group g of columns:
 *
 *   y[n] = step * (sum_g scale_g * sum_(k in g) x_int[k] q[n,k]  +  sum_g bias_g * sum_(k in g) x_int[k])
 *
 * the group sums of x_int computed once per call. The codes are stored in
 * chunks of 128 columns of 64 bytes: byte j holds column j in its low nibble
 * and column 64 + j in its high one, so a mask and a shift unpack 128 codes.
 * Each 64-column half is converted to float and scaled on its own (with
 * D = 3 its int32 lanes reach 2^29), so groups must be multiples of 64.
 *
 * Bounds: each of the 16 int32 lanes sums in_features / 16 products below
 * 255 * 128, so in_features / 16 * 255 * 128 must stay below 2^31 (the caller
 * checks); the lanes are then summed, and the digits combined, in int64.
 *
 * Threads: output rows are split over an OpenMP team; linked against torch's
 * own libgomp (already loaded in the process), it is the same thread pool
 * torch's operators use.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Weight rows sharing each load of the activation digits. A thread walks a block of rows in lockstep, column
 * chunk by column chunk, and prefetches the same chunk PREFETCH_BLOCKS blocks ahead: each row is too short (a few
 * KiB) for the hardware's stream prefetcher to learn, and a block ahead is far enough to hide memory's latency. */
#ifndef ROWS
#define ROWS 4
#endif
#ifndef INT4_ROWS
#define INT4_ROWS 8
#endif
#ifndef PREFETCH_BLOCKS
#define PREFETCH_BLOCKS 1
#endif
#define MAX_DIGITS 3

enum { F32 = 0, BF16 = 1 };

static float load_value(const void *p, long i, int dtype) {
    if (dtype == F32) return ((const float *)p)[i];
    uint32_t bits = (uint32_t)((const uint16_t *)p)[i] << 16;
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

static void store_value(void *p, long i, float value, int dtype) {
    if (dtype == F32) {
        ((float *)p)[i] = value;
        return;
    }
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    bits += 0x7FFF + ((bits >> 16) & 1); /* round to nearest even (finite values) */
    ((uint16_t *)p)[i] = (uint16_t)(bits >> 16);
}

/* 16 values of x from index k (fewer where mask says) as float32 lanes; the rest are zero. */
static __m512 load16(const void *x, long k, __mmask16 mask, int dtype) {
    if (dtype == F32) return _mm512_maskz_loadu_ps(mask, (const float *)x + k);
    const __m256i half = _mm256_maskz_loadu_epi16(mask, (const uint16_t *)x + k);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

static __mmask16 tail16(long left) { return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1); }

/* x (K values) as D digit rows of `stride` bytes each, zero-padded past K; returns step. */
static float split_digits(const void *x, int dtype, long K, int D, long stride, uint8_t *digits) {
    __m512 largest16 = _mm512_setzero_ps();
    for (long k = 0; k < K; k += 16) largest16 = _mm512_max_ps(largest16, _mm512_abs_ps(load16(x, k, tail16(K - k), dtype)));
    const float largest = _mm512_reduce_max_ps(largest16);
    const int32_t top = (1 << (8 * D - 1)) - 1;
    const float step = largest > 0.0f ? largest / (float)top : 1.0f;
    const __m512 inverse = _mm512_set1_ps((float)top / (largest > 0.0f ? largest : (float)top));
    const __m512i low = _mm512_set1_epi32(-top), high = _mm512_set1_epi32(top), bias = _mm512_set1_epi32(top + 1);
    memset(digits, 0, (size_t)D * stride);
    for (long k = 0; k < K; k += 16) {
        const __mmask16 mask = tail16(K - k);
        __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(load16(x, k, mask, dtype), inverse)); /* nearest even */
        q = _mm512_add_epi32(_mm512_min_epi32(_mm512_max_epi32(q, low), high), bias);
        for (int d = 0; d < D; d++)
            _mm512_mask_cvtepi32_storeu_epi8(digits + d * stride + k, mask, _mm512_srli_epi32(q, 8 * d));
    }
    return step;
}

static int64_t sum_lanes(__m512i lanes) {
    const __m512i low = _mm512_cvtepi32_epi64(_mm512_castsi512_si256(lanes));
    const __m512i high = _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(lanes, 1));
    return _mm512_reduce_add_epi64(_mm512_add_epi64(low, high));
}

/* The same for the int8 kernel's signed twin: balanced digits (see the top) and, per group of `group` columns
 * (a multiple of 64 dividing K), the sum of x_int as a float. */
static float split_signed_digits(const void *x, int dtype, long K, int D, long group, int8_t *digits,
                                 float *group_sums) {
    __m512 largest16 = _mm512_setzero_ps();
    for (long k = 0; k < K; k += 16) largest16 = _mm512_max_ps(largest16, _mm512_abs_ps(load16(x, k, 0xFFFF, dtype)));
    const float largest = _mm512_reduce_max_ps(largest16);
    const int32_t top = 127 << (8 * (D - 1));
    const float step = largest > 0.0f ? largest / (float)top : 1.0f;
    const __m512 inverse = _mm512_set1_ps((float)top / (largest > 0.0f ? largest : (float)top));
    const __m512i low = _mm512_set1_epi32(-top), high = _mm512_set1_epi32(top);
    const __m512i half = _mm512_set1_epi32(128), byte = _mm512_set1_epi32(255);
    for (long g = 0; g < K / group; g++) {
        __m512i sum = _mm512_setzero_si512();
        for (long k = g * group; k < (g + 1) * group; k += 16) {
            __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(load16(x, k, 0xFFFF, dtype), inverse)); /* nearest even */
            q = _mm512_min_epi32(_mm512_max_epi32(q, low), high);
            sum = _mm512_add_epi32(sum, q);
            for (int d = 0; d < D; d++) {
                const __m512i digit = _mm512_sub_epi32(_mm512_and_si512(_mm512_add_epi32(q, half), byte), half);
                _mm_storeu_si128((__m128i *)(digits + d * K + k), _mm512_cvtepi32_epi8(digit));
                q = _mm512_srai_epi32(_mm512_sub_epi32(q, digit), 8);
            }
        }
        group_sums[g] = (float)sum_lanes(sum);
    }
    return step;
}

/* Rows [n, n + rows) of one output row y, rows <= ROWS. */
static inline __attribute__((always_inline)) void dot_rows(const uint8_t *digits, const int D, long stride, const int8_t *w, long K, long n, int rows,
                     int64_t sums[ROWS]) {
    __m512i acc[ROWS][MAX_DIGITS];
    for (int r = 0; r < ROWS; r++)
        for (int d = 0; d < MAX_DIGITS; d++) acc[r][d] = _mm512_setzero_si512();
    for (long k = 0; k < K; k += 64) {
        const __mmask64 mask = K - k >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (K - k)) - 1);
        __m512i digit[MAX_DIGITS];
        for (int d = 0; d < D; d++) digit[d] = _mm512_loadu_si512(digits + d * stride + k);
        for (int r = 0; r < rows; r++) {
            const int8_t *row = w + (n + r) * K + k;
            _mm_prefetch((const char *)(row + PREFETCH_BLOCKS * ROWS * K), _MM_HINT_T0);
            const __m512i weights = _mm512_maskz_loadu_epi8(mask, row);
            for (int d = 0; d < D; d++) acc[r][d] = _mm512_dpbusd_epi32(acc[r][d], digit[d], weights);
        }
    }
    for (int r = 0; r < rows; r++) {
        sums[r] = 0;
        for (int d = 0; d < D; d++) sums[r] += sum_lanes(acc[r][d]) << (8 * d);
    }
}

/* y (M x N) = x (M x K) @ (w * scale[:, None]).T for int8 w (N x K, row-major) with row totals wsum.
 * x, scale and y are float32 (dtype 0) or bfloat16 (dtype 1). Returns 0, or -1 when out of memory. */
int fxc_gemv_int8(const void *x, long M, long K, const int8_t *w, const int32_t *wsum, const void *scale,
                  void *y, long N, int D, int dtype, int threads) {
    const long stride = (K + 63) / 64 * 64;
    uint8_t *digits = aligned_alloc(64, (size_t)D * stride);
    if (!digits) return -1;
    const int64_t offset = (int64_t)1 << (8 * D - 1);
    for (long m = 0; m < M; m++) {
        const float step = split_digits((const char *)x + m * K * (dtype == F32 ? 4 : 2), dtype, K, D, stride,
                                        digits);
        void *out = (char *)y + m * N * (dtype == F32 ? 4 : 2);
        #pragma omp parallel for num_threads(threads) schedule(static)
        for (long n = 0; n < N; n += ROWS) {
            const int rows = N - n < ROWS ? (int)(N - n) : ROWS;
            int64_t sums[ROWS];
            if (D == 2)  /* D as a constant: the digit loops unroll */
                dot_rows(digits, 2, stride, w, K, n, rows, sums);
            else
                dot_rows(digits, 3, stride, w, K, n, rows, sums);
            for (int r = 0; r < rows; r++) {
                const int64_t total = sums[r] - offset * wsum[n + r];
                store_value(out, n + r, (float)total * step * load_value(scale, n + r, dtype), dtype);
            }
        }
    }
    free(digits);
    return 0;
}

/* Rows [n, n + rows) of one output row of fxc_gemv_int4 (rows <= INT4_ROWS). Inlined with D, dtype and rows as
 * constants where the caller can, so that the loops over them unroll and the accumulators stay in registers. */
static inline __attribute__((always_inline)) void int4_rows(
        const int8_t *digits, const int D, long K, const uint8_t *w, const void *scales, const void *biases,
        long group, const float *group_sums, float step, void *out, long n, const int rows, const int dtype) {
    const long groups = K / group;
    const int size = dtype == F32 ? 4 : 2;
    const __m512i nibble = _mm512_set1_epi8(0x0F);
    __m512 acc[INT4_ROWS];
    for (int r = 0; r < INT4_ROWS; r++) acc[r] = _mm512_setzero_ps();
    for (long c = 0; c < K / 128; c++) {
        __m512i low_digits[MAX_DIGITS], high_digits[MAX_DIGITS];
        for (int d = 0; d < D; d++) {
            low_digits[d] = _mm512_loadu_si512(digits + d * K + c * 128);
            high_digits[d] = _mm512_loadu_si512(digits + d * K + c * 128 + 64);
        }
        const long low_group = c * 128 / group, high_group = (c * 128 + 64) / group;
        for (int r = 0; r < rows; r++) {
            const uint8_t *row = w + (n + r) * (K / 2) + c * 64;
            _mm_prefetch((const char *)(row + PREFETCH_BLOCKS * INT4_ROWS * (K / 2)), _MM_HINT_T0);
            const __m512i packed = _mm512_loadu_si512(row);
            const __m512i low = _mm512_and_si512(packed, nibble);
            const __m512i high = _mm512_and_si512(_mm512_srli_epi16(packed, 4), nibble);
            const void *row_scales = (const char *)scales + (n + r) * groups * size;
            if (low_group == high_group) {
                /* one group: both halves in one Horner chain over the digits, most significant first (its
                 * lanes stay below 8 * 15 * 2^23 = 2^30) */
                __m512i sum = _mm512_setzero_si512();
                for (int d = D - 1; d >= 0; d--) {
                    if (d < D - 1) sum = _mm512_slli_epi32(sum, 8);
                    sum = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(sum, low, low_digits[d]), high, high_digits[d]);
                }
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum),
                                         _mm512_set1_ps(load_value(row_scales, low_group, dtype)), acc[r]);
            } else {
                __m512i low_sum = _mm512_setzero_si512(), high_sum = _mm512_setzero_si512();
                for (int d = D - 1; d >= 0; d--) {
                    if (d < D - 1) {
                        low_sum = _mm512_slli_epi32(low_sum, 8);
                        high_sum = _mm512_slli_epi32(high_sum, 8);
                    }
                    low_sum = _mm512_dpbusd_epi32(low_sum, low, low_digits[d]);
                    high_sum = _mm512_dpbusd_epi32(high_sum, high, high_digits[d]);
                }
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(low_sum),
                                         _mm512_set1_ps(load_value(row_scales, low_group, dtype)), acc[r]);
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(high_sum),
                                         _mm512_set1_ps(load_value(row_scales, high_group, dtype)), acc[r]);
            }
        }
    }
    for (int r = 0; r < rows; r++) {
        const void *row_biases = (const char *)biases + (n + r) * groups * size;
        __m512 offsets = _mm512_setzero_ps();
        for (long g = 0; g < groups; g += 16) {
            const __mmask16 mask = tail16(groups - g);
            offsets = _mm512_fmadd_ps(load16(row_biases, g, mask, dtype), _mm512_maskz_loadu_ps(mask, group_sums + g),
                                      offsets);
        }
        store_value(out, n + r, (_mm512_reduce_add_ps(acc[r]) + _mm512_reduce_add_ps(offsets)) * step, dtype);
    }
}

/* int4_rows with D (2 or 3) and dtype as constants, and rows too for a whole block. */
#define INT4_ROWS_AS_CONSTANTS(D_, DTYPE_)                                                                           \
    (rows == INT4_ROWS                                                                                              \
         ? int4_rows(digits, D_, K, w, scales, biases, group, group_sums, step, out, n, INT4_ROWS, DTYPE_)          \
         : int4_rows(digits, D_, K, w, scales, biases, group, group_sums, step, out, n, rows, DTYPE_))

/* y (M x N) = x (M x K) @ W.T for int4 W[n, k] = q[n, k] * scales[n, g] + biases[n, g] (g = k / group), q stored
 * as described at the top (N x K/2 bytes). K is a multiple of 128, group a multiple of 64 dividing K; x, scales,
 * biases and y are float32 (dtype 0) or bfloat16 (dtype 1). Returns 0, or -1 when out of memory. */
int fxc_gemv_int4(const void *x, long M, long K, const uint8_t *w, const void *scales, const void *biases,
                  void *y, long N, long group, int D, int dtype, int threads) {
    const long groups = K / group;
    int8_t *digits = aligned_alloc(64, (size_t)D * K);
    float *group_sums = aligned_alloc(64, (size_t)(groups + 15) / 16 * 64);
    if (!digits || !group_sums) {
        free(digits);
        free(group_sums);
        return -1;
    }
    const int size = dtype == F32 ? 4 : 2;
    for (long m = 0; m < M; m++) {
        const float step = split_signed_digits((const char *)x + m * K * size, dtype, K, D, group, digits,
                                               group_sums);
        void *out = (char *)y + m * N * size;
        #pragma omp parallel for num_threads(threads) schedule(static)
        for (long n = 0; n < N; n += INT4_ROWS) {
            const int rows = N - n < INT4_ROWS ? (int)(N - n) : INT4_ROWS;
            if (D == 2)
                dtype == BF16 ? INT4_ROWS_AS_CONSTANTS(2, BF16) : INT4_ROWS_AS_CONSTANTS(2, F32);
            else
                dtype == BF16 ? INT4_ROWS_AS_CONSTANTS(3, BF16) : INT4_ROWS_AS_CONSTANTS(3, F32);
        }
    }
    free(digits);
    free(group_sums);
    return 0;
}
