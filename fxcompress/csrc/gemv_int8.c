/* Weight-only int8 matrix-vector products for decoding, on AVX-512 VNNI.
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

#define ROWS 4        /* weight rows sharing each load of the activation digits */
#define PREFETCH 512  /* bytes ahead of each weight row's stream */
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

/* Rows [n, n + rows) of one output row y, rows <= ROWS. */
static void dot_rows(const uint8_t *digits, int D, long stride, const int8_t *w, long K, long n, int rows,
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
            _mm_prefetch((const char *)(row + PREFETCH), _MM_HINT_T0);
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
            dot_rows(digits, D, stride, w, K, n, rows, sums);
            for (int r = 0; r < rows; r++) {
                const int64_t total = sums[r] - offset * wsum[n + r];
                store_value(out, n + r, (float)total * step * load_value(scale, n + r, dtype), dtype);
            }
        }
    }
    free(digits);
    return 0;
}
