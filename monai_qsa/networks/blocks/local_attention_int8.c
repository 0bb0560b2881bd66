/*
 * Int8 neighbourhood attention of StandAloneSelfAttention for CPUs (2D and 3D).
 *
 * Same row blocking as local_attention.c: per row of BLOCK consecutive positions of one head it computes the logits
 * of all k^d neighbours, their softmax and the weighted sum of the values in cache. Integer where it holds accuracy:
 *   logits   int8 queries x int8 keys, accumulated in int32; relative-position terms fp32, added after scaling
 *   softmax  fp32: p = exp(logit - max) in (0, 1], then quantised to uint8 as round(255 p)
 *   output   uint8 probabilities x int8 values, accumulated in int32, divided by the sum of the uint8 weights (fp32)
 * Built at run time by monai_qsa/networks/blocks/local_attention_int8.py; one build holds every instruction-set path
 * of the integer dot products, chosen per call:
 *   PATH_AVX512_VNNI  vpdpbusd on 16 positions (zmm)     PATH_AVX_VNNI  vpdpbusd on 8 positions (ymm)
 *   PATH_AVX2         vpmovzx/sx + vpmaddwd: exact int16 products (vpmaddubsw would saturate)
 *   PATH_SCALAR       plain C, any CPU
 * The integer sums are exact, so every path gives the same output.
 *
 * Both products are "4 bytes per int32 lane" dot products, u8 x s8 as vpdpbusd wants them:
 *   q . k    lane = position, its 4 bytes = 4 channels (channels in groups of 4, G = ceil(d / 4), zero-filled);
 *            keys are stored + 128 (uint8), and 128 * sum(q) removes the offset: exact signed products.
 *   p . v    lane = position, its 4 bytes = 4 neighbours l..l+3 of one neighbour row (kw rounded up to 4 with zero
 *            weights); v4 holds, for every padded position X, the 4 values v[X], v[X + dil], v[X + 2dil], v[X + 3dil].
 *
 * Layouts (2D images are passed as depth 1 with kd = 1; Dp, Hp, Wp: sizes zero-padded by dilation * (k - 1) / 2):
 *   q8:   (BH, G, D, H, W, 4) int8         round(q * (1 / q_scale)), clamped to [-127, 127]
 *   qf:   (BH, d, D, H, W) float           q8 * q_scale * scale: the queries of the relative-position terms
 *   k8:   (BH, G, Dp, Hp, Wp, 4) uint8     round(k * (1 / k_scale)) + 128, 128 in the padding (masked anyway)
 *   v4:   (BH, d, Dp, Hp, Wp, 4) int8      round(v * (1 / v_scale)) at X + t * dilation, t = 0..3 (0 outside)
 *   rel:  (kd + kh + kw, d) float          relative-position embedding of each offset on depth, height, width
 *   out:  (BH, d, D, H, W) float
 * The logit of neighbour (i, j, l) is alpha * (q8 . k8_ijl) + qf . rel[i] + qf . rel[kd + j] + qf . rel[kd + kh + l]
 * with alpha = scale * q_scale * k_scale; neighbours outside the image take no part in the softmax.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define X86 1
#else
#define X86 0
#endif

#define BLOCK 64
#define OUTSIDE (-1e30f)
#define KEY_OFFSET 128
#define LEVELS 255.f /* uint8 probability levels */

enum { PATH_BEST = 0, PATH_SCALAR = 1, PATH_AVX2 = 2, PATH_AVX_VNNI = 3, PATH_AVX512_VNNI = 4 };

typedef struct {
    const int8_t *q8, *v4;
    const uint8_t *k8;
    const float *qf, *rel;
    float *out;
    float alpha, v_scale;
    int64_t d, groups, D, H, W, padded_H, padded_W, plane, padded_plane;
    int kd, kh, kw, dilation;
    /* byte offsets of the dot products' pairs: channel groups of keys and queries (groups entries); probability
     * words and value words of every neighbour row and group of 4 neighbours (kd kh ceil(kw / 4) entries) */
    const int64_t *key_offsets, *query_offsets, *probability_offsets, *value_offsets;
    const uint8_t *ones;          /* 4 BLOCK bytes 1: sum(q8) as the dot product ones . q8 */
    const int64_t *zero_offsets;  /* groups zeros */
} problem_t;

/* exp(x) for x <= 0: 2^n e^r, |r| <= ln(2) / 2, with a degree-4 Taylor polynomial (relative error < 5e-5, far
 * below the 1 / 510 resolution of the uint8 probabilities); 0 below -87, where float underflows */
static inline float exp_nonpositive(float x) {
    const float clamped = x < -87.f ? -87.f : x;
    const float n = (clamped * 1.44269504088896341f + 12582912.f) - 12582912.f; /* round(x / ln 2) */
    const float r = clamped - n * 0.693359375f + n * 2.12194440e-4f;
    const float p = 1.f + r * (1.f + r * (0.5f + r * (1.f / 6.f + r * (1.f / 24.f))));
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return x < -87.f ? 0.f : p * scale;
}

/* The integer dot product of both stages: acc[x] += sum over pairs i and bytes t of
 * a[a_offsets[i] + 4x + t] * b[b_offsets[i] + 4x + t], x in [x0, n); a unsigned, b signed bytes. */
static void dot_scalar_from(const uint8_t *a, const int64_t *a_offsets, const int8_t *b, const int64_t *b_offsets,
                            int pairs, int x0, int n, int32_t *restrict acc) {
    for (int i = 0; i < pairs; i++) {
        const uint8_t *restrict ai = a + a_offsets[i];
        const int8_t *restrict bi = b + b_offsets[i];
        for (int x = x0; x < n; x++)
            acc[x] += (int32_t)ai[4 * x] * bi[4 * x] + (int32_t)ai[4 * x + 1] * bi[4 * x + 1]
                      + (int32_t)ai[4 * x + 2] * bi[4 * x + 2] + (int32_t)ai[4 * x + 3] * bi[4 * x + 3];
    }
}

static void dot_scalar(const uint8_t *a, const int64_t *a_offsets, const int8_t *b, const int64_t *b_offsets,
                       int pairs, int n, int32_t *acc) {
    dot_scalar_from(a, a_offsets, b, b_offsets, pairs, 0, n, acc);
}

#if X86
/* 8 positions x..x+7 of one pair, as two vectors of pairwise sums (positions x..x+3 and x+4..x+7) */
__attribute__((target("avx2"))) static inline void madd_avx2(const uint8_t *a, const int8_t *b, __m256i *low,
                                                             __m256i *high) {
    const __m256i av = _mm256_loadu_si256((const __m256i *)a), bv = _mm256_loadu_si256((const __m256i *)b);
    *low = _mm256_add_epi32(*low, _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm256_castsi256_si128(av)),
                                                    _mm256_cvtepi8_epi16(_mm256_castsi256_si128(bv))));
    *high = _mm256_add_epi32(*high, _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm256_extracti128_si256(av, 1)),
                                                      _mm256_cvtepi8_epi16(_mm256_extracti128_si256(bv, 1))));
}

/* acc[x..x+7] += the pairwise sums: 128-bit halves of hadd are [x, x+1, x+4, x+5 | x+2, x+3, x+6, x+7] */
__attribute__((target("avx2"))) static inline void add_pairs_avx2(int32_t *acc, __m256i low, __m256i high) {
    const __m256i sums = _mm256_permute4x64_epi64(_mm256_hadd_epi32(low, high), _MM_SHUFFLE(3, 1, 2, 0));
    _mm256_storeu_si256((__m256i *)acc, _mm256_add_epi32(_mm256_loadu_si256((const __m256i *)acc), sums));
}

/* exact int16 products (zero- and sign-extended bytes, vpmaddwd), 16 positions per step */
__attribute__((target("avx2"))) static void dot_avx2(const uint8_t *a, const int64_t *a_offsets, const int8_t *b,
                                                     const int64_t *b_offsets, int pairs, int n, int32_t *acc) {
    int x = 0;
    for (; x + 16 <= n; x += 16) {
        __m256i low0 = _mm256_setzero_si256(), high0 = low0, low1 = low0, high1 = low0;
        for (int i = 0; i < pairs; i++) {
            const uint8_t *ai = a + a_offsets[i] + 4 * x;
            const int8_t *bi = b + b_offsets[i] + 4 * x;
            madd_avx2(ai, bi, &low0, &high0);
            madd_avx2(ai + 32, bi + 32, &low1, &high1);
        }
        add_pairs_avx2(acc + x, low0, high0);
        add_pairs_avx2(acc + x + 8, low1, high1);
    }
    dot_scalar_from(a, a_offsets, b, b_offsets, pairs, x, n, acc);
}

#define LOAD256(p) _mm256_loadu_si256((const __m256i *)(p))
__attribute__((target("avx2,avxvnni"))) static void dot_avx_vnni(const uint8_t *a, const int64_t *a_offsets,
                                                                 const int8_t *b, const int64_t *b_offsets, int pairs,
                                                                 int n, int32_t *acc) {
    int x = 0;
    for (; x + 32 <= n; x += 32) { /* four independent accumulators */
        __m256i s0 = LOAD256(acc + x), s1 = LOAD256(acc + x + 8), s2 = LOAD256(acc + x + 16),
                s3 = LOAD256(acc + x + 24);
        for (int i = 0; i < pairs; i++) {
            const uint8_t *ai = a + a_offsets[i] + 4 * x;
            const int8_t *bi = b + b_offsets[i] + 4 * x;
            s0 = _mm256_dpbusd_avx_epi32(s0, LOAD256(ai), LOAD256(bi));
            s1 = _mm256_dpbusd_avx_epi32(s1, LOAD256(ai + 32), LOAD256(bi + 32));
            s2 = _mm256_dpbusd_avx_epi32(s2, LOAD256(ai + 64), LOAD256(bi + 64));
            s3 = _mm256_dpbusd_avx_epi32(s3, LOAD256(ai + 96), LOAD256(bi + 96));
        }
        _mm256_storeu_si256((__m256i *)(acc + x), s0);
        _mm256_storeu_si256((__m256i *)(acc + x + 8), s1);
        _mm256_storeu_si256((__m256i *)(acc + x + 16), s2);
        _mm256_storeu_si256((__m256i *)(acc + x + 24), s3);
    }
    for (; x + 8 <= n; x += 8) {
        __m256i sum = LOAD256(acc + x);
        for (int i = 0; i < pairs; i++)
            sum = _mm256_dpbusd_avx_epi32(sum, LOAD256(a + a_offsets[i] + 4 * x), LOAD256(b + b_offsets[i] + 4 * x));
        _mm256_storeu_si256((__m256i *)(acc + x), sum);
    }
    dot_scalar_from(a, a_offsets, b, b_offsets, pairs, x, n, acc);
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) static void dot_avx512_vnni(
    const uint8_t *a, const int64_t *a_offsets, const int8_t *b, const int64_t *b_offsets, int pairs, int n,
    int32_t *acc) {
    int x = 0;
    for (; x + 64 <= n; x += 64) { /* four independent accumulators */
        __m512i s0 = _mm512_loadu_si512(acc + x), s1 = _mm512_loadu_si512(acc + x + 16),
                s2 = _mm512_loadu_si512(acc + x + 32), s3 = _mm512_loadu_si512(acc + x + 48);
        for (int i = 0; i < pairs; i++) {
            const uint8_t *ai = a + a_offsets[i] + 4 * x;
            const int8_t *bi = b + b_offsets[i] + 4 * x;
            s0 = _mm512_dpbusd_epi32(s0, _mm512_loadu_si512(ai), _mm512_loadu_si512(bi));
            s1 = _mm512_dpbusd_epi32(s1, _mm512_loadu_si512(ai + 64), _mm512_loadu_si512(bi + 64));
            s2 = _mm512_dpbusd_epi32(s2, _mm512_loadu_si512(ai + 128), _mm512_loadu_si512(bi + 128));
            s3 = _mm512_dpbusd_epi32(s3, _mm512_loadu_si512(ai + 192), _mm512_loadu_si512(bi + 192));
        }
        _mm512_storeu_si512(acc + x, s0);
        _mm512_storeu_si512(acc + x + 16, s1);
        _mm512_storeu_si512(acc + x + 32, s2);
        _mm512_storeu_si512(acc + x + 48, s3);
    }
    for (; x + 32 <= n; x += 32) { /* two independent accumulators */
        __m512i s0 = _mm512_loadu_si512(acc + x), s1 = _mm512_loadu_si512(acc + x + 16);
        for (int i = 0; i < pairs; i++) {
            const uint8_t *ai = a + a_offsets[i] + 4 * x;
            const int8_t *bi = b + b_offsets[i] + 4 * x;
            s0 = _mm512_dpbusd_epi32(s0, _mm512_loadu_si512(ai), _mm512_loadu_si512(bi));
            s1 = _mm512_dpbusd_epi32(s1, _mm512_loadu_si512(ai + 64), _mm512_loadu_si512(bi + 64));
        }
        _mm512_storeu_si512(acc + x, s0);
        _mm512_storeu_si512(acc + x + 16, s1);
    }
    for (; x < n; x += 16) {
        const __mmask16 lanes = n - x >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - x)) - 1);
        __m512i sum = _mm512_maskz_loadu_epi32(lanes, acc + x);
        for (int i = 0; i < pairs; i++)
            sum = _mm512_dpbusd_epi32(sum, _mm512_maskz_loadu_epi32(lanes, a + a_offsets[i] + 4 * x),
                                      _mm512_maskz_loadu_epi32(lanes, b + b_offsets[i] + 4 * x));
        _mm512_mask_storeu_epi32(acc + x, lanes, sum);
    }
}
#endif

typedef void (*dot_fn)(const uint8_t *, const int64_t *, const int8_t *, const int64_t *, int, int, int32_t *);

/* Scratch of one thread: logits (kd kh kw x BLOCK), relative terms (kd + kh + kw x BLOCK), packed uint8
 * probabilities (kd kh ceil(kw / 4) x BLOCK words). */
typedef struct {
    float *logits, *axis_logits;
    uint32_t *probabilities;
} scratch_t;

/* positions [x0, x0 + n) of image row (bh, z, y); n <= BLOCK */
static inline __attribute__((always_inline)) void attend_block(const problem_t *p, const scratch_t *s, int64_t bh,
                                                               int64_t z, int64_t y, int64_t x0, const int n,
                                                               dot_fn dot) {
    const int64_t d = p->d, groups = p->groups;
    const int kd = p->kd, kh = p->kh, kw = p->kw, dilation = p->dilation, axes = kd + kh + kw;
    const int row_groups = (kw + 3) / 4; /* neighbours of one row in groups of 4 */
    const int64_t pz = (int64_t)dilation * (kd - 1) / 2, py = (int64_t)dilation * (kh - 1) / 2,
                  px = (int64_t)dilation * (kw - 1) / 2;
    const int64_t row = (z * p->H + y) * p->W + x0;
    const float *qf = p->qf + bh * d * p->plane + row;
    const int8_t *q8 = p->q8 + (bh * groups * p->plane + row) * 4; /* group g at + g * 4 * plane */
    float *restrict logits = s->logits, *restrict axis_logits = s->axis_logits;

    for (int a = 0; a < axes; a++) { /* qf . rel[a] */
        float acc[BLOCK];
        for (int x = 0; x < n; x++) acc[x] = 0.f;
        for (int64_t c = 0; c < d; c++) {
            const float e = p->rel[a * d + c];
            const float *restrict qc = qf + c * p->plane;
            for (int x = 0; x < n; x++) acc[x] += e * qc[x];
        }
        memcpy(axis_logits + a * BLOCK, acc, sizeof(float) * n);
    }
    int32_t correction[BLOCK]; /* -128 sum(q8): removes the key offset from the dot products */
    for (int x = 0; x < n; x++) correction[x] = 0;
    dot(p->ones, p->zero_offsets, q8, p->query_offsets, (int)groups, n, correction);
    for (int x = 0; x < n; x++) correction[x] *= -KEY_OFFSET;

    /* logits (B, k^d): q8 . k8 in int32, scaled, plus the relative terms */
    float max[BLOCK];
    for (int x = 0; x < n; x++) max[x] = OUTSIDE;
    int o = 0;
    for (int i = 0; i < kd; i++)
        for (int j = 0; j < kh; j++) {
            float row_logits[BLOCK]; /* relative terms of depth offset i and height offset j */
            for (int x = 0; x < n; x++) row_logits[x] = axis_logits[i * BLOCK + x] + axis_logits[(kd + j) * BLOCK + x];
            for (int l = 0; l < kw; l++, o++) {
                float *restrict logit = logits + o * BLOCK;
                const int64_t zz = z + i * dilation - pz, yy = y + j * dilation - py, dx = (int64_t)l * dilation - px;
                if (zz < 0 || zz >= p->D || yy < 0 || yy >= p->H) {
                    for (int x = 0; x < n; x++) logit[x] = OUTSIDE;
                    continue;
                }
                const uint8_t *k8 = p->k8 + (bh * groups * p->padded_plane
                                             + ((zz + pz) * p->padded_H + yy + py) * p->padded_W + x0 + l * dilation)
                                                * 4;
                int32_t dots[BLOCK];
                memcpy(dots, correction, sizeof(int32_t) * n);
                dot(k8, p->key_offsets, q8, p->query_offsets, (int)groups, n, dots);
                const float *restrict rx = axis_logits + (kd + kh + l) * BLOCK;
                float acc[BLOCK];
                for (int x = 0; x < n; x++) acc[x] = p->alpha * (float)dots[x] + (row_logits[x] + rx[x]);
                /* positions whose neighbour lies left / right of the image: [0, lo) and [hi, n) */
                const int lo = (int)(-dx - x0 > 0 ? (-dx - x0 < n ? -dx - x0 : n) : 0);
                const int hi = (int)(p->W - dx - x0 < n ? (p->W - dx - x0 > 0 ? p->W - dx - x0 : 0) : n);
                for (int x = 0; x < lo; x++) acc[x] = OUTSIDE;
                for (int x = hi; x < n; x++) acc[x] = OUTSIDE;
                for (int x = 0; x < n; x++) {
                    logit[x] = acc[x];
                    max[x] = acc[x] > max[x] ? acc[x] : max[x];
                }
            }
        }

    /* probabilities (kd kh, row_groups, B) words of 4 uint8: round(255 exp(logit - max)), 0 past the row's end */
    int32_t weight_sum[BLOCK];
    for (int x = 0; x < n; x++) weight_sum[x] = 0;
    for (int r = 0; r < kd * kh; r++)
        for (int g = 0; g < row_groups; g++) {
            uint32_t *restrict word = s->probabilities + (r * row_groups + g) * BLOCK;
            for (int x = 0; x < n; x++) word[x] = 0;
            for (int t = 0; t < 4 && 4 * g + t < kw; t++) {
                const float *restrict logit = logits + (r * kw + 4 * g + t) * BLOCK;
                for (int x = 0; x < n; x++) {
                    const uint32_t level = (uint32_t)(exp_nonpositive(logit[x] - max[x]) * LEVELS + 0.5f);
                    word[x] |= level << (8 * t);
                    weight_sum[x] += (int32_t)level;
                }
            }
        }
    float normaliser[BLOCK]; /* v_scale / sum of the weights; the largest weight is 255, so the sum is >= 255 */
    for (int x = 0; x < n; x++) normaliser[x] = p->v_scale / (float)weight_sum[x];

    /* out (d, B) = sum over neighbours of uint8 weights x int8 values, in int32 */
    float *out = p->out + bh * d * p->plane + row;
    const int pairs = kd * kh * row_groups;
    for (int64_t c = 0; c < d; c++) {
        int32_t acc[BLOCK];
        for (int x = 0; x < n; x++) acc[x] = 0;
        /* value words of channel c at padded row (z, y): neighbour rows outside the image have weight 0 */
        const int8_t *v4 = p->v4 + ((bh * d + c) * p->padded_plane + (z * p->padded_H + y) * p->padded_W + x0) * 4;
        dot((const uint8_t *)s->probabilities, p->probability_offsets, v4, p->value_offsets, pairs, n, acc);
        float *restrict oc = out + c * p->plane;
        for (int x = 0; x < n; x++) oc[x] = (float)acc[x] * normaliser[x];
    }
}

typedef void (*block_fn)(const problem_t *, const scratch_t *, int64_t, int64_t, int64_t, int64_t, int);

/* one function per path, each compiling the block (softmax included) for its instruction set */
#define BLOCK_FUNCTION(NAME, TARGET, DOT)                                                                             \
    TARGET static void attend_##NAME(const problem_t *p, const scratch_t *s, int64_t bh, int64_t z, int64_t y,        \
                                     int64_t x0, int n) {                                                             \
        if (n == BLOCK) /* full blocks: loops of a constant trip count */                                             \
            attend_block(p, s, bh, z, y, x0, BLOCK, DOT);                                                             \
        else                                                                                                          \
            attend_block(p, s, bh, z, y, x0, n, DOT);                                                                 \
    }

BLOCK_FUNCTION(scalar, , dot_scalar)
#if X86
BLOCK_FUNCTION(avx2, __attribute__((target("avx2,fma"))), dot_avx2)
BLOCK_FUNCTION(avx_vnni, __attribute__((target("avx2,fma,avxvnni"))), dot_avx_vnni)
BLOCK_FUNCTION(avx512_vnni,
               __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma,prefer-vector-width=512"))),
               dot_avx512_vnni)
#endif

/* Whether this CPU (and OS) runs `path`. */
int monai_qsa_int8_path_supported(int path) {
#if X86
    __builtin_cpu_init();
    switch (path) {
    case PATH_AVX512_VNNI:
        return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw")
               && __builtin_cpu_supports("avx512vl");
    case PATH_AVX_VNNI:
        return __builtin_cpu_supports("avxvnni") && __builtin_cpu_supports("fma");
    case PATH_AVX2:
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    }
#endif
    return path == PATH_SCALAR;
}

/* The fastest path this CPU runs. */
int monai_qsa_int8_best_path(void) {
    const int order[] = {PATH_AVX512_VNNI, PATH_AVX_VNNI, PATH_AVX2};
    for (int i = 0; i < 3; i++)
        if (monai_qsa_int8_path_supported(order[i])) return order[i];
    return PATH_SCALAR;
}

static block_fn block_function(int path) {
    switch (path) {
#if X86
    case PATH_AVX512_VNNI: return attend_avx512_vnni;
    case PATH_AVX_VNNI: return attend_avx_vnni;
    case PATH_AVX2: return attend_avx2;
#endif
    default: return attend_scalar;
    }
}

/* Returns 0 on success, 1 if scratch memory could not be allocated, 2 if this CPU does not run `path`
 * (PATH_BEST: the fastest it runs). */
int monai_qsa_local_attention_int8(const int8_t *q8, const float *qf, const uint8_t *k8, const int8_t *v4,
                                   const float *rel, float *out, float alpha, float v_scale, int64_t bh_count,
                                   int64_t d, int64_t D, int64_t H, int64_t W, int kd, int kh, int kw, int dilation,
                                   int path, int num_threads) {
    if (path == PATH_BEST) path = monai_qsa_int8_best_path();
    if (!monai_qsa_int8_path_supported(path)) return 2;
    const block_fn attend = block_function(path);
    const int64_t groups = (d + 3) / 4, row_groups = (kw + 3) / 4, pairs = (int64_t)kd * kh * row_groups;
    problem_t p = {q8, v4, k8, qf, rel, out, alpha, v_scale, d, groups, D, H, W, 0, 0, 0, 0, kd, kh, kw, dilation,
                   NULL, NULL, NULL, NULL, NULL, NULL};
    p.padded_H = H + (int64_t)dilation * (kh - 1);
    p.padded_W = W + (int64_t)dilation * (kw - 1);
    p.plane = D * H * W;
    p.padded_plane = (D + (int64_t)dilation * (kd - 1)) * p.padded_H * p.padded_W;
    int64_t *offsets = (int64_t *)calloc((size_t)(3 * groups + 2 * pairs), sizeof(int64_t));
    uint8_t *ones = (uint8_t *)malloc(4 * BLOCK);
    if (offsets == NULL || ones == NULL) {
        free(offsets);
        free(ones);
        return 1;
    }
    memset(ones, 1, 4 * BLOCK);
    int64_t *key_offsets = offsets, *query_offsets = offsets + groups, *probability_offsets = offsets + 2 * groups,
            *value_offsets = probability_offsets + pairs;
    for (int64_t g = 0; g < groups; g++) {
        key_offsets[g] = 4 * g * p.padded_plane;
        query_offsets[g] = 4 * g * p.plane;
    }
    for (int64_t i = 0, pair = 0; i < kd; i++)
        for (int64_t j = 0; j < kh; j++)
            for (int64_t g = 0; g < row_groups; g++, pair++) {
                probability_offsets[pair] = 4 * BLOCK * pair;
                value_offsets[pair] = 4 * (((i * p.padded_H + j) * p.padded_W + 4 * g) * dilation);
            }
    p.key_offsets = key_offsets;
    p.query_offsets = query_offsets;
    p.probability_offsets = probability_offsets;
    p.value_offsets = value_offsets;
    p.zero_offsets = value_offsets + pairs; /* calloc: zeros */
    p.ones = ones;
    const int64_t blocks_per_row = (W + BLOCK - 1) / BLOCK, items = bh_count * D * H * blocks_per_row;
    const int64_t neighbours = (int64_t)kd * kh * kw;
    int failed = 0;
#pragma omp parallel num_threads(num_threads) reduction(| : failed)
    {
        float *floats = (float *)malloc(sizeof(float) * BLOCK * (neighbours + kd + kh + kw));
        uint32_t *probabilities = (uint32_t *)malloc(sizeof(uint32_t) * BLOCK * pairs);
        const scratch_t s = {floats, floats + BLOCK * neighbours, probabilities};
        if (floats == NULL || probabilities == NULL) failed = 1;
#pragma omp for schedule(static)
        for (int64_t item = 0; item < items; item++) {
            if (failed) continue;
            const int64_t row = item / blocks_per_row, x0 = (item % blocks_per_row) * BLOCK;
            const int64_t y = row % H, z = (row / H) % D, bh = row / (H * D);
            attend(&p, &s, bh, z, y, x0, (int)(W - x0 < BLOCK ? W - x0 : BLOCK));
        }
        free(floats);
        free(probabilities);
    }
    free(offsets);
    free(ones);
    return failed;
}

/* round(x * inverse_scale) clamped to [-127, 127], ties to even as torch.round; an integer, as a float */
static inline float quantize(float x, float inverse_scale) {
    float r = x * inverse_scale;
    r = r > 127.f ? 127.f : (r < -127.f ? -127.f : r);
    return (r + 12582912.f) - 12582912.f;
}

/* Split the (B, 3, heads, d, D, H, W) fp32 projection, of any strides (int8 convolutions leave it channels-last),
 * into the kernel's layouts (see the top of this file): q8 and qf from the queries, keys into the interior of k8
 * (filled with 128), values into v4 (zero-filled). One pass, parallel over image rows; the rows of 4-byte words are
 * written one byte plane at a time, so that the loops over positions vectorise. Returns 1 if scratch memory could
 * not be allocated, else 0. */
int monai_qsa_int8_split_quantize(const float *qkv, const int64_t *strides, int64_t batch, int64_t heads, int64_t d,
                                  int64_t D, int64_t H, int64_t W, int64_t pz, int64_t py, int64_t px,
                                  int64_t dilation, float q_scale, float k_scale, float v_scale, float scale,
                                  int8_t *q8, float *qf, uint8_t *k8, int8_t *v4, int num_threads) {
    /* strides: batch, part (q/k/v), channel within the part (heads * d), depth, height, width */
    const int64_t s_batch = strides[0], s_part = strides[1], s_channel = strides[2], s_z = strides[3],
                  s_y = strides[4], s_x = strides[5];
    const int64_t groups = (d + 3) / 4, padded_H = H + 2 * py, padded_W = W + 2 * px;
    const int64_t padded_plane = (D + 2 * pz) * padded_H * padded_W, plane = D * H * W, rows = batch * D * H;
    const float q_inverse = 1.f / q_scale, k_inverse = 1.f / k_scale, v_inverse = 1.f / v_scale;
    int failed = 0;
#pragma omp parallel num_threads(num_threads) reduction(| : failed)
    {
        /* one padded row of quantised values, zero past both ends (3 * dilation more on the right for v4) */
        uint8_t *values = (uint8_t *)calloc((size_t)(padded_W + 3 * dilation), 1);
        if (values == NULL) failed = 1;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            if (failed) continue;
            const int64_t y = r % H, z = (r / H) % D, b = r / (H * D);
            const int64_t q_row = (z * H + y) * W, pad_row = ((z + pz) * padded_H + y + py) * padded_W;
            const float *row = qkv + b * s_batch + z * s_z + y * s_y;
            for (int64_t h = 0; h < heads; h++)
                for (int64_t g = 0; g < groups; g++) {
                    const int64_t bh = b * heads + h, in_group = d - 4 * g < 4 ? d - 4 * g : 4;
                    uint32_t *restrict q_words = (uint32_t *)(q8 + ((bh * groups + g) * plane + q_row) * 4);
                    uint32_t *restrict k_words =
                        (uint32_t *)(k8 + ((bh * groups + g) * padded_plane + pad_row + px) * 4);
                    const uint32_t absent = 0x80808080u << (8 * in_group); /* channels past d: keys 128 */
                    for (int64_t x = 0; x < W; x++) {
                        q_words[x] = 0;
                        k_words[x] = in_group == 4 ? 0 : absent;
                    }
                    for (int64_t t = 0; t < in_group; t++) {
                        const int64_t c = 4 * g + t;
                        const float *restrict q = row + (h * d + c) * s_channel, *restrict k = q + s_part;
                        float *restrict qf_row = qf + (bh * d + c) * plane + q_row;
                        for (int64_t x = 0; x < W; x++) {
                            const float qi = quantize(q[x * s_x], q_inverse);
                            q_words[x] |= ((uint32_t)(int32_t)qi & 0xFFu) << (8 * t);
                            qf_row[x] = (qi * q_scale) * scale;
                        }
                        for (int64_t x = 0; x < W; x++)
                            k_words[x] |= (uint32_t)((int32_t)quantize(k[x * s_x], k_inverse) + KEY_OFFSET) << (8 * t);
                    }
                }
            for (int64_t channel = 0; channel < heads * d; channel++) {
                const float *restrict v = row + channel * s_channel + 2 * s_part;
                for (int64_t x = 0; x < W; x++) values[px + x] = (uint8_t)(int32_t)quantize(v[x * s_x], v_inverse);
                uint32_t *restrict v_words =
                    (uint32_t *)(v4 + ((b * heads * d + channel) * padded_plane + pad_row) * 4);
                for (int64_t x = 0; x < padded_W; x++)
                    v_words[x] = values[x] | (uint32_t)values[x + dilation] << 8
                                 | (uint32_t)values[x + 2 * dilation] << 16 | (uint32_t)values[x + 3 * dilation] << 24;
            }
        }
        free(values);
    }
    return failed;
}
