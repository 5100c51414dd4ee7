/* Decode GEMVs for biogpt-cli: y[m] = W x[m] + b for a few rows m, float32, int8 and int4 weights.

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
#define AHEAD 1024   /* bytes prefetched ahead of the stream */
#define MAX_M 64     /* activation rows per call */

/* The output, with the activation a layer may leave to us (1: GELU, erf form, as torch's). */
static inline float out(float v, int act) { return act ? 0.5f * v * (1.0f + erff(v * 0.70710678118654752f)) : v; }

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
#define VNNI 1
#elif defined(__AVX2__)
#include <immintrin.h>
#define AVX2 1
#endif

/* ---- float32: W row-major [N, K], the layer's own weight ---- */
static void f32_block(const float *w, const float *x, int K, float *out) {
    const float *w0 = w, *w1 = w + K, *w2 = w + 2 * (long)K, *w3 = w + 3 * (long)K;
    float a0 = 0, a1 = 0, a2 = 0, a3 = 0;
#pragma omp simd reduction(+:a0, a1, a2, a3)
    for (int k = 0; k < K; k++) {
        float v = x[k];
        a0 += w0[k] * v; a1 += w1[k] * v; a2 += w2[k] * v; a3 += w3[k] * v;
    }
    out[0] = a0; out[1] = a1; out[2] = a2; out[3] = a3;
}

void f32_gemv(const float *W, const float *b, const float *x, float *y, int M, int N, int K, int act, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int i = 0; i < N / R; i++) {
        int n = i * R;
        for (int m = 0; m < M; m++) {
            float *o = y + (long)m * N + n;
            f32_block(W + (long)n * K, x + (long)m * K, K, o);
            for (int r = 0; r < R; r++) o[r] = out(o[r] + (b ? b[n + r] : 0.0f), act);
        }
    }
}

/* ---- activations: int8, one scale a row (max |x| -> 127) ---- */
static float quantize_row(const float *x, int K, int8_t *q) {
    float top = 0;
    for (int k = 0; k < K; k++) top = fmaxf(top, fabsf(x[k]));
    float scale = top > 0 ? top / 127.0f : 1.0f, inv = 1.0f / scale;
    for (int k = 0; k < K; k++) q[k] = (int8_t)lrintf(x[k] * inv);
    return scale;
}

/* ---- int8: per-row scales; a block is, for each C8 columns, its R rows' C8 bytes in turn ---- */
static void q8_block(const int8_t *w, const int32_t *wsum, const int8_t *x, int K, int32_t *out) {
#if VNNI /* dpbusd multiplies unsigned by signed: x + 128 as unsigned, then 128 * sum(w) taken back */
    __m512i a[R], flip = _mm512_set1_epi8((char)0x80);
    for (int r = 0; r < R; r++) a[r] = _mm512_setzero_si512();
    for (int k = 0; k < K; k += C8, w += R * C8) {
        for (int p = 0; p < R * C8; p += 64) __builtin_prefetch(w + AHEAD + p);
        __m512i v = _mm512_xor_si512(_mm512_loadu_si512(x + k), flip);
        for (int r = 0; r < R; r++) a[r] = _mm512_dpbusd_epi32(a[r], v, _mm512_loadu_si512(w + r * C8));
    }
    for (int r = 0; r < R; r++) out[r] = _mm512_reduce_add_epi32(a[r]) - 128 * wsum[r];
#elif AVX2 /* maddubs(|w|, x * sign(w)): |w| <= 127 keeps the pair sums from saturating */
    __m256i a[R], ones = _mm256_set1_epi16(1);
    for (int r = 0; r < R; r++) a[r] = _mm256_setzero_si256();
    for (int k = 0; k < K; k += C8, w += R * C8) {
        for (int p = 0; p < R * C8; p += 64) __builtin_prefetch(w + AHEAD + p);
        for (int s = 0; s < C8; s += 32) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(x + k + s));
            for (int r = 0; r < R; r++) {
                __m256i u = _mm256_loadu_si256((const __m256i *)(w + r * C8 + s));
                __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(u, u), _mm256_sign_epi8(v, u));
                a[r] = _mm256_add_epi32(a[r], _mm256_madd_epi16(p, ones));
            }
        }
    }
    for (int r = 0; r < R; r++) {
        __m128i s = _mm_add_epi32(_mm256_castsi256_si128(a[r]), _mm256_extracti128_si256(a[r], 1));
        s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
        out[r] = _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1)));
    }
    (void)wsum;
#else
    (void)wsum;
    for (int r = 0; r < R; r++) out[r] = 0;
    for (int k = 0; k < K; k += C8, w += R * C8)
        for (int r = 0; r < R; r++)
            for (int s = 0; s < C8; s++) out[r] += w[r * C8 + s] * x[k + s];
#endif
}

void q8_gemv(const int8_t *W, const int32_t *wsum, const float *scale, const float *b, const float *x, float *y,
             int M, int N, int K, int act, int threads) {
    int8_t *xq = malloc((size_t)M * K);
    float sx[MAX_M];
    for (int m = 0; m < M; m++) sx[m] = quantize_row(x + (long)m * K, K, xq + (long)m * K);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int i = 0; i < N / R; i++) {
        int n = i * R;
        for (int m = 0; m < M; m++) {
            int32_t acc[R];
            float *o = y + (long)m * N + n;
            q8_block(W + (long)n * K, wsum + n, xq + (long)m * K, K, acc);
            for (int r = 0; r < R; r++) o[r] = out((float)acc[r] * sx[m] * scale[n + r] + (b ? b[n + r] : 0.0f), act);
        }
    }
    free(xq);
}

/* ---- int4: w = q * scale + min per group of G4 columns, q in 0..15. A block is, for each group,
   its R rows' G4 / 2 bytes in turn; byte j holds column j (low nibble) and column j + G4 / 2. ---- */
static void q4_block(const uint8_t *w, const float *sc, const float *mn, const int8_t *x, const int32_t *xsum,
                     int K, float *out) {
    int groups = K / G4;
    for (int r = 0; r < R; r++) out[r] = 0;
    for (int g = 0; g < groups; g++)  /* the minimum's share: min * sum of the group's x */
        for (int r = 0; r < R; r++) out[r] += mn[g * R + r] * (float)xsum[g];
#if VNNI
    __m512 f[R];
    const __m512i low = _mm512_set1_epi8(0x0F);
    for (int r = 0; r < R; r++) f[r] = _mm512_setzero_ps();
    for (int g = 0; g < groups; g++, w += R * G4 / 2) {
        for (int p = 0; p < R * G4 / 2; p += 64) __builtin_prefetch(w + AHEAD + p);
        __m512i xl = _mm512_loadu_si512(x + g * G4), xh = _mm512_loadu_si512(x + g * G4 + 64);
        for (int r = 0; r < R; r++) {
            __m512i v = _mm512_loadu_si512(w + r * 64);
            __m512i a = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(v, low), xl);
            a = _mm512_dpbusd_epi32(a, _mm512_and_si512(_mm512_srli_epi16(v, 4), low), xh);
            f[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), _mm512_set1_ps(sc[g * R + r]), f[r]);
        }
    }
    for (int r = 0; r < R; r++) out[r] += _mm512_reduce_add_ps(f[r]);
#elif AVX2
    __m256 f[R];
    const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    for (int r = 0; r < R; r++) f[r] = _mm256_setzero_ps();
    for (int g = 0; g < groups; g++, w += R * G4 / 2) {
        for (int p = 0; p < R * G4 / 2; p += 64) __builtin_prefetch(w + AHEAD + p);
        const int8_t *xg = x + g * G4;
        __m256i xl0 = _mm256_loadu_si256((const __m256i *)xg), xl1 = _mm256_loadu_si256((const __m256i *)(xg + 32));
        __m256i xh0 = _mm256_loadu_si256((const __m256i *)(xg + 64)), xh1 = _mm256_loadu_si256((const __m256i *)(xg + 96));
        for (int r = 0; r < R; r++) {  /* q <= 15: maddubs's pair sums cannot saturate */
            __m256i v0 = _mm256_loadu_si256((const __m256i *)(w + r * 64));
            __m256i v1 = _mm256_loadu_si256((const __m256i *)(w + r * 64 + 32));
            __m256i lo = _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_and_si256(v0, low), xl0),
                                          _mm256_maddubs_epi16(_mm256_and_si256(v1, low), xl1));
            __m256i hi = _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v0, 4), low), xh0),
                                          _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v1, 4), low), xh1));
            __m256i a = _mm256_madd_epi16(_mm256_add_epi16(lo, hi), ones);
            f[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a), _mm256_set1_ps(sc[g * R + r]), f[r]);
        }
    }
    for (int r = 0; r < R; r++) {
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(f[r]), _mm256_extractf128_ps(f[r], 1));
        s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        out[r] += _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
    }
#else
    for (int g = 0; g < groups; g++, w += R * G4 / 2)
        for (int r = 0; r < R; r++) {
            int32_t a = 0;
            for (int j = 0; j < G4 / 2; j++)
                a += (w[r * G4 / 2 + j] & 15) * x[g * G4 + j] + (w[r * G4 / 2 + j] >> 4) * x[g * G4 + G4 / 2 + j];
            out[r] += (float)a * sc[g * R + r];
        }
#endif
}

void q4_gemv(const uint8_t *W, const float *sc, const float *mn, const float *b, const float *x, float *y,
             int M, int N, int K, int act, int threads) {
    int groups = K / G4;
    int8_t *xq = malloc((size_t)M * K);
    int32_t *xsum = malloc(sizeof(int32_t) * (size_t)M * groups);
    float sx[MAX_M];
    for (int m = 0; m < M; m++) {
        int8_t *q = xq + (long)m * K;
        sx[m] = quantize_row(x + (long)m * K, K, q);
        for (int g = 0; g < groups; g++) {
            int32_t s = 0;
            for (int j = 0; j < G4; j++) s += q[g * G4 + j];
            xsum[m * groups + g] = s;
        }
    }
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int i = 0; i < N / R; i++) {
        int n = i * R;
        for (int m = 0; m < M; m++) {
            float acc[R], *o = y + (long)m * N + n;
            q4_block(W + (long)n * K / 2, sc + (long)n * groups, mn + (long)n * groups, xq + (long)m * K,
                     xsum + m * groups, K, acc);
            for (int r = 0; r < R; r++) o[r] = out(acc[r] * sx[m] + (b ? b[n + r] : 0.0f), act);
        }
    }
    free(xq);
    free(xsum);
}

/* ---- attention for a few new tokens: softmax(q k^T * scale) v per (row, head, token), over the
   keys `mask` allows ([B, t, T] bytes), or without one the causal rule (the last t keys are the new
   tokens). q is [B, H, t, hd] and k, v are [B, H, T, hd] by their strides; out is [B, t, H, hd].
   A decoding step's work is a few microseconds: threads only where there is far more. ---- */
void attend(const float *q, long qb, long qh, long qt, const float *k, const float *v, long kb, long kh, long kt,
            const uint8_t *mask, float *o, int B, int H, int t, int T, int hd, float scale, int threads) {
    long work = (long)B * H * t * T * hd;
#pragma omp parallel for schedule(static) num_threads(threads) if (work > (1L << 21))
    for (int j = 0; j < B * H * t; j++) {
        int b = j / (H * t), h = (j / t) % H, i = j % t;
        const float *qq = q + b * qb + h * qh + i * qt, *kk = k + b * kb + h * kh, *vv = v + b * kb + h * kh;
        const uint8_t *m = mask ? mask + ((long)b * t + i) * T : 0;
        int keys = mask ? T : T - t + i + 1;
        float *s = malloc(sizeof(float) * (size_t)keys), top = -INFINITY, sum = 0;
        for (int key = 0; key < keys; key++) {
            float d = 0;
            if (m && !m[key]) { s[key] = -INFINITY; continue; }
#pragma omp simd reduction(+:d)
            for (int c = 0; c < hd; c++) d += qq[c] * kk[key * kt + c];
            s[key] = d * scale;
            top = fmaxf(top, s[key]);
        }
        float *out = o + (((long)b * t + i) * H + h) * hd;
        for (int c = 0; c < hd; c++) out[c] = 0;
        for (int key = 0; key < keys; key++) {
            if (s[key] == -INFINITY) continue;
            float e = expf(s[key] - top);
            sum += e;
#pragma omp simd
            for (int c = 0; c < hd; c++) out[c] += e * vv[key * kt + c];
        }
        for (int c = 0; c < hd; c++) out[c] /= sum;
        free(s);
    }
}
