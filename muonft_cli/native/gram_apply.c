/* muonft native kernel: the Gram operator of one matrix applied to a thin block, for `muonft diagnose`.
 *
 * For X (m x n, row-major, fp32 or bf16 as stored) and a block V of b fp32 vectors (b a multiple of 8, <= 32):
 *   tall (m >= n):  out (n x b) = X^T (X V)        wide (m < n):  out (m x b) = X (X^T V)
 * with products and sums in fp32.  BLAS does this as two skinny GEMMs, and for a skinny GEMM it re-packs
 * the big matrix on every call (MKL: ~35 % of a diagnose run in its copy routines on an AVX2 CPU) or runs
 * a kernel tuned for wide blocks (oneDNN bf16: 24 columns cost what 32 do).  Here X is streamed row by row:
 * a group of R rows (a bf16 X upcast JC columns at a time into an L1-resident buffer) gives
 *   tall: y = rows . V (R x b, in registers), out += rows^T y     (X read from memory once)
 *   wide: Z += rows^T V[rows] over all rows, then out[rows] = rows . Z   (X read twice)
 * V, out and Z (r x b fp32, <= 32 columns) stay in L2.  One thread per call (diagnose runs one matrix per
 * core).  No Python, no torch: pointers in, 0 or an error code out.
 */
#include <stdint.h>
#include <string.h>

#define BMAX 32
#define RMAX 8
#ifndef JC
#define JC 256 /* columns per chunk: a bf16 row group upcast into RMAX x JC floats (8 KiB, in L1) */
#endif
#define INLINE static inline __attribute__((always_inline))
typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4), may_alias));

INLINE v8 ld8(const float *p) { return *(const v8u *)p; }
INLINE void st8(float *p, v8 v) { *(v8u *)p = v; }

/* rows k < R of the group, columns j0 .. j0+len, as fp32 (row stride ld): X itself when it is fp32, else
 * upcast into buf (R x JC floats, in L1; bf16 -> fp32 is exact) */
INLINE const float *rows_at(const void *X, int bf16, int64_t i0, int R, int64_t n, int64_t j0, int64_t len,
                            float *buf, int64_t *ld) {
    if (!bf16) {
        *ld = n;
        return (const float *)X + i0 * n + j0;
    }
    for (int k = 0; k < R; k++) {
        const uint16_t *src = (const uint16_t *)X + (i0 + k) * n + j0;
        uint32_t *dst = (uint32_t *)buf + k * JC;
#pragma omp simd
        for (int64_t j = 0; j < len; j++) dst[j] = (uint32_t)src[j] << 16;
    }
    *ld = JC;
    return buf;
}

/* the R x b block at p (row-major, b = 8 NV) into vector registers */
INLINE void ld_tile(const int R, const int NV, const float *p, v8 t[RMAX][BMAX / 8]) {
    for (int k = 0; k < R; k++)
        for (int v = 0; v < NV; v++) t[k][v] = ld8(p + k * 8 * NV + 8 * v);
}

/* acc[k, :] += sum_j x[k, j] V[j, :] over len columns, R rows (NV vectors of 8 per row of V, b = 8 NV) */
INLINE void rowdot(const int R, const int NV, const float *restrict x, int64_t ld, int64_t len,
                   const float *restrict V, float *restrict acc) {
    v8 a[RMAX][BMAX / 8];
    ld_tile(R, NV, acc, a);
    for (int64_t j = 0; j < len; j++) {
        const float *vj = V + j * 8 * NV;
        v8 vv[BMAX / 8];
        for (int v = 0; v < NV; v++) vv[v] = ld8(vj + 8 * v);
        for (int k = 0; k < R; k++) {
            const float xk = x[k * ld + j];
            for (int v = 0; v < NV; v++) a[k][v] += xk * vv[v];
        }
    }
    for (int k = 0; k < R; k++)
        for (int v = 0; v < NV; v++) st8(acc + k * 8 * NV + 8 * v, a[k][v]);
}

/* out[j, :] += sum_k x[k, j] y[k, :] over len columns, R rows (y: R x b) */
INLINE void rowouter(const int R, const int NV, const float *restrict x, int64_t ld, int64_t len,
                     const float *restrict y, float *restrict out) {
    v8 yy[RMAX][BMAX / 8];
    ld_tile(R, NV, y, yy);
    for (int64_t j = 0; j < len; j++) {
        float *oj = out + j * 8 * NV;
        v8 o[BMAX / 8];
        for (int v = 0; v < NV; v++) o[v] = ld8(oj + 8 * v);
        for (int k = 0; k < R; k++) {
            const float xk = x[k * ld + j];
            for (int v = 0; v < NV; v++) o[v] += xk * yy[k][v];
        }
        for (int v = 0; v < NV; v++) st8(oj + 8 * v, o[v]);
    }
}

/* one group of R rows starting at i0 (R and NV compile-time constants where apply_nv dispatches), columns in
 * chunks of JC (a bf16 X is upcast chunk by chunk, twice for tall: the rows stay in L1/L2 between) */
INLINE void group(const int R, const int NV, const void *X, int bf16, int64_t i0, int64_t n, const float *V,
                  float *out, float *buf, int tall, int second) {
    const int b = 8 * NV;
    float y[RMAX * BMAX] __attribute__((aligned(32)));
    int64_t ld = n;
    if (tall || second) { /* y = rows . V (tall), or out[rows] = rows . Z (wide, second sweep; V is Z) */
        float *acc = tall ? y : out + i0 * b;
        memset(acc, 0, sizeof(float) * R * b);
        for (int64_t j0 = 0; j0 < n; j0 += JC) {
            const int64_t len = n - j0 < JC ? n - j0 : JC;
            const float *x = rows_at(X, bf16, i0, R, n, j0, len, buf, &ld);
            rowdot(R, NV, x, ld, len, V + j0 * b, acc);
        }
        if (!tall) return;
    }
    /* out += rows^T y (tall), or Z += rows^T V[rows] (wide, first sweep; out is Z) */
    const float *yy = tall ? y : V + i0 * b;
    for (int64_t j0 = 0; j0 < n; j0 += JC) {
        const int64_t len = n - j0 < JC ? n - j0 : JC;
        const float *x = rows_at(X, bf16, i0, R, n, j0, len, buf, &ld);
        rowouter(R, NV, x, ld, len, yy, out + j0 * b);
    }
}

INLINE void sweep(const int R, const int NV, const void *X, int bf16, int64_t m, int64_t n, const float *V,
                  float *out, float *buf, int tall, int second) {
    int64_t i = 0;
    for (; i + R <= m; i += R) group(R, NV, X, bf16, i, n, V, out, buf, tall, second);
    for (; i < m; i++) group(1, NV, X, bf16, i, n, V, out, buf, tall, second);
}

INLINE void apply_nv(const int NV, const void *X, int bf16, int64_t m, int64_t n, const float *V, float *out,
                     float *Z, float *buf) {
    /* rows per group: R x NV accumulators + NV operands within 16 vector registers (AVX2) */
    const int R = NV == 1 ? 8 : NV == 2 ? 6 : NV == 3 ? 4 : 2;
    const int b = 8 * NV;
    if (m >= n) {
        memset(out, 0, sizeof(float) * n * b);
        sweep(R, NV, X, bf16, m, n, V, out, buf, 1, 0);
    } else {
        memset(Z, 0, sizeof(float) * n * b);
        sweep(R, NV, X, bf16, m, n, V, Z, buf, 0, 0);
        sweep(R, NV, X, bf16, m, n, Z, out, buf, 0, 1);
    }
}

/* Scratch floats the call needs: the upcast chunk of a row group (bf16 X) and, for a wide X, Z (n x b). */
int64_t muonft_gram_apply_scratch(int64_t m, int64_t n, int64_t b) {
    return (int64_t)RMAX * JC + (m < n ? n * b : 0);
}

/* out = X^T X V (m >= n; V, out: n x b) or X X^T V (m < n; V, out: m x b), all row-major.
 * Returns 0, or 2 for b not one of 8, 16, 24, 32 or an empty X (nothing written). */
int muonft_gram_apply(const void *X, int bf16, int64_t m, int64_t n, const float *V, int64_t b, float *out,
                      float *scratch) {
    if (m < 1 || n < 1 || b < 8 || b > BMAX || b % 8) return 2;
    float *buf = scratch, *Z = scratch + (int64_t)RMAX * JC;
    switch (b / 8) { /* constant NV: the accumulators stay in registers */
    case 1: apply_nv(1, X, bf16, m, n, V, out, Z, buf); break;
    case 2: apply_nv(2, X, bf16, m, n, V, out, Z, buf); break;
    case 3: apply_nv(3, X, bf16, m, n, V, out, Z, buf); break;
    case 4: apply_nv(4, X, bf16, m, n, V, out, Z, buf); break;
    }
    return 0;
}
