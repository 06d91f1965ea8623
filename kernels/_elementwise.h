/* The elementwise loops of the kernels (outputs y and dx), computed block by block.
 *
 * Each block of FBN_BLOCK values is computed into a local buffer, then stored: the loads of
 * the next block come after the stores of this one, never interleaved with them. A plain
 * loop stores y[i] and then loads x[i + 4]; when y - x is 16-63 bytes modulo 1 MiB (two
 * equal, consecutive heap allocations of a whole number of MiB in transparent huge pages
 * land exactly there) the CPU takes the load for one that depends on the store and stalls:
 * 3.5x slower on the project machine. Blocks cut that to one stall per block.
 * The expressions are the plain ones (float64, rounded once; -ffp-contract=off), so the
 * results are the same bits as the plain loops, in place (y == x) included, and as the
 * streamed loops of _stream_stores.h (same expressions).
 */
#ifndef FASTBN_ELEMENTWISE_H
#define FASTBN_ELEMENTWISE_H

#include <stddef.h>

#include "_simd.h"

#define FBN_BLOCK 64

/* Apply EXPR(i) for i in [0, n) into OUT, block by block. */
#define FBN_BLOCKED(T, OUT, n, EXPR)                                     \
    do {                                                                 \
        ptrdiff_t i0_ = 0;                                               \
        T blk_[FBN_BLOCK];                                               \
        for (; i0_ + FBN_BLOCK <= (n); i0_ += FBN_BLOCK) {               \
            for (int l_ = 0; l_ < FBN_BLOCK; l_++) {                     \
                ptrdiff_t i = i0_ + l_;                                  \
                blk_[l_] = (T)(EXPR);                                    \
            }                                                            \
            for (int l_ = 0; l_ < FBN_BLOCK; l_++) (OUT)[i0_ + l_] = blk_[l_]; \
        }                                                                \
        for (ptrdiff_t i = i0_; i < (n); i++) (OUT)[i] = (T)(EXPR);      \
    } while (0)

/* Float32 outputs, EXPR(i) into OUT for i in [0, n). With wide vectors (FBN_WIDE) the
 * values come from VEXPR, the same operations on FBN_W values from index j (the FBN_V_*
 * forms below): a block of vectors is computed, then stored, then the remaining whole
 * vectors, then single values. gcc's own vector loops for these expressions put a lane
 * shuffle (vextract/vinsert) around each conversion between float32 and float64; in a C
 * loop over rows in L2, one core: x * sc + c 6.2 -> 7.8 G values/s (AVX-512; 3.4 -> 6.4
 * with AVX2), the dx expression 3.2 -> 3.8 (2.2 -> 3.7). A block holds at most FBN_VB
 * vectors: AVX2 has 16 vector registers, and a block of 16 vectors spilled some to the
 * stack (a C loop over 7x7 groups of 20 channels in L2, one core of a Zen 3: the dx
 * expression from tables 1.77 -> 2.28 G values/s with blocks of 8 vectors, from scalars
 * 2.83 -> 3.84, x * sc + c from tables 4.17 -> 5.71; blocks of 4 vectors: 1.94, 3.47,
 * 4.25). In the kernels, whose data mostly comes from memory (2 threads, the previous
 * extension loaded beside this one): training backward 0.92x-0.98x of the time, forward
 * and inference 0.97x-1.04x. The AVX-512 build's blocks (8 vectors of 8) are unchanged. */
#define FBN_VB 8
#if FBN_WIDE
#define FBN_BLOCKED_F32(OUT, n, EXPR, VEXPR)                                                 \
    do {                                                                                     \
        ptrdiff_t i = 0;                                                                     \
        for (; i + FBN_VB * FBN_W <= (n); i += FBN_VB * FBN_W) {                             \
            fbn_vd v_[FBN_VB];                                                               \
            for (int l_ = 0; l_ < FBN_VB; l_++) {                                            \
                ptrdiff_t j = i + l_ * FBN_W;                                                \
                v_[l_] = (VEXPR);                                                            \
            }                                                                                \
            for (int l_ = 0; l_ < FBN_VB; l_++)                                              \
                fbn_storef((OUT) + i + l_ * FBN_W, v_[l_]);                                  \
        }                                                                                    \
        for (; i + FBN_W <= (n); i += FBN_W) {                                               \
            ptrdiff_t j = i;                                                                 \
            fbn_storef((OUT) + i, (VEXPR));                                                  \
        }                                                                                    \
        for (; i < (n); i++) (OUT)[i] = (float)(EXPR);                                       \
    } while (0)
#else
#define FBN_BLOCKED_F32(OUT, n, EXPR, VEXPR) FBN_BLOCKED(float, OUT, n, EXPR)
#endif
/* x * s + c and k * ((g - a) - (x - m) * q) on FBN_W values from float32 pointers: the
 * operations of the scalar expressions, in their order (s, c, k, a, m, q: vectors). */
#define FBN_V_APPLY(X, S, C) fbn_add(fbn_mul(fbn_loadf(X), (S)), (C))
#define FBN_V_DX(G, X, M, K, A, Q) \
    fbn_mul((K), fbn_sub(fbn_sub(fbn_loadf(G), (A)), fbn_mul(fbn_sub(fbn_loadf(X), (M)), (Q))))

/* The shift of the float32 apply: y = x * sc + (b - m * sc), see fastbn_apply_f32. */
static inline double fastbn_shift(double m, double sc, double b) { return b - m * sc; }

/* float32: y = x * sc + shift (fastbn_shift) in float64, rounded once to float32. The
 * shift's roundings (about 2^-52 |m * sc|) stay below the output's half ulp (2^-25 |y|)
 * unless |m * sc| / |y| nears 2^27, far beyond what float32 data (24 bits) can resolve;
 * it takes one table and one operation fewer than (x - m) * sc + b (a C loop over 7x7
 * position tables in cache: 3.7 -> 5.6 G values/s per core; the kernels on one core,
 * same process: normalize 1.09-1.24x, training forward 1.05-1.13x faster). The two
 * round differently only near float32 ties when |m| / std is large (tested). float64 keeps
 * (x - m) * sc + b, whose exact difference its outputs need. */
static inline void fastbn_apply_f32(const float* x, float* y, ptrdiff_t n, double m, double sc,
                                    double b) {
    double c = fastbn_shift(m, sc, b);
#if FBN_WIDE
    fbn_vd vs = fbn_set1(sc), vc = fbn_set1(c);
#endif
    FBN_BLOCKED_F32(y, n, (double)x[i] * sc + c, FBN_V_APPLY(x + j, vs, vc));
}
/* y = x * sc[i] + c[i], the float32 apply with per-value constants (c: shifts). */
static inline void fastbn_apply_cols_f32(const float* x, float* y, ptrdiff_t n,
                                         const double* sc, const double* c) {
    FBN_BLOCKED_F32(y, n, (double)x[i] * sc[i] + c[i],
                    FBN_V_APPLY(x + j, fbn_loadd(sc + j), fbn_loadd(c + j)));
}
/* float64: y = (x - m) * sc + b, scalar constants (an NCHW row). */
static inline void fastbn_apply_f64(const double* x, double* y, ptrdiff_t n, double m,
                                    double sc, double b) {
    FBN_BLOCKED(double, y, n, (x[i] - m) * sc + b);
}
/* y = (x - m[i]) * sc[i] + b[i] (an NHWC row, one constant per channel). */
static inline void fastbn_apply_cols_f64(const double* x, double* y, ptrdiff_t n,
                                         const double* m, const double* sc, const double* b) {
    FBN_BLOCKED(double, y, n, (x[i] - m[i]) * sc[i] + b[i]);
}

/* dx = k * ((dy - a) - (x - m) * q), scalar constants. */
static inline void fastbn_dx_f32(const float* g, const float* x, float* d, ptrdiff_t n,
                                 double m, double k, double a, double q) {
#if FBN_WIDE
    fbn_vd vm = fbn_set1(m), vk = fbn_set1(k), va = fbn_set1(a), vq = fbn_set1(q);
#endif
    FBN_BLOCKED_F32(d, n, k * (((double)g[i] - a) - ((double)x[i] - m) * q),
                    FBN_V_DX(g + j, x + j, vm, vk, va, vq));
}
static inline void fastbn_dx_f64(const double* g, const double* x, double* d, ptrdiff_t n,
                                 double m, double k, double a, double q) {
    FBN_BLOCKED(double, d, n, k * ((g[i] - a) - (x[i] - m) * q));
}
/* dx per channel constants (an NHWC row). */
static inline void fastbn_dx_cols_f32(const float* g, const float* x, float* d, ptrdiff_t n,
                                      const double* m, const double* k, const double* a,
                                      const double* q) {
    FBN_BLOCKED_F32(d, n, k[i] * (((double)g[i] - a[i]) - ((double)x[i] - m[i]) * q[i]),
                    FBN_V_DX(g + j, x + j, fbn_loadd(m + j), fbn_loadd(k + j),
                             fbn_loadd(a + j), fbn_loadd(q + j)));
}
static inline void fastbn_dx_cols_f64(const double* g, const double* x, double* d, ptrdiff_t n,
                                      const double* m, const double* k, const double* a,
                                      const double* q) {
    FBN_BLOCKED(double, d, n, k[i] * ((g[i] - a[i]) - (x[i] - m[i]) * q[i]));
}

#endif
