/* The least-traffic passes of fastbn-bench's floor (traffic_floor in _cython_kernels.pyx).
 *
 * They read and write bytes and compute nothing, so their time is memory traffic only: a
 * read of every byte (an OR of 8-byte words), and a write of dst = a or dst = a | b (bitwise)
 * with the stores fastbn's kernels use, streaming (whole 64-byte lines from the first
 * line-aligned address on, see _stream_stores.h) or ordinary. Long runs are walked as the
 * kernels walk them, interleaved streams of FBN_TRAFFIC_PIECE bytes in turn
 * (_simd.h: one core of the project machine moves memory faster from four places at once):
 * a floor walked in one stream was slower than the kernels it bounds.
 */
#ifndef FASTBN_TRAFFIC_H
#define FASTBN_TRAFFIC_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "_simd.h"

#define FBN_TRAFFIC_PIECE 256

/* OR of the bytes p[lo:hi), as 8-byte words (so that nothing is skipped). */
static uint64_t fbn_traffic_or(const unsigned char* p, ptrdiff_t lo, ptrdiff_t hi) {
    uint64_t acc = 0, w;
    ptrdiff_t i = lo;
    for (; i + 8 <= hi; i += 8) {
        memcpy(&w, p + i, 8);
        acc |= w;
    }
    for (; i < hi; i++) acc |= p[i];
    return acc;
}

/* dst[i] = a[i] (b NULL) or a[i] | b[i] for bytes i in [lo, hi), ordinary stores, or
 * streaming stores when `stream` (then dst + lo is line-aligned and hi - lo whole lines). */
static void fbn_traffic_move(unsigned char* dst, const unsigned char* a, const unsigned char* b,
                             ptrdiff_t lo, ptrdiff_t hi, int stream) {
    ptrdiff_t i = lo;
    uint64_t u, v;
#if FASTBN_SIMD
    if (stream) {
        for (; i < hi; i += 64)
            for (int l = 0; l < 64; l += 8 * FBN_W) {
                fbn_vd w = fbn_loadd((const double*)(const void*)(a + i + l));
                if (b != NULL) w = fbn_or(w, fbn_loadd((const double*)(const void*)(b + i + l)));
                fbn_streamd((double*)(void*)(dst + i + l), w);
            }
        return;
    }
#else
    (void)stream;
#endif
    if (b == NULL) {
        memcpy(dst + lo, a + lo, (size_t)(hi - lo));
        return;
    }
    for (; i + 8 <= hi; i += 8) {
        memcpy(&u, a + i, 8);
        memcpy(&v, b + i, 8);
        u |= v;
        memcpy(dst + i, &u, 8);
    }
    for (; i < hi; i++) dst[i] = a[i] | b[i];
}

/* Bytes [h, n) of a run walked as NS streams: BODY(lo, hi) for each piece, NS parts of P
 * bytes a piece of each in turn, then the rest in pieces, in order. */
#define FBN_TRAFFIC_WALK(h, n, NS, BODY)                                                     \
    {                                                                                        \
        ptrdiff_t P_ = fbn_stream_part_of((n) - (h), FBN_TRAFFIC_PIECE, NS), i_;             \
        for (ptrdiff_t k_ = 0; k_ < P_; k_ += FBN_TRAFFIC_PIECE)                             \
            for (int s_ = 0; s_ < (NS); s_++) {                                              \
                ptrdiff_t lo = (h) + s_ * P_ + k_, hi = lo + FBN_TRAFFIC_PIECE;              \
                BODY                                                                         \
            }                                                                                \
        for (i_ = (h) + (NS) * P_; i_ < (n); i_ += FBN_TRAFFIC_PIECE) {                      \
            ptrdiff_t lo = i_, hi = i_ + FBN_TRAFFIC_PIECE < (n) ? i_ + FBN_TRAFFIC_PIECE : (n); \
            BODY                                                                             \
        }                                                                                    \
    }

/* OR of every byte of p[0:n). */
static uint64_t fastbn_traffic_read(const unsigned char* p, ptrdiff_t n) {
    uint64_t acc = 0;
    FBN_TRAFFIC_WALK(0, n, FBN_STREAMS, { acc |= fbn_traffic_or(p, lo, hi); })
    return acc;
}

/* dst = a, or a | b when b is not NULL, over n bytes; with `stream`, the whole 64-byte lines
 * of dst are written with streaming stores (the caller fences, fastbn_sfence). Two inputs
 * are walked as dx is, in FBN_DX_STREAMS streams. */
static void fastbn_traffic_write(unsigned char* dst, const unsigned char* a,
                                 const unsigned char* b, ptrdiff_t n, int stream) {
    ptrdiff_t h = 0, e = n;
#if FASTBN_SIMD
    if (stream) {
        h = (ptrdiff_t)((64u - (uintptr_t)dst % 64u) % 64u);
        if (h > n) h = n;
        e = h + (n - h) / 64 * 64; /* whole lines from the first aligned address */
    }
#endif
    fbn_traffic_move(dst, a, b, 0, h, 0);
    FBN_TRAFFIC_WALK(h, e, b != NULL ? FBN_DX_STREAMS : FBN_STREAMS,
                     { fbn_traffic_move(dst, a, b, lo, hi, stream); })
    fbn_traffic_move(dst, a, b, e, n, 0);
}

#endif
