/*
 * Fused neighbourhood attention of StandAloneSelfAttention for CPUs (fp32, 2D and 3D).
 *
 * For every position, head and row of BLOCK consecutive positions it computes the logits of all k^d neighbours,
 * their softmax and the weighted sum of the values in one pass over cache-resident rows: nothing of size
 * k^d x image is ever written to memory. For training, the forward pass also saves each position's log-sum-exp
 * and the backward pass (monai_qsa_local_attention_backward, below) recomputes the attention from it. Built at run
 * time by monai_qsa/networks/blocks/local_attention.py with the machine's C compiler (-O3 -march=native -fopenmp);
 * loops over BLOCK positions vectorise along the rows.
 *
 * Layouts (contiguous float32; 2D images are passed as depth 1 with kd = 1):
 *   q:    (BH, d, D, H, W)                  scaled queries of B x heads
 *   k, v: (BH, d, D + 2pz, H + 2py, W + 2px) keys and values zero-padded by p = dilation * (k - 1) / 2 per axis
 *   rel:  (kd + kh + kw, d)                 relative-position embedding of each offset on depth, height, width
 *   out:  (BH, d, D, H, W)
 * The logit of neighbour (i, j, l) is q . k_ijl + q . rel[i] + q . rel[kd + j] + q . rel[kd + kh + l];
 * neighbours outside the image take no part in the softmax.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 64
#define OUTSIDE (-1e30f)

typedef struct {
    const float *q, *k, *v, *rel;
    float *out, *lse;
    int64_t d, D, H, W, padded_H, padded_W, plane, padded_plane;
    int kd, kh, kw, dilation;
} problem_t;

/* exp(x) for x <= 0 (Cephes' expf polynomial, relative error ~1e-7); 0 below -87, where float underflows */
static inline float exp_nonpositive(float x) {
    const float clamped = x < -87.f ? -87.f : x;
    const float n = (clamped * 1.44269504088896341f + 12582912.f) - 12582912.f; /* round(x / ln 2) */
    const float r = clamped - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return x < -87.f ? 0.f : p * scale;
}

/* positions [x0, x0 + n) of image row (bh, z, y); n <= BLOCK. `logits` holds kd * kh * kw * BLOCK floats and
 * `axis_logits` (kd + kh + kw) * BLOCK floats of scratch space. */
static inline __attribute__((always_inline)) void attend_block(const problem_t *p, float *restrict logits,
                                                               float *restrict axis_logits, int64_t bh, int64_t z,
                                                               int64_t y, int64_t x0, const int n) {
    const int64_t d = p->d;
    const int kd = p->kd, kh = p->kh, kw = p->kw, dilation = p->dilation, axes = kd + kh + kw;
    const int64_t pz = (int64_t)dilation * (kd - 1) / 2, py = (int64_t)dilation * (kh - 1) / 2,
                  px = (int64_t)dilation * (kw - 1) / 2;
    const float *q = p->q + bh * d * p->plane + (z * p->H + y) * p->W + x0;

    for (int a = 0; a < axes; a++) { /* q . rel[a] */
        float acc[BLOCK];
        for (int x = 0; x < n; x++) acc[x] = 0.f;
        for (int64_t c = 0; c < d; c++) {
            const float e = p->rel[a * d + c];
            const float *restrict qc = q + c * p->plane;
            for (int x = 0; x < n; x++) acc[x] += e * qc[x];
        }
        memcpy(axis_logits + a * BLOCK, acc, sizeof(float) * n);
    }

    float max[BLOCK], sum[BLOCK];
    for (int x = 0; x < n; x++) max[x] = OUTSIDE;
    int o = 0;
    for (int i = 0; i < kd; i++)
        for (int j = 0; j < kh; j++)
            for (int l = 0; l < kw; l++, o++) {
                float *restrict logit = logits + o * BLOCK;
                const int64_t zz = z + i * dilation - pz, yy = y + j * dilation - py, dx = (int64_t)l * dilation - px;
                if (zz < 0 || zz >= p->D || yy < 0 || yy >= p->H) {
                    for (int x = 0; x < n; x++) logit[x] = OUTSIDE;
                    continue;
                }
                const float *restrict rz = axis_logits + i * BLOCK, *restrict ry = axis_logits + (kd + j) * BLOCK,
                                      *restrict rx = axis_logits + (kd + kh + l) * BLOCK;
                float acc[BLOCK];
                for (int x = 0; x < n; x++) acc[x] = rz[x] + ry[x] + rx[x];
                const float *k = p->k + bh * d * p->padded_plane + ((zz + pz) * p->padded_H + yy + py) * p->padded_W
                                 + x0 + l * dilation;
                for (int64_t c = 0; c < d; c++) {
                    const float *restrict qc = q + c * p->plane, *restrict kc = k + c * p->padded_plane;
                    for (int x = 0; x < n; x++) acc[x] += qc[x] * kc[x];
                }
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

    const int neighbours = kd * kh * kw;
    for (int x = 0; x < n; x++) sum[x] = 0.f;
    for (o = 0; o < neighbours; o++) {
        float *restrict logit = logits + o * BLOCK;
        for (int x = 0; x < n; x++) {
            logit[x] = exp_nonpositive(logit[x] - max[x]);
            sum[x] += logit[x];
        }
    }
    if (p->lse != NULL) { /* training: the log-sum-exp of the logits, from which the backward pass recomputes them */
        float *restrict lse = p->lse + bh * p->plane + (z * p->H + y) * p->W + x0;
        for (int x = 0; x < n; x++) lse[x] = max[x] + logf(sum[x]);
    }
    for (int x = 0; x < n; x++) sum[x] = 1.f / sum[x];

    float *out = p->out + bh * d * p->plane + (z * p->H + y) * p->W + x0;
    for (int64_t c = 0; c < d; c++) {
        float acc[BLOCK];
        for (int x = 0; x < n; x++) acc[x] = 0.f;
        const float *v = p->v + (bh * d + c) * p->padded_plane + x0;
        o = 0;
        for (int i = 0; i < kd; i++)
            for (int j = 0; j < kh; j++) {
                /* padded coordinates of neighbour row (i, j); rows outside the image are zeros with weight 0 */
                const float *restrict v_row = v + ((z + i * dilation) * p->padded_H + y + j * dilation) * p->padded_W;
                for (int l = 0; l < kw; l++, o++) {
                    const float *restrict weight = logits + o * BLOCK, *restrict vc = v_row + l * dilation;
                    for (int x = 0; x < n; x++) acc[x] += weight[x] * vc[x];
                }
            }
        float *restrict oc = out + c * p->plane;
        for (int x = 0; x < n; x++) oc[x] = acc[x] * sum[x];
    }
}

/* lse: NULL (inference) or (BH, D, H, W), the log-sum-exp of each position's logits (training). Returns 0 on success,
 * 1 if scratch memory could not be allocated. */
int monai_qsa_local_attention(const float *q, const float *k, const float *v, const float *rel, float *out, float *lse,
                              int64_t bh_count, int64_t d, int64_t D, int64_t H, int64_t W, int kd, int kh, int kw,
                              int dilation, int num_threads) {
    problem_t p = {q, k, v, rel, out, lse, d, D, H, W, 0, 0, 0, 0, kd, kh, kw, dilation};
    p.padded_H = H + (int64_t)dilation * (kh - 1);
    p.padded_W = W + (int64_t)dilation * (kw - 1);
    p.plane = D * H * W;
    p.padded_plane = (D + (int64_t)dilation * (kd - 1)) * p.padded_H * p.padded_W;
    const int64_t blocks_per_row = (W + BLOCK - 1) / BLOCK, items = bh_count * D * H * blocks_per_row;
    const int64_t scratch = (int64_t)BLOCK * (kd * kh * kw + kd + kh + kw);
    int failed = 0;
#pragma omp parallel num_threads(num_threads) reduction(| : failed)
    {
        float *logits = (float *)malloc(sizeof(float) * scratch);
        if (logits == NULL) failed = 1;
        float *axis_logits = logits + (int64_t)BLOCK * kd * kh * kw;
#pragma omp for schedule(static)
        for (int64_t item = 0; item < items; item++) {
            if (logits == NULL) continue;
            const int64_t row = item / blocks_per_row, x0 = (item % blocks_per_row) * BLOCK;
            const int64_t y = row % H, z = (row / H) % D, bh = row / (H * D);
            if (x0 + BLOCK <= W)
                attend_block(&p, logits, axis_logits, bh, z, y, x0, BLOCK);
            else
                attend_block(&p, logits, axis_logits, bh, z, y, x0, (int)(W - x0));
        }
        free(logits);
    }
    return failed;
}

/* Copy the (B, 3, heads, d, D, H, W) projection, of any strides (convolutions may leave it channels-last), into the
 * kernel's layouts: q * scale into q_out (B * heads, d, D, H, W), keys and values into the interior of the zero
 * k_pad / v_pad buffers (B * heads, d, D + 2pz, H + 2py, W + 2px). One pass, parallel over image rows. */
void monai_qsa_split_and_pad(const float *qkv, const int64_t *strides, int64_t batch, int64_t channels, int64_t D,
                             int64_t H, int64_t W, int64_t pz, int64_t py, int64_t px, float scale, float *q_out,
                             float *k_pad, float *v_pad, int num_threads) {
    /* strides: batch, part (q/k/v), channel within the part (heads * d), depth, height, width */
    const int64_t s_batch = strides[0], s_part = strides[1], s_channel = strides[2], s_z = strides[3], s_y = strides[4],
                  s_x = strides[5];
    const int64_t padded_H = H + 2 * py, padded_W = W + 2 * px, padded_plane = (D + 2 * pz) * padded_H * padded_W;
    const int64_t plane = D * H * W, rows = batch * D * H;
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t r = 0; r < rows; r++) {
        const int64_t y = r % H, z = (r / H) % D, b = r / (H * D);
        const float *src = qkv + b * s_batch + z * s_z + y * s_y;
        const int64_t q_row = (z * H + y) * W, pad_row = ((z + pz) * padded_H + y + py) * padded_W + px;
        if (s_x == 1) { /* rows contiguous: vectorised row copies */
            for (int64_t c = 0; c < channels; c++) {
                const int64_t image = b * channels + c; /* index of (b, head, channel) in the outputs */
                const float *restrict q = src + c * s_channel, *restrict k = q + s_part, *restrict v = k + s_part;
                float *restrict qo = q_out + image * plane + q_row, *restrict ko = k_pad + image * padded_plane + pad_row,
                                *restrict vo = v_pad + image * padded_plane + pad_row;
                for (int64_t x = 0; x < W; x++) qo[x] = q[x] * scale;
                memcpy(ko, k, sizeof(float) * W);
                memcpy(vo, v, sizeof(float) * W);
            }
            continue;
        }
        /* a transposition (channels-last input): each position's channels are read contiguously */
        const int64_t image0 = b * channels;
        for (int64_t x = 0; x < W; x++) {
            const float *restrict q = src + x * s_x, *restrict k = q + s_part, *restrict v = k + s_part;
            float *restrict qo = q_out + image0 * plane + q_row + x, *restrict ko = k_pad + image0 * padded_plane + pad_row + x,
                            *restrict vo = v_pad + image0 * padded_plane + pad_row + x;
            for (int64_t c = 0; c < channels; c++) {
                qo[c * plane] = q[c * s_channel] * scale;
                ko[c * padded_plane] = k[c * s_channel];
                vo[c * padded_plane] = v[c * s_channel];
            }
        }
    }
}

/*
 * Backward pass (training). With a_po = softmax_o(s_po) the attention of position p to its neighbour p + o,
 * s_po = q_p . (k_{p+o} + r_o) the logit (q scaled), out_p = sum_o a_po v_{p+o} and g_p = dL/dout_p:
 *   dA_po = g_p . v_{p+o},  delta_p = g_p . out_p,  dS_po = a_po (dA_po - delta_p)
 *   dq_p = scale * sum_o dS_po (k_{p+o} + r_o)
 *   dk_m = sum of dS_po q_p and dv_m = sum of a_po g_p over the pairs (p, o) with p + o = m
 *   dr[a] = sum over p of (the sum of dS_po over the offsets o whose offset on axis a is a) q_p
 * a_po is recomputed as exp(s_po - lse_p) from the log-sum-exp saved by the forward pass: nothing of size
 * k^d x image is stored. Each row block of queries scatters its dk, dv into zero-padded planes of the thread
 * (vectorised along the rows, like the forward pass); threads share out whole planes (batch x heads), so every
 * gradient element is summed by one thread in a fixed order: results do not depend on the number of threads.
 *
 * Layouts (contiguous float32; 2D images are passed as depth 1 with kd = 1):
 *   q:           (BH, d, D, H, W)  scaled queries, as the forward pass gets them
 *   k, v:        (BH, d, D + 2pz, H + 2py, W + 2px)
 *   g, out:      (BH, d, D, H, W)  output gradient and output;  lse: (BH, D, H, W)
 *   rel:         (A, d), A = kd + kh + kw, as in the forward pass
 *   grad_qkv:    (B, 3, heads, d, D, H, W) with BH = B * heads;  grad_rel: (A, d)
 */
typedef struct {
    const float *q, *k, *v, *g, *out, *lse, *rel;
    float *grad_qkv;
    int64_t d, D, H, W, padded_H, padded_W, plane, padded_plane, heads;
    int kd, kh, kw, dilation, pz, py, px, axes, neighbours;
    float scale;
} backward_t;

typedef struct { /* scratch space of one thread */
    float *grad_k, *grad_v;               /* (d, padded plane) each: the plane's dk and dv, zero-padded */
    float *attention, *grad_logits;       /* (neighbours, BLOCK) each */
    float *axis_logits, *axis_grads;      /* (A, BLOCK) each: q . rel[a] and the sums of dS per axis offset */
    float *table_grads;                   /* (A, d, BLOCK): lanes of the plane's dr */
} workspace_t;

/* a and dS of the queries [x0, x0 + n) of image row (bh, z, y) for every neighbour; their sums per axis offset */
static void block_attention(const backward_t *p, const workspace_t *w, int64_t bh, int64_t z, int64_t y, int64_t x0,
                            int n) {
    const int64_t d = p->d, at = bh * d * p->plane + (z * p->H + y) * p->W + x0;
    const float *q = p->q + at, *g = p->g + at, *out = p->out + at;
    const float *restrict lse = p->lse + bh * p->plane + (z * p->H + y) * p->W + x0;
    float delta[BLOCK];
    for (int x = 0; x < n; x++) delta[x] = 0.f;
    for (int64_t c = 0; c < d; c++) {
        const float *restrict gc = g + c * p->plane, *restrict oc = out + c * p->plane;
        for (int x = 0; x < n; x++) delta[x] += gc[x] * oc[x];
    }
    for (int a = 0; a < p->axes; a++) {
        float *restrict r = w->axis_logits + a * BLOCK, *restrict sums = w->axis_grads + a * BLOCK;
        for (int x = 0; x < n; x++) r[x] = sums[x] = 0.f;
        for (int64_t c = 0; c < d; c++) {
            const float e = p->rel[a * d + c];
            const float *restrict qc = q + c * p->plane;
            for (int x = 0; x < n; x++) r[x] += e * qc[x];
        }
    }
    int o = 0;
    for (int i = 0; i < p->kd; i++)
        for (int j = 0; j < p->kh; j++)
            for (int l = 0; l < p->kw; l++, o++) {
                float *restrict att = w->attention + o * BLOCK, *restrict ds = w->grad_logits + o * BLOCK;
                const int64_t zz = z + (int64_t)i * p->dilation - p->pz, yy = y + (int64_t)j * p->dilation - p->py,
                              dx = (int64_t)l * p->dilation - p->px;
                if (zz < 0 || zz >= p->D || yy < 0 || yy >= p->H) {
                    for (int x = 0; x < n; x++) att[x] = ds[x] = 0.f;
                    continue;
                }
                const int lo = (int)(-dx - x0 > 0 ? (-dx - x0 < n ? -dx - x0 : n) : 0);
                const int hi = (int)(p->W - dx - x0 < n ? (p->W - dx - x0 > 0 ? p->W - dx - x0 : 0) : n);
                const int64_t neighbour = bh * d * p->padded_plane +
                                          ((z + i * p->dilation) * p->padded_H + y + j * p->dilation) * p->padded_W +
                                          x0 + l * p->dilation;
                float *restrict sz = w->axis_grads + i * BLOCK, *restrict sy = w->axis_grads + (p->kd + j) * BLOCK,
                               *restrict sx = w->axis_grads + (p->kd + p->kh + l) * BLOCK;
                const float *restrict rz = w->axis_logits + i * BLOCK,
                                      *restrict ry = w->axis_logits + (p->kd + j) * BLOCK,
                                      *restrict rx = w->axis_logits + (p->kd + p->kh + l) * BLOCK;
                float logit[BLOCK], dot_gv[BLOCK];
                for (int x = 0; x < n; x++) {
                    logit[x] = rz[x] + ry[x] + rx[x];
                    dot_gv[x] = 0.f;
                }
                for (int64_t c = 0; c < d; c++) {
                    const float *restrict qc = q + c * p->plane, *restrict kc = p->k + neighbour + c * p->padded_plane,
                                          *restrict gc = g + c * p->plane, *restrict vc = p->v + neighbour + c * p->padded_plane;
                    for (int x = 0; x < n; x++) {
                        logit[x] += qc[x] * kc[x];
                        dot_gv[x] += gc[x] * vc[x];
                    }
                }
                for (int x = 0; x < n; x++) att[x] = exp_nonpositive(logit[x] - lse[x]);
                for (int x = 0; x < lo; x++) att[x] = 0.f; /* neighbours left / right of the image */
                for (int x = hi; x < n; x++) att[x] = 0.f;
                for (int x = 0; x < n; x++) {
                    ds[x] = att[x] * (dot_gv[x] - delta[x]);
                    sz[x] += ds[x];
                    sy[x] += ds[x];
                    sx[x] += ds[x];
                }
            }
}

/* dq of the block and its dk, dv, dr contributions (after block_attention) */
static void block_gradients(const backward_t *p, const workspace_t *w, int64_t bh, int64_t z, int64_t y, int64_t x0,
                            int n) {
    const int64_t d = p->d, at = bh * d * p->plane + (z * p->H + y) * p->W + x0;
    const int64_t b = bh / p->heads, head = bh % p->heads;
    float *grad_q = p->grad_qkv + ((b * 3 * p->heads + head) * d) * p->plane + (z * p->H + y) * p->W + x0;
    for (int64_t c = 0; c < d; c++) {
        const float *restrict qc = p->q + at + c * p->plane, *restrict gc = p->g + at + c * p->plane;
        float acc[BLOCK];
        for (int x = 0; x < n; x++) acc[x] = 0.f;
        for (int a = 0; a < p->axes; a++) {
            const float e = p->rel[a * d + c];
            const float *restrict sums = w->axis_grads + a * BLOCK;
            float *restrict lanes = w->table_grads + (a * d + c) * BLOCK;
            for (int x = 0; x < n; x++) {
                acc[x] += sums[x] * e;
                lanes[x] += sums[x] * qc[x];
            }
        }
        const int64_t channel = c * p->padded_plane + x0;
        const float *k = p->k + bh * d * p->padded_plane + channel;
        float *grad_k = w->grad_k + channel, *grad_v = w->grad_v + channel;
        int o = 0;
        for (int i = 0; i < p->kd; i++)
            for (int j = 0; j < p->kh; j++) {
                const int64_t row = ((z + i * p->dilation) * p->padded_H + y + j * p->dilation) * p->padded_W;
                const int64_t zz = z + (int64_t)i * p->dilation - p->pz, yy = y + (int64_t)j * p->dilation - p->py;
                if (zz < 0 || zz >= p->D || yy < 0 || yy >= p->H) { /* weights 0 */
                    o += p->kw;
                    continue;
                }
                for (int l = 0; l < p->kw; l++, o++) {
                    const float *restrict att = w->attention + o * BLOCK, *restrict ds = w->grad_logits + o * BLOCK,
                                          *restrict kc = k + row + l * p->dilation;
                    float *restrict dk = grad_k + row + l * p->dilation, *restrict dv = grad_v + row + l * p->dilation;
                    for (int x = 0; x < n; x++) acc[x] += ds[x] * kc[x];
                    for (int x = 0; x < n; x++) {
                        dk[x] += ds[x] * qc[x];
                        dv[x] += att[x] * gc[x];
                    }
                }
            }
        float *restrict gq = grad_q + c * p->plane;
        for (int x = 0; x < n; x++) gq[x] = acc[x] * p->scale;
    }
}

/* the gradients of plane bh: all its row blocks, then its dk, dv into grad_qkv and its dr lanes into `table` */
static void plane_gradients(const backward_t *p, const workspace_t *w, int64_t bh, float *restrict table) {
    const int64_t d = p->d;
    memset(w->grad_k, 0, sizeof(float) * d * p->padded_plane);
    memset(w->grad_v, 0, sizeof(float) * d * p->padded_plane);
    memset(w->table_grads, 0, sizeof(float) * p->axes * d * BLOCK);
    for (int64_t z = 0; z < p->D; z++)
        for (int64_t y = 0; y < p->H; y++)
            for (int64_t x0 = 0; x0 < p->W; x0 += BLOCK) {
                const int n = (int)(p->W - x0 < BLOCK ? p->W - x0 : BLOCK);
                block_attention(p, w, bh, z, y, x0, n);
                block_gradients(p, w, bh, z, y, x0, n);
            }
    const int64_t b = bh / p->heads, head = bh % p->heads;
    for (int part = 1; part <= 2; part++) {
        const float *padded = part == 1 ? w->grad_k : w->grad_v;
        float *grad = p->grad_qkv + (((b * 3 + part) * p->heads + head) * d) * p->plane;
        for (int64_t c = 0; c < d; c++)
            for (int64_t z = 0; z < p->D; z++)
                for (int64_t y = 0; y < p->H; y++)
                    memcpy(grad + c * p->plane + (z * p->H + y) * p->W,
                           padded + c * p->padded_plane + ((z + p->pz) * p->padded_H + y + p->py) * p->padded_W + p->px,
                           sizeof(float) * p->W);
    }
    for (int64_t i = 0; i < p->axes * d; i++) {
        float sum = 0.f;
        for (int x = 0; x < BLOCK; x++) sum += w->table_grads[i * BLOCK + x];
        table[i] = sum;
    }
}

/* The backward pass (layouts above). Returns 0 on success, 1 if scratch memory could not be allocated. */
int monai_qsa_local_attention_backward(const float *q, const float *k, const float *v, const float *g, const float *out,
                                       const float *lse, const float *rel, float *grad_qkv, float *grad_rel,
                                       int64_t batch, int64_t heads, int64_t d, int64_t D, int64_t H, int64_t W, int kd,
                                       int kh, int kw, int dilation, float scale, int num_threads) {
    backward_t p = {.q = q, .k = k, .v = v, .g = g, .out = out, .lse = lse, .rel = rel, .grad_qkv = grad_qkv,
                    .d = d, .D = D, .H = H, .W = W, .heads = heads, .kd = kd, .kh = kh, .kw = kw,
                    .dilation = dilation, .scale = scale};
    p.pz = dilation * (kd - 1) / 2, p.py = dilation * (kh - 1) / 2, p.px = dilation * (kw - 1) / 2;
    p.padded_H = H + 2 * p.py, p.padded_W = W + 2 * p.px;
    p.plane = D * H * W, p.padded_plane = (D + 2 * p.pz) * p.padded_H * p.padded_W;
    p.axes = kd + kh + kw, p.neighbours = kd * kh * kw;
    const int64_t planes = batch * heads, table_size = p.axes * d;
    float *tables = (float *)malloc(sizeof(float) * planes * table_size); /* dr of each plane */
    int failed = tables == NULL;
#pragma omp parallel num_threads(num_threads) reduction(| : failed)
    {
        const int64_t floats = 2 * d * p.padded_plane + (int64_t)BLOCK * (2 * p.neighbours + 2 * p.axes + table_size);
        float *scratch = (float *)malloc(sizeof(float) * floats);
        workspace_t w = {.grad_k = scratch, .grad_v = scratch + d * p.padded_plane};
        w.attention = w.grad_v + d * p.padded_plane;
        w.grad_logits = w.attention + (int64_t)BLOCK * p.neighbours;
        w.axis_logits = w.grad_logits + (int64_t)BLOCK * p.neighbours;
        w.axis_grads = w.axis_logits + (int64_t)BLOCK * p.axes;
        w.table_grads = w.axis_grads + (int64_t)BLOCK * p.axes;
        if (scratch == NULL) failed = 1;
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < planes; bh++)
            if (scratch != NULL && tables != NULL) plane_gradients(&p, &w, bh, tables + bh * table_size);
        free(scratch);
    }
    if (!failed)
        for (int64_t i = 0; i < table_size; i++) {
            float sum = 0.f;
            for (int64_t bh = 0; bh < planes; bh++) sum += tables[bh * table_size + i];
            grad_rel[i] = sum;
        }
    free(tables);
    return failed;
}
