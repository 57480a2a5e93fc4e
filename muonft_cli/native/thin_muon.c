/* muonft native kernel: the whole Muon step of thin (LoRA-shaped) fp32 matrices, one matrix at a time.
 *
 * For every matrix W (rows x cols, row-major, r = min(rows, cols) <= 64) with gradient G and momentum M:
 *   M <- G + beta*M;  X = G + beta*M (Nesterov) or M;
 *   S = X X^T (r x r, float64; products of two floats are exact in float64);
 *   Q = Gram-space iteration of S (the same recurrence as muonft_cli.optim.orthogonalize.gram_iterate);
 *   W <- keep*W + (coef*Q) X          (tall matrices as stored: X (coef*Q)^T)
 * The matrix is read from memory once: X stays in a per-thread scratch buffer between the Gram and the
 * apply, so the second pass runs from cache (five tensor passes per step against fused AdamW's seven).
 * Matrices are spread over threads by size; the caller owns the scratch memory (reused across steps).
 * No Python, no torch: pointers in, 0 or an error code out.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAXR 64
#define BLK 512 /* scratch unit: the float64 block of X is MAXR x BLK */
#define INLINE static inline __attribute__((always_inline))

typedef struct {
    int64_t n;
    const int64_t *wp, *gp, *mp; /* data pointers per matrix: W, G, M */
    const int64_t *shape; /* 2 per matrix: rows, cols */
    const double *scal;   /* 4 per matrix: beta, nesterov, coef, keep */
    int ncoef;
    const double *coeffs; /* 3 per iteration: a, b, c */
    double norm_scale, norm_eps;
    int64_t begin, end;   /* this thread's matrices */
    float *xs;            /* its scratch: X as stored (fp32, the largest matrix) */
    double *xd;           /* and one float64 column block of X (wide matrices) */
} job_t;

INLINE void matmul(const int r, const double *restrict A, const double *restrict B, double *restrict C) {
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

/* S += X[:, j0:j0+len] X[:, j0:j0+len]^T for a wide X held as float64 rows xd (r x ld): register tiles
 * of 4 x 4 row pairs (16 independent accumulator chains; the lower triangle is filled, the diagonal
 * tiles whole). */
INLINE void gram_block(const int r, const double *restrict xd, const int64_t ld, int64_t len, double *restrict S) {
    if (r % 4 == 0) {
        for (int a0 = 0; a0 < r; a0 += 4)
            for (int b0 = 0; b0 <= a0; b0 += 4) {
                const double *x0 = xd + a0 * ld, *x1 = x0 + ld, *x2 = x1 + ld, *x3 = x2 + ld;
                const double *y0 = xd + b0 * ld, *y1 = y0 + ld, *y2 = y1 + ld, *y3 = y2 + ld;
                double s00 = 0, s01 = 0, s02 = 0, s03 = 0, s10 = 0, s11 = 0, s12 = 0, s13 = 0;
                double s20 = 0, s21 = 0, s22 = 0, s23 = 0, s30 = 0, s31 = 0, s32 = 0, s33 = 0;
#pragma omp simd reduction(+ : s00, s01, s02, s03, s10, s11, s12, s13, s20, s21, s22, s23, s30, s31, s32, s33)
                for (int64_t j = 0; j < len; j++) {
                    const double a_0 = x0[j], a_1 = x1[j], a_2 = x2[j], a_3 = x3[j];
                    const double b_0 = y0[j], b_1 = y1[j], b_2 = y2[j], b_3 = y3[j];
                    s00 += a_0 * b_0; s01 += a_0 * b_1; s02 += a_0 * b_2; s03 += a_0 * b_3;
                    s10 += a_1 * b_0; s11 += a_1 * b_1; s12 += a_1 * b_2; s13 += a_1 * b_3;
                    s20 += a_2 * b_0; s21 += a_2 * b_1; s22 += a_2 * b_2; s23 += a_2 * b_3;
                    s30 += a_3 * b_0; s31 += a_3 * b_1; s32 += a_3 * b_2; s33 += a_3 * b_3;
                }
                double *S0 = S + a0 * r + b0, *S1 = S0 + r, *S2 = S1 + r, *S3 = S2 + r;
                S0[0] += s00; S0[1] += s01; S0[2] += s02; S0[3] += s03;
                S1[0] += s10; S1[1] += s11; S1[2] += s12; S1[3] += s13;
                S2[0] += s20; S2[1] += s21; S2[2] += s22; S2[3] += s23;
                S3[0] += s30; S3[1] += s31; S3[2] += s32; S3[3] += s33;
            }
    } else {
        for (int a = 0; a < r; a++)
            for (int b = 0; b <= a; b++) {
                const double *da = xd + a * ld, *db = xd + b * ld;
                double acc = 0.0;
#pragma omp simd reduction(+ : acc)
                for (int64_t j = 0; j < len; j++) acc += da[j] * db[j];
                S[a * r + b] += acc;
            }
    }
}

/* Pass 1 of a wide X (r x n as stored), by column blocks of MAXR*BLK/r: momentum into xs, the block's
 * float64 copy, and its Gram tiles, while the block is in cache (the block's compute overlaps the
 * streaming of the next). */
INLINE void pass1_wide(const int r, const int64_t n, const float *restrict G, float *restrict M,
                       float *restrict xs, double *restrict xd, double *restrict S, float beta, int nesterov) {
    const int64_t cb = (int64_t)MAXR * BLK / r;
    memset(S, 0, sizeof(double) * r * r);
    for (int64_t j0 = 0; j0 < n; j0 += cb) {
        const int64_t len = (n - j0 < cb) ? n - j0 : cb;
        for (int a = 0; a < r; a++) {
            float *xa = xs + a * n + j0;
            momentum(len, G + a * n + j0, M + a * n + j0, xa, beta, nesterov);
            double *da = xd + a * cb;
#pragma omp simd
            for (int64_t j = 0; j < len; j++) da[j] = (double)xa[j];
        }
        gram_block(r, xd, cb, len, S);
    }
    for (int a = 0; a < r; a++)
        for (int b = a + 1; b < r; b++) S[a * r + b] = S[b * r + a];
}

/* Pass 1 of a tall X (n x r as stored), by row blocks: momentum into xs, the float64 copy and the sum of
 * row outer products X^T X (rows are contiguous: the r-wide inner loop vectorises). */
INLINE void pass1_tall(const int r, const int64_t n, const float *restrict G, float *restrict M,
                       float *restrict xs, double *restrict xd, double *restrict S, float beta, int nesterov) {
    const int64_t rows_per = (int64_t)MAXR * BLK / r;
    double acc[MAXR * MAXR];
    memset(acc, 0, sizeof(double) * r * r);
    for (int64_t i0 = 0; i0 < n; i0 += rows_per) {
        const int64_t len = (n - i0 < rows_per) ? n - i0 : rows_per;
        float *src = xs + i0 * r;
        momentum(len * r, G + i0 * r, M + i0 * r, src, beta, nesterov);
#pragma omp simd
        for (int64_t k = 0; k < len * r; k++) xd[k] = (double)src[k];
        for (int64_t i = 0; i < len; i++) {
            const double *v = xd + i * r;
            for (int a = 0; a < r; a++) {
                const double va = v[a];
#pragma omp simd
                for (int b = 0; b < r; b++) acc[a * r + b] += va * v[b];
            }
        }
    }
    for (int a = 0; a < r; a++)
        for (int b = 0; b < r; b++) S[a * r + b] = 0.5 * (acc[a * r + b] + acc[b * r + a]);
}

/* One matrix, r = min(rows, cols) (a compile-time constant where step_one dispatches on it).
 * Pass 1 reads G and M from memory (one contiguous sweep) and leaves X in the scratch; the Gram and the
 * apply then read X from cache.  Wide (r x n as stored): the apply forms four output rows per sweep
 * (register tiles).  Tall (n x r as stored): a small matvec per contiguous row. */
INLINE void step_r(const int r, const job_t *job, int64_t idx, float *restrict xs, double *restrict xd) {
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

    if (!flip)
        pass1_wide(r, n, G, M, xs, xd, S, beta, nesterov);
    else
        pass1_tall(r, n, G, M, xs, xd, S, beta, nesterov);

    /* the r x r iteration, then the update factor coef*Q in float (the apply runs in fp32) */
    gram_iterate(r, S, job, Q, P, T, U);
    for (int a = 0; a < r; a++)
        for (int b = 0; b < r; b++) {
            Qc[a * r + b] = (float)(Q[a * r + b] * coef);
            Qt[b * r + a] = Qc[a * r + b];
        }

    if (!flip) { /* W[a, :] <- keep*W[a, :] + sum_b Qc[a, b] X[b, :] */
        int a = 0;
        for (; a + 4 <= r; a += 4) {
            const float *q0 = Qc + a * r, *q1 = q0 + r, *q2 = q1 + r, *q3 = q2 + r;
            float *w0 = W + a * n, *w1 = w0 + n, *w2 = w1 + n, *w3 = w2 + n;
#pragma omp simd
            for (int64_t j = 0; j < n; j++) {
                float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
                for (int b = 0; b < r; b++) {
                    const float xv = xs[b * n + j];
                    s0 += q0[b] * xv;
                    s1 += q1[b] * xv;
                    s2 += q2[b] * xv;
                    s3 += q3[b] * xv;
                }
                w0[j] = keep * w0[j] + s0;
                w1[j] = keep * w1[j] + s1;
                w2[j] = keep * w2[j] + s2;
                w3[j] = keep * w3[j] + s3;
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
    } else { /* W[i, :] <- keep*W[i, :] + X[i, :] Qc^T */
        for (int64_t i = 0; i < n; i++) {
            const float *x = xs + i * r;
            float *w = W + i * r;
            float o[MAXR];
            for (int a = 0; a < r; a++) o[a] = 0.0f;
            for (int b = 0; b < r; b++) {
                const float xb = x[b];
                const float *qt = Qt + b * r;
#pragma omp simd
                for (int a = 0; a < r; a++) o[a] += xb * qt[a];
            }
#pragma omp simd
            for (int a = 0; a < r; a++) w[a] = keep * w[a] + o[a];
        }
    }
}

static void step_one(const job_t *job, int64_t idx, float *xs, double *xd) {
    const int64_t rows = job->shape[2 * idx], cols = job->shape[2 * idx + 1];
    const int r = (int)(rows > cols ? cols : rows);
    switch (r) { /* constant r: the small loops unroll and their accumulators stay in registers */
    case 4: step_r(4, job, idx, xs, xd); break;
    case 8: step_r(8, job, idx, xs, xd); break;
    case 16: step_r(16, job, idx, xs, xd); break;
    case 32: step_r(32, job, idx, xs, xd); break;
    default: step_r(r, job, idx, xs, xd); break;
    }
}

static void *run_job(void *arg) {
    job_t *job = (job_t *)arg;
    for (int64_t i = job->begin; i < job->end; i++) step_one(job, i, job->xs, job->xd);
    return NULL;
}

/* Scratch bytes per thread for matrices of at most max_numel elements (the caller allocates them once and
 * keeps them: fresh multi-100-KiB buffers would be page-faulted in on every step). */
int64_t muonft_thin_scratch_bytes(int64_t max_numel) {
    const int64_t xs = (max_numel * (int64_t)sizeof(float) + 63) / 64 * 64;
    return xs + (int64_t)MAXR * BLK * (int64_t)sizeof(double);
}

/* One step of n matrices.  scratch: scratch_size >= nthreads * muonft_thin_scratch_bytes(largest numel)
 * bytes, 64-byte aligned (nthreads capped at n and 64).  Returns 0 on success; before touching any
 * matrix, 2 for a matrix with min(rows, cols) > 64 or an empty one, 3 for too little scratch. */
int muonft_thin_step(int64_t n, const int64_t *wp, const int64_t *gp, const int64_t *mp, const int64_t *shape, const double *scal, int ncoef,
                     const double *coeffs, double norm_scale, double norm_eps, int nthreads, void *scratch,
                     int64_t scratch_size) {
    double total = 0.0;
    int64_t most = 1;
    for (int64_t i = 0; i < n; i++) {
        const int64_t rows = shape[2 * i], cols = shape[2 * i + 1];
        const int64_t r = rows < cols ? rows : cols;
        if (r < 1 || r > MAXR) return 2;
        total += (double)(rows * cols);
        if (rows * cols > most) most = rows * cols;
    }
    if (nthreads < 1) nthreads = 1;
    if (nthreads > 64) nthreads = 64;
    if (nthreads > n) nthreads = (int)(n > 0 ? n : 1);
    const int64_t per = muonft_thin_scratch_bytes(most);
    if (per * nthreads > scratch_size || ((intptr_t)scratch & 63)) return 3;
    const int64_t xs_bytes = per - (int64_t)MAXR * BLK * (int64_t)sizeof(double);
    job_t jobs[64];
    pthread_t tids[64];
    int started[64];
    double acc = 0.0;
    int64_t begin = 0;
    for (int t = 0; t < nthreads; t++) { /* contiguous shares of about equal size */
        const double target = total * (t + 1) / nthreads;
        int64_t end = begin;
        while (end < n && (t == nthreads - 1 || acc < target)) {
            acc += (double)(shape[2 * end] * shape[2 * end + 1]);
            end++;
        }
        char *base = (char *)scratch + (int64_t)t * per;
        jobs[t] = (job_t){n, wp, gp, mp, shape, scal, ncoef, coeffs, norm_scale, norm_eps, begin, end,
                          (float *)base, (double *)(base + xs_bytes)};
        begin = end;
    }
    for (int t = 1; t < nthreads; t++)
        started[t] = pthread_create(&tids[t], NULL, run_job, &jobs[t]) == 0;
    run_job(&jobs[0]);
    for (int t = 1; t < nthreads; t++) {
        if (started[t])
            pthread_join(tids[t], NULL);
        else
            run_job(&jobs[t]); /* no thread: run its share here */
    }
    return 0;
}
