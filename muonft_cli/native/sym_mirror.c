/* muonft native kernel: mirror the blocks below the diagonal of symmetric products to the blocks above.
 *
 * muonft_cli.optim.orthogonalize._sym_bmm forms a product that is symmetric in exact arithmetic (X X^T, A^2,
 * products of polynomials in one symmetric matrix) from its blocks on and below the diagonal of a k x k grid
 * of s x s blocks; this copies every block (j, i), j > i, transposed into (i, j).  torch's strided transpose
 * copy moves ~1.4 ns per bf16 element on 2 threads (a sixth of the whole product at 1024 x 1024); this moves
 * 8 x 8 (2-byte) or 4 x 4 (4-byte) tiles through SSE2 registers, 5-9x faster (README "Optimizers").  The
 * copies are exact: the result is bit for bit the torch copy's.  Threads: OpenMP (the pool of the libgomp
 * torch has loaded), over strips of rows of the source blocks; built without OpenMP, one thread.
 * No Python, no torch: a pointer and sizes in, 0 or an error code out.
 */
#include <stdint.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#define T 32 /* rows (and columns) of the source block a strip (and a tile) holds */

/* dst[c*ld + r] = src[r*ld + c] for r < h, c < w: 2-byte elements (bf16, fp16) */
static void tile16(const uint16_t *src, uint16_t *dst, int64_t ld, int64_t h, int64_t w) {
#if defined(__SSE2__)
    if (h % 8 == 0 && w % 8 == 0) {
        for (int64_t r = 0; r < h; r += 8)
            for (int64_t c = 0; c < w; c += 8) {
                const uint16_t *s = src + r * ld + c;
                __m128i a0 = _mm_loadu_si128((const __m128i *)(s + 0 * ld)), a1 = _mm_loadu_si128((const __m128i *)(s + 1 * ld));
                __m128i a2 = _mm_loadu_si128((const __m128i *)(s + 2 * ld)), a3 = _mm_loadu_si128((const __m128i *)(s + 3 * ld));
                __m128i a4 = _mm_loadu_si128((const __m128i *)(s + 4 * ld)), a5 = _mm_loadu_si128((const __m128i *)(s + 5 * ld));
                __m128i a6 = _mm_loadu_si128((const __m128i *)(s + 6 * ld)), a7 = _mm_loadu_si128((const __m128i *)(s + 7 * ld));
                __m128i b0 = _mm_unpacklo_epi16(a0, a1), b1 = _mm_unpackhi_epi16(a0, a1);
                __m128i b2 = _mm_unpacklo_epi16(a2, a3), b3 = _mm_unpackhi_epi16(a2, a3);
                __m128i b4 = _mm_unpacklo_epi16(a4, a5), b5 = _mm_unpackhi_epi16(a4, a5);
                __m128i b6 = _mm_unpacklo_epi16(a6, a7), b7 = _mm_unpackhi_epi16(a6, a7);
                __m128i c0 = _mm_unpacklo_epi32(b0, b2), c1 = _mm_unpackhi_epi32(b0, b2);
                __m128i c2 = _mm_unpacklo_epi32(b1, b3), c3 = _mm_unpackhi_epi32(b1, b3);
                __m128i c4 = _mm_unpacklo_epi32(b4, b6), c5 = _mm_unpackhi_epi32(b4, b6);
                __m128i c6 = _mm_unpacklo_epi32(b5, b7), c7 = _mm_unpackhi_epi32(b5, b7);
                uint16_t *d = dst + c * ld + r;
                _mm_storeu_si128((__m128i *)(d + 0 * ld), _mm_unpacklo_epi64(c0, c4));
                _mm_storeu_si128((__m128i *)(d + 1 * ld), _mm_unpackhi_epi64(c0, c4));
                _mm_storeu_si128((__m128i *)(d + 2 * ld), _mm_unpacklo_epi64(c1, c5));
                _mm_storeu_si128((__m128i *)(d + 3 * ld), _mm_unpackhi_epi64(c1, c5));
                _mm_storeu_si128((__m128i *)(d + 4 * ld), _mm_unpacklo_epi64(c2, c6));
                _mm_storeu_si128((__m128i *)(d + 5 * ld), _mm_unpackhi_epi64(c2, c6));
                _mm_storeu_si128((__m128i *)(d + 6 * ld), _mm_unpacklo_epi64(c3, c7));
                _mm_storeu_si128((__m128i *)(d + 7 * ld), _mm_unpackhi_epi64(c3, c7));
            }
        return;
    }
#endif
    for (int64_t r = 0; r < h; r++)
        for (int64_t c = 0; c < w; c++) dst[c * ld + r] = src[r * ld + c];
}

/* the same for 4-byte elements (fp32) */
static void tile32(const uint32_t *src, uint32_t *dst, int64_t ld, int64_t h, int64_t w) {
#if defined(__SSE2__)
    if (h % 4 == 0 && w % 4 == 0) {
        for (int64_t r = 0; r < h; r += 4)
            for (int64_t c = 0; c < w; c += 4) {
                const uint32_t *s = src + r * ld + c;
                __m128i a0 = _mm_loadu_si128((const __m128i *)(s + 0 * ld)), a1 = _mm_loadu_si128((const __m128i *)(s + 1 * ld));
                __m128i a2 = _mm_loadu_si128((const __m128i *)(s + 2 * ld)), a3 = _mm_loadu_si128((const __m128i *)(s + 3 * ld));
                __m128i b0 = _mm_unpacklo_epi32(a0, a1), b1 = _mm_unpackhi_epi32(a0, a1);
                __m128i b2 = _mm_unpacklo_epi32(a2, a3), b3 = _mm_unpackhi_epi32(a2, a3);
                uint32_t *d = dst + c * ld + r;
                _mm_storeu_si128((__m128i *)(d + 0 * ld), _mm_unpacklo_epi64(b0, b2));
                _mm_storeu_si128((__m128i *)(d + 1 * ld), _mm_unpackhi_epi64(b0, b2));
                _mm_storeu_si128((__m128i *)(d + 2 * ld), _mm_unpacklo_epi64(b1, b3));
                _mm_storeu_si128((__m128i *)(d + 3 * ld), _mm_unpackhi_epi64(b1, b3));
            }
        return;
    }
#endif
    for (int64_t r = 0; r < h; r++)
        for (int64_t c = 0; c < w; c++) dst[c * ld + r] = src[r * ld + c];
}

/* base: b contiguous row-major n x n matrices of elsize-byte elements (2 or 4), n = k s.  Every block above
 * the diagonal of the k x k grid of s x s blocks becomes the transpose of its mirror below; the blocks on and
 * below the diagonal are read only.  Returns 1 (nothing written) for another elsize or an s that does not
 * divide n. */
int muonft_sym_mirror(void *base, int elsize, int64_t b, int64_t n, int64_t s, int threads) {
    if ((elsize != 2 && elsize != 4) || s <= 0 || n % s) return 1;
    const int64_t k = n / s, pairs = k * (k - 1) / 2, tpb = (s + T - 1) / T, items = b * pairs * tpb;
    /* an item: (matrix, block pair, strip of T rows of the source block) */
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t it = 0; it < items; it++) {
        int64_t m = it / (pairs * tpb), rest = it % (pairs * tpb), p = rest / tpb, strip = rest % tpb;
        int64_t j = 1, q = p; /* pair p -> (j, i), i < j: row blocks below */
        while (q >= j) { q -= j; j++; }
        const int64_t i = q;
        const int64_t r0 = strip * T, h = (s - r0 < T) ? s - r0 : T;
        if (elsize == 2) {
            uint16_t *M = (uint16_t *)base + m * n * n;
            const uint16_t *src = M + (j * s + r0) * n + i * s; /* block (j, i), rows r0.. */
            uint16_t *dst = M + (i * s) * n + j * s + r0;     /* block (i, j), cols r0.. */
            for (int64_t c = 0; c < s; c += T) tile16(src + c, dst + c * n, n, h, (s - c < T) ? s - c : T);
        } else {
            uint32_t *M = (uint32_t *)base + m * n * n;
            const uint32_t *src = M + (j * s + r0) * n + i * s;
            uint32_t *dst = M + (i * s) * n + j * s + r0;
            for (int64_t c = 0; c < s; c += T) tile32(src + c, dst + c * n, n, h, (s - c < T) ? s - c : T);
        }
    }
    return 0;
}
