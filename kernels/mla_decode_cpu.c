/* Absorbed-form MLA decode attention over a latent cache, fused for one CPU core.
 *
 * Same contract as mla_decode.py (the Triton kernel), float32 only:
 *
 *     logits[b, h, t] = scale * (q_lat[b, h] . ckv[b, t] + q_pe[b, h] . kpe[b, t])   where mask[b, t]
 *     out[b, h]       = sum_t softmax_t(logits[b, h]) * ckv[b, t]
 *
 * One pass over the cache: for each batch row, the sequence is walked in chunks of TC slots. A
 * chunk's rows are read from memory once, for the logits of every head; the chunk (TC rows of
 * C + R floats) then sits in L1/L2 while the online softmax rescales the accumulators and the
 * probabilities weight the same rows into them. So the cache crosses the memory bus once per
 * step, which is what a roofline for this op assumes, and no [B, H, T] intermediate exists.
 *
 * Specialized at build time: KH heads, KC latent width, KR rope width are -D constants (the
 * launcher builds one shared object per shape, as Triton specializes on constexprs). With AVX2 +
 * FMA and KC, KR multiples of 8 the inner loops use 8-wide intrinsics; otherwise portable C.
 *
 * Masked slots are never loaded (their bytes may be anything, NaN included); a row whose keys are
 * all masked returns zeros.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#if !defined(KH) || !defined(KC) || !defined(KR)
#error "build with -DKH=<heads> -DKC=<latent width> -DKR=<rope width>"
#endif

#define TC 64 /* slots per chunk */

/* Logits: blocks of LT slots x LH heads = 8 dot products, reduced together by hsum8 into one vector
 * whose lanes are (slot, head) slot-major: contiguous in s[TC][KH] when LH = KH or LT = 1. */
#if KH % 8 == 0
#define LH 8
#elif KH % 4 == 0
#define LH 4
#elif KH % 2 == 0
#define LH 2
#else
#define LH 1
#endif
#define LT (8 / LH)

/* Accumulation: AH heads share each row load; AH * KC / 8 accumulators stay in registers and
 * give that many independent FMA chains. */
#if KC / 8 <= 2 && KH % 4 == 0
#define AH 4
#elif KC / 8 <= 4 && KH % 2 == 0
#define AH 2
#else
#define AH 1
#endif

#if defined(__AVX2__) && defined(__FMA__) && KC % 8 == 0 && KR % 8 == 0
#define VEC 1

/* Lane j of the result is the horizontal sum of a[j]. */
static inline __m256 hsum8(const __m256 *a) {
    const __m256 b0 = _mm256_hadd_ps(a[0], a[1]), b1 = _mm256_hadd_ps(a[2], a[3]);
    const __m256 b2 = _mm256_hadd_ps(a[4], a[5]), b3 = _mm256_hadd_ps(a[6], a[7]);
    const __m256 c0 = _mm256_hadd_ps(b0, b1), c1 = _mm256_hadd_ps(b2, b3);
    return _mm256_add_ps(_mm256_permute2f128_ps(c0, c1, 0x20), _mm256_permute2f128_ps(c0, c1, 0x31));
}

/* e^x for x <= 0 (logits minus their running max): 2^n * 2^f with x log2(e) = n + f, f in [0, 1),
 * 2^f by a degree-6 polynomial (relative error below 2e-7); x below -87 flushes towards 0. */
static inline __m256 exp_nonpositive(__m256 x) {
    x = _mm256_max_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _mm256_set1_ps(-126.f));
    const __m256 n = _mm256_floor_ps(x), f = _mm256_sub_ps(x, n);
    __m256 p = _mm256_set1_ps(1.535336188319500e-4f);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.339887440266574e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.618437357674640e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550332471162809e-2f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.402264791363012e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931472028550421e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    const __m256i exponent = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
    return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), exponent));
}
#endif

/* s[i][h] = scale * (q_lat[h] . k_i + q_pe[h] . p_i) for the n gathered rows of a chunk. */
static void chunk_logits(const float *restrict q_lat, const float *restrict q_pe, const float *const *k_rows,
                         const float *const *p_rows, int n, float scale, float s[TC][KH]) {
    int i0 = 0;
#ifdef VEC
    for (; i0 + LT <= n; i0 += LT)
        for (int h0 = 0; h0 < KH; h0 += LH) {
            __m256 a[8], row[LT];
            for (int j = 0; j < 8; ++j) a[j] = _mm256_setzero_ps();
            for (int c = 0; c < KC; c += 8) {
                for (int t = 0; t < LT; ++t) row[t] = _mm256_loadu_ps(k_rows[i0 + t] + c);
                for (int h = 0; h < LH; ++h) {
                    const __m256 q = _mm256_loadu_ps(q_lat + (h0 + h) * KC + c);
                    for (int t = 0; t < LT; ++t) a[t * LH + h] = _mm256_fmadd_ps(q, row[t], a[t * LH + h]);
                }
            }
            for (int r = 0; r < KR; r += 8) {
                for (int t = 0; t < LT; ++t) row[t] = _mm256_loadu_ps(p_rows[i0 + t] + r);
                for (int h = 0; h < LH; ++h) {
                    const __m256 q = _mm256_loadu_ps(q_pe + (h0 + h) * KR + r);
                    for (int t = 0; t < LT; ++t) a[t * LH + h] = _mm256_fmadd_ps(q, row[t], a[t * LH + h]);
                }
            }
            const __m256 v = _mm256_mul_ps(hsum8(a), _mm256_set1_ps(scale));
#if LH == KH || LT == 1
            _mm256_storeu_ps(&s[i0][h0], v);
#else
            float lanes[8];
            _mm256_storeu_ps(lanes, v);
            for (int t = 0; t < LT; ++t)
                for (int h = 0; h < LH; ++h) s[i0 + t][h0 + h] = lanes[t * LH + h];
#endif
        }
#endif
    for (int i = i0; i < n; ++i)
        for (int h = 0; h < KH; ++h) {
            float d = 0.f;
            for (int c = 0; c < KC; ++c) d += q_lat[h * KC + c] * k_rows[i][c];
            for (int r = 0; r < KR; ++r) d += q_pe[h * KR + r] * p_rows[i][r];
            s[i][h] = scale * d;
        }
}

/* Online softmax over one chunk: s[:n][h] becomes exp(s - new max of head h); returns the rescale
 * factors of the accumulators. The exponentials run over s flattened, 8 lanes at a time. */
static void chunk_softmax(float s[TC][KH], int n, float *m, float *l, float *alpha) {
    float mx[KH], sum[KH];
    for (int h = 0; h < KH; ++h) {
        mx[h] = m[h];
        sum[h] = 0.f;
    }
    for (int i = 0; i < n; ++i)
        for (int h = 0; h < KH; ++h) mx[h] = s[i][h] > mx[h] ? s[i][h] : mx[h];
    float *flat = &s[0][0];
    const int total = n * KH;
    int j = 0;
#if defined(VEC) && (8 % KH == 0 || KH % 8 == 0)
#if 8 % KH == 0
    float pattern[8];  /* lane l holds head l % KH */
    for (int x = 0; x < 8; ++x) pattern[x] = mx[x % KH];
    const __m256 vmax = _mm256_loadu_ps(pattern);
    __m256 vsum = _mm256_setzero_ps();
    for (; j + 8 <= total; j += 8) {
        const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(flat + j), vmax));
        _mm256_storeu_ps(flat + j, e);
        vsum = _mm256_add_ps(vsum, e);
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, vsum);
    for (int x = 0; x < 8; ++x) sum[x % KH] += lanes[x];
#else
    for (; j + 8 <= total; j += 8) {  /* lanes are heads j % KH .. j % KH + 7 */
        const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(flat + j), _mm256_loadu_ps(mx + j % KH)));
        _mm256_storeu_ps(flat + j, e);
        _mm256_storeu_ps(sum + j % KH, _mm256_add_ps(_mm256_loadu_ps(sum + j % KH), e));
    }
#endif
#endif
    for (; j < total; ++j) {
        flat[j] = expf(flat[j] - mx[j % KH]);
        sum[j % KH] += flat[j];
    }
    for (int h = 0; h < KH; ++h) {
        alpha[h] = expf(m[h] - mx[h]);
        l[h] = l[h] * alpha[h] + sum[h];
        m[h] = mx[h];
    }
}

/* acc[h] = alpha[h] * acc[h] + sum_i s[i][h] * k_i */
static void chunk_accumulate(float acc[KH][KC], const float *alpha, float s[TC][KH], const float *const *k_rows,
                             int n) {
#ifdef VEC
    for (int h0 = 0; h0 < KH; h0 += AH) {
        __m256 a[AH][KC / 8];
        for (int h = 0; h < AH; ++h)
            for (int v = 0; v < KC / 8; ++v)
                a[h][v] = _mm256_mul_ps(_mm256_loadu_ps(&acc[h0 + h][8 * v]), _mm256_set1_ps(alpha[h0 + h]));
        for (int i = 0; i < n; ++i)
            for (int v = 0; v < KC / 8; ++v) {
                const __m256 row = _mm256_loadu_ps(k_rows[i] + 8 * v);
                for (int h = 0; h < AH; ++h) a[h][v] = _mm256_fmadd_ps(_mm256_set1_ps(s[i][h0 + h]), row, a[h][v]);
            }
        for (int h = 0; h < AH; ++h)
            for (int v = 0; v < KC / 8; ++v) _mm256_storeu_ps(&acc[h0 + h][8 * v], a[h][v]);
    }
#else
    for (int h = 0; h < KH; ++h) {
        for (int c = 0; c < KC; ++c) acc[h][c] *= alpha[h];
        for (int i = 0; i < n; ++i)
            for (int c = 0; c < KC; ++c) acc[h][c] += s[i][h] * k_rows[i][c];
    }
#endif
}

/* q_lat [B, KH, KC] and q_pe [B, KH, KR] contiguous; ckv [B, T, KC], kpe [B, T, KR] and mask [B, T]
 * with unit stride in the last dimension and the given strides (in elements) otherwise;
 * out [B, KH, KC] contiguous. */
void mla_decode_f32(const float *restrict q_lat, const float *restrict q_pe, const float *restrict ckv,
                    const float *restrict kpe, const uint8_t *restrict mask, float *restrict out, int64_t B,
                    int64_t T, int64_t ckv_sb, int64_t ckv_st, int64_t kpe_sb, int64_t kpe_st, int64_t mask_sb,
                    float scale) {
    float s[TC][KH], m[KH], l[KH], alpha[KH], acc[KH][KC];
    const float *k_rows[TC], *p_rows[TC];
    for (int64_t b = 0; b < B; ++b) {
        memset(acc, 0, sizeof(acc));
        for (int h = 0; h < KH; ++h) {
            m[h] = -FLT_MAX;
            l[h] = 0.f;
        }
        for (int64_t t0 = 0; t0 < T; t0 += TC) {
            int n = 0;
            for (int64_t t = t0; t < t0 + TC && t < T; ++t) {
                if (!mask[b * mask_sb + t]) continue;
                k_rows[n] = ckv + b * ckv_sb + t * ckv_st;
                p_rows[n++] = kpe + b * kpe_sb + t * kpe_st;
            }
            if (n == 0) continue;
            chunk_logits(q_lat + b * KH * KC, q_pe + b * KH * KR, k_rows, p_rows, n, scale, s);
            chunk_softmax(s, n, m, l, alpha);
            chunk_accumulate(acc, alpha, s, k_rows, n);
        }
        float *o = out + b * KH * KC;
        for (int h = 0; h < KH; ++h) {
            const float inv = l[h] > 0.f ? 1.f / l[h] : 0.f;
            for (int c = 0; c < KC; ++c) o[h * KC + c] = acc[h][c] * inv;
        }
    }
}
