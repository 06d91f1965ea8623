/* Streaming (non-temporal) stores for fastbn's large outputs.
 *
 * An ordinary store to a line that is not in cache first reads that line from memory
 * (read-for-ownership), so writing an output as large as the input costs one memory pass
 * more than needed. A streaming store writes whole lines straight to memory. The functions
 * below are the elementwise loops of the kernels (apply and dx: NCHW rows, and NHWC runs of
 * whole rows) with the body written with SIMD intrinsics and streaming stores: ordinary
 * stores up to the first cache-line-aligned output address, aligned streaming stores for
 * the body, ordinary stores for the tail.
 *
 * The body is blocks of FBN_SBLOCK values, then the whole lines left one at a time
 * (FBN_LINE_OF), so that ordinary stores write no more than the partial lines at the two
 * ends of a run: an ordinary store to a line that is not in cache reads it from memory
 * first. With a tail of up to a block (up to 4 lines of float32) left to ordinary stores,
 * the (128, 512, 7, 7) float32 training forward, whose groups write runs of 980 values,
 * took 1.07x-1.12x as long, and groups of 14 channels (runs of 686 values, tails of 31-46
 * values) 1.20x-1.26x as long as groups of 20.
 *
 * Same bits as the plain loops: every value is computed with the same IEEE operations in the
 * same order as in _elementwise.h (float32 widened exactly to float64, mul/add or
 * sub/mul/add in float64, one rounding to float32 in the default rounding mode), and the
 * build uses -ffp-contract=off so nothing is fused into FMA. The x86-64-v3 (or AVX) build
 * uses 256-bit vectors, the baseline SSE2 build 128-bit ones; other targets get the plain
 * loops (FASTBN_STREAM_STORES == 0).
 *
 * Streaming stores are weakly ordered: a thread calls fastbn_sfence() after its last one,
 * before its part of the parallel region ends.
 */
#ifndef FASTBN_STREAM_STORES_H
#define FASTBN_STREAM_STORES_H

#include <stddef.h>
#include <stdint.h>
#include <unistd.h>

#include "_elementwise.h"
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

/* The body is computed block by block (FBN_SBLOCK values: into a local buffer of doubles
 * from plain C expressions, or into vectors for float32 with wide vectors), then streamed:
 * loads of x never follow the stores of the same block (see _elementwise.h: interleaved,
 * they stalled 3.5x when the output sits 16-63 bytes after the input modulo 1 MiB). OUT is
 * the output, EXPR the value at index j (of channel c + l in the NHWC loops). */
#define FBN_SBLOCK 64
/* Values of OUT's type in one cache line: after the blocks, the whole lines left are
 * streamed one at a time, so that ordinary stores write at most the partial lines at the
 * two ends of a run. */
#define FBN_LINE_OF(OUT) ((ptrdiff_t)(FBN_LINE / sizeof(*(OUT))))
#if FASTBN_STREAM_STORES
/* One block: EXPR for j in [i, i + FBN_SBLOCK), channel c (NHWC), into OUT. */
#define FBN_STREAM_ONE(OUT, EXPR, STORE_BLOCK, NB)                                           \
    {                                                                                        \
        double t_[NB];                                                                       \
        for (int l = 0; l < (NB); l++) {                                                     \
            ptrdiff_t j = i + l;                                                             \
            t_[l] = (EXPR);                                                                  \
        }                                                                                    \
        STORE_BLOCK((OUT) + i, t_, NB);                                                      \
    }
/* The body, block by block (ONE(OUT, EXPR) computes and streams the block at i: the
 * FBN_STREAM_ONE_* below): a long body is walked as NS parts of q blocks, a block
 * of each in turn (fbn_stream_part of _simd.h), then the remaining blocks in order. c is the
 * channel of the block's first value, CC the channel count (NHWC runs; NCHW rows pass 1 and
 * their EXPR ignores c). */
#define FBN_STREAM_BODY(OUT, EXPR, CC, ONE, NS)                                              \
    {                                                                                        \
        ptrdiff_t q_ = fbn_stream_part_of(n - i, FBN_SBLOCK, NS) / FBN_SBLOCK;               \
        if (q_ > 0) {                                                                        \
            ptrdiff_t i_[NS], c_[NS];                                                        \
            for (int s_ = 0; s_ < NS; s_++) {                                                \
                i_[s_] = i + s_ * q_ * FBN_SBLOCK;                                           \
                c_[s_] = (c + s_ * q_ * FBN_SBLOCK) % (CC);                                  \
            }                                                                                \
            for (ptrdiff_t k_ = 0; k_ < q_; k_++)                                            \
                for (int s_ = 0; s_ < NS; s_++) {                                            \
                    ptrdiff_t i = i_[s_], c = c_[s_];                                        \
                    ONE(OUT, EXPR, FBN_SBLOCK)                                               \
                    i_[s_] = i + FBN_SBLOCK;                                                 \
                    c_[s_] = (c + FBN_SBLOCK) % (CC);                                        \
                }                                                                            \
            i += (NS) * q_ * FBN_SBLOCK;                                                     \
            c = (c + (NS) * q_ * FBN_SBLOCK) % (CC);                                         \
        }                                                                                    \
        for (; i + FBN_SBLOCK <= n; i += FBN_SBLOCK) {                                       \
            ONE(OUT, EXPR, FBN_SBLOCK)                                                       \
            c = (c + FBN_SBLOCK) % (CC);                                                     \
        }                                                                                    \
        for (; i + FBN_LINE_OF(OUT) <= n; i += FBN_LINE_OF(OUT)) {                           \
            ONE(OUT, EXPR, FBN_LINE_OF(OUT))                                                 \
            c = (c + FBN_LINE_OF(OUT)) % (CC);                                               \
        }                                                                                    \
    }
/* Stream the FBN_SBLOCK doubles of t to p: rounded to float32 (two vectors make one of
 * floats), or as they are. */
#define FBN_STREAM_BLOCK_F32(p, t, NB)                                                       \
    for (int l = 0; l < (NB); l += 2 * FBN_W)                                                \
    fbn_streamf((p) + l, fbn_loadd((t) + l), fbn_loadd((t) + l + FBN_W))
#define FBN_STREAM_BLOCK_F64(p, t, NB)                                                       \
    for (int l = 0; l < (NB); l += FBN_W) fbn_streamd((p) + l, fbn_loadd((t) + l))
#define FBN_STREAM_ONE_F64(OUT, EXPR, NB) FBN_STREAM_ONE(OUT, EXPR, FBN_STREAM_BLOCK_F64, NB)
#if FBN_WIDE
/* Float32 with wide vectors: the block's vectors come from VEXPR (the FBN_V_* forms of
 * _elementwise.h, FBN_W values from index j, constants from c + l) at most FBN_VB at a
 * time, then are rounded and streamed; as the plain loops, without gcc's lane shuffles. */
#define FBN_SUB_OF(NB) ((NB) < FBN_VB * FBN_W ? (NB) : FBN_VB * FBN_W)
#define FBN_STREAM_ONE_F32(OUT, VEXPR, NB)                                                   \
    for (int b_ = 0; b_ < (NB); b_ += FBN_SUB_OF(NB)) {                                      \
        fbn_vd v_[FBN_SUB_OF(NB) / FBN_W];                                                   \
        for (int l_ = 0; l_ < FBN_SUB_OF(NB) / FBN_W; l_++) {                                \
            int l = b_ + l_ * FBN_W;                                                         \
            ptrdiff_t j = i + l;                                                             \
            v_[l_] = (VEXPR);                                                                \
        }                                                                                    \
        for (int l_ = 0; l_ < FBN_SUB_OF(NB) / FBN_W; l_ += 2)                               \
            fbn_streamf((OUT) + i + b_ + l_ * FBN_W, v_[l_], v_[l_ + 1]);                    \
    }
#define FBN_STREAM_BODY_F32(OUT, EXPR, VEXPR, CC, NS)                                        \
    FBN_STREAM_BODY(OUT, VEXPR, CC, FBN_STREAM_ONE_F32, NS)
#else
#define FBN_STREAM_ONE_F32(OUT, EXPR, NB) FBN_STREAM_ONE(OUT, EXPR, FBN_STREAM_BLOCK_F32, NB)
#define FBN_STREAM_BODY_F32(OUT, EXPR, VEXPR, CC, NS)                                        \
    FBN_STREAM_BODY(OUT, EXPR, CC, FBN_STREAM_ONE_F32, NS)
#endif
#define FBN_STREAM_BODY_F64(OUT, EXPR, VEXPR, CC, NS)                                        \
    FBN_STREAM_BODY(OUT, EXPR, CC, FBN_STREAM_ONE_F64, NS)
#else
#define FBN_STREAM_BODY_F32(OUT, EXPR, VEXPR, CC, NS)
#define FBN_STREAM_BODY_F64(OUT, EXPR, VEXPR, CC, NS)
#endif

/* y = x * sc + shift (float32, see fastbn_apply_f32) or (x - m) * sc + b (float64), scalar
 * constants (NCHW rows). */
static void fastbn_apply_nt_f32(const float* x, float* y, ptrdiff_t n, double m, double sc,
                                double b) {
    ptrdiff_t i = 0, c = 0, h = FBN_HEAD(y, n, sizeof(float));
    double s = fastbn_shift(m, sc, b);
#if FBN_WIDE
    fbn_vd vs = fbn_set1(sc), vc = fbn_set1(s);
#endif
    for (; i < h; i++) y[i] = (float)((double)x[i] * sc + s);
    FBN_STREAM_BODY_F32(y, (double)x[j] * sc + s, FBN_V_APPLY(x + j, vs, vc), 1, FBN_STREAMS)
    for (; i < n; i++) y[i] = (float)((double)x[i] * sc + s);
}
static void fastbn_apply_nt_f64(const double* x, double* y, ptrdiff_t n, double m, double sc,
                                double b) {
    ptrdiff_t i = 0, c = 0, h = FBN_HEAD(y, n, sizeof(double));
    for (; i < h; i++) y[i] = (x[i] - m) * sc + b;
    FBN_STREAM_BODY_F64(y, (x[j] - m) * sc + b, , 1, FBN_STREAMS)
    for (; i < n; i++) y[i] = (x[i] - m) * sc + b;
}

/* dx = k * ((dy - a) - (x - m) * q), scalar constants (NCHW rows). */
static void fastbn_dx_nt_f32(const float* g, const float* x, float* d, ptrdiff_t n, double m,
                             double k, double a, double q) {
    ptrdiff_t i = 0, c = 0, h = FBN_HEAD(d, n, sizeof(float));
#if FBN_WIDE
    fbn_vd vm = fbn_set1(m), vk = fbn_set1(k), va = fbn_set1(a), vq = fbn_set1(q);
#endif
    for (; i < h; i++) d[i] = (float)(k * ((g[i] - a) - (x[i] - m) * q));
    FBN_STREAM_BODY_F32(d, k * (((double)g[j] - a) - ((double)x[j] - m) * q),
                        FBN_V_DX(g + j, x + j, vm, vk, va, vq), 1, FBN_DX_STREAMS)
    for (; i < n; i++) d[i] = (float)(k * ((g[i] - a) - (x[i] - m) * q));
}
static void fastbn_dx_nt_f64(const double* g, const double* x, double* d, ptrdiff_t n,
                             double m, double k, double a, double q) {
    ptrdiff_t i = 0, c = 0, h = FBN_HEAD(d, n, sizeof(double));
    for (; i < h; i++) d[i] = k * ((g[i] - a) - (x[i] - m) * q);
    FBN_STREAM_BODY_F64(d, k * ((g[j] - a) - (x[j] - m) * q), , 1, FBN_DX_STREAMS)
    for (; i < n; i++) d[i] = k * ((g[i] - a) - (x[i] - m) * q);
}

/* NCHW rows: nr consecutive rows of S values, row r with the constants of channel
 * (c0 + r) % C (nchw_normalize's block of rows). A row alone is too short for the streams
 * of fbn_stream_part, so the rows are cut into FBN_STREAMS parts of consecutive rows, walked
 * a block of each in turn; each row: ordinary stores up to its first whole line, streamed
 * blocks and lines, an ordinary partial line. The values are those of the row-by-row loops. On the project
 * machine, (64, 256, 56, 56) float32 inference: 24-26 -> 17-19 ms. */
#if FASTBN_STREAM_STORES
/* The value at index j of a row of channel c (the expressions of fastbn_apply_nt_*). */
#define FBN_ROW_EXPR_f32 ((double)x[j] * sc[c] + fastbn_shift(m[c], sc[c], b[c]))
#define FBN_ROW_EXPR_f64 ((x[j] - m[c]) * sc[c] + b[c])
/* One streamed block of a row (FBN_STREAM_ONE_*: vectors for float32 with wide vectors). */
#if FBN_WIDE
#define FBN_ROW_BLOCK_f32(NB)                                                                \
    FBN_STREAM_ONE_F32(y, FBN_V_APPLY(x + j, fbn_set1(sc[c]),                                \
                                      fbn_set1(fastbn_shift(m[c], sc[c], b[c]))), NB)
#else
#define FBN_ROW_BLOCK_f32(NB) FBN_STREAM_ONE_F32(y, FBN_ROW_EXPR_f32, NB)
#endif
#define FBN_ROW_BLOCK_f64(NB) FBN_STREAM_ONE_F64(y, FBN_ROW_EXPR_f64, NB)
#define FBN_ROW_VALUE(T, SUFFIX)                                                             \
    {                                                                                        \
        ptrdiff_t j = o + i;                                                                 \
        y[j] = (T)(FBN_ROW_EXPR_##SUFFIX);                                                   \
    }
#define FBN_DEFINE_ROWS_NT(SUFFIX, T)                                                        \
    static void fastbn_apply_rows_nt_##SUFFIX(const T* x, T* y, ptrdiff_t nr, ptrdiff_t S,   \
                                              ptrdiff_t C, ptrdiff_t c0, const double* m,    \
                                              const double* sc, const double* b) {           \
        ptrdiff_t q = nr / FBN_STREAMS, r_[FBN_STREAMS], i_[FBN_STREAMS], e_[FBN_STREAMS];   \
        int live = 1;                                                                        \
        if (q == 0 || q * S < FBN_STREAM_MIN) {                                              \
            for (ptrdiff_t r = 0; r < nr; r++) {                                             \
                ptrdiff_t c = (c0 + r) % C;                                                  \
                fastbn_apply_nt_##SUFFIX(x + r * S, y + r * S, S, m[c], sc[c], b[c]);        \
            }                                                                                \
            return;                                                                          \
        }                                                                                    \
        for (int s = 0; s < FBN_STREAMS; s++) {                                              \
            r_[s] = s * q;                                                                   \
            e_[s] = s == FBN_STREAMS - 1 ? nr : (s + 1) * q;                                 \
            i_[s] = 0;                                                                       \
        }                                                                                    \
        while (live) {                                                                       \
            live = 0;                                                                        \
            for (int s = 0; s < FBN_STREAMS; s++) {                                          \
                ptrdiff_t r = r_[s], i = i_[s], c = (c0 + r) % C, o = r * S;                 \
                if (r == e_[s]) continue;                                                    \
                live = 1;                                                                    \
                if (i == 0)                                                                  \
                    for (ptrdiff_t h = FBN_HEAD(y + o, S, sizeof(T)); i < h; i++)            \
                        FBN_ROW_VALUE(T, SUFFIX)                                             \
                if (i + FBN_SBLOCK <= S) {                                                   \
                    ptrdiff_t i0 = i;                                                        \
                    i = o + i0;                                                              \
                    FBN_ROW_BLOCK_##SUFFIX(FBN_SBLOCK)                                       \
                    i = i0 + FBN_SBLOCK;                                                     \
                } else {                                                                     \
                    for (; i + FBN_LINE_OF(y) <= S; i += FBN_LINE_OF(y)) {                   \
                        ptrdiff_t i0 = i;                                                    \
                        i = o + i0;                                                          \
                        FBN_ROW_BLOCK_##SUFFIX(FBN_LINE_OF(y))                               \
                        i = i0;                                                              \
                    }                                                                        \
                    for (; i < S; i++) FBN_ROW_VALUE(T, SUFFIX)                              \
                }                                                                            \
                if (i == S) {                                                                \
                    r_[s] = r + 1;                                                           \
                    i = 0;                                                                   \
                }                                                                            \
                i_[s] = i;                                                                   \
            }                                                                                \
        }                                                                                    \
    }
FBN_DEFINE_ROWS_NT(f32, float)
FBN_DEFINE_ROWS_NT(f64, double)
#else
#define FBN_DEFINE_ROWS_NT(SUFFIX, T)                                                        \
    static void fastbn_apply_rows_nt_##SUFFIX(const T* x, T* y, ptrdiff_t nr, ptrdiff_t S,   \
                                              ptrdiff_t C, ptrdiff_t c0, const double* m,    \
                                              const double* sc, const double* b) {           \
        for (ptrdiff_t r = 0; r < nr; r++) {                                                 \
            ptrdiff_t c = (c0 + r) % C;                                                      \
            fastbn_apply_nt_##SUFFIX(x + r * S, y + r * S, S, m[c], sc[c], b[c]);            \
        }                                                                                    \
    }
FBN_DEFINE_ROWS_NT(f32, float)
FBN_DEFINE_ROWS_NT(f64, double)
#endif

/* NHWC: a run of n values of whole rows of C channels, value i in channel i % C, walked as
 * one flat array so that the body is on whole lines whatever C (row by row, every row of a
 * numpy array would start mid-line). The per-channel constants are wrapped tables of n
 * values (at least C + FBN_SBLOCK), t[j] = t[j % C] (fastbn_wrap), so the block that starts
 * at channel c reads its constants at t + c. Same expressions as the _cols loops of _elementwise.h
 * (float32 applies take the scales and the shifts, float64 ones the means, scales and biases). */
static inline void fastbn_wrap(double* t, const double* v, ptrdiff_t C, ptrdiff_t n) {
    for (ptrdiff_t j = 0; j < n; j++) t[j] = v[j % C];
}
#define FBN_NEXT(c, k, C) ((c) = ((c) + (k)) % (C))
/* y = x * sc[c] + s[c] (float32; s: shifts, see fastbn_apply_f32) */
static void fastbn_apply_cols_nt_f32(const float* x, float* y, ptrdiff_t n, ptrdiff_t C,
                                     const double* sc, const double* s) {
    ptrdiff_t i = 0, c = 0, h = FBN_HEAD(y, n, sizeof(float));
    for (; i < h; i++, FBN_NEXT(c, 1, C)) y[i] = (float)((double)x[i] * sc[c] + s[c]);
    FBN_STREAM_BODY_F32(y, (double)x[j] * sc[c + l] + s[c + l],
                        FBN_V_APPLY(x + j, fbn_loadd(sc + c + l), fbn_loadd(s + c + l)), C,
                        FBN_STREAMS)
    for (; i < n; i++, FBN_NEXT(c, 1, C)) y[i] = (float)((double)x[i] * sc[c] + s[c]);
}
/* y = (x - m[c]) * sc[c] + b[c] (float64) */
static void fastbn_apply_cols_nt_f64(const double* x, double* y, ptrdiff_t n, ptrdiff_t C,
                                     const double* m, const double* sc, const double* b) {
    ptrdiff_t i = 0, c = 0, h = FBN_HEAD(y, n, sizeof(double));
    for (; i < h; i++, FBN_NEXT(c, 1, C)) y[i] = (x[i] - m[c]) * sc[c] + b[c];
    FBN_STREAM_BODY_F64(y, (x[j] - m[c + l]) * sc[c + l] + b[c + l], , C, FBN_STREAMS)
    for (; i < n; i++, FBN_NEXT(c, 1, C)) y[i] = (x[i] - m[c]) * sc[c] + b[c];
}
#define FBN_DEFINE_COLS_NT(SUFFIX, T, BODY)                                                  \
    /* dx = k[c] * ((dy - a[c]) - (x - m[c]) * q[c]) */                                      \
    static void fastbn_dx_cols_nt_##SUFFIX(const T* g, const T* x, T* d, ptrdiff_t n,        \
                                           ptrdiff_t C, const double* m, const double* k,    \
                                           const double* a, const double* q) {               \
        ptrdiff_t i = 0, c = 0, h = FBN_HEAD(d, n, sizeof(T));                               \
        for (; i < h; i++, FBN_NEXT(c, 1, C))                                                \
            d[i] = (T)(k[c] * (((double)g[i] - a[c]) - ((double)x[i] - m[c]) * q[c]));       \
        BODY(d, k[c + l] * (((double)g[j] - a[c + l]) - ((double)x[j] - m[c + l]) * q[c + l]), \
             FBN_V_DX(g + j, x + j, fbn_loadd(m + c + l), fbn_loadd(k + c + l),              \
                      fbn_loadd(a + c + l), fbn_loadd(q + c + l)),                           \
             C, FBN_DX_STREAMS)                                                              \
        for (; i < n; i++, FBN_NEXT(c, 1, C))                                                \
            d[i] = (T)(k[c] * (((double)g[i] - a[c]) - ((double)x[i] - m[c]) * q[c]));       \
    }

FBN_DEFINE_COLS_NT(f32, float, FBN_STREAM_BODY_F32)
FBN_DEFINE_COLS_NT(f64, double, FBN_STREAM_BODY_F64)

/* Size of one core's L2 cache in bytes (0 when the OS does not say). */
static long fastbn_l2_bytes(void) {
    long v = 0;
#if defined(_SC_LEVEL2_CACHE_SIZE)
    v = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    return v > 0 ? v : 0;
}

#endif
