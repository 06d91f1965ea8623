/* Streaming (non-temporal) stores for fastbn's large outputs.
 *
 * An ordinary store to a line that is not in cache first reads that line from memory
 * (read-for-ownership), so writing an output as large as the input costs one memory pass
 * more than needed. A streaming store writes whole lines straight to memory. The functions
 * below are the elementwise loops of the NCHW kernels (_apply and _dx) with the body
 * written with SIMD intrinsics and streaming stores: ordinary stores up to the first
 * vector-aligned output address, aligned streaming stores for the body, ordinary stores
 * for the tail.
 *
 * Same bits as the plain loops: every value is computed with the same IEEE operations in the
 * same order (float32 widened exactly to float64, sub/mul/add in float64, one rounding to
 * float32 in the default rounding mode), and the build uses -ffp-contract=off so nothing is
 * fused into FMA. The x86-64-v3 (or AVX) build uses 256-bit vectors, the baseline SSE2 build
 * 128-bit ones; other targets get the plain loops (FASTBN_STREAM_STORES == 0).
 *
 * Streaming stores are weakly ordered: a thread calls fastbn_sfence() after its last one,
 * before its part of the parallel region ends.
 */
#ifndef FASTBN_STREAM_STORES_H
#define FASTBN_STREAM_STORES_H

#include <stddef.h>
#include <stdint.h>
#include <unistd.h>

#include "_simd.h"

/* Streaming stores exist wherever the SIMD vocabulary does. */
#define FASTBN_STREAM_STORES FASTBN_SIMD
#if FASTBN_SIMD
    #define fastbn_sfence() _mm_sfence()
#else
    #define fastbn_sfence() ((void)0)
#endif

/* Elements before the first cache-line-aligned address of p (all of n if never aligned).
 * The body starts on a whole line, not just on a vector: a block of streaming stores then
 * fills whole lines. Started mid-line (numpy's large arrays start 16 bytes into a page),
 * every block left two lines half written, which the write-combining buffers flush as
 * partial writes: the (64, 256, 56, 56) float32 inference took 26 ms instead of 21 ms. */
#define FBN_LINE 64u
#define FBN_HEAD(p, n, size) fbn_head((uintptr_t)(p), (n), (size))
static inline ptrdiff_t fbn_head(uintptr_t a, ptrdiff_t n, size_t size) {
#if FASTBN_STREAM_STORES
    ptrdiff_t h;
    if (a % size) return n;
    h = (ptrdiff_t)(((FBN_LINE - a % FBN_LINE) % FBN_LINE) / size);
    return h < n ? h : n;
#else
    (void)a; (void)size;
    return n;
#endif
}

/* The body is computed block by block into a local buffer (FBN_SBLOCK doubles, plain C
 * expressions), then streamed: loads of x never follow the stores of the same block (see
 * _elementwise.h: interleaved, they stalled 3.5x when the output sits 16-63 bytes after the
 * input modulo 1 MiB). */
#define FBN_SBLOCK 64
#define FBN_STREAM_BODY_F32(EXPR)                                                \
    for (; i + FBN_SBLOCK <= n; i += FBN_SBLOCK) {                               \
        double t_[FBN_SBLOCK];                                                   \
        for (int l = 0; l < FBN_SBLOCK; l++) {                                   \
            ptrdiff_t j = i + l;                                                 \
            t_[l] = (EXPR);                                                      \
        }                                                                        \
        for (int l = 0; l < FBN_SBLOCK; l += 2 * FBN_W)                          \
            fbn_streamf(y_ + i + l, fbn_loadd(t_ + l), fbn_loadd(t_ + l + FBN_W)); \
    }
#define FBN_STREAM_BODY_F64(EXPR)                                                \
    for (; i + FBN_SBLOCK <= n; i += FBN_SBLOCK) {                               \
        double t_[FBN_SBLOCK];                                                   \
        for (int l = 0; l < FBN_SBLOCK; l++) {                                   \
            ptrdiff_t j = i + l;                                                 \
            t_[l] = (EXPR);                                                      \
        }                                                                        \
        for (int l = 0; l < FBN_SBLOCK; l += FBN_W) fbn_streamd(y_ + i + l, fbn_loadd(t_ + l)); \
    }

/* y = (x - m) * sc + b, scalar constants (NCHW rows). */
static void fastbn_apply_nt_f32(const float* x, float* y, ptrdiff_t n, double m, double sc,
                                double b) {
    ptrdiff_t i = 0, h = FBN_HEAD(y, n, sizeof(float));
    for (; i < h; i++) y[i] = (float)((x[i] - m) * sc + b);
#if FASTBN_STREAM_STORES
    float* y_ = y;
    FBN_STREAM_BODY_F32(((double)x[j] - m) * sc + b)
#endif
    for (; i < n; i++) y[i] = (float)((x[i] - m) * sc + b);
}
static void fastbn_apply_nt_f64(const double* x, double* y, ptrdiff_t n, double m, double sc,
                                double b) {
    ptrdiff_t i = 0, h = FBN_HEAD(y, n, sizeof(double));
    for (; i < h; i++) y[i] = (x[i] - m) * sc + b;
#if FASTBN_STREAM_STORES
    double* y_ = y;
    FBN_STREAM_BODY_F64((x[j] - m) * sc + b)
#endif
    for (; i < n; i++) y[i] = (x[i] - m) * sc + b;
}

/* dx = k * ((dy - a) - (x - m) * q), scalar constants (NCHW rows). */
static void fastbn_dx_nt_f32(const float* g, const float* x, float* d, ptrdiff_t n, double m,
                             double k, double a, double q) {
    ptrdiff_t i = 0, h = FBN_HEAD(d, n, sizeof(float));
    for (; i < h; i++) d[i] = (float)(k * ((g[i] - a) - (x[i] - m) * q));
#if FASTBN_STREAM_STORES
    float* y_ = d;
    FBN_STREAM_BODY_F32(k * (((double)g[j] - a) - ((double)x[j] - m) * q))
#endif
    for (; i < n; i++) d[i] = (float)(k * ((g[i] - a) - (x[i] - m) * q));
}
static void fastbn_dx_nt_f64(const double* g, const double* x, double* d, ptrdiff_t n,
                             double m, double k, double a, double q) {
    ptrdiff_t i = 0, h = FBN_HEAD(d, n, sizeof(double));
    for (; i < h; i++) d[i] = k * ((g[i] - a) - (x[i] - m) * q);
#if FASTBN_STREAM_STORES
    double* y_ = d;
    FBN_STREAM_BODY_F64(k * ((g[j] - a) - (x[j] - m) * q))
#endif
    for (; i < n; i++) d[i] = k * ((g[i] - a) - (x[i] - m) * q);
}

/* Size of the last-level cache in bytes (0 when the OS does not say). */
static long fastbn_llc_bytes(void) {
    long v = 0;
#if defined(_SC_LEVEL3_CACHE_SIZE)
    v = sysconf(_SC_LEVEL3_CACHE_SIZE);
    if (v <= 0) v = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    return v > 0 ? v : 0;
}

#endif
