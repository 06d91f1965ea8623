/* The elementwise loops of the kernels (outputs y and dx), computed block by block.
 *
 * Each block of FBN_BLOCK values is computed into a local buffer, then stored: the loads of
 * the next block come after the stores of this one, never interleaved with them. A plain
 * loop stores y[i] and then loads x[i + 4]; when y - x is 16-63 bytes modulo 1 MiB (two
 * equal, consecutive heap allocations of a whole number of MiB in transparent huge pages
 * land exactly there) the CPU takes the load for one that depends on the store and stalls:
 * 3.5x slower on the project machine. Blocks cut that to one stall per block.
 * The expressions are the plain ones (float64, rounded once; -ffp-contract=off), so the
 * results are the same bits as the plain loops, in place (y == x) included.
 */
#ifndef FASTBN_ELEMENTWISE_H
#define FASTBN_ELEMENTWISE_H

#include <stddef.h>

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

#define FBN_DEFINE_ELEMENTWISE(SUFFIX, T)                                                    \
    /* y = (x - m) * sc + b, scalar constants (an NCHW row). */                              \
    static inline void fastbn_apply_##SUFFIX(const T* x, T* y, ptrdiff_t n, double m,        \
                                             double sc, double b) {                          \
        FBN_BLOCKED(T, y, n, ((double)x[i] - m) * sc + b);                                   \
    }                                                                                        \
    /* y = (x - m[i]) * sc[i] + b[i] (an NHWC row, one constant per channel). */             \
    static inline void fastbn_apply_cols_##SUFFIX(const T* x, T* y, ptrdiff_t n,             \
                                                  const double* m, const double* sc,         \
                                                  const double* b) {                         \
        FBN_BLOCKED(T, y, n, ((double)x[i] - m[i]) * sc[i] + b[i]);                          \
    }                                                                                        \
    /* dx = k * ((dy - a) - (x - m) * q), scalar constants. */                               \
    static inline void fastbn_dx_##SUFFIX(const T* g, const T* x, T* d, ptrdiff_t n,         \
                                          double m, double k, double a, double q) {          \
        FBN_BLOCKED(T, d, n, k * (((double)g[i] - a) - ((double)x[i] - m) * q));             \
    }                                                                                        \
    /* dx per channel constants (an NHWC row). */                                            \
    static inline void fastbn_dx_cols_##SUFFIX(const T* g, const T* x, T* d, ptrdiff_t n,    \
                                               const double* m, const double* k,             \
                                               const double* a, const double* q) {           \
        FBN_BLOCKED(T, d, n, k[i] * (((double)g[i] - a[i]) - ((double)x[i] - m[i]) * q[i])); \
    }

FBN_DEFINE_ELEMENTWISE(f32, float)
FBN_DEFINE_ELEMENTWISE(f64, double)

#endif
