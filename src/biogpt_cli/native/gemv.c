/* Decode kernels for biogpt-cli: the GEMVs y[m] = W x[m] + b for a few rows m (float32, int8 and
   int4 weights), the small ops around them (attention over the cache for a few new tokens, GELU,
   layer norm), and the decoder's layers in one call (decode_layers) built from them.

   Decoding reads every weight once per step, so these kernels are written to stream: each thread
   walks its blocks of R rows front to back, one activation load serves the R rows, and int8/int4
   blocks are laid out so that a block is one sequential stream (rows of a kilobyte are too short
   for the hardware prefetcher). int8 and int4 quantize the activations to int8 per call (one scale
   a row) and multiply in integers: VNNI's dpbusd where the CPU has it, AVX2's maddubs otherwise,
   plain C elsewhere (the compiler vectorizes what it can). Built by native/__init__.py with
   -march=native, so the ISA is the machine's own. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define R 4          /* weight rows per block */
#define C8 64        /* int8: columns per chunk of a block */
#define G4 128       /* int4: columns per group (one scale and one minimum each) */
#define AHEAD 4096   /* bytes prefetched ahead of the stream (1 KB streamed slower: docs/development.md) */
#define KEYS_AHEAD 16 /* attention: keys (and values) prefetched ahead, 4 KB of a 64-wide head */

/* e^x for x <= 0 (shifted scores), in plain arithmetic the compiler vectorizes (Cephes' expf:
   2^n times a polynomial in the remainder; within 2 float ulps). */
static inline float exp_neg(float x) {
    x = x < -87.0f ? -87.0f : x;
    float n = nearbyintf(x * 1.44269504088896341f);
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { int32_t i; float f; } two = { .i = ((int32_t)n + 127) << 23 };
    return p * two.f;
}

/* GELU in its erf form, as torch's; erf by Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7), in plain
   arithmetic the compiler vectorizes (libm's erff is a call a value). */
static inline float gelu1(float v) {
    float z = fabsf(v) * 0.70710678118654752f, t = 1.0f / (1.0f + 0.3275911f * z);
    float p = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f))));
    float e = 1.0f - p * exp_neg(-z * z);
    return 0.5f * v * (1.0f + (v < 0 ? -e : e));
}

void gelu(const float *x, float *y, long n, int threads) {
#pragma omp parallel for simd schedule(static) num_threads(threads) if (n > (1L << 16))
    for (long i = 0; i < n; i++) y[i] = gelu1(x[i]);
}

/* A linear layer as the kernels see it: kind F32 (w: the weight [N, K] row-major), Q8 (w: int8
   blocks, a: each row's sum, c: each row's scale) or Q4 (w: int4 blocks, a: scales, c: minimums). */
enum { F32, Q8, Q4 };
typedef struct { int kind, N, K; const void *w, *a, *c; const float *bias; } linear_t;

/* What a call's activations become before an integer multiply: int8 rows, their scales, and for
   int4 each group's sum (the minimums' share). */
typedef struct { int8_t *q; float *s; int32_t *gsum; } acts_t;

/* How a kernel writes y: as is, through GELU, or added to what y holds (a residual). */
enum { PLAIN, GELU, ADD };

#define INLINE static inline __attribute__((always_inline))
/* Loops over a block's rows and activation rows, unrolled whole so that their accumulators stay in
   registers (left to itself the compiler keeps the 4 x 4 array in memory) */
#define UNROLL _Pragma("GCC unroll 16")
/* CALL(k) for k = mb (1 to 6, at most max): each k its own unrolled copy, so that a few activation
   rows take one pass over the weights */
#define BY_ROWS(mb, max, CALL) switch (mb) {                                                        \
    case 1: CALL(1); break;                                                                       \
    case 2: CALL((max) >= 2 ? 2 : 1); break;                                                      \
    case 3: CALL((max) >= 3 ? 3 : 1); break;                                                      \
    case 4: CALL((max) >= 4 ? 4 : 1); break;                                                      \
    case 5: CALL((max) >= 5 ? 5 : 1); break;                                                      \
    default: CALL((max) >= 6 ? 6 : 1); }
/* A function both paths call (a layer at a time, the decoder in one call) runs the same machine
   code in both: no inlining or specialized copies that could round or contract differently. */
#if defined(__clang__)
#define SHARED static __attribute__((noinline))
#else
#define SHARED static __attribute__((noipa))
#endif

INLINE void put(float *o, float v, const float *b, int n, int mode) {
    v += b ? b[n] : 0.0f;
    *o = mode == GELU ? gelu1(v) : mode == ADD ? *o + v : v;
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
#define VNNI 1
#elif defined(__AVX2__)
#include <immintrin.h>
#define AVX2 1
#endif

/* ---- float32: W row-major [N, K], the layer's own weight. out[m * R + r] for mb activation
   rows (x, K apart): each weight load serves the mb rows. ---- */
#if defined(__AVX512F__)
#define FW 16
#define FMB 6          /* activation rows that share each weight load: 24 accumulators of 32 registers */
typedef __m512 fvec;
#define F_ZERO _mm512_setzero_ps
#define F_LOAD _mm512_loadu_ps
#define F_FMA _mm512_fmadd_ps
#define F_SUM _mm512_reduce_add_ps
#elif defined(__AVX2__) && defined(__FMA__)
#define FW 8
#define FMB 2
typedef __m256 fvec;
#define F_ZERO _mm256_setzero_ps
#define F_LOAD _mm256_loadu_ps
#define F_FMA _mm256_fmadd_ps
static inline float F_SUM(__m256 v) {
    __m128 t = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    t = _mm_add_ps(t, _mm_movehl_ps(t, t));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}
#else
#define FMB 1
#endif

static inline __attribute__((always_inline)) void f32_rows(const float *w, const float *x, int K, int mb,
                                                          float *out) {
    int k = 0;
    for (int j = 0; j < mb * R; j++) out[j] = 0;
#ifdef FW
    fvec a[FMB][R];
    UNROLL
    for (int m = 0; m < mb; m++)
        UNROLL
        for (int r = 0; r < R; r++) a[m][r] = F_ZERO();
    for (; k + FW <= K; k += FW) {
        fvec wv[R];
        UNROLL
        for (int r = 0; r < R; r++) {
            if (k % 16 == 0) __builtin_prefetch(w + (long)r * K + k + AHEAD / 4);  /* a line at a time */
            wv[r] = F_LOAD(w + (long)r * K + k);
        }
        UNROLL
        for (int m = 0; m < mb; m++) {
            fvec v = F_LOAD(x + (long)m * K + k);
            UNROLL
            for (int r = 0; r < R; r++) a[m][r] = F_FMA(wv[r], v, a[m][r]);
        }
    }
    UNROLL
    for (int m = 0; m < mb; m++)
        UNROLL
        for (int r = 0; r < R; r++) out[m * R + r] = F_SUM(a[m][r]);
#endif
    for (; k < K; k++)
        UNROLL
        for (int m = 0; m < mb; m++)
            UNROLL
            for (int r = 0; r < R; r++) out[m * R + r] += w[(long)r * K + k] * x[(long)m * K + k];
}

/* One thread's share of y = W x + b (an orphaned `omp for`: the threads of the enclosing parallel
   region split the blocks, and wait for each other at its end). */
static void f32_part(const linear_t *L, const float *x, float *y, int M, int mode) {
    const float *W = L->w;
    int N = L->N, K = L->K;
#pragma omp for schedule(static)
    for (int i = 0; i < N / R; i++) {
        int n = i * R;
        float acc[FMB * R];
        for (int m = 0; m < M; m += FMB) {
            int mb = M - m < FMB ? M - m : FMB;
#define F32_ROWS(k) f32_rows(W + (long)n * K, x + (long)m * K, K, k, acc)
            BY_ROWS(mb, FMB, F32_ROWS)
            for (int j = 0; j < mb; j++)
                UNROLL
                for (int r = 0; r < R; r++) put(y + (long)(m + j) * N + n + r, acc[j * R + r], L->bias, n + r, mode);
        }
    }
}

/* ---- activations: int8, one scale a row (max |x| -> 127) ---- */
static float quantize_row(const float *x, int K, int8_t *q) {
    float top = 0;
#pragma omp simd reduction(max:top)
    for (int k = 0; k < K; k++) {  /* not fmaxf: its NaN rule keeps it a call per element */
        float a = fabsf(x[k]);
        top = a > top ? a : top;
    }
    float scale = top > 0 ? top / 127.0f : 1.0f, inv = 1.0f / scale;
#pragma omp simd
    for (int k = 0; k < K; k++) q[k] = (int8_t)(int)nearbyintf(x[k] * inv);  /* half to even, as torch.round */
    return scale;
}

/* Every row of x [M, K] quantized (in threads when there are many), their scales in sx: ours, and
   the activations of a prompt's int8 GEMM (torch's), rounded alike. */
void quantize_rows(const float *x, int M, int K, int8_t *xq, float *sx, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if ((long)M * K > (1L << 16))
    for (int m = 0; m < M; m++) sx[m] = quantize_row(x + (long)m * K, K, xq + (long)m * K);
}

#if VNNI
#define MB 6         /* activation rows that share each weight load (int8 and int4) */
#elif AVX2
#define MB 2
#else
#define MB 1
#endif

#if defined(__AVX512F__)
/* The lane sums of R = 4 vectors at once (out[r] = sum of a[r]'s lanes): a transposing tree,
   a third of the work of four separate reductions. */
INLINE void sum4_epi32(const __m512i *a, int32_t *out) {
    __m512i s01 = _mm512_add_epi32(_mm512_unpacklo_epi32(a[0], a[1]), _mm512_unpackhi_epi32(a[0], a[1]));
    __m512i s23 = _mm512_add_epi32(_mm512_unpacklo_epi32(a[2], a[3]), _mm512_unpackhi_epi32(a[2], a[3]));
    __m512i s = _mm512_add_epi32(_mm512_unpacklo_epi64(s01, s23), _mm512_unpackhi_epi64(s01, s23));
    __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(s), _mm512_extracti64x4_epi64(s, 1));
    _mm_storeu_si128((__m128i *)out, _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1)));
}

INLINE void sum4_ps(const __m512 *a, float *out) {
    __m512 s01 = _mm512_add_ps(_mm512_unpacklo_ps(a[0], a[1]), _mm512_unpackhi_ps(a[0], a[1]));
    __m512 s23 = _mm512_add_ps(_mm512_unpacklo_ps(a[2], a[3]), _mm512_unpackhi_ps(a[2], a[3]));
    __m512 s = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(s01), _mm512_castps_pd(s23))),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(s01), _mm512_castps_pd(s23))));
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(s), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s), 1)));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
}
#endif

/* ---- int8: per-row scales; a block is, for each C8 columns, its R rows' C8 bytes in turn.
   out[m * R + r]: the integer dot products of mb activation rows (x, xs apart) with the block. ---- */
INLINE void q8_rows(const int8_t *w, const int8_t *x, long xs, int K, int mb, int32_t *out) {
#if VNNI /* dpbusd multiplies unsigned by signed: x + 128 as unsigned (the caller takes 128 * sum(w) back) */
    __m512i a[MB][R], flip = _mm512_set1_epi8((char)0x80);
    UNROLL
    for (int m = 0; m < mb; m++)
        UNROLL
        for (int r = 0; r < R; r++) a[m][r] = _mm512_setzero_si512();
    for (int k = 0; k < K; k += C8, w += R * C8) {
        for (int p = 0; p < R * C8; p += 64) __builtin_prefetch(w + AHEAD + p);
        __m512i wv[R];
        UNROLL
        for (int r = 0; r < R; r++) wv[r] = _mm512_loadu_si512(w + r * C8);
        UNROLL
        for (int m = 0; m < mb; m++) {
            __m512i v = _mm512_xor_si512(_mm512_loadu_si512(x + m * xs + k), flip);
            UNROLL
            for (int r = 0; r < R; r++) a[m][r] = _mm512_dpbusd_epi32(a[m][r], v, wv[r]);
        }
    }
    UNROLL
    for (int m = 0; m < mb; m++) sum4_epi32(a[m], out + m * R);
#elif AVX2 /* maddubs(|w|, x * sign(w)): |w| <= 127 keeps the pair sums from saturating */
    __m256i a[MB][R], ones = _mm256_set1_epi16(1);
    UNROLL
    for (int m = 0; m < mb; m++)
        UNROLL
        for (int r = 0; r < R; r++) a[m][r] = _mm256_setzero_si256();
    for (int k = 0; k < K; k += C8, w += R * C8) {
        for (int p = 0; p < R * C8; p += 64) __builtin_prefetch(w + AHEAD + p);
        for (int s = 0; s < C8; s += 32) {
            __m256i wv[R], wa[R];
            UNROLL
            for (int r = 0; r < R; r++) {
                wv[r] = _mm256_loadu_si256((const __m256i *)(w + r * C8 + s));
                wa[r] = _mm256_sign_epi8(wv[r], wv[r]);
            }
            UNROLL
            for (int m = 0; m < mb; m++) {
                __m256i v = _mm256_loadu_si256((const __m256i *)(x + m * xs + k + s));
                UNROLL
                for (int r = 0; r < R; r++)
                    a[m][r] = _mm256_add_epi32(a[m][r], _mm256_madd_epi16(
                        _mm256_maddubs_epi16(wa[r], _mm256_sign_epi8(v, wv[r])), ones));
            }
        }
    }
    UNROLL
    for (int m = 0; m < mb; m++)
        UNROLL
        for (int r = 0; r < R; r++) {
            __m128i t = _mm_add_epi32(_mm256_castsi256_si128(a[m][r]), _mm256_extracti128_si256(a[m][r], 1));
            t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4e));
            out[m * R + r] = _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32(t, 0xb1)));
        }
#else
    UNROLL
    for (int m = 0; m < mb; m++)
        UNROLL
        for (int r = 0; r < R; r++) out[m * R + r] = 0;
    for (int k = 0; k < K; k += C8, w += R * C8)
        UNROLL
        for (int m = 0; m < mb; m++)
            UNROLL
            for (int r = 0; r < R; r++)
                for (int s = 0; s < C8; s++) out[m * R + r] += w[r * C8 + s] * x[m * xs + k + s];
#endif
}

#if VNNI
#define OFFSET 128
#else
#define OFFSET 0
#endif

static void q8_part(const linear_t *L, const acts_t *x, float *y, int M, int mode) {
    const int32_t *wsum = L->a;
    const float *scale = L->c;
    int N = L->N, K = L->K;
#pragma omp for schedule(static)
    for (int i = 0; i < N / R; i++) {
        int n = i * R;
        const int8_t *w = (const int8_t *)L->w + (long)n * K;
        int32_t acc[MB * R];
        for (int m = 0; m < M; m += MB) {
            int mb = M - m < MB ? M - m : MB;
#define Q8_ROWS(k) q8_rows(w, x->q + (long)m * K, K, K, k, acc)
            BY_ROWS(mb, MB, Q8_ROWS)
            for (int j = 0; j < mb; j++)
                UNROLL
                for (int r = 0; r < R; r++)
                    put(y + (long)(m + j) * N + n + r,
                        (float)(acc[j * R + r] - OFFSET * wsum[n + r]) * x->s[m + j] * scale[n + r], L->bias, n + r,
                        mode);
        }
    }
}

/* y = acc * sx[m] * scale[n] + b, through GELU with act: what q8_part writes, from the exact int32
   products of a prompt's int8 GEMM (torch's), in one pass. */
void q8_finish(const int32_t *acc, const float *sx, const float *scale, const float *b, float *y, int M, int N,
               int act, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if ((long)M * N > (1L << 16))
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++)
            put(y + (long)m * N + n, (float)acc[(long)m * N + n] * sx[m] * scale[n], b, n, act ? GELU : PLAIN);
}

/* ---- int4: w = q * scale + min per group of G4 columns, q in 0..15. A block is, for each group,
   its R rows' G4 / 2 bytes in turn; byte j holds column j (low nibble) and column j + G4 / 2.
   out[m * R + r]: sum over groups of scale * (q . x) for mb activation rows (the minimum's share,
   min * sum of the group's x, is the caller's). ---- */
INLINE void q4_rows(const uint8_t *w, const float *sc, const int8_t *x, long xs, int K, int mb, float *out) {
    int groups = K / G4;
#if VNNI
    __m512 f[MB][R];
    const __m512i low = _mm512_set1_epi8(0x0F);
    UNROLL
    for (int m = 0; m < mb; m++)
        UNROLL
        for (int r = 0; r < R; r++) f[m][r] = _mm512_setzero_ps();
    for (int g = 0; g < groups; g++, w += R * G4 / 2) {
        for (int p = 0; p < R * G4 / 2; p += 64) __builtin_prefetch(w + AHEAD + p);
        UNROLL
        for (int r = 0; r < R; r++) {  /* a row's nibbles at a time: registers for 6 rows of x */
            __m512i v = _mm512_loadu_si512(w + r * 64), lo = _mm512_and_si512(v, low);
            __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
            __m512 scale = _mm512_set1_ps(sc[g * R + r]);
            UNROLL
            for (int m = 0; m < mb; m++) {
                const int8_t *xg = x + m * xs + g * G4;
                __m512i a = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo,
                                                                    _mm512_loadu_si512(xg)),
                                                hi, _mm512_loadu_si512(xg + 64));
                f[m][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), scale, f[m][r]);
            }
        }
    }
    UNROLL
    for (int m = 0; m < mb; m++) sum4_ps(f[m], out + m * R);
#elif AVX2
    __m256 f[MB][R];
    const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    UNROLL
    for (int m = 0; m < mb; m++)
        UNROLL
        for (int r = 0; r < R; r++) f[m][r] = _mm256_setzero_ps();
    for (int g = 0; g < groups; g++, w += R * G4 / 2) {
        for (int p = 0; p < R * G4 / 2; p += 64) __builtin_prefetch(w + AHEAD + p);
        UNROLL
        for (int r = 0; r < R; r++) {  /* q <= 15: maddubs's pair sums cannot saturate */
            __m256i v0 = _mm256_loadu_si256((const __m256i *)(w + r * 64));
            __m256i v1 = _mm256_loadu_si256((const __m256i *)(w + r * 64 + 32));
            __m256i l0 = _mm256_and_si256(v0, low), l1 = _mm256_and_si256(v1, low);
            __m256i h0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), low);
            __m256i h1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), low);
            __m256 scale = _mm256_set1_ps(sc[g * R + r]);
            UNROLL
            for (int m = 0; m < mb; m++) {
                const int8_t *xg = x + m * xs + g * G4;
                __m256i lo = _mm256_add_epi16(_mm256_maddubs_epi16(l0, _mm256_loadu_si256((const __m256i *)xg)),
                                              _mm256_maddubs_epi16(l1, _mm256_loadu_si256((const __m256i *)(xg + 32))));
                __m256i hi = _mm256_add_epi16(_mm256_maddubs_epi16(h0, _mm256_loadu_si256((const __m256i *)(xg + 64))),
                                              _mm256_maddubs_epi16(h1, _mm256_loadu_si256((const __m256i *)(xg + 96))));
                __m256i a = _mm256_madd_epi16(_mm256_add_epi16(lo, hi), ones);
                f[m][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a), scale, f[m][r]);
            }
        }
    }
    UNROLL
    for (int m = 0; m < mb; m++)
        UNROLL
        for (int r = 0; r < R; r++) {
            __m128 t = _mm_add_ps(_mm256_castps256_ps128(f[m][r]), _mm256_extractf128_ps(f[m][r], 1));
            t = _mm_add_ps(t, _mm_movehl_ps(t, t));
            out[m * R + r] = _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
        }
#else
    UNROLL
    for (int m = 0; m < mb; m++)
        UNROLL
        for (int r = 0; r < R; r++) out[m * R + r] = 0;
    for (int g = 0; g < groups; g++, w += R * G4 / 2)
        UNROLL
        for (int m = 0; m < mb; m++)
            UNROLL
            for (int r = 0; r < R; r++) {
                int32_t a = 0;
                const int8_t *xg = x + m * xs + g * G4;
                for (int j = 0; j < G4 / 2; j++)
                    a += (w[r * G4 / 2 + j] & 15) * xg[j] + (w[r * G4 / 2 + j] >> 4) * xg[G4 / 2 + j];
                out[m * R + r] += (float)a * sc[g * R + r];
            }
#endif
}

static void q4_part(const linear_t *L, const acts_t *x, float *y, int M, int mode) {
    int N = L->N, K = L->K, groups = K / G4;
#pragma omp for schedule(static)
    for (int i = 0; i < N / R; i++) {
        int n = i * R;
        const uint8_t *w = (const uint8_t *)L->w + (long)n * K / 2;
        const float *s = (const float *)L->a + (long)n * groups, *mins = (const float *)L->c + (long)n * groups;
        float acc[MB * R];
        for (int m = 0; m < M; m += MB) {
            int mb = M - m < MB ? M - m : MB;
#define Q4_ROWS(k) q4_rows(w, s, x->q + (long)m * K, K, K, k, acc)
            BY_ROWS(mb, MB, Q4_ROWS)
            for (int j = 0; j < mb; j++) {
                const int32_t *xs = x->gsum + (long)(m + j) * groups;
                for (int r = 0; r < R; r++) {
                    float v = acc[j * R + r];
                    for (int g = 0; g < groups; g++) v += mins[g * R + r] * (float)xs[g];
                    put(y + (long)(m + j) * N + n + r, v * x->s[m + j], L->bias, n + r, mode);
                }
            }
        }
    }
}

/* ---- a layer's call: its activations prepared once (one thread), then its blocks split ---- */
static acts_t acts_alloc(int M, int K) {
    acts_t a = { malloc((size_t)M * K), malloc(sizeof(float) * (size_t)M),
                 malloc(sizeof(int32_t) * (size_t)M * (K / G4 + 1)) };
    return a;
}

static void acts_free(acts_t *a) {
    free(a->q);
    free(a->s);
    free(a->gsum);
}

SHARED void prep(const linear_t *L, const float *x, int M, acts_t *a, int threads) {
    if (L->kind == F32) return;
    quantize_rows(x, M, L->K, a->q, a->s, threads);
    if (L->kind == Q4)
        for (long g = 0; g < (long)M * (L->K / G4); g++) {
            int32_t s = 0;
            for (int j = 0; j < G4; j++) s += a->q[g * G4 + j];
            a->gsum[g] = s;
        }
}

SHARED void part(const linear_t *L, const float *x, const acts_t *a, float *y, int M, int mode) {
    if (L->kind == F32) f32_part(L, x, y, M, mode);
    else if (L->kind == Q8) q8_part(L, a, y, M, mode);
    else q4_part(L, a, y, M, mode);
}

static void run(const linear_t *L, const float *x, float *y, int M, int act, int threads) {
    acts_t a = acts_alloc(M, L->K);
    prep(L, x, M, &a, threads);
#pragma omp parallel num_threads(threads)
    part(L, x, &a, y, M, act ? GELU : PLAIN);
    acts_free(&a);
}

void f32_gemv(const float *W, const float *b, const float *x, float *y, int M, int N, int K, int act, int threads) {
    linear_t L = { F32, N, K, W, 0, 0, b };
    run(&L, x, y, M, act, threads);
}

void q8_gemv(const int8_t *W, const int32_t *wsum, const float *scale, const float *b, const float *x, float *y,
             int M, int N, int K, int act, int threads) {
    linear_t L = { Q8, N, K, W, wsum, scale, b };
    run(&L, x, y, M, act, threads);
}

void q4_gemv(const uint8_t *W, const float *sc, const float *mn, const float *b, const float *x, float *y,
             int M, int N, int K, int act, int threads) {
    linear_t L = { Q4, N, K, W, sc, mn, b };
    run(&L, x, y, M, act, threads);
}

/* The layers `ls` in turn over the same rows x, in one parallel region as decode_layers runs them
   (what choose_kernel times: ours as decoding runs them). x holds M rows of the widest input. */
void run_linears(const linear_t *ls, int n, const float *x, float *y, int M, int threads) {
    int K = 0;
    for (int i = 0; i < n; i++) K = ls[i].K > K ? ls[i].K : K;
    acts_t a = acts_alloc(M, K);
#pragma omp parallel num_threads(threads)
    for (int i = 0; i < n; i++) {
#pragma omp single
        prep(ls + i, x, M, &a, 1);
        part(ls + i, x, &a, y, M, PLAIN);
    }
    acts_free(&a);
}

/* ---- attention for a few new tokens: softmax(q k^T * scale) v per (row, head, token), over the
   keys `mask` allows ([B, t, T] bytes), or without one the causal rule (the last t keys are the new
   tokens). q is [B, H, t, hd] and k, v are [B, H, T, hd] by their strides; out is [B, t, H, hd].
   A decoding step's work is a few microseconds: threads only where there is more. ---- */

/* A cached key's (or value's) hd floats, KEYS_AHEAD keys ahead: a head's keys are a short stream,
   over before the hardware prefetcher has ramped up. */
static inline void prefetch_key(const float *k, long kt, int hd) {
    for (int c = 0; c < hd; c += 16) __builtin_prefetch(k + KEYS_AHEAD * kt + c);
}

/* s[key] = q . k[key] * scale for every key, kt apart. Every key's score comes from the same
   instructions whatever the number of keys (a last short group re-reads its last key), so a row's
   numbers do not depend on the padding its batch adds. */
static void scores(const float *q, const float *k, long kt, int keys, int hd, float scale, float *s) {
#if defined(__AVX512F__)
    if (hd % 16 == 0 && hd <= 128) {
        __m512 qv[8];
        for (int c = 0; c < hd / 16; c++) qv[c] = _mm512_loadu_ps(q + 16 * c);
        for (int key = 0; key < keys; key += R) {
            __m512 a[R];
            float out4[R];
            for (int r = 0; r < R; r++) {
                const float *kr = k + (long)(key + r < keys ? key + r : keys - 1) * kt;
                prefetch_key(kr, kt, hd);
                a[r] = _mm512_setzero_ps();
                for (int c = 0; c < hd / 16; c++) a[r] = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(kr + 16 * c), a[r]);
            }
            sum4_ps(a, out4);
            for (int r = 0; r < R && key + r < keys; r++) s[key + r] = out4[r] * scale;
        }
        return;
    }
#endif
    for (int key = 0; key < keys; key++) {
        float d = 0;
        prefetch_key(k + key * kt, kt, hd);
#pragma omp simd reduction(+:d)
        for (int c = 0; c < hd; c++) d += q[c] * k[key * kt + c];
        s[key] = d * scale;
    }
}

/* Query j's attention (j counts rows, then heads, then new tokens). */
SHARED void attend_one(int j, const float *q, long qb, long qh, long qt, const float *k, const float *v, long kb,
                       long kh, long kt, const uint8_t *mask, float *o, int H, int t, int T, int hd, float scale) {
    int b = j / (H * t), h = (j / t) % H, i = j % t;
    const float *qq = q + b * qb + h * qh + i * qt, *kk = k + b * kb + h * kh, *vv = v + b * kb + h * kh;
    const uint8_t *m = mask ? mask + ((long)b * t + i) * T : 0;
    int keys = mask ? T : T - t + i + 1;
    float *s = malloc(sizeof(float) * (size_t)keys), top = -INFINITY, sum = 0;
    scores(qq, kk, kt, keys, hd, scale, s);
    if (m)
        for (int key = 0; key < keys; key++) s[key] = m[key] ? s[key] : -INFINITY;
#pragma omp simd reduction(max:top)
    for (int key = 0; key < keys; key++) top = s[key] > top ? s[key] : top;
#pragma omp simd
    for (int key = 0; key < keys; key++) s[key] = s[key] == -INFINITY ? 0.0f : exp_neg(s[key] - top);
    for (int key = 0; key < keys; key++) sum += s[key];  /* in order: padding's zeros change nothing */
    float *out = o + (((long)b * t + i) * H + h) * hd;
    for (int c = 0; c < hd; c++) out[c] = 0;
    for (int key = 0; key < keys; key++) {
        float e = s[key] / sum;
        prefetch_key(vv + key * kt, kt, hd);
#pragma omp simd
        for (int c = 0; c < hd; c++) out[c] += e * vv[key * kt + c];
    }
    free(s);
}

void attend(const float *q, long qb, long qh, long qt, const float *k, const float *v, long kb, long kh, long kt,
            const uint8_t *mask, float *o, int B, int H, int t, int T, int hd, float scale, int threads) {
    long work = (long)B * H * t * T * hd;
#pragma omp parallel for schedule(static) num_threads(threads) if (work > (1L << 18))
    for (int j = 0; j < B * H * t; j++) attend_one(j, q, qb, qh, qt, k, v, kb, kh, kt, mask, o, H, t, T, hd, scale);
}

/* ---- the decoder's layers for a few new tokens, in one call: one parallel region, the threads
   meeting between the steps of a layer instead of a Python call, a thread start and a torch op
   for each. Each layer: x += out(attention(LN1(x))), x += fc2(GELU(fc1(LN2(x)))), its new keys
   and values written into the cache at `past` (k, v: [layers, rows, heads, capacity, head_dim]
   by their strides). The same kernels as the layer-by-layer path, so a row's numbers do not
   depend on the path. ---- */
typedef struct { const float *ln1w, *ln1b, *ln2w, *ln2b; linear_t qkv, out, fc1, fc2; } layer_t;

SHARED void norm_rows(const float *x, const float *w, const float *b, float *y, int M, int D, float eps) {
    for (int m = 0; m < M; m++) {
        const float *xr = x + (long)m * D;
        float *yr = y + (long)m * D, mean = 0, var = 0;
#pragma omp simd reduction(+:mean)
        for (int k = 0; k < D; k++) mean += xr[k];
        mean /= D;
#pragma omp simd reduction(+:var)
        for (int k = 0; k < D; k++) var += (xr[k] - mean) * (xr[k] - mean);
        float rstd = 1.0f / sqrtf(var / D + eps);
#pragma omp simd
        for (int k = 0; k < D; k++) yr[k] = (xr[k] - mean) * rstd * w[k] + b[k];
    }
}

/* The layer norm of M rows of D (the layer-by-layer path's, so both paths round alike). */
void layer_norm(const float *x, const float *w, const float *b, float *y, int M, int D, float eps, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if ((long)M * D > (1L << 16))
    for (int m = 0; m < M; m++) norm_rows(x + (long)m * D, w, b, y + (long)m * D, 1, D, eps);
}

/* The new tokens' keys and values (qkv rows: [q | k | v], heads of hd each) into the cache. */
static void store_kv(const float *qkv, float *k, float *v, long kb, long kh, long kt, int B, int t, int H, int hd,
                     int past) {
    int D = H * hd;
    for (int m = 0; m < B * t; m++)
        for (int h = 0; h < H; h++) {
            long at = (m / t) * kb + h * kh + (long)(past + m % t) * kt;
            for (int c = 0; c < hd; c++) {
                k[at + c] = qkv[(long)m * 3 * D + D + h * hd + c];
                v[at + c] = qkv[(long)m * 3 * D + 2 * D + h * hd + c];
            }
        }
}

void decode_layers(const layer_t *layers, int L, float *x, int B, int t, float *kc, float *vc, long kl, long kb,
                   long kh, long kt, int past, const uint8_t *mask, int H, int hd, float eps, int threads) {
    int M = B * t, D = H * hd, F = layers[0].fc1.N, T = past + t;
    float *h = malloc(sizeof(float) * (size_t)M * D), *qkv = malloc(sizeof(float) * (size_t)M * 3 * D);
    float *att = malloc(sizeof(float) * (size_t)M * D), *f = malloc(sizeof(float) * (size_t)M * F);
    acts_t a = acts_alloc(M, F > D ? F : D);
    float scale = 1.0f / sqrtf((float)hd);
#pragma omp parallel num_threads(threads)
    for (int l = 0; l < L; l++) {
        const layer_t *y = layers + l;
        float *k = kc + l * kl, *v = vc + l * kl;
#pragma omp single
        { norm_rows(x, y->ln1w, y->ln1b, h, M, D, eps); prep(&y->qkv, h, M, &a, 1); }
        part(&y->qkv, h, &a, qkv, M, PLAIN);
#pragma omp single
        store_kv(qkv, k, v, kb, kh, kt, B, t, H, hd, past);
#pragma omp for schedule(static)
        for (int j = 0; j < M * H; j++)
            attend_one(j, qkv, (long)t * 3 * D, hd, 3 * D, k, v, kb, kh, kt, mask, att, H, t, T, hd, scale);
#pragma omp single
        prep(&y->out, att, M, &a, 1);
        part(&y->out, att, &a, x, M, ADD);
#pragma omp single
        { norm_rows(x, y->ln2w, y->ln2b, h, M, D, eps); prep(&y->fc1, h, M, &a, 1); }
        part(&y->fc1, h, &a, f, M, GELU);
#pragma omp single
        prep(&y->fc2, f, M, &a, 1);
        part(&y->fc2, f, &a, x, M, ADD);
    }
    free(h);
    free(qkv);
    free(att);
    free(f);
    acts_free(&a);
}
