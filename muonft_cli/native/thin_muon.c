/* muonft native kernel: the whole Muon step of thin (LoRA-shaped) fp32 matrices, one matrix at a time.
 *
 * For every matrix W (rows x cols, row-major, r = min(rows, cols) <= 64) with gradient G and momentum M:
 *   M <- G + beta*M;  X = G + beta*M (Nesterov) or M;
 *   S = X X^T (r x r, float64; products of two floats are exact in float64);
 *   Q = Gram-space iteration of S (the same recurrence as muonft_cli.optim.orthogonalize.gram_iterate);
 *   W <- keep*W + (coef*Q) X          (tall matrices as stored: X (coef*Q)^T)
 * The matrix is read from memory once: X stays in a per-thread scratch buffer between the Gram and the
 * apply, so the second pass runs from cache (five tensor passes per step against fused AdamW's seven).
 * Threads take the matrices one at a time from a shared counter, so wide and tall ones (different costs
 * per element) balance; they are OpenMP threads when built with it (the pool of the libgomp torch has
 * loaded, whose workers are still spinning from the backward pass), else pthreads.  The caller owns the
 * scratch memory (reused across steps).
 * No Python, no torch: pointers in, 0 or an error code out.
 */
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAXR 64
#define CHUNK 2048 /* elements of X converted to float64 and taken into the Gram at a time (16 KiB, in L1) */
#ifndef VL /* VL and TB may be set together on the command line (one width's code tested on another CPU) */
#if defined(__AVX512F__)
#define VL 8 /* float64 lanes of a vector register */
#define TB 4 /* wide Gram register tile: 4 x TB row pairs (32 vector registers) */
#else
#define VL 4
#define TB 2 /* (16 vector registers: 8 accumulators, 4 + 1 operands) */
#endif
#endif
typedef double vd __attribute__((vector_size(8 * VL)));
typedef double vdu __attribute__((vector_size(8 * VL), aligned(8), may_alias)); /* unaligned loads */
typedef float vf __attribute__((vector_size(8 * VL)));  /* 2 VL float32 lanes: the wide apply's vectors */
typedef float vfu __attribute__((vector_size(8 * VL), aligned(4), may_alias));
#define FL (2 * VL)
#define SV_BYTES (MAXR * MAXR * 8 * 8) /* r x r vectors of up to 8 float64 lanes, per thread */
#define INLINE static inline __attribute__((always_inline))

typedef struct {
    int64_t n;
    const int64_t *wp, *gp, *mp; /* data pointers per matrix: W, G, M */
    const int64_t *shape; /* 2 per matrix: rows, cols */
    const double *scal;   /* 4 per matrix: beta, nesterov, coef, keep */
    int ncoef;
    const double *coeffs; /* 3 per iteration: a, b, c */
    double norm_scale, norm_eps;
    atomic_llong *next;   /* the next matrix to take (shared by the threads: dynamic balance) */
    float *xs;            /* its scratch: X as stored (fp32, the largest matrix) */
    vd *sv;               /* and the wide Gram's vector sums (SV_BYTES) */
} job_t;

/* C = A B (r x r, row-major).  r a multiple of VL: blocks of C (rb rows x cg vectors, 8 vector accumulators:
 * independent FMA chains; one row at a time left the r x r iteration latency-bound, ~35 us per matrix at
 * r = 16, a quarter of its step).  Each entry is summed over k in order, as in the scalar loop below. */
INLINE void matmul(const int r, const double *restrict A, const double *restrict B, double *restrict C) {
    if (r % VL == 0) {
        enum { ACC = 8 };
        const int nv = r / VL, cg = nv < ACC ? nv : ACC, rb = ACC / cg; /* rb rows x cg vectors of C */
        for (int i0 = 0; i0 < r; i0 += rb)
            for (int v0 = 0; v0 < nv; v0 += cg) {
                const int rows = r - i0 < rb ? r - i0 : rb;
                vd acc[ACC];
                for (int v = 0; v < ACC; v++) acc[v] = (vd){0};
                for (int k = 0; k < r; k++) {
                    const double *bk = B + k * r + v0 * VL;
                    for (int ii = 0; ii < rows; ii++) {
                        const double aik = A[(i0 + ii) * r + k];
                        for (int v = 0; v < cg; v++) acc[ii * cg + v] += aik * *(const vdu *)(bk + v * VL);
                    }
                }
                for (int ii = 0; ii < rows; ii++)
                    for (int v = 0; v < cg; v++) *(vdu *)(C + (i0 + ii) * r + (v0 + v) * VL) = acc[ii * cg + v];
            }
        return;
    }
    for (int i = 0; i < r; i++) {
        double *c = C + i * r;
        for (int j = 0; j < r; j++) c[j] = 0.0;
        for (int k = 0; k < r; k++) {
            const double a = A[i * r + k];
            const double *b = B + k * r;
            for (int j = 0; j < r; j++) c[j] += a * b[j];
        }
    }
}

/* Q (r x r) from the Gram S (overwritten): Q_K / (||X||_F * norm_scale). */
INLINE void gram_iterate(const int r, double *restrict S, const job_t *job, double *restrict Q, double *restrict P,
                         double *restrict T, double *restrict U) {
    double sq = 0.0;
    for (int i = 0; i < r; i++) sq += S[i * r + i];
    if (sq < 0.0) sq = 0.0;
    double norm = sqrt(sq) * job->norm_scale;
    if (norm < job->norm_eps) norm = job->norm_eps;
    const double inv2 = 1.0 / (norm * norm);
    const int rr = r * r;
    for (int i = 0; i < rr; i++) S[i] *= inv2; /* A = Gram of the normalised X */
    int have_q = 0;
    for (int t = 0; t < job->ncoef; t++) {
        const double a = job->coeffs[3 * t], b = job->coeffs[3 * t + 1], c = job->coeffs[3 * t + 2];
        matmul(r, S, S, T); /* A^2 */
        for (int i = 0; i < rr; i++) P[i] = b * S[i] + c * T[i];
        for (int i = 0; i < r; i++) P[i * r + i] += a;
        if (!have_q) {
            memcpy(Q, P, sizeof(double) * rr);
            have_q = 1;
        } else {
            matmul(r, P, Q, T);
            memcpy(Q, T, sizeof(double) * rr);
        }
        matmul(r, S, P, T); /* A P */
        matmul(r, P, T, U); /* P A P */
        for (int i = 0; i < r; i++)
            for (int j = 0; j < r; j++) S[i * r + j] = 0.5 * (U[i * r + j] + U[j * r + i]);
    }
    if (!have_q) {
        memset(Q, 0, sizeof(double) * rr);
        for (int i = 0; i < r; i++) Q[i * r + i] = 1.0;
    }
    for (int i = 0; i < rr; i++) Q[i] /= norm;
}

/* Momentum and the Nesterov input over a contiguous run: M <- G + beta*M, x = G + beta*M (or M). */
INLINE void momentum(int64_t len, const float *restrict G, float *restrict M, float *restrict x, float beta,
                     int nesterov) {
    if (nesterov) {
#pragma omp simd
        for (int64_t i = 0; i < len; i++) {
            const float m = fmaf(beta, M[i], G[i]); /* fused, as torch.add(G, M, alpha=beta) computes it */
            M[i] = m;
            x[i] = fmaf(beta, m, G[i]);
        }
    } else {
#pragma omp simd
        for (int64_t i = 0; i < len; i++) {
            const float m = fmaf(beta, M[i], G[i]);
            M[i] = m;
            x[i] = m;
        }
    }
}

/* S += X X^T over one chunk of a wide X held as float64 rows xd (r x len, row stride len): register tiles
 * of 4 x TB row pairs (the lower triangle and the diagonal tiles) whose vector sums go to Sv (one vector
 * per entry, reduced once per matrix by gram_wide_finish: no horizontal sums per chunk), columns past the
 * last full vector and rows past the last tile straight to S. */
INLINE void gram_wide_chunk(const int r, const double *restrict xd, const int64_t len, vd *restrict Sv,
                            double *restrict S) {
    const int r4 = r / 4 * 4;
    const int64_t lv = len / VL * VL;
    for (int a0 = 0; a0 < r4; a0 += 4)
        for (int b0 = 0; b0 < a0 + 4; b0 += TB) {
            const double *x0 = xd + a0 * len, *x1 = x0 + len, *x2 = x1 + len, *x3 = x2 + len;
            const double *y0 = xd + b0 * len, *y1 = y0 + len;
            vd s00 = {0}, s01 = {0}, s10 = {0}, s11 = {0}, s20 = {0}, s21 = {0}, s30 = {0}, s31 = {0};
#if TB == 4
            const double *y2 = y1 + len, *y3 = y2 + len;
            vd s02 = {0}, s03 = {0}, s12 = {0}, s13 = {0}, s22 = {0}, s23 = {0}, s32 = {0}, s33 = {0};
#endif
            for (int64_t j = 0; j < lv; j += VL) {
                const vd a_0 = *(const vdu *)(x0 + j), a_1 = *(const vdu *)(x1 + j);
                const vd a_2 = *(const vdu *)(x2 + j), a_3 = *(const vdu *)(x3 + j);
                const vd b_0 = *(const vdu *)(y0 + j), b_1 = *(const vdu *)(y1 + j);
                s00 += a_0 * b_0; s01 += a_0 * b_1; s10 += a_1 * b_0; s11 += a_1 * b_1;
                s20 += a_2 * b_0; s21 += a_2 * b_1; s30 += a_3 * b_0; s31 += a_3 * b_1;
#if TB == 4
                const vd b_2 = *(const vdu *)(y2 + j), b_3 = *(const vdu *)(y3 + j);
                s02 += a_0 * b_2; s03 += a_0 * b_3; s12 += a_1 * b_2; s13 += a_1 * b_3;
                s22 += a_2 * b_2; s23 += a_2 * b_3; s32 += a_3 * b_2; s33 += a_3 * b_3;
#endif
            }
            vd *V0 = Sv + a0 * r + b0, *V1 = V0 + r, *V2 = V1 + r, *V3 = V2 + r;
            V0[0] += s00; V0[1] += s01; V1[0] += s10; V1[1] += s11;
            V2[0] += s20; V2[1] += s21; V3[0] += s30; V3[1] += s31;
#if TB == 4
            V0[2] += s02; V0[3] += s03; V1[2] += s12; V1[3] += s13;
            V2[2] += s22; V2[3] += s23; V3[2] += s32; V3[3] += s33;
#endif
            for (int64_t j = lv; j < len; j++) /* columns past the last full vector */
                for (int i = 0; i < 4; i++)
                    for (int k = 0; k < TB; k++) S[(a0 + i) * r + b0 + k] += xd[(a0 + i) * len + j] * xd[(b0 + k) * len + j];
        }
    for (int a = r4; a < r; a++) /* rows past the last tile (none when r % 4 == 0) */
        for (int b = 0; b <= a; b++) {
            const double *xa = xd + a * len, *xb = xd + b * len;
            double acc = 0.0;
#pragma omp simd reduction(+ : acc)
            for (int64_t j = 0; j < len; j++) acc += xa[j] * xb[j];
            S[a * r + b] += acc;
        }
}

/* S += the lane sums of Sv over the entries the wide tiles fill. */
INLINE void gram_wide_finish(const int r, const vd *restrict Sv, double *restrict S) {
    const int r4 = r / 4 * 4;
    for (int a = 0; a < r4; a++)
        for (int b = 0; b < a / 4 * 4 + 4 && b < r; b++) {
            double t = 0.0;
            for (int l = 0; l < VL; l++) t += Sv[a * r + b][l];
            S[a * r + b] += t;
        }
}

/* S += X^T X over one chunk of a tall X held as float64 rows xd (len x r): for each group of VL columns
 * b0.., the rows a >= b0 in groups of up to 8 accumulate x[a] * x[b0:b0+VL] (one vector FMA per row and a)
 * while the chunk is in L1; the lower triangle and the diagonal blocks are filled. */
INLINE void gram_tall_chunk(const int r, const double *restrict xd, const int64_t len, double *restrict S) {
    if (r == VL) { /* one vector per row: lane l of x * rot_k(x) is x[l] x[l+k mod VL], k = 0..VL/2 — every
                    * entry of the lower triangle once (k = VL/2 twice: lanes < VL/2 kept), VL/2 + 1 FMAs
                    * per row instead of VL; each entry summed over the rows in the same order as below */
#if VL == 8
        vd s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0}, s4 = {0};
        for (int64_t i = 0; i < len; i++) {
            const vd x = *(const vdu *)(xd + i * r);
            s0 += x * x;
            s1 += x * __builtin_shufflevector(x, x, 1, 2, 3, 4, 5, 6, 7, 0);
            s2 += x * __builtin_shufflevector(x, x, 2, 3, 4, 5, 6, 7, 0, 1);
            s3 += x * __builtin_shufflevector(x, x, 3, 4, 5, 6, 7, 0, 1, 2);
            s4 += x * __builtin_shufflevector(x, x, 4, 5, 6, 7, 0, 1, 2, 3);
        }
        const vd acc[5] = {s0, s1, s2, s3, s4};
#else
        vd s0 = {0}, s1 = {0}, s2 = {0};
        for (int64_t i = 0; i < len; i++) {
            const vd x = *(const vdu *)(xd + i * r);
            s0 += x * x;
            s1 += x * __builtin_shufflevector(x, x, 1, 2, 3, 0);
            s2 += x * __builtin_shufflevector(x, x, 2, 3, 0, 1);
        }
        const vd acc[3] = {s0, s1, s2};
#endif
        for (int k = 0; k <= VL / 2; k++)
            for (int l = 0; l < (k == VL / 2 ? VL / 2 : VL); l++) {
                const int a = l, b = (l + k) % VL;
                S[(a > b ? a : b) * r + (a > b ? b : a)] += acc[k][l];
            }
        return;
    }
    if (r % VL) { /* r not a multiple of the vector width: row outer products, the lower triangle */
        for (int64_t i = 0; i < len; i++) {
            const double *v = xd + i * r;
            for (int a = 0; a < r; a++) {
                const double va = v[a];
                for (int b = 0; b <= a; b++) S[a * r + b] += va * v[b];
            }
        }
        return;
    }
    for (int b0 = 0; b0 < r; b0 += VL)
        for (int a0 = b0; a0 < r; a0 += 8) {
            vd s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0}, s4 = {0}, s5 = {0}, s6 = {0}, s7 = {0};
            if (r - a0 >= 8) {
                for (int64_t i = 0; i < len; i++) {
                    const double *v = xd + i * r, *u = v + a0;
                    const vd vb = *(const vdu *)(v + b0);
                    s0 += u[0] * vb; s1 += u[1] * vb; s2 += u[2] * vb; s3 += u[3] * vb;
                    s4 += u[4] * vb; s5 += u[5] * vb; s6 += u[6] * vb; s7 += u[7] * vb;
                }
            } else { /* 4 rows left (r - a0 is a multiple of VL = 4): two rows per step, 8 chains */
                int64_t i = 0;
                for (; i + 2 <= len; i += 2) {
                    const double *v = xd + i * r, *u = v + a0, *w = u + r;
                    const vd vb = *(const vdu *)(v + b0), wb = *(const vdu *)(v + r + b0);
                    s0 += u[0] * vb; s1 += u[1] * vb; s2 += u[2] * vb; s3 += u[3] * vb;
                    s4 += w[0] * wb; s5 += w[1] * wb; s6 += w[2] * wb; s7 += w[3] * wb;
                }
                for (; i < len; i++) {
                    const double *v = xd + i * r, *u = v + a0;
                    const vd vb = *(const vdu *)(v + b0);
                    s0 += u[0] * vb; s1 += u[1] * vb; s2 += u[2] * vb; s3 += u[3] * vb;
                }
                s0 += s4; s1 += s5; s2 += s6; s3 += s7;
            }
            const vd acc[8] = {s0, s1, s2, s3, s4, s5, s6, s7};
            const int ag = r - a0 < 8 ? r - a0 : 8;
            for (int k = 0; k < ag; k++)
                for (int l = 0; l < VL; l++) S[(a0 + k) * r + b0 + l] += acc[k][l];
        }
}

/* Pass 1: momentum into xs (X as stored) and the Gram S (r x r, lower triangle then mirrored).  G and M
 * are read in long contiguous runs (whole rows of a wide X, the whole of a tall one, so the hardware
 * prefetchers keep up); the Gram then takes X CHUNK elements at a time, converted to float64 into an
 * L1-resident block.  Wide X (r x n): chunks of CHUNK / r columns; tall (n x r): of CHUNK / r rows (a tall
 * X's momentum runs chunk by chunk, one contiguous stream). */
INLINE void pass1(const int r, const int64_t n, const int flip, const float *restrict G, float *restrict M,
                  float *restrict xs, vd *restrict Sv, double *restrict S, float beta, int nesterov) {
    double xd[CHUNK] __attribute__((aligned(64)));
    int64_t ch = CHUNK / r;
    if (!flip && ch >= 2 * VL) ch = ch / VL * VL;
    memset(S, 0, sizeof(double) * r * r);
    if (!flip) {
        memset(Sv, 0, sizeof(vd) * r * r);
        for (int a = 0; a < r; a++) momentum(n, G + a * n, M + a * n, xs + a * n, beta, nesterov);
    }
    for (int64_t j0 = 0; j0 < n; j0 += ch) {
        const int64_t len = (n - j0 < ch) ? n - j0 : ch;
        if (!flip) {
            for (int a = 0; a < r; a++) {
                const float *xa = xs + a * n + j0;
                double *da = xd + a * len;
#pragma omp simd
                for (int64_t j = 0; j < len; j++) da[j] = (double)xa[j];
            }
            gram_wide_chunk(r, xd, len, Sv, S);
        } else {
            float *x = xs + j0 * r;
            momentum(len * r, G + j0 * r, M + j0 * r, x, beta, nesterov);
#pragma omp simd
            for (int64_t k = 0; k < len * r; k++) xd[k] = (double)x[k];
            gram_tall_chunk(r, xd, len, S);
        }
    }
    if (!flip) gram_wide_finish(r, Sv, S);
    for (int a = 0; a < r; a++)
        for (int b = a + 1; b < r; b++) S[a * r + b] = S[b * r + a];
}

/* One matrix, r = min(rows, cols) (a compile-time constant where step_one dispatches on it).
 * Pass 1 reads G and M from memory (one contiguous sweep) and leaves X in the scratch; the Gram and the
 * apply then read X from cache.  Wide (r x n as stored): the apply forms four output rows per sweep
 * (register tiles).  Tall (n x r as stored): small matvecs, four contiguous rows at a time. */
INLINE void step_r(const int r, const job_t *job, int64_t idx, float *restrict xs, vd *restrict sv) {
    float *restrict W = (float *)(intptr_t)job->wp[idx];
    const float *restrict G = (const float *)(intptr_t)job->gp[idx];
    float *restrict M = (float *)(intptr_t)job->mp[idx];
    const int64_t rows = job->shape[2 * idx], cols = job->shape[2 * idx + 1];
    const float beta = (float)job->scal[4 * idx];
    const int nesterov = job->scal[4 * idx + 1] != 0.0;
    const double coef = job->scal[4 * idx + 2];
    const float keep = (float)job->scal[4 * idx + 3];
    const int flip = rows > cols;
    const int64_t n = flip ? rows : cols;
    double S[MAXR * MAXR], Q[MAXR * MAXR], P[MAXR * MAXR], T[MAXR * MAXR], U[MAXR * MAXR];
    float Qc[MAXR * MAXR], Qt[MAXR * MAXR];

    pass1(r, n, flip, G, M, xs, sv, S, beta, nesterov);

    /* the r x r iteration, then the update factor coef*Q in float (the apply runs in fp32) */
    gram_iterate(r, S, job, Q, P, T, U);
    for (int a = 0; a < r; a++)
        for (int b = 0; b < r; b++) {
            Qc[a * r + b] = (float)(Q[a * r + b] * coef);
            Qt[b * r + a] = Qc[a * r + b];
        }

    if (!flip) { /* W[a, :] <- keep*W[a, :] + sum_b Qc[a, b] X[b, :], 4 output rows per sweep */
        int a = 0;
        for (; a + 4 <= r; a += 4) {
            const float *q0 = Qc + a * r, *q1 = q0 + r, *q2 = q1 + r, *q3 = q2 + r;
            float *w0 = W + a * n, *w1 = w0 + n, *w2 = w1 + n, *w3 = w2 + n;
            int64_t j = 0;
            /* explicit vectors over j: left to `omp simd`, gcc vectorised the short loop over b instead
             * once r >= 12 (gathers, 5-9x slower per element than at r = 8); the same sums in the same order */
            for (; j + FL <= n; j += FL) {
                vf s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0}, t0 = {0}, t1 = {0}, t2 = {0}, t3 = {0};
                int b = 0;
                for (; b + 2 <= r; b += 2) {
                    const vf xv = *(const vfu *)(xs + b * n + j), yv = *(const vfu *)(xs + (b + 1) * n + j);
                    s0 += q0[b] * xv; s1 += q1[b] * xv; s2 += q2[b] * xv; s3 += q3[b] * xv;
                    t0 += q0[b + 1] * yv; t1 += q1[b + 1] * yv; t2 += q2[b + 1] * yv; t3 += q3[b + 1] * yv;
                }
                if (b < r) {
                    const vf xv = *(const vfu *)(xs + b * n + j);
                    s0 += q0[b] * xv; s1 += q1[b] * xv; s2 += q2[b] * xv; s3 += q3[b] * xv;
                }
                *(vfu *)(w0 + j) = keep * *(const vfu *)(w0 + j) + (s0 + t0);
                *(vfu *)(w1 + j) = keep * *(const vfu *)(w1 + j) + (s1 + t1);
                *(vfu *)(w2 + j) = keep * *(const vfu *)(w2 + j) + (s2 + t2);
                *(vfu *)(w3 + j) = keep * *(const vfu *)(w3 + j) + (s3 + t3);
            }
            for (; j < n; j++) { /* columns past the last full vector */
                float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f, t0 = 0.0f, t1 = 0.0f, t2 = 0.0f, t3 = 0.0f;
                int b = 0;
                for (; b + 2 <= r; b += 2) { /* even and odd b in separate sums: 8 independent chains */
                    const float xv = xs[b * n + j], yv = xs[(b + 1) * n + j];
                    s0 += q0[b] * xv; s1 += q1[b] * xv; s2 += q2[b] * xv; s3 += q3[b] * xv;
                    t0 += q0[b + 1] * yv; t1 += q1[b + 1] * yv; t2 += q2[b + 1] * yv; t3 += q3[b + 1] * yv;
                }
                if (b < r) {
                    const float xv = xs[b * n + j];
                    s0 += q0[b] * xv; s1 += q1[b] * xv; s2 += q2[b] * xv; s3 += q3[b] * xv;
                }
                w0[j] = keep * w0[j] + (s0 + t0); w1[j] = keep * w1[j] + (s1 + t1);
                w2[j] = keep * w2[j] + (s2 + t2); w3[j] = keep * w3[j] + (s3 + t3);
            }
        }
        for (; r % 4 && a < r; a++) { /* rows past the last tile (none when r % 4 == 0) */
            const float *q0 = Qc + a * r;
            float *w0 = W + a * n;
#pragma omp simd
            for (int64_t j = 0; j < n; j++) {
                float s0 = 0.0f;
                for (int b = 0; b < r; b++) s0 += q0[b] * xs[b * n + j];
                w0[j] = keep * w0[j] + s0;
            }
        }
    } else { /* W[i, :] <- keep*W[i, :] + X[i, :] Qc^T, RG rows at a time (independent FMA chains) */
        enum { RG = 4 };
        int64_t i = 0;
        for (; i + RG <= n; i += RG) {
            const float *x = xs + i * r;
            float *w = W + i * r;
            float o[RG][MAXR];
            for (int k = 0; k < RG; k++)
                for (int c = 0; c < r; c++) o[k][c] = 0.0f;
            for (int b = 0; b < r; b++) {
                const float *qt = Qt + b * r;
                for (int k = 0; k < RG; k++) {
                    const float xb = x[k * r + b];
#pragma omp simd
                    for (int c = 0; c < r; c++) o[k][c] += xb * qt[c];
                }
            }
            for (int k = 0; k < RG; k++)
#pragma omp simd
                for (int c = 0; c < r; c++) w[k * r + c] = keep * w[k * r + c] + o[k][c];
        }
        for (; i < n; i++) {
            const float *x = xs + i * r;
            float *w = W + i * r;
            float o[MAXR];
            for (int c = 0; c < r; c++) o[c] = 0.0f;
            for (int b = 0; b < r; b++) {
                const float xb = x[b];
                const float *qt = Qt + b * r;
#pragma omp simd
                for (int c = 0; c < r; c++) o[c] += xb * qt[c];
            }
#pragma omp simd
            for (int c = 0; c < r; c++) w[c] = keep * w[c] + o[c];
        }
    }
}

static void step_one(const job_t *job, int64_t idx) {
    const int64_t rows = job->shape[2 * idx], cols = job->shape[2 * idx + 1];
    const int r = (int)(rows > cols ? cols : rows);
    switch (r) { /* constant r: the small loops unroll and their accumulators stay in registers (the LoRA
                  * ranks people use; another r runs the same code with runtime loops, 2-10x slower per
                  * element on tall matrices: README "Optimizers") */
    case 1: step_r(1, job, idx, job->xs, job->sv); break;
    case 2: step_r(2, job, idx, job->xs, job->sv); break;
    case 4: step_r(4, job, idx, job->xs, job->sv); break;
    case 8: step_r(8, job, idx, job->xs, job->sv); break;
    case 12: step_r(12, job, idx, job->xs, job->sv); break;
    case 16: step_r(16, job, idx, job->xs, job->sv); break;
    case 24: step_r(24, job, idx, job->xs, job->sv); break;
    case 32: step_r(32, job, idx, job->xs, job->sv); break;
    case 48: step_r(48, job, idx, job->xs, job->sv); break;
    case 64: step_r(64, job, idx, job->xs, job->sv); break;
    default: step_r(r, job, idx, job->xs, job->sv); break;
    }
}

static void *run_job(void *arg) {
    job_t *job = (job_t *)arg;
    for (;;) {
        const long long i = atomic_fetch_add_explicit(job->next, 1, memory_order_relaxed);
        if (i >= job->n) return NULL;
        step_one(job, i);
    }
}

/* Scratch bytes per thread for matrices of at most max_numel elements (the caller allocates them once and
 * keeps them: fresh multi-100-KiB buffers would be page-faulted in on every step). */
int64_t muonft_thin_scratch_bytes(int64_t max_numel) {
    return (max_numel * (int64_t)sizeof(float) + 63) / 64 * 64 + SV_BYTES;
}

/* One step of n matrices.  scratch: scratch_size >= nthreads * muonft_thin_scratch_bytes(largest numel)
 * bytes, 64-byte aligned (nthreads capped at n and 64).  Returns 0 on success; before touching any
 * matrix, 2 for a matrix with min(rows, cols) > 64 or an empty one, 3 for too little scratch. */
int muonft_thin_step(int64_t n, const int64_t *wp, const int64_t *gp, const int64_t *mp, const int64_t *shape, const double *scal, int ncoef,
                     const double *coeffs, double norm_scale, double norm_eps, int nthreads, void *scratch,
                     int64_t scratch_size) {
    int64_t most = 1;
    for (int64_t i = 0; i < n; i++) {
        const int64_t rows = shape[2 * i], cols = shape[2 * i + 1];
        const int64_t r = rows < cols ? rows : cols;
        if (r < 1 || r > MAXR) return 2;
        if (rows * cols > most) most = rows * cols;
    }
    if (nthreads < 1) nthreads = 1;
    if (nthreads > 64) nthreads = 64;
    if (nthreads > n) nthreads = (int)(n > 0 ? n : 1);
    const int64_t per = muonft_thin_scratch_bytes(most);
    if (per * nthreads > scratch_size || ((intptr_t)scratch & 63)) return 3;
    job_t jobs[64];
    atomic_llong next;
    atomic_init(&next, 0);
    for (int t = 0; t < nthreads; t++) { /* each thread its scratch; matrices taken one at a time */
        char *base = (char *)scratch + (int64_t)t * per;
        jobs[t] = (job_t){n, wp, gp, mp, shape, scal, ncoef, coeffs, norm_scale, norm_eps, &next,
                          (float *)base, (vd *)(base + per - SV_BYTES)};
    }
#ifdef _OPENMP
    /* torch's own OpenMP pool (this library binds to the libgomp torch loaded): its workers are still
     * spinning from the backward pass, so a second set of threads would fight them for the cores */
#pragma omp parallel num_threads(nthreads)
    run_job(&jobs[omp_get_thread_num()]); /* a smaller team than asked for shares the same counter */
#else
    pthread_t tids[64];
    int started[64];
    for (int t = 1; t < nthreads; t++)
        started[t] = pthread_create(&tids[t], NULL, run_job, &jobs[t]) == 0;
    run_job(&jobs[0]);
    for (int t = 1; t < nthreads; t++) /* a thread that could not start: the others took its matrices */
        if (started[t]) pthread_join(tids[t], NULL);
#endif
    return 0;
}

/* 1 when matrices are spread over OpenMP threads (the pool of the libgomp already loaded), 0 for pthreads. */
int muonft_thin_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}
