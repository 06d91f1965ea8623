/* Sums over one contiguous run into 16 independent float64 lanes.
 *
 * The reductions of the NCHW kernels of _cython_kernels.pyx: value i of the run goes to
 * lane i % 16, in run order (a long run in the interleaved order of FBN_GROUPS), so the
 * order of the additions is fixed by the code whatever the instruction set (and whatever
 * the thread count). With SIMD (the macros of
 * _simd.h: 256-bit vectors in the x86-64-v3 build, 128-bit in the SSE2 one) the
 * 16 lanes live in 16 / FBN_W registers for the whole run; gcc's own vectorization of the
 * plain loops kept them in memory, a store-to-load chain per step, several times slower.
 * Every lane receives the same IEEE operations as in the plain loops below (float32 widened
 * exactly, no FMA: the build uses -ffp-contract=off), so both builds give the same bits.
 *
 * fastbn_acc_sum:     a[l] += p
 * fastbn_acc_dev_sq:  a[l] += p - m;  b[l] += (p - m)**2       (one sweep, two sums)
 * fastbn_acc_sum_dot: a[l] += g;      b[l] += g * (p - m)
 */
#ifndef FASTBN_LANES_H
#define FASTBN_LANES_H

#include <stddef.h>

#include "_simd.h"

#if FASTBN_SIMD
    #define FBN_NV (16 / FBN_W)
    #define FBN_LOAD_LANES(V, p)                                                             \
        for (int v_ = 0; v_ < FBN_NV; v_++) V[v_] = fbn_loadd((p) + v_ * FBN_W)
    #define FBN_STORE_LANES(p, V)                                                            \
        for (int v_ = 0; v_ < FBN_NV; v_++) fbn_storeu((p) + v_ * FBN_W, V[v_])
#endif

/* The walk: BODY for each group of 16 values starting at q, for the groups of the run's
 * first n - n % 16 values. A long run is read as FBN_STREAMS interleaved streams: its first
 * FBN_STREAMS * P values are FBN_STREAMS parts of P values (P a multiple of FBN_PIECE, at
 * least FBN_STREAM_MIN), taken FBN_PIECE values of each part in turn; the rest follows in
 * order. On the project machine one core reads memory faster from four places at once
 * than from one (see _simd.h). Value i still goes to lane i % 16; only the order of the
 * additions into a lane differs from a plain walk, and it depends on n alone. */
#define FBN_PIECE 64
#define FBN_GROUPS(n, q, BODY)                                                               \
    {                                                                                        \
        ptrdiff_t n16_ = (n) - (n) % 16, P_ = fbn_stream_part(n16_, FBN_PIECE);              \
        for (ptrdiff_t k_ = 0; k_ < P_; k_ += FBN_PIECE)                                     \
            for (int s_ = 0; s_ < FBN_STREAMS; s_++)                                         \
                for (ptrdiff_t q = s_ * P_ + k_; q < s_ * P_ + k_ + FBN_PIECE; q += 16)      \
                    BODY                                                                     \
        for (ptrdiff_t q = FBN_STREAMS * P_; q < n16_; q += 16)                              \
            BODY                                                                             \
    }

#if FASTBN_SIMD
    #define FBN_SUM_GROUPS(LOADV)                                                            \
        fbn_vd va[FBN_NV];                                                                   \
        FBN_LOAD_LANES(va, a);                                                               \
        FBN_GROUPS(n, q, {                                                                   \
            for (int v = 0; v < FBN_NV; v++)                                                 \
                va[v] = fbn_add(va[v], LOADV(p + q + v * FBN_W));                            \
        })                                                                                   \
        FBN_STORE_LANES(a, va);
    #define FBN_DEV_SQ_GROUPS(LOADV)                                                         \
        fbn_vd va[FBN_NV], vb[FBN_NV], vm = fbn_set1(m), d;                                  \
        FBN_LOAD_LANES(va, a);                                                               \
        FBN_LOAD_LANES(vb, b);                                                               \
        FBN_GROUPS(n, q, {                                                                   \
            for (int v = 0; v < FBN_NV; v++) {                                               \
                d = fbn_sub(LOADV(p + q + v * FBN_W), vm);                                   \
                va[v] = fbn_add(va[v], d);                                                   \
                vb[v] = fbn_add(vb[v], fbn_mul(d, d));                                       \
            }                                                                                \
        })                                                                                   \
        FBN_STORE_LANES(a, va);                                                              \
        FBN_STORE_LANES(b, vb);
    #define FBN_SUM_DOT_GROUPS(LOADV)                                                        \
        fbn_vd va[FBN_NV], vb[FBN_NV], vm = fbn_set1(m), gv;                                 \
        FBN_LOAD_LANES(va, a);                                                               \
        FBN_LOAD_LANES(vb, b);                                                               \
        FBN_GROUPS(n, q, {                                                                   \
            for (int v = 0; v < FBN_NV; v++) {                                               \
                gv = LOADV(g + q + v * FBN_W);                                               \
                va[v] = fbn_add(va[v], gv);                                                  \
                vb[v] = fbn_add(vb[v], fbn_mul(gv, fbn_sub(LOADV(p + q + v * FBN_W), vm)));  \
            }                                                                                \
        })                                                                                   \
        FBN_STORE_LANES(a, va);                                                              \
        FBN_STORE_LANES(b, vb);
#else
    #define FBN_SUM_GROUPS(LOADV)                                                            \
        FBN_GROUPS(n, q, {                                                                   \
            for (int l = 0; l < 16; l++) a[l] += (double)p[q + l];                           \
        })
    #define FBN_DEV_SQ_GROUPS(LOADV)                                                         \
        FBN_GROUPS(n, q, {                                                                   \
            for (int l = 0; l < 16; l++) {                                                   \
                double t = (double)p[q + l] - m;                                             \
                a[l] += t;                                                                   \
                b[l] += t * t;                                                               \
            }                                                                                \
        })
    #define FBN_SUM_DOT_GROUPS(LOADV)                                                        \
        FBN_GROUPS(n, q, {                                                                   \
            for (int l = 0; l < 16; l++) {                                                   \
                a[l] += (double)g[q + l];                                                    \
                b[l] += (double)g[q + l] * ((double)p[q + l] - m);                           \
            }                                                                                \
        })
#endif

/* Each function: the groups (SIMD or plain, same additions), then the last n % 16 values
 * into lanes 0, 1, ... */
#define FBN_DEFINE_LANES(SUFFIX, T, LOADV)                                                   \
    static inline void fastbn_acc_sum_##SUFFIX(const T* p, ptrdiff_t n, double* a) {         \
        ptrdiff_t n16 = n - n % 16;                                                          \
        FBN_SUM_GROUPS(LOADV)                                                                \
        for (ptrdiff_t i = n16; i < n; i++) a[i - n16] += (double)p[i];                      \
    }                                                                                        \
    static inline void fastbn_acc_dev_sq_##SUFFIX(const T* p, ptrdiff_t n, double m,         \
                                                  double* a, double* b) {                    \
        ptrdiff_t n16 = n - n % 16;                                                          \
        FBN_DEV_SQ_GROUPS(LOADV)                                                             \
        for (ptrdiff_t i = n16; i < n; i++) {                                                \
            double t = (double)p[i] - m;                                                     \
            a[i - n16] += t;                                                                 \
            b[i - n16] += t * t;                                                             \
        }                                                                                    \
    }                                                                                        \
    static inline void fastbn_acc_sum_dot_##SUFFIX(const T* g, const T* p, ptrdiff_t n,      \
                                                   double m, double* a, double* b) {         \
        ptrdiff_t n16 = n - n % 16;                                                          \
        FBN_SUM_DOT_GROUPS(LOADV)                                                            \
        for (ptrdiff_t i = n16; i < n; i++) {                                                \
            a[i - n16] += (double)g[i];                                                      \
            b[i - n16] += (double)g[i] * ((double)p[i] - m);                                 \
        }                                                                                    \
    }

FBN_DEFINE_LANES(f32, float, fbn_loadf)
FBN_DEFINE_LANES(f64, double, fbn_loadd)

/* Column sums of a (rows, C) block, rows in order, one accumulator per column (NHWC
 * statistics): the columns are taken 16 at a time (one cache line of float32) with their
 * accumulators in registers for all the rows; the plain loops across a row kept them in
 * memory, a load and a store per value. Meant for a block that is in cache (one chunk).
 *
 * fastbn_cols_sum:     k[c] = x[0,c] + x[1,c] + ...          (starts from row 0)
 * fastbn_cols_dev_sq:  sd[c] += sum_r (x[r,c] - k[c]);  sdd[c] += sum_r (x[r,c] - k[c])**2
 * (rows in order onto the accumulators' values: the same additions, in the same order, as
 * the plain loops, hence the same bits.) The backward sums (two inputs) stay plain loops
 * across the rows: column blocks of two arrays measured up to 2x slower.
 */
#define FBN_DEFINE_COLS(SUFFIX, T, LOADV)                                                    \
    static inline void fastbn_cols_sum_##SUFFIX(const T* x, ptrdiff_t rows, ptrdiff_t C,     \
                                                 double* k) {                                \
        ptrdiff_t c = 0;                                                                     \
        FBN_SIMD_COLS_SUM(LOADV)                                                             \
        for (; c < C; c++) {                                                                 \
            double s = (double)x[c];                                                         \
            for (ptrdiff_t r = 1; r < rows; r++) s += (double)x[r * C + c];                  \
            k[c] = s;                                                                        \
        }                                                                                    \
    }                                                                                        \
    static inline void fastbn_cols_dev_sq_##SUFFIX(const T* x, ptrdiff_t rows, ptrdiff_t C,  \
                                                   const double* k, double* sd,              \
                                                   double* sdd) {                            \
        ptrdiff_t c = 0;                                                                     \
        FBN_SIMD_COLS_DEV_SQ(LOADV)                                                          \
        for (; c < C; c++) {                                                                 \
            double a = sd[c], b = sdd[c], d;                                                 \
            for (ptrdiff_t r = 0; r < rows; r++) {                                           \
                d = (double)x[r * C + c] - k[c];                                             \
                a += d;                                                                      \
                b += d * d;                                                                  \
            }                                                                                \
            sd[c] = a;                                                                       \
            sdd[c] = b;                                                                      \
        }                                                                                    \
    }

#if FASTBN_SIMD
    /* The 16 columns from c0: k[c0 + l] for l >= from (the block's lanes below from are
     * columns a block before it took: computed again, not stored). */
    #define FBN_COLS_SUM_BLOCK(LOADV, c0, from)                                              \
        {                                                                                    \
            fbn_vd va[FBN_NV];                                                               \
            double t_[16];                                                                   \
            for (int v = 0; v < FBN_NV; v++) va[v] = LOADV(x + (c0) + v * FBN_W);            \
            for (ptrdiff_t r = 1; r < rows; r++)                                             \
                for (int v = 0; v < FBN_NV; v++)                                             \
                    va[v] = fbn_add(va[v], LOADV(x + r * C + (c0) + v * FBN_W));             \
            if (from) {                                                                      \
                FBN_STORE_LANES(t_, va);                                                     \
                for (int l = (from); l < 16; l++) k[(c0) + l] = t_[l];                       \
            } else {                                                                         \
                FBN_STORE_LANES(k + (c0), va);                                               \
            }                                                                                \
        }
    #define FBN_COLS_DEV_SQ_BLOCK(LOADV, c0, from)                                           \
        {                                                                                    \
            fbn_vd va[FBN_NV], vb[FBN_NV], vk[FBN_NV], d;                                    \
            double t_[32];                                                                   \
            FBN_LOAD_LANES(vk, k + (c0));                                                    \
            FBN_LOAD_LANES(va, sd + (c0));                                                   \
            FBN_LOAD_LANES(vb, sdd + (c0));                                                  \
            for (ptrdiff_t r = 0; r < rows; r++)                                             \
                for (int v = 0; v < FBN_NV; v++) {                                           \
                    d = fbn_sub(LOADV(x + r * C + (c0) + v * FBN_W), vk[v]);                 \
                    va[v] = fbn_add(va[v], d);                                               \
                    vb[v] = fbn_add(vb[v], fbn_mul(d, d));                                   \
                }                                                                            \
            if (from) {                                                                      \
                FBN_STORE_LANES(t_, va);                                                     \
                FBN_STORE_LANES(t_ + 16, vb);                                                \
                for (int l = (from); l < 16; l++) {                                          \
                    sd[(c0) + l] = t_[l];                                                    \
                    sdd[(c0) + l] = t_[16 + l];                                              \
                }                                                                            \
            } else {                                                                         \
                FBN_STORE_LANES(sd + (c0), va);                                              \
                FBN_STORE_LANES(sdd + (c0), vb);                                             \
            }                                                                                \
        }
    /* Blocks of 16 columns; with C >= 16, the last C % 16 columns as the block of the last
     * 16 (a column taken alone is one chain of additions down all the rows: (32768, 24)
     * float32 statistics took 3.8x the time of numba's). */
    #define FBN_SIMD_COLS(BLOCK, LOADV)                                                      \
        for (; c + 16 <= C; c += 16) BLOCK(LOADV, c, 0)                                      \
        if (c < C && C >= 16) {                                                              \
            BLOCK(LOADV, C - 16, (int)(c - (C - 16)))                                        \
            c = C;                                                                           \
        }
    #define FBN_SIMD_COLS_SUM(LOADV) FBN_SIMD_COLS(FBN_COLS_SUM_BLOCK, LOADV)
    #define FBN_SIMD_COLS_DEV_SQ(LOADV) FBN_SIMD_COLS(FBN_COLS_DEV_SQ_BLOCK, LOADV)
#else
    #define FBN_SIMD_COLS_SUM(LOADV)
    #define FBN_SIMD_COLS_DEV_SQ(LOADV)
#endif

FBN_DEFINE_COLS(f32, float, fbn_loadf)
FBN_DEFINE_COLS(f64, double, fbn_loadd)

/* nr rows, x + j*d for j = 0, 1, ..., nr - 1, into per-column accumulators in memory (the
 * NHWC statistics read as FBN_STREAMS interleaved streams of rows, see _nhwc_moments; the
 * NCHW groups of short rows, a tile of samples at a time, see _nchw_group_moments): a
 * column receives the rows' additions in the order j = 0, 1, ..., as in the _cols loops;
 * the accumulators are loaded and stored once for all the rows.
 *
 * fastbn_rows_add:     k[c] += x[j*d + c]
 * fastbn_rows_dev_sq:  sd[c] += x[j*d + c] - k[c];  sdd[c] += (x[j*d + c] - k[c])**2
 * fastbn_rows_sum_dot: sdy[c] += g[j*d + c];  sxm[c] += g[j*d + c] * (x[j*d + c] - m[c])
 *                      (the NHWC backward sums, see _nhwc_bsums)
 *
 * With nnr > 0 the SIMD loops also request (prefetch into L2) the nnr rows that follow at
 * x + ahead (and g + ahead): the line of each at the same columns, once per cache line of
 * the columns read, so that the requests keep pace with the reads (the NCHW groups' next
 * tile of samples, whose runs are on other pages); the values summed do not change.
 */
#if FASTBN_SIMD
    /* At each cache line of the columns: that line of the nnr rows at P + ahead. */
    #define FBN_ROWS_AHEAD(P)                                                                \
        if (nnr && !((c * (ptrdiff_t)sizeof(*(P))) & 63))                                    \
            for (int j = 0; j < nnr; j++)                                                    \
                _mm_prefetch((const char*)((P) + ahead + j * d + c), _MM_HINT_T1);
    /* The columns are taken RV vectors at a time (a cache line of them, at most 4
     * vectors: RV independent chains of additions down the rows), then one vector at a
     * time; a column's additions are the same, in the same order, either way. With one
     * vector at a time, each step was one chain of nr dependent additions: on a Zen 3
     * (AVX2), a line at a time took 0.73x-0.90x as long for the NCHW training backward
     * of (128, 512, 7, 7), (32, 256, 14, 14) and (128, 256, 14, 14) float32, 0.85x-0.94x
     * for their training forward, 0.91x-0.93x for (16, 32, 56, 56) channels last;
     * (4096, 1024) unchanged (0.98x-1.03x). */
    #define FBN_ROWS_STEP(RV, SETUP, ROW, DONE)                                              \
        for (; c + (RV) * FBN_W <= C; c += (RV) * FBN_W) {                                   \
            SETUP(RV)                                                                        \
            for (int j = 0; j < nr; j++)                                                     \
                for (int l = 0; l < (RV); l++) ROW                                           \
            DONE(RV)                                                                         \
        }
    #define FBN_ROWS_WALK(RV, SETUP, ROW, DONE)                                              \
        if ((RV) > 1) FBN_ROWS_STEP(RV, SETUP, ROW, DONE)                                    \
        FBN_ROWS_STEP(1, SETUP, ROW, DONE)
    #define FBN_ROWS_ADD_SETUP(RV)                                                           \
        FBN_ROWS_AHEAD(x)                                                                    \
        fbn_vd a[RV];                                                                        \
        for (int l = 0; l < (RV); l++) a[l] = fbn_loadd(k + c + l * FBN_W);
    #define FBN_ROWS_ADD_DONE(RV)                                                            \
        for (int l = 0; l < (RV); l++) fbn_storeu(k + c + l * FBN_W, a[l]);
    #define FBN_SIMD_ROWS_ADD(LOADV, RV)                                                     \
        FBN_ROWS_WALK(RV, FBN_ROWS_ADD_SETUP,                                                \
                      { a[l] = fbn_add(a[l], LOADV(x + j * d + c + l * FBN_W)); },           \
                      FBN_ROWS_ADD_DONE)
    /* The two-sum steps: per-column constants kv from K, accumulators a and b loaded from
     * A and B, stored back. */
    #define FBN_ROWS_LOAD2(RV, K, A, B)                                                      \
        fbn_vd kv[RV], a[RV], b[RV], t;                                                      \
        for (int l = 0; l < (RV); l++) {                                                     \
            kv[l] = fbn_loadd((K) + c + l * FBN_W);                                          \
            a[l] = fbn_loadd((A) + c + l * FBN_W);                                           \
            b[l] = fbn_loadd((B) + c + l * FBN_W);                                           \
        }
    #define FBN_ROWS_STORE2(RV, A, B)                                                        \
        for (int l = 0; l < (RV); l++) {                                                     \
            fbn_storeu((A) + c + l * FBN_W, a[l]);                                           \
            fbn_storeu((B) + c + l * FBN_W, b[l]);                                           \
        }
    #define FBN_ROWS_DEV_SQ_SETUP(RV) FBN_ROWS_AHEAD(x) FBN_ROWS_LOAD2(RV, k, sd, sdd)
    #define FBN_ROWS_DEV_SQ_DONE(RV) FBN_ROWS_STORE2(RV, sd, sdd)
    #define FBN_SIMD_ROWS_DEV_SQ(LOADV, RV)                                                  \
        FBN_ROWS_WALK(RV, FBN_ROWS_DEV_SQ_SETUP, {                                           \
            t = fbn_sub(LOADV(x + j * d + c + l * FBN_W), kv[l]);                            \
            a[l] = fbn_add(a[l], t);                                                         \
            b[l] = fbn_add(b[l], fbn_mul(t, t));                                             \
        }, FBN_ROWS_DEV_SQ_DONE)
    #define FBN_ROWS_SUM_DOT_SETUP(RV)                                                       \
        FBN_ROWS_AHEAD(g)                                                                    \
        FBN_ROWS_AHEAD(x)                                                                    \
        FBN_ROWS_LOAD2(RV, m, sdy, sxm)
    #define FBN_ROWS_SUM_DOT_DONE(RV) FBN_ROWS_STORE2(RV, sdy, sxm)
    #define FBN_SIMD_ROWS_SUM_DOT(LOADV, RV)                                                 \
        FBN_ROWS_WALK(RV, FBN_ROWS_SUM_DOT_SETUP, {                                          \
            t = LOADV(g + j * d + c + l * FBN_W);                                            \
            a[l] = fbn_add(a[l], t);                                                         \
            b[l] = fbn_add(b[l],                                                             \
                           fbn_mul(t, fbn_sub(LOADV(x + j * d + c + l * FBN_W), kv[l])));    \
        }, FBN_ROWS_SUM_DOT_DONE)
    /* Vectors per step for values of `size` bytes: a cache line, at most 4. */
    #define FBN_ROWS_RV(size) (64 / (size) / FBN_W > 4 ? 4 : 64 / (size) / FBN_W)
#else
    #define FBN_SIMD_ROWS_ADD(LOADV, RV)
    #define FBN_SIMD_ROWS_DEV_SQ(LOADV, RV)
    #define FBN_SIMD_ROWS_SUM_DOT(LOADV, RV)
#endif
#define FBN_DEFINE_ROWS(SUFFIX, T, LOADV)                                                    \
    static inline void fastbn_rows_add_##SUFFIX(const T* x, int nr, ptrdiff_t d,             \
                                                ptrdiff_t C, double* k,                      \
                                                ptrdiff_t ahead, int nnr) {                  \
        ptrdiff_t c = 0;                                                                     \
        FBN_SIMD_ROWS_ADD(LOADV, FBN_ROWS_RV(sizeof(T)))                                     \
        for (; c < C; c++)                                                                   \
            for (int j = 0; j < nr; j++) k[c] += (double)x[j * d + c];                       \
    }                                                                                        \
    static inline void fastbn_rows_dev_sq_##SUFFIX(const T* x, int nr, ptrdiff_t d,          \
                                                   ptrdiff_t C, const double* k, double* sd, \
                                                   double* sdd, ptrdiff_t ahead, int nnr) {  \
        ptrdiff_t c = 0;                                                                     \
        FBN_SIMD_ROWS_DEV_SQ(LOADV, FBN_ROWS_RV(sizeof(T)))                                  \
        for (; c < C; c++)                                                                   \
            for (int j = 0; j < nr; j++) {                                                   \
                double t = (double)x[j * d + c] - k[c];                                      \
                sd[c] += t;                                                                  \
                sdd[c] += t * t;                                                             \
            }                                                                                \
    }                                                                                        \
    static inline void fastbn_rows_sum_dot_##SUFFIX(const T* g, const T* x, int nr,          \
                                                    ptrdiff_t d, ptrdiff_t C,                \
                                                    const double* m, double* sdy,            \
                                                    double* sxm, ptrdiff_t ahead, int nnr) { \
        ptrdiff_t c = 0;                                                                     \
        FBN_SIMD_ROWS_SUM_DOT(LOADV, FBN_ROWS_RV(sizeof(T)))                                 \
        for (; c < C; c++)                                                                   \
            for (int j = 0; j < nr; j++) {                                                   \
                double gv = (double)g[j * d + c];                                            \
                sdy[c] += gv;                                                                \
                sxm[c] += gv * ((double)x[j * d + c] - m[c]);                                \
            }                                                                                \
    }

FBN_DEFINE_ROWS(f32, float, fbn_loadf)
FBN_DEFINE_ROWS(f64, double, fbn_loadd)

#endif
