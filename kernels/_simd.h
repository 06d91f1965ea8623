/* The SIMD vocabulary of fastbn's C loops (_lanes.h, _stream_stores.h).
 *
 * FBN_W float64 lanes per vector: 512-bit vectors in the x86-64-v4 (AVX-512) build, 256-bit
 * in the x86-64-v3 (or AVX) one, 128-bit in the baseline SSE2 one; FASTBN_SIMD is 0 on other
 * targets, which use the plain loops.
 * Only IEEE add/sub/mul and exact float32 widening: the builds give the same bits (fbn_or,
 * a bitwise OR, only moves bits: _traffic.h).
 */
#ifndef FASTBN_SIMD_H
#define FASTBN_SIMD_H

#include <stddef.h>

#if defined(__AVX512F__) && defined(__AVX512DQ__)
    #include <immintrin.h>
    #define FASTBN_SIMD 1
    #define FBN_W 8
    typedef __m512d fbn_vd;
    #define fbn_set1(v) _mm512_set1_pd(v)
    #define fbn_add(a, b) _mm512_add_pd(a, b)
    #define fbn_sub(a, b) _mm512_sub_pd(a, b)
    #define fbn_mul(a, b) _mm512_mul_pd(a, b)
    #define fbn_loadd(p) _mm512_loadu_pd(p)
    #define fbn_storeu(p, a) _mm512_storeu_pd((p), (a))
    #define fbn_loadf(p) _mm512_cvtps_pd(_mm256_loadu_ps(p))
    #define fbn_streamf(p, a, b) \
        _mm512_stream_ps((p), _mm512_insertf32x8(_mm512_castps256_ps512(_mm512_cvtpd_ps(a)), \
                                                 _mm512_cvtpd_ps(b), 1))
    #define fbn_storef(p, a) _mm256_storeu_ps((p), _mm512_cvtpd_ps(a))
    #define fbn_streamd(p, a) _mm512_stream_pd((p), (a))
    #define fbn_or(a, b) _mm512_or_pd(a, b)
#elif defined(__AVX__)
    #include <immintrin.h>
    #define FASTBN_SIMD 1
    #define FBN_W 4                        /* doubles per vector */
    typedef __m256d fbn_vd;
    #define fbn_set1(v) _mm256_set1_pd(v)
    #define fbn_add(a, b) _mm256_add_pd(a, b)
    #define fbn_sub(a, b) _mm256_sub_pd(a, b)
    #define fbn_mul(a, b) _mm256_mul_pd(a, b)
    #define fbn_loadd(p) _mm256_loadu_pd(p)
    #define fbn_storeu(p, a) _mm256_storeu_pd((p), (a))
    #define fbn_loadf(p) _mm256_cvtps_pd(_mm_loadu_ps(p))      /* FBN_W floats, widened */
    /* Round 2*FBN_W doubles to float and stream them. */
    #define fbn_streamf(p, a, b) \
        _mm256_stream_ps((p), _mm256_set_m128(_mm256_cvtpd_ps(b), _mm256_cvtpd_ps(a)))
    #define fbn_storef(p, a) _mm_storeu_ps((p), _mm256_cvtpd_ps(a)) /* FBN_W floats */
    #define fbn_streamd(p, a) _mm256_stream_pd((p), (a))
    #define fbn_or(a, b) _mm256_or_pd(a, b)
#elif defined(__SSE2__)
    #include <emmintrin.h>
    #define FASTBN_SIMD 1
    #define FBN_W 2
    typedef __m128d fbn_vd;
    #define fbn_set1(v) _mm_set1_pd(v)
    #define fbn_add(a, b) _mm_add_pd(a, b)
    #define fbn_sub(a, b) _mm_sub_pd(a, b)
    #define fbn_mul(a, b) _mm_mul_pd(a, b)
    #define fbn_loadd(p) _mm_loadu_pd(p)
    #define fbn_storeu(p, a) _mm_storeu_pd((p), (a))
    #define fbn_loadf(p) _mm_cvtps_pd(_mm_castsi128_ps(_mm_loadl_epi64((const __m128i*)(p))))
    #define fbn_streamf(p, a, b) \
        _mm_stream_ps((p), _mm_movelh_ps(_mm_cvtpd_ps(a), _mm_cvtpd_ps(b)))
    #define fbn_streamd(p, a) _mm_stream_pd((p), (a))
    #define fbn_or(a, b) _mm_or_pd(a, b)
#else
    #define FASTBN_SIMD 0
#endif

/* Vectors of at least 4 doubles (AVX, AVX-512): the float32 output loops are written with
 * this vocabulary there (_elementwise.h). With SSE2's 2 lanes, gcc's own loops are as fast. */
#if FASTBN_SIMD && FBN_W >= 4
    #define FBN_WIDE 1
#else
    #define FBN_WIDE 0
#endif

/* Long runs are walked as FBN_STREAMS interleaved streams (_lanes.h, _stream_stores.h):
 * one core of the project machine reads and streams memory faster from four places at once
 * than from one (a C loop over 205 MB on 2 threads: a read pass 12-13 -> 9-10 ms, a
 * streamed copy-like pass 19-24 -> 14-19 ms), but only when each stream runs for pages
 * (streams of less than a page within 12.5 KB NCHW rows gained nothing). A part is at least
 * FBN_STREAM_MIN values. */
#define FBN_STREAMS 4
#define FBN_STREAM_MIN 1024
/* dx reads two arrays: its streamed stores walk two parts, four read streams as a
 * normalize's (four parts: 12 streams in all, 0.83-0.91x the speed, NHWC (200704, 256)). */
#define FBN_DX_STREAMS 2
/* Values per stream for a run of n values walked as ns streams in units of `unit` values:
 * a multiple of `unit`, 0 when the run is too short for streams. */
static inline ptrdiff_t fbn_stream_part_of(ptrdiff_t n, ptrdiff_t unit, int ns) {
    ptrdiff_t p = n / (ns * unit) * unit;
    return p >= FBN_STREAM_MIN ? p : 0;
}
static inline ptrdiff_t fbn_stream_part(ptrdiff_t n, ptrdiff_t unit) {
    return fbn_stream_part_of(n, unit, FBN_STREAMS);
}

#endif
