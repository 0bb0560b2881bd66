/*
 * Int8 neighbourhood attention of StandAloneSelfAttention for CPUs (2D and 3D).
 *
 * Work items are pieces of BLOCK positions of one image row of one head; each is computed LANES positions (16 on
 * AVX-512 builds, 8 on other x86 ones) at a time, everything for them in registers or L1: the logits of all k^d
 * neighbours, their softmax and the weighted sum of the values. Integer where it holds accuracy:
 *   logits   int8 queries x int8 keys, accumulated in int32; relative-position terms int8 queries x int8 table
 *            (its own scale), int32, scaled and added in fp32
 *   softmax  fp32: uint8 weights round(255 exp(logit - max)), exp by a polynomial on LANES lanes
 *   output   uint8 weights x int8 values, accumulated in int32, divided by the sum of the weights (fp32)
 * Built at run time by monai_qsa/networks/blocks/local_attention_int8.py; one build holds every instruction-set path
 * of the integer dot products, chosen per call. The rest of the computation is written once with GCC vector
 * extensions (LANES lanes) and compiled by each path's function for its target:
 *   PATH_AVX512_VNNI  vpdpbusd on one vector (zmm, or ymm in 8-lane builds)
 *   PATH_AVX_VNNI     vpdpbusd on 8 positions (ymm; twice in 16-lane builds)
 *   PATH_AVX2         even/odd bytes as int16 + 2 vpmaddwd: exact (vpmaddubsw would saturate); ymm, or zmm in
 *                     builds with AVX-512BW (AVX-512 CPUs without VNNI run it)
 *   PATH_SCALAR       plain C, any CPU
 * The integer sums are exact, so every path gives the same output.
 *
 * The projection itself (the 1x1(x1) convolution giving q, k and v) can be computed here too, from the layer's input
 * and fp32 weights (projected_local_attention_int8): row by row, in fp32, summed over the input channels in their
 * order with one rounding per product and per sum (no fused multiply-adds there: UNFUSED_ROUNDING), so that
 * PyTorch operations reproduce it exactly; the projection then never leaves the thread's scratch memory.
 *
 * All dot products are "4 bytes per int32 lane" products, u8 x s8 as vpdpbusd wants them:
 *   q . k    lane = position, its 4 bytes = 4 channels (channels in groups of 4, G = ceil(d / 4), zero-filled);
 *            keys are stored + 128 (uint8), and 128 * sum(q) removes the offset: exact signed products.
 *   q . rel  the same, with the table's 4 bytes (+ 128) repeated in every lane.
 *   p . v    lane = position, its 4 bytes = 4 neighbours l..l+3 of one neighbour row (kw rounded up to 4 with zero
 *            weights); v4 holds, for every padded position X, the 4 values v[X], v[X + dil], v[X + 2dil], v[X + 3dil].
 * The queries of LANES positions stay in registers for all their neighbours (d_head 4, 8, 16 and 32 are compiled as
 * constants); the weighted sums run up to 16 output channels at a time (8 on the ymm paths, 4 in plain C: as many
 * independent chains, one load of the weights).
 *
 * Layouts (2D images are passed as depth 1 with kd = 1; Dp, Hp, Wp: sizes zero-padded by dilation * (k - 1) / 2).
 * The buffers are followed by 64 bytes of slack: the last vector step of a row reads up to LANES - 1 positions past
 * it.
 *   q8:   (BH, G, D, H, W, 4) int8         round(q * (1 / q_scale)), clamped to [-127, 127]
 *   k8:   (BH, G, Dp, Hp, Wp, 4) uint8     round(k * (1 / k_scale)) + 128, 128 in the padding (masked anyway)
 *   v4:   (BH, d, Dp, Hp, Wp, 4) int8      round(v * (1 / v_scale)) at X + t * dilation, t = 0..3 (0 outside)
 *   rel8: (kd + kh + kw, d) int8           relative-position table of each offset on depth, height, width
 *   out:  (BH, d, D, H, W) float
 * The logit of neighbour (i, j, l) is alpha * (q8 . k8_ijl) + beta * (q8 . rel8[i] + q8 . rel8[kd + j]
 * + q8 . rel8[kd + kh + l]) with alpha = scale * q_scale * k_scale, beta = scale * q_scale * table_scale (each
 * axis term scaled on its own); neighbours outside the image take no part in the softmax.
 *
 * The end of the file holds a second kernel on the same dot products and paths: restore_head_int8, a SAUNet's
 * resolution restore and head (restore_head_int8.py).
 */
#include <float.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define X86 1
#else
#define X86 0
#endif

#define BLOCK 64 /* positions of one work item: a piece of an image row */
/* positions of one vector step: one register of the build's widest vectors. 16 (a zmm) where the build targets
 * AVX-512 (-march=native on such a CPU); 8 on other x86 CPUs (a ymm; two xmm without AVX, where only the scalar path
 * runs), whose compiler otherwise keeps 16-lane vectors in memory (measured: the AVX2 build's paths spent most of
 * their time storing and reloading them). Every path of a build uses the same width, and each position's arithmetic
 * is the same whatever the width: the same output. */
#if X86 && !defined(__AVX512F__)
#define LANES 8
#else
#define LANES 16
#endif
#define MAX_CHANNELS 16 /* output channels of one pass over the weights, at most */
#define PROJECTED 8 /* projected channels of one pass over a row's input */
#define MAX_GROUPS 64 /* channel groups of 4 per head: d_head <= 256 */
#define OUTSIDE (-1e30f)
#define KEY_OFFSET 128
#define LEVELS 255.f /* uint8 probability levels */
#define MAGIC 12582912.f /* 1.5 2^23: x + MAGIC rounds x to an integer (|x| < 2^22), held in its low bits */
#define MAGIC_BITS 0x4B400000 /* the bits of MAGIC */
#define LOG2_E 1.44269504088896341 /* the logits are computed in units of log2 (alpha, beta times LOG2_E) */

enum { PATH_BEST = 0, PATH_SCALAR = 1, PATH_AVX2 = 2, PATH_AVX_VNNI = 3, PATH_AVX512_VNNI = 4 };

/* LANES positions: GCC vector extensions, lowered to one zmm, one or two ymm or scalar code by each path's target */
typedef int32_t i32xN __attribute__((vector_size(4 * LANES)));
typedef uint32_t u32xN __attribute__((vector_size(4 * LANES)));
typedef float f32xN __attribute__((vector_size(4 * LANES)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef uint8_t u8x8 __attribute__((vector_size(8)));

typedef struct {
    const int8_t *q8, *v4;
    const uint8_t *k8, *table; /* table: (axes, groups, LANES, 4) rel8 + 128, the same 4 bytes in every lane */
    float *out;
    float alpha, beta, v_scale;
    int64_t d, groups, D, H, W, padded_H, padded_W, plane, padded_plane;
    int kd, kh, kw, dilation;
} problem_t;

static inline __attribute__((always_inline)) i32xN load_i32(const void *address) {
    i32xN v;
    memcpy(&v, address, sizeof v);
    return v;
}

static inline __attribute__((always_inline)) f32xN select_f32(i32xN mask, f32xN yes, f32xN no) {
    return (f32xN)(((i32xN)yes & mask) | ((i32xN)no & ~mask));
}

/* a > b ? a : b per lane (the scalar path). The x86 paths use vmaxps, which computes exactly that (NaN or equal: b):
 * one instruction where this takes a compare and a blend (measured, when every build had 16 lanes: GCC lowered this
 * one's masks through memory in AVX2 builds, a quarter of their AVX2 paths' time) */
static inline __attribute__((always_inline)) f32xN max_f32(f32xN a, f32xN b) { return select_f32(a > b, a, b); }

typedef f32xN (*max_fn)(f32xN, f32xN);

/* round(255 2^y) for y <= 0 (the logit minus its maximum, in units of log2: see LOG2_E), as integers: 255 2^n 2^r,
 * n = round(y), |r| <= 1/2, 2^r by a degree-3 polynomial (relative error < 1.2e-4: at most 0.03 of the weights'
 * unit); y is clamped at -16, where 255 2^-16 rounds to 0. n is read from the bits of y + MAGIC (the float whose
 * unit in the last place is 1), and 2^n built from it as exponent bits. */
static inline __attribute__((always_inline)) u32xN levels(f32xN y, max_fn max) {
    const f32xN zero = {0}, magic = zero + MAGIC;
    y = max(y, zero - 16.f);
    const f32xN shifted = y + magic; /* n + MAGIC: round to nearest */
    const f32xN r = y - (shifted - magic);
    const f32xN p = LEVELS + r * (LEVELS * 0.69336869f + r * (LEVELS * 0.24221838f + r * (LEVELS * 0.05459283f)));
    const i32xN bits = ((i32xN)shifted - (MAGIC_BITS - 127)) << 23; /* (n + 127) << 23: 2^n */
    return (u32xN)__builtin_convertvector(p * (f32xN)bits + 0.5f, i32xN); /* 0..255: a signed conversion */
}

static inline __attribute__((always_inline)) i32xN dp_scalar(i32xN acc, const uint8_t *a, i32xN b) {
    int8_t bytes[4 * LANES];
    memcpy(bytes, &b, sizeof bytes);
    for (int x = 0; x < LANES; x++)
        acc[x] += (int32_t)a[4 * x] * bytes[4 * x] + (int32_t)a[4 * x + 1] * bytes[4 * x + 1]
                  + (int32_t)a[4 * x + 2] * bytes[4 * x + 2] + (int32_t)a[4 * x + 3] * bytes[4 * x + 3];
    return acc;
}

#if X86
/* vpdpbusd without VNNI, exact: even and odd bytes as 16-bit integers (a zero-, b sign-extended), two vpmaddwd */
__attribute__((target("avx2"))) static inline __m256i dpbusd_avx2(__m256i acc, __m256i a, __m256i b) {
    const __m256i low_bytes = _mm256_set1_epi16(0xFF);
    const __m256i a_even = _mm256_and_si256(a, low_bytes), a_odd = _mm256_srli_epi16(a, 8);
    const __m256i b_even = _mm256_srai_epi16(_mm256_slli_epi16(b, 8), 8), b_odd = _mm256_srai_epi16(b, 8);
    return _mm256_add_epi32(acc, _mm256_add_epi32(_mm256_madd_epi16(a_even, b_even), _mm256_madd_epi16(a_odd, b_odd)));
}

#if LANES == 16
/* a 16-lane vector as two ymm halves, for the avx_vnni path of an AVX-512 build (run only when forced: CPUs with
 * AVX-VNNI and AVX-512 have AVX-512 VNNI too) and its avx2 path without AVX-512BW */
typedef union {
    i32xN v;
    __m256i half[2];
} halves_t;

#if defined(__AVX512BW__)
/* AVX-512 CPUs without VNNI (Skylake-SP/X) run the avx2 path of this build: dpbusd_avx2's products on whole zmm
 * registers (AVX-512BW) */
__attribute__((target("avx512f,avx512bw"))) static inline i32xN dp_avx2(i32xN acc, const uint8_t *a, i32xN b) {
    const __m512i low_bytes = _mm512_set1_epi16(0xFF), va = _mm512_loadu_si512(a), vb = (__m512i)b;
    const __m512i a_even = _mm512_and_si512(va, low_bytes), a_odd = _mm512_srli_epi16(va, 8);
    const __m512i b_even = _mm512_srai_epi16(_mm512_slli_epi16(vb, 8), 8), b_odd = _mm512_srai_epi16(vb, 8);
    const __m512i products = _mm512_add_epi32(_mm512_madd_epi16(a_even, b_even), _mm512_madd_epi16(a_odd, b_odd));
    return (i32xN)_mm512_add_epi32((__m512i)acc, products);
}
#else
__attribute__((target("avx2"))) static inline i32xN dp_avx2(i32xN acc, const uint8_t *a, i32xN b) {
    halves_t h = {acc}, hb = {b};
    for (int i = 0; i < 2; i++)
        h.half[i] = dpbusd_avx2(h.half[i], _mm256_loadu_si256((const __m256i *)(a + 32 * i)), hb.half[i]);
    return h.v;
}
#endif

__attribute__((target("avx2,avxvnni"))) static inline i32xN dp_avx_vnni(i32xN acc, const uint8_t *a, i32xN b) {
    halves_t h = {acc}, hb = {b};
    for (int i = 0; i < 2; i++)
        h.half[i] = _mm256_dpbusd_avx_epi32(h.half[i], _mm256_loadu_si256((const __m256i *)(a + 32 * i)), hb.half[i]);
    return h.v;
}

__attribute__((target("avx512f,avx512vnni"))) static inline i32xN dp_avx512_vnni(i32xN acc, const uint8_t *a,
                                                                                 i32xN b) {
    return (i32xN)_mm512_dpbusd_epi32((__m512i)acc, _mm512_loadu_si512(a), (__m512i)b);
}

__attribute__((target("avx512f"))) static inline f32xN max_avx512(f32xN a, f32xN b) {
    return (f32xN)_mm512_max_ps((__m512)a, (__m512)b);
}

#define max_avx2 max_avx512 /* a 16-lane build targets AVX-512 */
#else /* 8 lanes: one ymm on every path */
__attribute__((target("avx2"))) static inline i32xN dp_avx2(i32xN acc, const uint8_t *a, i32xN b) {
    return (i32xN)dpbusd_avx2((__m256i)acc, _mm256_loadu_si256((const __m256i *)a), (__m256i)b);
}

__attribute__((target("avx2,avxvnni"))) static inline i32xN dp_avx_vnni(i32xN acc, const uint8_t *a, i32xN b) {
    return (i32xN)_mm256_dpbusd_avx_epi32((__m256i)acc, _mm256_loadu_si256((const __m256i *)a), (__m256i)b);
}

__attribute__((target("avx512vl,avx512vnni"))) static inline i32xN dp_avx512_vnni(i32xN acc, const uint8_t *a,
                                                                                  i32xN b) {
    return (i32xN)_mm256_dpbusd_epi32((__m256i)acc, _mm256_loadu_si256((const __m256i *)a), (__m256i)b);
}

__attribute__((target("avx2"))) static inline f32xN max_avx2(f32xN a, f32xN b) {
    return (f32xN)_mm256_max_ps((__m256)a, (__m256)b);
}

#define max_avx512 max_avx2
#endif
#endif

/* acc + the LANES "4 bytes per lane" dot products of a (unsigned bytes, 4 LANES at a) and b (signed bytes) */
typedef i32xN (*dp_fn)(i32xN, const uint8_t *, i32xN);

/* Scratch of one thread, per vector step: logits (kd kh kw vectors), relative terms (kd + kh + kw vectors), masks of
 * the neighbour columns (kw vectors), packed uint8 probabilities (kd kh ceil(kw / 4) vectors of words). */
typedef struct {
    f32xN *logits, *axis_logits, *column_masks;
    u32xN *probabilities;
} scratch_t;

/* Output channels [c0, c0 + count) of the positions [x, x + LANES) of image row (bh, z, y), of which the first m
 * are stored: the weighted sums of the values, uint8 weights (s->probabilities) x int8 values in int32, times
 * normaliser. count independent chains of dot products share each load of the weights (count a constant where
 * inlined: the sums stay in registers). Returns count. */
static inline __attribute__((always_inline)) int weighted_sums(const problem_t *p, const scratch_t *s, int64_t bh,
                                                               int64_t z, int64_t y, int64_t x, int64_t c0,
                                                               const int count, int m, f32xN normaliser, float *out,
                                                               dp_fn dp) {
    const int row_groups = (p->kw + 3) / 4, dilation = p->dilation;
    const int64_t padded_plane = p->padded_plane, plane = p->plane;
    /* value words of channel c0 at padded row (z, y): neighbour rows outside the image have weight 0 */
    const int8_t *v4 = p->v4 + ((bh * p->d + c0) * padded_plane + (z * p->padded_H + y) * p->padded_W + x) * 4;
    i32xN acc[MAX_CHANNELS];
    for (int c = 0; c < count; c++) acc[c] = (i32xN){0};
    for (int i = 0, pair = 0; i < p->kd; i++)
        for (int j = 0; j < p->kh; j++)
            for (int g = 0; g < row_groups; g++, pair++) {
                const int8_t *values = v4 + 4 * (((int64_t)i * p->padded_H + j) * p->padded_W + 4 * g) * dilation;
                const uint8_t *weights = (const uint8_t *)&s->probabilities[pair];
                for (int c = 0; c < count; c++) acc[c] = dp(acc[c], weights, load_i32(values + 4 * c * padded_plane));
            }
    for (int c = 0; c < count; c++) {
        const f32xN result = __builtin_convertvector(acc[c], f32xN) * normaliser;
        if (m == LANES)
            memcpy(out + (c0 + c) * plane, &result, sizeof result);
        else
            for (int t = 0; t < m; t++) out[(c0 + c) * plane + t] = result[t];
    }
    return count;
}

/* Positions [x, x + LANES) of image row (bh, z, y), of which the first m < LANES or all are stored: logits of all
 * neighbours, their softmax as uint8 weights, the weighted sums of the values. Reads up to LANES - 1 positions past
 * the end of rows, which the buffers' slack covers. */
static inline __attribute__((always_inline)) void attend_lanes(const problem_t *p, const scratch_t *s, int64_t bh,
                                                               int64_t z, int64_t y, int64_t x, int m,
                                                               const int64_t groups, const int max_channels,
                                                               dp_fn dp, max_fn vmax) {
    static const uint8_t ones[4 * LANES] = {[0 ... 4 * LANES - 1] = 1};
    const int64_t plane = p->plane, padded_plane = p->padded_plane;
    const int kd = p->kd, kh = p->kh, kw = p->kw, dilation = p->dilation;
    const int64_t pz = (int64_t)dilation * (kd - 1) / 2, py = (int64_t)dilation * (kh - 1) / 2,
                  px = (int64_t)dilation * (kw - 1) / 2;
    const int8_t *q8 = p->q8 + (bh * groups * plane + (z * p->H + y) * p->W + x) * 4; /* group g at + 4 g plane */
    f32xN *restrict logits = s->logits, *restrict axis = s->axis_logits;
    static const int32_t lane_numbers[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    const i32xN lane = load_i32(lane_numbers), izero = {0};
    const f32xN outside = (f32xN){0} + OUTSIDE;

    i32xN q[MAX_GROUPS]; /* the queries, in registers when groups is a constant */
    for (int64_t g = 0; g < groups; g++) q[g] = load_i32(q8 + 4 * g * plane);
    i32xN correction = izero; /* -128 sum(q8): removes the offset of keys and table from the dot products */
    for (int64_t g = 0; g < groups; g++) correction = dp(correction, ones, q[g]);
    correction *= -KEY_OFFSET;
    for (int a = 0; a < kd + kh + kw; a++) { /* relative terms beta (q8 . rel8[a]) */
        i32xN acc = correction;
        for (int64_t g = 0; g < groups; g++) acc = dp(acc, p->table + (a * groups + g) * 4 * LANES, q[g]);
        axis[a] = p->beta * __builtin_convertvector(acc, f32xN);
    }
    /* whether every neighbour column of these positions lies in the image; if not, per neighbour column l, 0
     * where it does and OUTSIDE where it does not, added to the logits (logit + OUTSIDE rounds to OUTSIDE) */
    const int interior = x - px >= 0 && x + LANES - 1 + (int64_t)(kw - 1) * dilation - px < p->W;
    f32xN *restrict column_masks = s->column_masks;
    if (!interior)
        for (int l = 0; l < kw; l++) {
            const i32xN column = lane + (int32_t)(x + (int64_t)l * dilation - px); /* the neighbour's x */
            column_masks[l] = select_f32((column >= 0) & (column < (int32_t)p->W), (f32xN){0}, outside);
        }

    /* logits alpha (q8 . k8) + relative terms, outside the image OUTSIDE; their maximum, per neighbour row first
     * (kd kh short dependency chains rather than one of k^d) */
    f32xN max = outside;
    for (int i = 0, o = 0; i < kd; i++)
        for (int j = 0; j < kh; j++, o += kw) {
            const int64_t zz = z + i * dilation - pz, yy = y + j * dilation - py;
            if (zz < 0 || zz >= p->D || yy < 0 || yy >= p->H) {
                for (int l = 0; l < kw; l++) logits[o + l] = outside;
                continue;
            }
            const f32xN row_terms = axis[i] + axis[kd + j];
            const int64_t key_row = ((zz + pz) * p->padded_H + yy + py) * p->padded_W + x;
            const uint8_t *k8 = p->k8 + (bh * groups * padded_plane + key_row) * 4;
            f32xN row_max = outside;
            for (int l = 0; l < kw; l++) {
                i32xN acc = correction;
                for (int64_t g = 0; g < groups; g++)
                    acc = dp(acc, k8 + 4 * (g * padded_plane + (int64_t)l * dilation), q[g]);
                f32xN logit = p->alpha * __builtin_convertvector(acc, f32xN) + (row_terms + axis[kd + kh + l]);
                if (!interior) logit += column_masks[l];
                logits[o + l] = logit;
                row_max = vmax(row_max, logit);
            }
            max = vmax(max, row_max);
        }

    /* uint8 weights round(255 exp(logit - max)), 4 neighbours of a row per word (0 past the row's end): the whole
     * words of a row, then its last, partial one */
    i32xN weight_sum = izero;
    u32xN *words = s->probabilities;
    for (int r = 0; r < kd * kh; r++) {
        const f32xN *row = logits + r * kw;
        int l = 0;
        for (; l + 4 <= kw; l += 4) {
            const u32xN w0 = levels(row[l] - max, vmax), w1 = levels(row[l + 1] - max, vmax),
                         w2 = levels(row[l + 2] - max, vmax), w3 = levels(row[l + 3] - max, vmax);
            *words++ = w0 | w1 << 8 | w2 << 16 | w3 << 24;
            weight_sum += (i32xN)((w0 + w1) + (w2 + w3));
        }
        if (l < kw) {
            u32xN word = (u32xN)izero;
            for (int t = 0; l + t < kw; t++) {
                const u32xN level = levels(row[l + t] - max, vmax);
                word |= level << (8 * t);
                weight_sum += (i32xN)level;
            }
            *words++ = word;
        }
    }
    /* v_scale / sum of the weights; the largest weight is 255, so the sum is >= 255 */
    const f32xN normaliser = p->v_scale / __builtin_convertvector(weight_sum, f32xN);

    /* out (d, LANES) = sum over neighbours of uint8 weights x int8 values, in int32: up to max_channels channels per
     * pass over the weights, as many independent chains of dot products sharing each load of the weights (constant
     * counts, so that the sums stay in registers) */
    float *out = p->out + bh * p->d * plane + (z * p->H + y) * p->W + x;
    for (int64_t c0 = 0; c0 < p->d;) {
        const int64_t left = p->d - c0;
        if (max_channels >= 16 && left >= 16)
            c0 += weighted_sums(p, s, bh, z, y, x, c0, 16, m, normaliser, out, dp);
        else if (max_channels >= 8 && left >= 8)
            c0 += weighted_sums(p, s, bh, z, y, x, c0, 8, m, normaliser, out, dp);
        else if (left >= 4)
            c0 += weighted_sums(p, s, bh, z, y, x, c0, 4, m, normaliser, out, dp);
        else
            c0 += weighted_sums(p, s, bh, z, y, x, c0, 1, m, normaliser, out, dp);
    }
}

typedef void (*block_fn)(const problem_t *, const scratch_t *, int64_t, int64_t, int64_t, int64_t, int);

/* one function per path, each compiling the whole computation for its instruction set: positions [x0, x0 + n) */
#define BLOCK_FUNCTION(NAME, TARGET, DP, MAX, CHANNELS)                                                               \
    TARGET static void attend_##NAME(const problem_t *p, const scratch_t *s, int64_t bh, int64_t z, int64_t y,        \
                                     int64_t x0, int n) {                                                             \
        for (int x = 0; x < n; x += LANES) {                                                                          \
            const int m = n - x < LANES ? n - x : LANES;                                                              \
            switch (p->groups) { /* d_head 4, 8, 16, 32 (the bundles' networks): the queries stay in registers */     \
            case 1: attend_lanes(p, s, bh, z, y, x0 + x, m, 1, CHANNELS, DP, MAX); break;                             \
            case 2: attend_lanes(p, s, bh, z, y, x0 + x, m, 2, CHANNELS, DP, MAX); break;                             \
            case 4: attend_lanes(p, s, bh, z, y, x0 + x, m, 4, CHANNELS, DP, MAX); break;                             \
            case 8: attend_lanes(p, s, bh, z, y, x0 + x, m, 8, CHANNELS, DP, MAX); break;                             \
            default: attend_lanes(p, s, bh, z, y, x0 + x, m, p->groups, CHANNELS, DP, MAX);                           \
            }                                                                                                         \
        }                                                                                                             \
    }

BLOCK_FUNCTION(scalar, , dp_scalar, max_f32, 4)
#if X86
BLOCK_FUNCTION(avx2, __attribute__((target("avx2,fma"))), dp_avx2, max_avx2, 8)
BLOCK_FUNCTION(avx_vnni, __attribute__((target("avx2,fma,avxvnni"))), dp_avx_vnni, max_avx2, 8)
BLOCK_FUNCTION(avx512_vnni,
               __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma,prefer-vector-width=512"))),
               dp_avx512_vnni, max_avx512, 16)
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

/* The attention of the quantised buffers (layouts at the top of this file; rel8_table: (axes, groups, LANES, 4),
 * see quantize_table) on `path`. Returns 0, or 1 if scratch memory could not be allocated. */
static int attend_quantized(const problem_t *p, int path, int64_t bh_count, int num_threads) {
    const block_fn attend = block_function(path);
    const int64_t blocks_per_row = (p->W + BLOCK - 1) / BLOCK, items = bh_count * p->D * p->H * blocks_per_row;
    const int64_t axes = p->kd + p->kh + p->kw, neighbours = (int64_t)p->kd * p->kh * p->kw,
                  pairs = (int64_t)p->kd * p->kh * ((p->kw + 3) / 4);
    int failed = 0;
#pragma omp parallel num_threads(num_threads) reduction(| : failed)
    {
        f32xN *vectors =
            (f32xN *)aligned_alloc(sizeof(f32xN), sizeof(f32xN) * (neighbours + axes + p->kw + pairs));
        const scratch_t s = {vectors, vectors + neighbours, vectors + neighbours + axes,
                             (u32xN *)(vectors + neighbours + axes + p->kw)};
        if (vectors == NULL) failed = 1;
#pragma omp for schedule(static)
        for (int64_t item = 0; item < items; item++) {
            if (failed) continue;
            const int64_t row = item / blocks_per_row, x0 = (item % blocks_per_row) * BLOCK;
            const int64_t y = row % p->H, z = (row / p->H) % p->D, bh = row / (p->H * p->D);
            attend(p, &s, bh, z, y, x0, (int)(p->W - x0 < BLOCK ? p->W - x0 : BLOCK));
        }
        free(vectors);
    }
    return failed;
}

/* round(x * inverse_scale) clamped to [-127, 127], ties to even as torch.round; an integer, as a float */
static inline float quantize(float x, float inverse_scale) {
    float r = x * inverse_scale;
    r = r > 127.f ? 127.f : (r < -127.f ? -127.f : r);
    return (r + MAGIC) - MAGIC;
}

/* quantize() of 8 values, as the bytes of their int8 values: compare-and-select clamps and one narrowing convert,
 * a few vector instructions on every target where the scalar function's branches are not. 8 lanes, not 16: without
 * AVX-512, GCC lowers the masks of 64-byte vectors through memory (measured 2x slower), those of 32-byte ones not. */
static inline __attribute__((always_inline)) u8x8 quantize_lanes(f32x8 x, float inverse_scale) {
    const f32x8 zero = {0}, high = zero + 127.f, low = zero - 127.f, magic = zero + MAGIC;
    f32x8 r = x * inverse_scale;
    i32x8 above = r > high, below = r < low;
    r = (f32x8)(((i32x8)high & above) | ((i32x8)r & ~above));
    r = (f32x8)(((i32x8)low & below) | ((i32x8)r & ~below));
    return __builtin_convertvector(__builtin_convertvector((r + magic) - magic, i32x8), u8x8);
}

/* Quantise image row `row` of the projection (part stride s_part, channel stride s_channel, position stride s_x)
 * into bytes (3 parts, channels, row_length), position x at px + x: channel-major rows whatever the layout. Channel-
 * first projections are read channel by channel (vectorised, the next image row prefetched), others position by
 * position (channels-last: each position's channels are contiguous). */
static void quantize_row(const float *row, int64_t next_row, int64_t s_part, int64_t s_channel, int64_t s_x,
                         int64_t channels, int64_t W, int64_t px, int64_t row_length, const float inverse[3],
                         uint8_t *bytes) {
    if (s_x == 1) {
        for (int64_t part = 0; part < 3; part++)
            for (int64_t c = 0; c < channels; c++) {
                const float *restrict source = row + part * s_part + c * s_channel;
                uint8_t *restrict target = bytes + (part * channels + c) * row_length + px;
                int64_t x = 0;
                for (; x + 16 <= W; x += 16) { /* a cache line per step; the next image row's line prefetched */
                    if (next_row != 0) __builtin_prefetch(source + next_row + x);
                    for (int half = 0; half < 16; half += 8) {
                        f32x8 values;
                        memcpy(&values, source + x + half, sizeof values);
                        const u8x8 quantized = quantize_lanes(values, inverse[part]);
                        memcpy(target + x + half, &quantized, sizeof quantized);
                    }
                }
                if (next_row != 0 && x < W) __builtin_prefetch(source + next_row + x);
                for (; x < W; x++) target[x] = (uint8_t)(int32_t)quantize(source[x], inverse[part]);
            }
        return;
    }
    if (s_channel == 1 && s_part == channels && s_x == 3 * channels) { /* channels-last: the row is contiguous */
        uint8_t *restrict staged = bytes + (3 * channels + 1) * row_length; /* (W, 3 channels), position-major */
        for (int64_t x = 0; x < W; x++) {
            const float *restrict source = row + x * s_x;
            if (next_row != 0)
                for (int64_t c = 0; c < 3 * channels; c += 16) __builtin_prefetch(source + next_row + c);
            for (int64_t part = 0; part < 3; part++)
                for (int64_t c = 0; c < channels; c++)
                    staged[(x * 3 + part) * channels + c] =
                        (uint8_t)(int32_t)quantize(source[part * channels + c], inverse[part]);
        }
        for (int64_t c = 0; c < 3 * channels; c++) { /* transpose to channel-major rows */
            uint8_t *restrict target = bytes + c * row_length + px;
            for (int64_t x = 0; x < W; x++) target[x] = staged[x * 3 * channels + c];
        }
        return;
    }
    for (int64_t x = 0; x < W; x++)
        for (int64_t part = 0; part < 3; part++) {
            const float *restrict source = row + x * s_x + part * s_part;
            uint8_t *restrict target = bytes + part * channels * row_length + px + x;
            for (int64_t c = 0; c < channels; c++)
                target[c * row_length] = (uint8_t)(int32_t)quantize(source[c * s_channel], inverse[part]);
        }
}

/* The projection rounds every product and every sum, as PyTorch's separate multiplications and additions do: no
 * contraction into fused multiply-adds there (GCC: a function attribute; clang: a pragma in the function body). The
 * rest of the kernel may contract (measured: forbidding it everywhere made the 3D attention 1.4x slower). */
#if defined(__clang__)
#define UNFUSED_FUNCTION
#define UNFUSED_ROUNDING _Pragma("clang fp contract(off)")
#else
#define UNFUSED_FUNCTION __attribute__((optimize("fp-contract=off")))
#define UNFUSED_ROUNDING
#endif

/* LANES positions of `count` projected channels (count a constant where inlined): out[c] = bias[c] + sum over i of
 * weight[c][i] input[i], summed in the order of i */
static inline UNFUSED_FUNCTION __attribute__((always_inline)) void project_lanes(const float *input,
                                                                                    int64_t input_stride,
                                                                                    int64_t in_channels,
                                                                                    const float *weight,
                                                                                    const float *bias, const int count,
                                                                                    float *out, int64_t out_stride) {
    UNFUSED_ROUNDING
    const f32xN zero = {0};
    f32xN acc[PROJECTED];
    for (int c = 0; c < count; c++) acc[c] = zero + (bias != NULL ? bias[c] : 0.f);
    for (int64_t i = 0; i < in_channels; i++) {
        f32xN value;
        memcpy(&value, input + i * input_stride, sizeof value);
        for (int c = 0; c < count; c++) acc[c] = acc[c] + weight[c * in_channels + i] * value;
    }
    for (int c = 0; c < count; c++) memcpy(out + c * out_stride, &acc[c], sizeof acc[c]);
}

/* The projection of one image row: out (out_channels, stride), channel-major, = bias + weight (out_channels,
 * in_channels) x the row's input (in_channels, W; channel stride s_channel, position stride s_x), summed over the
 * input channels in their order; stride = W rounded up to LANES. The row is first copied into staged (in_channels,
 * stride), zero past W, so that every vector step is whole; PROJECTED output channels at a time (independent sums). */
static UNFUSED_FUNCTION void project_row(const float *row, int64_t s_channel, int64_t s_x, int64_t in_channels,
                                            int64_t W, const float *weight, const float *bias, int64_t out_channels,
                                            float *staged, float *out) {
    const int64_t stride = (W + LANES - 1) / LANES * LANES;
    if (s_x == 1)
        for (int64_t i = 0; i < in_channels; i++) memcpy(staged + i * stride, row + i * s_channel, sizeof(float) * W);
    else
        for (int64_t x = 0; x < W; x++)
            for (int64_t i = 0; i < in_channels; i++) staged[i * stride + x] = row[x * s_x + i * s_channel];
    for (int64_t i = 0; i < in_channels; i++)
        for (int64_t x = W; x < stride; x++) staged[i * stride + x] = 0.f;
    for (int64_t x = 0; x < W; x += LANES) {
        int64_t o = 0;
        for (; o + PROJECTED <= out_channels; o += PROJECTED) /* constant trip counts: the sums stay in registers */
            project_lanes(staged + x, stride, in_channels, weight + o * in_channels, bias ? bias + o : NULL, PROJECTED,
                          out + o * stride + x, stride);
        for (; o < out_channels; o++)
            project_lanes(staged + x, stride, in_channels, weight + o * in_channels, bias ? bias + o : NULL, 1,
                          out + o * stride + x, stride);
    }
}

/* Split the (B, 3, heads, d, D, H, W) fp32 projection, of any strides (int8 convolutions leave it channels-last),
 * into the kernel's layouts (see the top of this file): q8 from the queries, keys into k8 (128 in the padding), values
 * into v4 (0 in the padding). One pass over the padded rows, parallel, writing every byte of the three buffers (they
 * need no filling beforehand): each image row is quantised into channel-major byte rows (quantize_row), then packed
 * into 4-byte words by loops over positions that vectorise. With a projection weight (3 heads d, in_channels), qkv
 * is the layer's input (B, in_channels, D, H, W) instead (strides: batch, unused, channel, depth, height, width)
 * and each row is projected first (project_row). Returns 1 if scratch memory could not be allocated, else 0. */
static int split_quantize(const float *qkv, const int64_t *strides, int64_t batch, int64_t heads, int64_t d, int64_t D,
                          int64_t H, int64_t W, int64_t pz, int64_t py, int64_t px, int64_t dilation, float q_scale,
                          float k_scale, float v_scale, const float *weight, const float *bias, int64_t in_channels,
                          int8_t *q8, uint8_t *k8, int8_t *v4, int num_threads) {
    /* strides: batch, part (q/k/v), channel within the part (heads * d), depth, height, width */
    const int64_t s_batch = strides[0], s_part = strides[1], s_channel = strides[2], s_z = strides[3],
                  s_y = strides[4], s_x = strides[5];
    const int64_t groups = (d + 3) / 4, padded_D = D + 2 * pz, padded_H = H + 2 * py, padded_W = W + 2 * px;
    const int64_t padded_plane = padded_D * padded_H * padded_W, plane = D * H * W, rows = batch * padded_D * padded_H;
    const int64_t channels = heads * d, row_length = padded_W + 3 * dilation;
    const float inverse[3] = {1.f / q_scale, 1.f / k_scale, 1.f / v_scale};
    int failed = 0;
#pragma omp parallel num_threads(num_threads) reduction(| : failed)
    {
        /* the quantised row: (3 parts, channels, row_length) bytes, then one zero row (channels past d); zero
         * outside [px, px + W), which the values' words read (3 * dilation more on the right); then the staging
         * area of channels-last rows */
        uint8_t *bytes = (uint8_t *)calloc((size_t)((3 * channels + 1) * row_length + 3 * channels * W), 1);
        /* the projected row (3 channels, stride) and the input row channel-major (in_channels, stride) */
        const int64_t stride = (W + LANES - 1) / LANES * LANES;
        float *projected =
            weight != NULL ? (float *)malloc(sizeof(float) * (3 * channels + in_channels) * stride) : NULL;
        if (bytes == NULL || (weight != NULL && projected == NULL)) failed = 1;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            if (failed) continue;
            const int64_t yp = r % padded_H, zp = (r / padded_H) % padded_D, b = r / (padded_H * padded_D);
            const int64_t pad_row = (zp * padded_H + yp) * padded_W, y = yp - py, z = zp - pz;
            if (z < 0 || z >= D || y < 0 || y >= H) { /* a padding row: keys 128, values 0 */
                for (int64_t bh = b * heads; bh < (b + 1) * heads; bh++)
                    for (int64_t g = 0; g < groups; g++)
                        memset(k8 + ((bh * groups + g) * padded_plane + pad_row) * 4, KEY_OFFSET, 4 * padded_W);
                for (int64_t channel = b * channels; channel < (b + 1) * channels; channel++)
                    memset(v4 + (channel * padded_plane + pad_row) * 4, 0, 4 * padded_W);
                continue;
            }
            const int64_t next_row = y + 1 < H ? s_y : (z + 1 < D ? s_z - (H - 1) * s_y : 0);
            const float *row = qkv + b * s_batch + z * s_z + y * s_y;
            if (weight != NULL) {
                project_row(row, s_channel, s_x, in_channels, W, weight, bias, 3 * channels,
                            projected + 3 * channels * stride, projected);
                quantize_row(projected, 0, channels * stride, stride, 1, channels, W, px, row_length, inverse, bytes);
            } else
                quantize_row(row, next_row, s_part, s_channel, s_x, channels, W, px, row_length, inverse, bytes);
            const uint8_t *zero = bytes + 3 * channels * row_length + px;
            for (int64_t h = 0; h < heads; h++)
                for (int64_t g = 0; g < groups; g++) {
                    const int64_t bh = b * heads + h, first = h * d + 4 * g, in_group = d - 4 * g < 4 ? d - 4 * g : 4;
                    const uint8_t *restrict q[4], *restrict k[4];
                    for (int64_t t = 0; t < 4; t++) {
                        q[t] = t < in_group ? bytes + (first + t) * row_length + px : zero;
                        k[t] = t < in_group ? bytes + (channels + first + t) * row_length + px : zero;
                    }
                    uint32_t *restrict q_words = (uint32_t *)(q8 + ((bh * groups + g) * plane + (z * H + y) * W) * 4);
                    uint8_t *k_row = k8 + ((bh * groups + g) * padded_plane + pad_row) * 4;
                    uint32_t *restrict k_words = (uint32_t *)k_row + px;
                    for (int64_t x = 0; x < W; x++)
                        q_words[x] =
                            q[0][x] | (uint32_t)q[1][x] << 8 | (uint32_t)q[2][x] << 16 | (uint32_t)q[3][x] << 24;
                    /* k + 128 as a byte is the int8 byte with its top bit flipped; absent channels: 0 -> 128 */
                    for (int64_t x = 0; x < W; x++)
                        k_words[x] = (k[0][x] | (uint32_t)k[1][x] << 8 | (uint32_t)k[2][x] << 16
                                      | (uint32_t)k[3][x] << 24) ^ 0x80808080u;
                    memset(k_row, KEY_OFFSET, 4 * px);
                    memset(k_row + 4 * (px + W), KEY_OFFSET, 4 * px);
                }
            for (int64_t channel = 0; channel < channels; channel++) {
                const uint8_t *restrict values = bytes + (2 * channels + channel) * row_length;
                uint32_t *restrict v_words = (uint32_t *)(v4 + ((b * channels + channel) * padded_plane + pad_row) * 4);
                for (int64_t x = 0; x < padded_W; x++)
                    v_words[x] = values[x] | (uint32_t)values[x + dilation] << 8
                                 | (uint32_t)values[x + 2 * dilation] << 16 | (uint32_t)values[x + 3 * dilation] << 24;
            }
        }
        free(bytes), free(projected);
    }
    return failed;
}

/* The relative-position table (dims, k, d) fp32 as the kernel reads it: int8 with its own symmetric scale
 * (largest magnitude / 127, 1 for an all-zero table; as local_attention_int8_reference computes it), rows (kd + kh
 * + kw) with a zero depth row for 2D, + 128, the 4 bytes of each channel group repeated in every lane; channels past
 * d 128 (their queries are 0). Returns the scale (in double, as the reference's), or -1 for a non-finite value. */
static double quantize_table(const float *table, int dims, int kernel_size, int64_t d, int64_t groups,
                             uint8_t *rel8_table) {
    const int64_t count = (int64_t)dims * kernel_size * d;
    float amax = 0.f;
    for (int64_t i = 0; i < count; i++) {
        const float magnitude = table[i] < 0 ? -table[i] : table[i];
        if (!(magnitude <= 3.402823466e38f)) return -1; /* inf or nan */
        amax = magnitude > amax ? magnitude : amax;
    }
    const double scale = amax > 0 ? (double)amax / 127.0 : 1.0;
    const float inverse = 1.f / (float)scale;
    const int64_t missing = 3 - dims; /* 2D: one zero row for the single depth offset */
    for (int64_t a = 0; a < missing + (int64_t)dims * kernel_size; a++)
        for (int64_t g = 0; g < groups; g++)
            for (int t = 0; t < 4; t++) {
                const int64_t channel = 4 * g + t;
                const int32_t value =
                    a < missing || channel >= d ? 0 : (int32_t)quantize(table[(a - missing) * d + channel], inverse);
                for (int x = 0; x < LANES; x++)
                    rel8_table[((a * groups + g) * LANES + x) * 4 + t] = (uint8_t)(value + KEY_OFFSET);
            }
    return scale;
}

/* The byte buffers of the last call (q8, k8 and v4 in one block), kept for the next: freed after every call, they
 * were in some processes given back to the system by glibc's heap trimming and faulted in again by every call
 * (measured: 1 in about 8 fresh processes ran sa_seg3d's first level, 48^3, at 1.6x the time, 26 % of it in page
 * faults; forcing that allocator behaviour, 1.6-2.3x). One block at most, of up to KEPT_BYTES; a call that finds
 * none (another call holds it) allocates its own, and the block returned last is the one kept. */
#define KEPT_BYTES ((size_t)128 << 20)
#define HEADER 64 /* the block's size, then the data, 64-byte aligned */
static _Atomic(char *) kept_block;

/* `size` bytes, 64-byte aligned: the kept block if it is large enough, else a new one; NULL if out of memory */
static char *take_block(size_t size) {
    char *block = atomic_exchange(&kept_block, NULL);
    if (block != NULL && *(size_t *)block >= size) return block + HEADER;
    free(block);
    size = (size + 63) / 64 * 64;
    block = (char *)aligned_alloc(64, HEADER + size);
    if (block == NULL) return NULL;
    *(size_t *)block = size;
    return block + HEADER;
}

/* Give back the data of take_block: kept if at most KEPT_BYTES (the block kept before is freed), else freed. */
static void give_block(char *data) {
    if (data == NULL) return;
    char *block = data - HEADER;
    if (*(size_t *)block > KEPT_BYTES) {
        free(block);
        return;
    }
    free(atomic_exchange(&kept_block, block));
}

/* The int8 attention of an fp32 projection (B, 3, heads, d, *S), of any strides (strides: batch, part, channel within
 * the part, depth, height, width; depth 0 for 2D), and its fp32 relative-position table (dims, kernel_size, d),
 * contiguous, into out (B, heads, d, *S), contiguous: quantises the projection (split_quantize, scales q_scale,
 * k_scale, v_scale) and the table (quantize_table), then attends on `path`. alpha = scale q_scale k_scale;
 * scaled_q = scale q_scale, in double, so that beta = scaled_q table_scale is rounded once, as in the reference.
 * With weight (3 heads d, in_channels) and bias (3 heads d, or NULL), contiguous, qkv is the layer's input
 * (B, in_channels, *S), projected here (see split_quantize). Returns 0 on success, 1 if memory could not be
 * allocated, 2 if this CPU does not run `path` (PATH_BEST: the fastest it runs), 3 if the table holds a value that
 * is not finite. */
int monai_qsa_local_attention_int8(const float *qkv, const int64_t *strides, const float *table, float *out,
                                   float alpha, double scaled_q, float q_scale, float k_scale, float v_scale,
                                   int64_t batch, int64_t heads, int64_t d, int64_t D, int64_t H, int64_t W, int dims,
                                   int kernel_size, int dilation, int path, int num_threads, const float *weight,
                                   const float *bias, int64_t in_channels) {
    if (path == PATH_BEST) path = monai_qsa_int8_best_path();
    if (!monai_qsa_int8_path_supported(path)) return 2;
    const int kd = dims == 3 ? kernel_size : 1, half = dilation * (kernel_size - 1) / 2;
    const int64_t pz = dims == 3 ? half : 0, groups = (d + 3) / 4, axes = kd + 2 * kernel_size, bh = batch * heads;
    problem_t p = {NULL, NULL, NULL, NULL, out, (float)(alpha * LOG2_E), 0.f, v_scale, d, groups, D, H, W, 0, 0, 0,
                   0, kd, kernel_size, kernel_size, dilation};
    p.padded_H = H + 2 * half;
    p.padded_W = W + 2 * half;
    p.plane = D * H * W;
    p.padded_plane = (D + 2 * pz) * p.padded_H * p.padded_W;
    /* + 64 bytes each: the last vector step of a row reads up to LANES - 1 positions of 4 bytes past it; each
     * buffer starts on a cache line */
    const size_t q_bytes = (size_t)(bh * groups * p.plane * 4 + 127) / 64 * 64,
                 k_bytes = (size_t)(bh * groups * p.padded_plane * 4 + 127) / 64 * 64;
    char *buffers = take_block(q_bytes + k_bytes + (size_t)(bh * d * p.padded_plane * 4 + 64));
    int8_t *q8 = (int8_t *)buffers, *v4 = (int8_t *)(buffers + q_bytes + k_bytes);
    uint8_t *k8 = (uint8_t *)(buffers + q_bytes);
    uint8_t *rel8_table = (uint8_t *)malloc((size_t)(axes * groups * LANES * 4));
    int status = buffers == NULL || rel8_table == NULL;
    if (status == 0) {
        const double table_scale = quantize_table(table, dims, kernel_size, d, groups, rel8_table);
        status = table_scale < 0 ? 3 : 0;
        p.beta = (float)(scaled_q * table_scale * LOG2_E);
    }
    if (status == 0)
        status = split_quantize(qkv, strides, batch, heads, d, D, H, W, pz, half, half, dilation, q_scale, k_scale,
                                v_scale, weight, bias, in_channels, q8, k8, v4, num_threads);
    if (status == 0) {
        p.q8 = q8, p.k8 = k8, p.v4 = v4, p.table = rel8_table;
        status = attend_quantized(&p, path, bh, num_threads);
    }
    give_block(buffers), free(rel8_table);
    return status;
}

/* ---------------------------------------------------------------------------------------------------------------
 * A SAUNet's resolution restore and head in int8 (restore_head_int8), in 2D and 3D: the decoder's upsampling output
 * `features` (B, C s^dims, [d,] h, w; a pixel shuffle by s makes it C maps of [s d x] s h x s w, replicated at the
 * far borders or cropped to the image size) and the image (B, Ci, [D,] H, W) are quantised together to uint8 codes
 * (in_scale, in_zero_point), refined by a 3x3(x3) convolution (int8 weights, int32 sums scaled per output channel,
 * bias), ReLU, requantised to uint8 (mid_scale, mid_zero_point), dequantised and mapped to the output channels by a
 * 1x1(x1) convolution (int8 weights dequantised to fp32): the int8 program's quantize, convolution, ReLU, quantize,
 * convolution, in one pass over full resolution, where the int8 program spent most of a small network's time in
 * layout passes and in convolution kernels made for many channels. 2D is the case D = d = 1 with one kernel plane.
 *
 * Work items are bands of BAND output rows of one image and up to PLANES of its depth planes. A thread quantises the
 * input of the band into a ring of `kd` staged planes (kd = 3 in 3D, 1 in 2D), each (Cin, BAND + 2, W) words, which
 * stays in its cache: for every channel, padded row and position x one 4-byte word of the codes at x - 1, x, x + 1
 * and 0 (in_zero_point outside the image, a real zero), so that one "4 bytes per lane" product takes the three taps
 * of a kernel row: Cin x 3 kd products per refined channel and LANES positions. Moving one plane deeper stages one
 * plane, into the slot of the plane no longer needed. sum(codes x weights) - in_zero_point x sum(weights) is the
 * exact convolution of (codes - zero point). Everything after the integer sums is fp32 with one rounding per
 * operation (UNFUSED_FUNCTION), in the order of restore_head_int8_reference in restore_head_int8.py, which
 * reproduces it to the bit.
 */
#define MAX_MID 16 /* refined channels, at most */
#define MAX_STRIDE 64 /* pixel-shuffle factor, at most */
#define BAND 16 /* output rows of one work item */
#define PLANES 16 /* output depth planes of one work item, at most */

typedef struct {
    const i32xN *weights; /* (mid, Cin, kd, 3): the taps of one kernel row and 0 as 4 bytes, in every lane */
    const int32_t *offsets; /* (mid): in_zero_point x the sum of the channel's weights */
    const float *refine_scale, *refine_bias, *head_weight, *head_bias; /* (mid), (mid), (out, mid), (out) */
    float *out;
    float inverse_mid, mid_scale, mid_zero_point;
    int64_t in_channels, mid, out_channels, kd, D, H, W;
} refine_t;

/* The outputs of positions [x0, x0 + m) of row (b, z, y) from the integer sums of the refined channels. */
static inline UNFUSED_FUNCTION __attribute__((always_inline)) void refine_outputs(const refine_t *r,
                                                                                  const i32xN *sums, int64_t b,
                                                                                  int64_t z, int64_t y, int64_t x0,
                                                                                  int m, const int channels) {
    UNFUSED_ROUNDING
    const f32xN zero = {0}, magic = zero + MAGIC;
    f32xN mid[MAX_MID];
    for (int o = 0; o < channels; o++) {
        const f32xN sum = __builtin_convertvector(sums[o] - r->offsets[o], f32xN);
        f32xN refined = sum * r->refine_scale[o] + (r->refine_bias != NULL ? r->refine_bias[o] : 0.f);
        refined = select_f32((i32xN)(refined > zero), refined, zero);        /* ReLU */
        f32xN code = refined * r->inverse_mid;                               /* >= 0 */
        code = select_f32((i32xN)(code < 512.f), code, zero + 512.f);       /* NaN: 512 */
        code = (code + magic) - magic + r->mid_zero_point;                    /* ties to even */
        code = select_f32((i32xN)(code < 255.f), code, zero + 255.f);
        mid[o] = (code - r->mid_zero_point) * r->mid_scale;
    }
    for (int64_t k = 0; k < r->out_channels; k++) {
        const float *weight = r->head_weight + k * r->mid;
        f32xN value = mid[0] * weight[0];
        for (int o = 1; o < channels; o++) value = value + mid[o] * weight[o];
        value = value + (r->head_bias != NULL ? r->head_bias[k] : 0.f);
        float *target = r->out + (((b * r->out_channels + k) * r->D + z) * r->H + y) * r->W + x0;
        if (m == LANES) /* a constant size: one vector store, not a call */
            memcpy(target, &value, sizeof value);
        else
            memcpy(target, &value, sizeof(float) * m);
    }
}

/* The outputs of LANES positions from x0 of row (b, z, y), whose input rows in kernel plane kz < kd start at
 * planes[kz] (band row y - 1 of channel 0; a channel's rows are `band_rows` rows on): the integer sums of `mid`
 * refined channels (mid and kd constants where inlined), then refine_outputs. */
static inline UNFUSED_FUNCTION __attribute__((always_inline)) void refine_lanes(const refine_t *r,
                                                                                const uint32_t *const *planes,
                                                                                int64_t band_rows, int64_t b,
                                                                                int64_t z, int64_t y, int64_t x0,
                                                                                int m, const int mid, const int kd,
                                                                                dp_fn dp) {
    i32xN sums[MAX_MID], more[MAX_MID]; /* two independent chains of products per channel: kernel rows 0, 2 and 1 */
    for (int o = 0; o < mid; o++) sums[o] = more[o] = (i32xN){0};
    const int64_t next_row = 4 * r->W, taps_per_channel = r->in_channels * kd * 3;
    for (int64_t c = 0; c < r->in_channels; c++)
        for (int kz = 0; kz < kd; kz++) {
            const uint8_t *codes = (const uint8_t *)(planes[kz] + c * band_rows * r->W + x0);
            const i32xN *weights = r->weights + (c * kd + kz) * 3;
            for (int o = 0; o < mid; o++) {
                const i32xN *taps = weights + o * taps_per_channel;
                sums[o] = dp(dp(sums[o], codes, taps[0]), codes + 2 * next_row, taps[2]);
                more[o] = dp(more[o], codes + next_row, taps[1]);
            }
        }
    for (int o = 0; o < mid; o++) sums[o] += more[o];
    refine_outputs(r, sums, b, z, y, x0, m, mid);
}

typedef void (*refine_fn)(const refine_t *, const uint32_t *const *, int64_t, int64_t, int64_t, int64_t);

/* one function per path: image row (b, z, y), LANES positions at a time; 1 or 3 kernel planes and 4 or 8 refined
 * channels compiled as constants */
#define REFINE_FUNCTION(NAME, TARGET, DP)                                                                             \
    TARGET UNFUSED_FUNCTION static void refine_row_##NAME(const refine_t *r, const uint32_t *const *planes,           \
                                                          int64_t band_rows, int64_t b, int64_t z, int64_t y) {       \
        for (int64_t x = 0; x < r->W; x += LANES) {                                                                   \
            const int m = r->W - x < LANES ? (int)(r->W - x) : LANES;                                                 \
            switch (r->kd * 100 + r->mid) { /* kernel planes, refined channels */                                    \
            case 104: refine_lanes(r, planes, band_rows, b, z, y, x, m, 4, 1, DP); break;                             \
            case 108: refine_lanes(r, planes, band_rows, b, z, y, x, m, 8, 1, DP); break;                             \
            case 304: refine_lanes(r, planes, band_rows, b, z, y, x, m, 4, 3, DP); break;                             \
            case 308: refine_lanes(r, planes, band_rows, b, z, y, x, m, 8, 3, DP); break;                             \
            default: refine_lanes(r, planes, band_rows, b, z, y, x, m, (int)r->mid, (int)r->kd, DP);                  \
            }                                                                                                         \
        }                                                                                                             \
    }

REFINE_FUNCTION(scalar, , dp_scalar)
#if X86
REFINE_FUNCTION(avx2, __attribute__((target("avx2,fma"))), dp_avx2)
REFINE_FUNCTION(avx_vnni, __attribute__((target("avx2,fma,avxvnni"))), dp_avx_vnni)
REFINE_FUNCTION(avx512_vnni,
                __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma,prefer-vector-width=512"))),
                dp_avx512_vnni)
#endif

static refine_fn refine_function(int path) {
    switch (path) {
#if X86
    case PATH_AVX512_VNNI: return refine_row_avx512_vnni;
    case PATH_AVX_VNNI: return refine_row_avx_vnni;
    case PATH_AVX2: return refine_row_avx2;
#endif
    default: return refine_row_scalar;
    }
}

/* round(x * inverse) + zero_point clamped to [0, 255], ties to even (quantized_decomposed.quantize_per_tensor) */
static inline float uint8_code(float x, float inverse, float zero_point) {
    float r = x * inverse;
    r = r < 512.f ? r : 512.f; /* NaN: 512 */
    r = r > -512.f ? r : -512.f;
    r = (r + MAGIC) - MAGIC + zero_point;
    return r < 0.f ? 0.f : (r > 255.f ? 255.f : r);
}

/* What stage_row reads: the features (B, C s^dims, d, h, w; strides fs, depth stride 0 in 2D) and the image (B, Ci,
 * D, H, W; strides is), in_scale's inverse, the zero point, and the features' offset of each position of an
 * output row (x_offsets, W of them) */
typedef struct {
    const float *features, *image;
    const int64_t *fs, *is, *x_offsets;
    int64_t shuffled, stride, cells, d, h, w, D, H, W, pz; /* cells: stride^dims; pz: 1 in 3D, 0 in 2D */
    float inverse, zero_point;
} stage_t;

/* Padded row yp (0 and H + 1: outside) of padded plane zp (pz planes of padding before the first) of input channel
 * c of image b into `words` (see above); `values` and `codes`: scratch of W floats and W + 2 bytes. Channels below
 * `shuffled` come from the features. */
static void stage_row(const stage_t *s, int64_t b, int64_t c, int64_t zp, int64_t yp, float *values, uint8_t *codes,
                      uint32_t *words) {
    /* in locals: the loops below store through char pointers, which may alias *s for the compiler */
    const float inverse = s->inverse, zero_point = s->zero_point;
    const int64_t W = s->W, z = zp - s->pz, y = yp - 1, stride = s->stride, *x_offsets = s->x_offsets;
    const int64_t fx = s->fs[4], ix = s->is[4];
    const uint8_t outside = (uint8_t)zero_point;
    if (z < 0 || z >= s->D || y < 0 || y >= s->H) {
        for (int64_t x = 0; x < W; x++) words[x] = outside * 0x010101u;
        return;
    }
    if (c < s->shuffled) { /* pixel shuffle: channel c s^dims + ((Z mod s) s + Y mod s) s + X mod s at (Z, Y, X) / s */
        const int64_t Z = z < stride * s->d ? z : stride * s->d - 1, Y = y < stride * s->h ? y : stride * s->h - 1;
        const float *row = s->features + b * s->fs[0]
                           + (c * s->cells + ((Z % stride) * stride + Y % stride) * stride) * s->fs[1]
                           + (Z / stride) * s->fs[2] + (Y / stride) * s->fs[3];
        const int64_t whole = W < stride * s->w ? W / stride : s->w; /* cells read whole */
        if (s->fs[1] == 1 && stride == 4) /* channels-last, as int8 convolutions leave it: cells are 4 floats */
            for (int64_t j = 0; j < whole; j++) memcpy(values + j * 4, row + j * fx, sizeof(float) * 4);
        else if (s->fs[1] == 1 && stride == 2) /* sa_seg3d's stem: the operator 1.1x faster than through x_offsets */
            for (int64_t j = 0; j < whole; j++) memcpy(values + j * 2, row + j * fx, sizeof(float) * 2);
        else
            for (int64_t x = 0; x < whole * stride; x++) values[x] = row[x_offsets[x]];
        for (int64_t x = whole * stride; x < W; x++) values[x] = row[x_offsets[x]];
    } else {
        const float *row = s->image + b * s->is[0] + (c - s->shuffled) * s->is[1] + z * s->is[2] + y * s->is[3];
        if (ix == 1)
            memcpy(values, row, sizeof(float) * W);
        else
            for (int64_t x = 0; x < W; x++) values[x] = row[x * ix];
    }
    codes[0] = codes[W + 1] = outside;
    for (int64_t x = 0; x < W; x++) codes[x + 1] = (uint8_t)(int32_t)uint8_code(values[x], inverse, zero_point);
    for (int64_t x = 0; x < W; x++)
        words[x] = (uint32_t)codes[x] | (uint32_t)codes[x + 1] << 8 | (uint32_t)codes[x + 2] << 16;
}

/* The resolution restore and head (see above) of a batch, dims 2 or 3. features: (B, C s^dims, d, h, w), strides fs
 * (5: batch, channel, depth, height, width; d = 1 and depth stride 0 in 2D); image: (B, Ci, D, H, W), strides is (D
 * = 1 in 2D); refine_weight (mid, C + Ci, [3,] 3, 3) int8 with per-channel scales refine_scale and bias refine_bias
 * (NULL: none); head_weight (out_channels, mid) int8 with scales head_scale and head_bias; out (B, out_channels, [D,]
 * H, W) contiguous. Returns 0 on success, 1 if memory could not be allocated, 2 if this CPU does not run `path`, 3
 * (4) if a refine (head) weight scale is not positive and finite, 5 if the sizes are out of the kernel's range. */
int monai_qsa_restore_head_int8(int dims, const float *features, const int64_t *fs, int64_t feature_channels,
                                int64_t d, int64_t h, int64_t w, int64_t stride, const float *image, const int64_t *is,
                                int64_t image_channels, int64_t batch, int64_t D, int64_t H, int64_t W,
                                double in_scale, int in_zero_point, const int8_t *refine_weight,
                                const float *refine_scale, const float *refine_bias, int64_t mid, double mid_scale,
                                int mid_zero_point, const int8_t *head_weight, const float *head_scale,
                                const float *head_bias, int64_t out_channels, float *out, int path, int num_threads) {
    if (path == PATH_BEST) path = monai_qsa_int8_best_path();
    if (!monai_qsa_int8_path_supported(path)) return 2;
    const int64_t kd = dims == 3 ? 3 : 1, cells = dims == 3 ? stride * stride * stride : stride * stride;
    if ((dims != 2 && dims != 3) || stride < 1 || stride > MAX_STRIDE || mid < 1 || mid > MAX_MID
        || feature_channels < cells || feature_channels % cells || d < 1 || h < 1 || w < 1 || (dims == 2 && D != 1))
        return 5; /* checked by the caller already: a second line of defence for the buffer arithmetic */
    for (int64_t o = 0; o < mid; o++)
        if (!(refine_scale[o] > 0.f && refine_scale[o] <= FLT_MAX)) return 3;
    for (int64_t k = 0; k < out_channels; k++)
        if (!(head_scale[k] > 0.f && head_scale[k] <= FLT_MAX)) return 4;
    const int64_t shuffled = feature_channels / cells, in_channels = shuffled + image_channels;
    i32xN *weights = (i32xN *)aligned_alloc(sizeof(i32xN), sizeof(i32xN) * (size_t)(mid * in_channels * kd * 3));
    int64_t *x_offsets = (int64_t *)malloc(sizeof(int64_t) * (size_t)W);
    float *head = (float *)malloc(sizeof(float) * (size_t)(out_channels * mid));
    int32_t offsets[MAX_MID];
    float scales[MAX_MID];
    const int allocated = weights != NULL && x_offsets != NULL && head != NULL;
    if (allocated) {
        for (int64_t o = 0; o < mid; o++) {
            int32_t total = 0;
            for (int64_t row = 0; row < in_channels * kd * 3; row++) { /* (channel, kernel plane, kernel row) */
                const int8_t *taps = refine_weight + (o * in_channels * kd * 3 + row) * 3;
                int8_t bytes[4] = {taps[0], taps[1], taps[2], 0};
                int32_t word;
                memcpy(&word, bytes, sizeof word);
                weights[o * in_channels * kd * 3 + row] = (i32xN){0} + word;
                total += taps[0] + taps[1] + taps[2];
            }
            offsets[o] = in_zero_point * total;
            scales[o] = (float)in_scale * refine_scale[o];
        }
        for (int64_t k = 0; k < out_channels; k++)
            for (int64_t o = 0; o < mid; o++) head[k * mid + o] = (float)head_weight[k * mid + o] * head_scale[k];
        for (int64_t x = 0; x < W; x++) {
            const int64_t X = x < stride * w ? x : stride * w - 1;
            x_offsets[x] = (X % stride) * fs[1] + (X / stride) * fs[4];
        }
    }
    const refine_t r = {weights, offsets, scales, refine_bias, head, head_bias, out,
                        (float)(1.0 / mid_scale), (float)mid_scale, (float)mid_zero_point, in_channels, mid,
                        out_channels, kd, D, H, W};
    const stage_t s = {features, image, fs, is, x_offsets, shuffled, stride, cells, d, h, w, D, H, W, kd / 2,
                       (float)(1.0 / in_scale), (float)in_zero_point};
    const refine_fn refine_row = refine_function(path);
    const int64_t bands = (H + BAND - 1) / BAND, chunks = (D + PLANES - 1) / PLANES, band_rows = BAND + 2;
    const int64_t plane_words = in_channels * band_rows * W; /* one staged plane */
    int failed = !allocated;
#pragma omp parallel num_threads(num_threads) reduction(| : failed)
    {
        float *values = (float *)malloc(sizeof(float) * (size_t)W);
        uint8_t *codes = (uint8_t *)malloc((size_t)W + 2);
        uint32_t *ring = (uint32_t *)malloc(sizeof(uint32_t) * (size_t)(kd * plane_words + LANES));
        const int ready = allocated && values != NULL && codes != NULL && ring != NULL;
        if (!ready) failed = 1;
#pragma omp for schedule(static)
        for (int64_t item = 0; item < batch * chunks * bands; item++) {
            if (!ready) continue;
            const int64_t b = item / (chunks * bands), z0 = item / bands % chunks * PLANES,
                          z1 = z0 + PLANES < D ? z0 + PLANES : D, y0 = item % bands * BAND,
                          y1 = y0 + BAND < H ? y0 + BAND : H;
            /* padded plane zp in slot zp mod kd; output plane z reads padded planes z .. z + kd - 1 */
            for (int64_t zp = z0; zp < z1 + kd - 1; zp++) {
                uint32_t *slot = ring + zp % kd * plane_words;
                /* padded rows y0 .. y1 + 1: image rows y0 - 1 .. y1; a row's channels in turn, since channels-last
                 * features hold them side by side (each feature row's cache lines read once per row, not per channel:
                 * 1.5x faster at 96^3) */
                for (int64_t c = 0; c < in_channels; c++)
                    for (int64_t yp = y0; yp < y1 + 2; yp++) /* padded rows y0 .. y1 + 1: image rows y0 - 1 .. y1 */
                        stage_row(&s, b, c, zp, yp, values, codes, slot + (c * band_rows + yp - y0) * W);
                const int64_t z = zp - (kd - 1);
                if (z < z0) continue;
                const uint32_t *planes[3];
                for (int64_t kz = 0; kz < kd; kz++) planes[kz] = ring + (z + kz) % kd * plane_words;
                for (int64_t y = y0; y < y1; y++) {
                    const uint32_t *rows[3];
                    for (int64_t kz = 0; kz < kd; kz++) rows[kz] = planes[kz] + (y - y0) * W;
                    refine_row(&r, rows, band_rows, b, z, y);
                }
            }
        }
        free(values), free(codes), free(ring);
    }
    free(weights), free(x_offsets), free(head);
    return failed;
}
