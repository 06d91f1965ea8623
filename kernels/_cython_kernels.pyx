# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False, embedsignature=True
"""Cython/OpenMP batch-normalization kernels on fastbn's two canonical views.

The kernels follow ``fastbn/backends/CONTRACT.md``: ``nchw_*`` take C-contiguous
``(N, C, S)`` arrays, ``nhwc_*`` take C-contiguous ``(R, C)`` arrays; every per-channel array
is a C-contiguous float64 array of shape ``(C,)``; ``nthreads`` is explicit on every
parallel region. Results are bitwise identical for every ``nthreads``: work is cut into a
fixed grid of chunks and stripes that depends on the shape only, and partial results are
merged in a fixed order after the parallel loops.

Grid
----
NCHW. A channel's ``M = N*S`` values are read in flattened ``(n, s)`` order and cut into
chunks of ``NCHW_CHUNK`` values (the last one shorter). Each chunk, while in L1, is centred
on ``K`` (the running mean of the chunks before it in its stripe; for a stripe's first chunk
its own float64 mean, one extra loop) and gives the exact partial
``(k, K + sd/k, sdd - sd**2/k)`` from ``sd = sum(x - K)``, ``sdd = sum((x - K)**2)``;
partials are merged with Chan's formula in chunk order. The next chunk is prefetched
meanwhile. When ``C >= NCHW_STRIPE_MAX_C`` (or the channel is short) a work unit is a whole
channel: its statistics are computed and the channel is normalized (or its backward sums
computed and ``dx`` written) while it is still in cache. When ``C`` is smaller, each
channel is cut into ``min(ceil(NCHW_TARGET_UNITS / C), nchunks // NCHW_MIN_STRIPE_CHUNKS)``
stripes of whole chunks so that several cores share a channel; stripe partials are merged
in stripe order before a second parallel pass normalizes (or writes ``dx``). With short rows
a fused work unit is a group of adjacent channels (``grid()["group"]``), walked sample by
sample over contiguous runs; each channel is still computed exactly as alone.

NHWC. Rows are cut into chunks of ``max(1, NHWC_CHUNK // C)`` rows and chunks into at most
``NHWC_MAX_STRIPES`` stripes of whole chunks. Inner loops run across the contiguous
channels (vectorized). Statistics: each chunk is centred on the stripe's running mean (its
own mean for a stripe's first chunk), so later chunks are read once. Each stripe owns
``(mean, M2)`` (or the two backward sums) arrays of ``C`` float64 values, so temporary
memory is ``O(C * NHWC_MAX_STRIPES)`` plus ``3*C`` per thread. Stripes are merged in stripe
order.

All reductions use 16 float64 lanes with a fixed fold, so the bits do not depend on the
thread count nor on the SIMD width the compiler chose (the portable and x86-64-v3 builds
agree). Elementwise maths is done in float64 and rounded once to the data type
(``y = (x - mean) * scale + bias``; float32 outputs as ``x * scale + shift`` with
``shift = bias - mean * scale``, see ``_elementwise.h``). Large NCHW outputs are written
with streaming stores (see ``stream_min_bytes``); stores never change
a value.
"""

from cython cimport floating
from cython.parallel cimport parallel, prange, threadid
from libc.math cimport sqrt
from libc.stdlib cimport calloc, free, malloc

from _openmp_helpers cimport (
    FASTBN_BUILD_SIMD,
    FASTBN_OPENMP_ENABLED,
    FASTBN_STREAM_STORES,
    fastbn_cpu_has_x86_64_v3,
    fastbn_cpu_has_x86_64_v4,
    fastbn_l2_bytes,
    fastbn_omp_get_max_threads,
    fastbn_openmp_version,
    fastbn_prefetch,
    fastbn_prefetch_w,
    fastbn_apply_nt_f32,
    fastbn_apply_rows_nt_f32,
    fastbn_apply_rows_nt_f64,
    fastbn_apply_nt_f64,
    fastbn_dx_nt_f32,
    fastbn_dx_nt_f64,
    FBN_SBLOCK,
    FBN_STREAMS,
    fastbn_wrap,
    fastbn_apply_cols_nt_f32,
    fastbn_apply_cols_nt_f64,
    fastbn_dx_cols_nt_f32,
    fastbn_dx_cols_nt_f64,
    fastbn_sfence,
    fastbn_apply_f32,
    fastbn_apply_f64,
    fastbn_shift,
    fastbn_apply_cols_f32,
    fastbn_apply_cols_f64,
    fastbn_dx_f32,
    fastbn_dx_f64,
    fastbn_dx_cols_f32,
    fastbn_dx_cols_f64,
    fastbn_cols_sum_f32,
    fastbn_cols_sum_f64,
    fastbn_cols_dev_sq_f32,
    fastbn_rows_add_f32,
    fastbn_rows_add_f64,
    fastbn_rows_dev_sq_f32,
    fastbn_rows_dev_sq_f64,
    fastbn_rows_sum_dot_f32,
    fastbn_rows_sum_dot_f64,
    fastbn_cols_dev_sq_f64,
    fastbn_acc_sum_f32,
    fastbn_acc_sum_f64,
    fastbn_acc_dev_sq_f32,
    fastbn_acc_dev_sq_f64,
    fastbn_acc_sum_dot_f32,
    fastbn_acc_sum_dot_f64,
    fastbn_traffic_read,
    fastbn_traffic_write,
)

ctypedef Py_ssize_t idx_t

# ---------------------------------------------------------------------------------------
# Grid constants (shape-only rules; never change them with the thread count)
# ---------------------------------------------------------------------------------------
cdef enum:
    _NCHW_CHUNK = 4096
    # Values of one part taken in turn when a range is read as streams (_nchw_part).
    _PIECE = 64
    _NCHW_STRIPE_MAX_C = 16
    _NCHW_TARGET_UNITS = 32
    _NCHW_MIN_STRIPE_CHUNKS = 16
    # Short rows: a fused work unit is a group of channels (see _nchw_group).
    _NCHW_GROUP_VALUES = 1024
    _NCHW_GROUP_MAX = 64
    _NCHW_GROUP_CACHE = 131072
    # ... and prefetches the runs of the sample this many samples ahead.
    _NCHW_GROUP_AHEAD = 2
    # Rows of at least this many values are grouped only with _GROUP_TILE samples or more,
    # and by the backward sums only when shorter than _NCHW_GROUP_BACKWARD_ROW (see
    # _nchw_group).
    _NCHW_GROUP_SHORT_ROW = 64
    _NCHW_GROUP_BACKWARD_ROW = 320
    # A group's sample has at most this many values (G*S < NCHW_GROUP_VALUES + S), and its
    # reductions take this many samples at a time (_group_pass).
    _GROUP_W_MAX = 2 * _NCHW_GROUP_VALUES
    _GROUP_TILE = 8
    _NHWC_CHUNK = 32768
    # NHWC statistics read rows of at least this many channels as streams (_nhwc_part).
    _NHWC_ROW_MIN_C = 64
    # NHWC rows of fewer channels are summed as a flat run in periods of whole rows
    # (_nhwc_period_acc), at most _NHWC_PERIOD_MAX values each.
    _NHWC_PERIOD_C = 16
    _NHWC_PERIOD_MAX = 128
    # NHWC outputs not streamed are written in slices of this many values of whole rows
    # when their rows are shorter than _NHWC_SLICE_C channels, else row by row (see
    # _nhwc_slice_rows).
    _NHWC_SLICE = 512
    _NHWC_SLICE_C = 32
    _NHWC_MAX_STRIPES = 32
    # Below this many values a call runs on one thread (same grid, hence same result).
    _SERIAL_WORK = 32768

NCHW_CHUNK = _NCHW_CHUNK
NCHW_STRIPE_MAX_C = _NCHW_STRIPE_MAX_C
NCHW_TARGET_UNITS = _NCHW_TARGET_UNITS
NCHW_MIN_STRIPE_CHUNKS = _NCHW_MIN_STRIPE_CHUNKS
NHWC_CHUNK = _NHWC_CHUNK
NHWC_MAX_STRIPES = _NHWC_MAX_STRIPES
SERIAL_WORK = _SERIAL_WORK


# ---------------------------------------------------------------------------------------
# Store rule. An output (y or dx) larger than the caches is written with streaming stores
# (see _stream_stores.h): an ordinary store first reads the line it writes
# (read-for-ownership), one memory pass more. The rule is shape-only: stream when the output
# has at least `_stream_min_bytes` bytes (twice a core's L2 cache, read once at import; 4 MiB
# when the OS does not say), its contiguous runs have at least _STREAM_MIN_RUN values (NCHW
# rows; an NHWC stripe of rows is one run), and never in place (`y is x`, `dx is dy`): the
# lines were just read, so ordinary stores cost no extra pass there. Stores only move bits:
# the results are the same either way.
#
# Why the L2 and not the last-level cache: on the project machine (2 cores of a VM, 105 MB
# of L3 shared with the host) the L3 held about 16-32 MB for us, and streaming measured
# faster from 12 MB of output on: (32, 64, 56, 56) float32 inference 3.6 -> 3.0 ms NCHW,
# (4096, 1024) 2.1 -> 1.4 ms, (64, 256, 56, 56) NHWC 25 -> 19 ms; equal at 1.6 MB. Rows
# shorter than the minimum run (7x7 images) stream mostly through their scalar head and
# tail: (512, 512, 7, 7) inference took 7.0 ms streamed against 5.4 ms, hence the run rule.
# The NHWC kernels walk a stripe of whole rows as one flat run: a row of a numpy array
# starts mid-line, and a body started mid-line leaves half-written lines.
# A consumer that reads the output at once finds it in memory, not in cache: users move the
# threshold with fastbn.set_stream_threshold (which calls `stream_min_bytes`).
# ---------------------------------------------------------------------------------------
cdef enum:
    _STREAM_MIN_RUN = 4 * FBN_SBLOCK

cdef long _l2_bytes = fastbn_l2_bytes()
cdef Py_ssize_t _stream_min_bytes = 2 * _l2_bytes if _l2_bytes > 0 else 4 * 1024 * 1024


# Whether the walks over groups of short NCHW rows (``_group_pass``) request the next tile's
# lines as they read this one. A group holds up to NCHW_GROUP_CACHE values of the arrays it
# reads again from cache, 512 KiB of float32. With a core's L2 of 1 MiB (the Zen 4) the
# requests paid (numba's (128, 512, 7, 7) statistics, which make the same requests, took
# 0.88x-0.95x of the time with them); with 512 KiB (the Zen 3), which a group fills, they
# evict lines the group still needs: without them
# the training backward of (128, 512, 7, 7), (128, 256, 14, 14), (32, 256, 14, 14) and
# (16, 512, 7, 7) float32 took 0.85x-0.92x the time, their training forward 0.88x-0.99x
# (2 threads, same process). Same values either way.
cdef bint _tile_requests = _l2_bytes <= 0 or _l2_bytes > 4 * _NCHW_GROUP_CACHE


def tile_requests(enabled=None):
    """Return (and optionally set) whether the short-row group walks request the next
    tile of samples ahead of their reads (by default: when a core's L2 holds more than a
    group). Meant for tests and benchmarks; the results never depend on it.

    Parameters
    ----------
    enabled : bool, optional
        The new setting.

    Returns
    -------
    bool
        The setting before the call.
    """
    global _tile_requests
    cdef bint old = _tile_requests
    if enabled is not None:
        _tile_requests = bool(enabled)
    return old


def stream_min_bytes(n=None):
    """Return (and optionally set) the output size from which streaming stores are used.

    Parameters
    ----------
    n : int, optional
        New threshold in bytes (``0`` streams every output that is not written in place
        and whose runs are long enough).
        Meant for tests and benchmarks; the results never depend on it.

    Returns
    -------
    int
        The threshold before the call. Streaming stores are compiled in only on x86 (SSE2
        or AVX); elsewhere outputs always use ordinary stores.
    """
    global _stream_min_bytes
    cdef Py_ssize_t old = _stream_min_bytes
    if n is not None:
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        _stream_min_bytes = n
    return old


cdef inline bint _use_stream(const void* out, const void* a, const void* b,
                             idx_t nbytes, idx_t run) noexcept nogil:
    """Whether an output of ``nbytes`` at ``out`` (inputs ``a``, ``b``), written in
    contiguous runs of ``run`` values, is streamed."""
    return (FASTBN_STREAM_STORES and nbytes >= _stream_min_bytes and run >= _STREAM_MIN_RUN
            and out != a and out != b)


# ---------------------------------------------------------------------------------------
# Build information
# ---------------------------------------------------------------------------------------
def openmp_enabled():
    """Return whether the extension was compiled with OpenMP.

    Returns
    -------
    bool
        ``True`` when the kernels run their parallel regions with OpenMP; ``False`` when
        the build had no OpenMP and every kernel runs serially.
    """
    return bool(FASTBN_OPENMP_ENABLED)


def openmp_max_threads():
    """Return ``omp_get_max_threads()`` as the OpenMP runtime sees it (1 without OpenMP).

    Returns
    -------
    int
        The default team size of the OpenMP runtime (honours ``OMP_NUM_THREADS``).
    """
    return fastbn_omp_get_max_threads()


def openmp_version():
    """Return the ``_OPENMP`` date macro the extension was compiled with (0 without OpenMP).

    Returns
    -------
    int
        For example ``201511`` for OpenMP 4.5.
    """
    return fastbn_openmp_version()


def build_simd():
    """Return the widest SIMD instruction set this module was compiled for.

    Returns
    -------
    str
        ``"avx512f"``, ``"avx2"``, ``"avx"``, ``"sse2"`` or ``"generic"``.
    """
    return FASTBN_BUILD_SIMD.decode()


def cpu_has_x86_64(level):
    """Return whether the running CPU (and OS) can run the x86-64 `level` build.

    Parameters
    ----------
    level : {"v3", "v4"}
        ``"v3"``: AVX, AVX2, FMA, BMI1/2 and POPCNT; ``"v4"``: those and AVX-512
        F/BW/CD/DQ/VL.

    Returns
    -------
    bool
        ``True`` when the build of the kernels for `level` can run here.
    """
    if level == "v3":
        return bool(fastbn_cpu_has_x86_64_v3())
    if level == "v4":
        return bool(fastbn_cpu_has_x86_64_v4())
    raise ValueError(f"level must be 'v3' or 'v4', got {level!r}")


# ---------------------------------------------------------------------------------------
# Grid helpers
# ---------------------------------------------------------------------------------------
cdef inline idx_t _ceil_div(idx_t a, idx_t b) noexcept nogil:
    return (a + b - 1) // b


cdef inline idx_t _gcd(idx_t a, idx_t b) noexcept nogil:
    cdef idx_t t
    while b:
        t = a % b
        a = b
        b = t
    return a


cdef inline idx_t _nchw_stripe_len(idx_t C, idx_t M) noexcept nogil:
    """Length (in values, a multiple of the chunk) of one stripe of an NCHW channel."""
    cdef idx_t nchunks = _ceil_div(M, _NCHW_CHUNK)
    cdef idx_t want, most, ns, per
    if C >= _NCHW_STRIPE_MAX_C:
        return nchunks * _NCHW_CHUNK
    want = _ceil_div(_NCHW_TARGET_UNITS, C)
    most = nchunks // _NCHW_MIN_STRIPE_CHUNKS
    ns = want if want < most else most
    if ns < 1:
        ns = 1
    per = _ceil_div(nchunks, ns)
    return per * _NCHW_CHUNK


cdef inline idx_t _nchw_group(idx_t C, idx_t S, idx_t M, int reread,
                              bint backward) noexcept nogil:
    """Channels per work unit of the fused NCHW kernels (1: one channel at a time).

    With short rows (e.g. ``S = 49``) a channel is ``N`` scattered pieces of a few cache
    lines, which the hardware prefetcher does not follow. A group of ``G`` adjacent
    channels is ``N`` contiguous runs of ``G*S`` values, so the fused kernels walk it sample
    by sample. ``G*S`` aims at ``NCHW_GROUP_VALUES``; a group holds at most
    ``NCHW_GROUP_CACHE`` values of the ``reread`` arrays it reads again from cache for the
    output (the forward ``x``; the backward ``dy`` and ``x``: with one array's worth,
    (128, 512, 7, 7) float32 backward groups of 20 channels took 1.1x-1.2x the time of
    groups of 10 warm, 1.0x-1.1x after a flush), but at least 3 channels when one array's
    worth allows it ((128, 512, 14, 14): 3 channels 1.06x-1.10x faster than 5, 1.2x than
    2), and at most ``NCHW_GROUP_MAX`` channels. The group kernels sum each position of a
    sample over the samples, then a channel's positions (``_nchw_group_moments``): a
    channel's results do not depend on ``G``, only on the shape taking the group path.
    Those per-position sums pay only over enough samples and short rows: rows of
    ``NCHW_GROUP_SHORT_ROW`` values or more are grouped from ``GROUP_TILE`` samples on, and
    by the ``backward`` kernels below ``NCHW_GROUP_BACKWARD_ROW`` values only (the numba
    backend's rule; measured there and here, see ``nchw_sum_group`` of its kernels).
    """
    if S >= _NCHW_GROUP_SHORT_ROW and (
            M // S < _GROUP_TILE or (backward and S >= _NCHW_GROUP_BACKWARD_ROW)):
        return 1
    cdef idx_t g = _ceil_div(_NCHW_GROUP_VALUES, S)
    cdef idx_t most = _NCHW_GROUP_CACHE // (reread * M)
    if most < 3:  # runs of 1-2 channels cost more than a group spilling from L2
        most = _NCHW_GROUP_CACHE // M if _NCHW_GROUP_CACHE // M < 3 else 3
    if g > _NCHW_GROUP_MAX:
        g = _NCHW_GROUP_MAX
    if g > most:
        g = most
    if g > C:
        g = C
    return g if g > 1 else 1


cdef inline idx_t _group_end(idx_t u, idx_t g, idx_t C) noexcept nogil:
    """End channel of group ``u`` (channels ``[u*g, end)``; the last group may be short)."""
    return (u + 1) * g if (u + 1) * g < C else C


cdef inline idx_t _nhwc_chunk_rows(idx_t C) noexcept nogil:
    cdef idx_t br = _NHWC_CHUNK // C
    return br if br > 1 else 1


cdef inline idx_t _nhwc_stripe_rows(idx_t R, idx_t C) noexcept nogil:
    cdef idx_t br = _nhwc_chunk_rows(C)
    cdef idx_t nchunks = _ceil_div(R, br)
    cdef idx_t ns = nchunks if nchunks < _NHWC_MAX_STRIPES else _NHWC_MAX_STRIPES
    return _ceil_div(nchunks, ns) * br


cdef inline int _team(int nthreads, idx_t nunits, idx_t work) noexcept nogil:
    """Threads for a parallel region: never more than the units, 1 for small work."""
    if work < _SERIAL_WORK or nthreads < 1:
        return 1
    if nthreads > nunits:
        return <int>nunits
    return nthreads


def grid(layout, shape):
    """Describe the fixed work grid the kernels use for a canonical shape.

    Parameters
    ----------
    layout : {"nchw", "nhwc"}
        The canonical view.
    shape : tuple of int
        ``(N, C, S)`` for ``"nchw"``, ``(R, C)`` for ``"nhwc"``.

    Returns
    -------
    dict
        ``chunk`` (values per NCHW chunk, or rows per NHWC chunk), ``stripe`` (values per
        NCHW stripe, or rows per NHWC stripe), ``stripes`` (stripes per channel for NCHW,
        stripes over the rows for NHWC), ``fused`` (NCHW: whether a channel is
        normalized while in cache) and, for NCHW, ``group`` (channels per fused work unit;
        ``backward_group`` in the training backward) and ``streams``: values (NCHW) or rows (NHWC) per stream when the first stripe is
        read as interleaved streams (0: read in order).
    """
    cdef idx_t N, C, S, R, M, sl
    if layout == "nchw":
        N, C, S = shape
        M = N * S
        sl = _nchw_stripe_len(C, M)
        return {"chunk": _NCHW_CHUNK, "stripe": sl, "stripes": _ceil_div(M, sl),
                "fused": _ceil_div(M, sl) == 1,
                "group": _nchw_group(C, S, M, 1, False) if _ceil_div(M, sl) == 1 else 1,
                "backward_group": _nchw_group(C, S, M, 2, True) if _ceil_div(M, sl) == 1 else 1,
                "streams": _nchw_part(S, 0, sl if sl < M else M)}
    if layout == "nhwc":
        R, C = shape
        sl = _nhwc_stripe_rows(R, C)
        return {"chunk": _nhwc_chunk_rows(C), "stripe": sl, "stripes": _ceil_div(R, sl),
                "fused": False, "streams": _nhwc_part(C, 0, sl if sl < R else R,
                                                      _nhwc_chunk_rows(C))}
    raise ValueError(f"layout must be 'nchw' or 'nhwc', got {layout!r}")


# ---------------------------------------------------------------------------------------
# Contiguous-run primitives. The reductions sum into 16 independent float64 lanes (value
# i to lane i % 16), so the order of the additions is fixed by the code whatever the
# instruction set; they are the C loops of _lanes.h, which keep the lanes in SIMD registers
# and take two sums over the same data in one sweep.
# ---------------------------------------------------------------------------------------
cdef enum:
    _LANES = 16


cdef inline double _fold(const double* a) noexcept nogil:
    """Add the 16 lanes in a fixed tree."""
    return (((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]))) + (
        ((a[8] + a[9]) + (a[10] + a[11])) + ((a[12] + a[13]) + (a[14] + a[15])))


cdef inline void _zero(double* a) noexcept nogil:
    cdef int l
    for l in range(16):
        a[l] = 0.0


cdef inline void _acc_sum(const floating* p, idx_t n, double* a) noexcept nogil:
    """Lanes ``a`` += ``p`` (value ``i`` goes to lane ``i % 16``)."""
    if floating is float:
        fastbn_acc_sum_f32(p, n, a)
    else:
        fastbn_acc_sum_f64(p, n, a)


cdef inline void _acc_dev_sq(const floating* p, idx_t n, double m, double* a,
                             double* b) noexcept nogil:
    """Lanes ``a`` += ``p - m`` and lanes ``b`` += ``(p - m)**2``, in one sweep."""
    if floating is float:
        fastbn_acc_dev_sq_f32(p, n, m, a, b)
    else:
        fastbn_acc_dev_sq_f64(p, n, m, a, b)


cdef inline void _acc_sum_dot(const floating* g, const floating* p, idx_t n, double m,
                              double* a, double* b) noexcept nogil:
    """Lanes ``a`` += ``g`` and lanes ``b`` += ``g * (p - m)``, in one sweep."""
    if floating is float:
        fastbn_acc_sum_dot_f32(g, p, n, m, a, b)
    else:
        fastbn_acc_sum_dot_f64(g, p, n, m, a, b)


cdef inline void _cols_sum(const floating* x, idx_t rows, idx_t C, double* k) noexcept nogil:
    """``k[c]`` = sum of column ``c`` of the ``(rows, C)`` block ``x``, from row 0 down."""
    if floating is float:
        fastbn_cols_sum_f32(x, rows, C, k)
    else:
        fastbn_cols_sum_f64(x, rows, C, k)


cdef inline void _cols_dev_sq(const floating* x, idx_t rows, idx_t C, const double* k,
                              double* sd, double* sdd) noexcept nogil:
    """``sd[c]`` += sum(x[:, c] - k[c]), ``sdd[c]`` += sum((x[:, c] - k[c])**2)."""
    if floating is float:
        fastbn_cols_dev_sq_f32(x, rows, C, k, sd, sdd)
    else:
        fastbn_cols_dev_sq_f64(x, rows, C, k, sd, sdd)


# The elementwise loops are the blocked C loops of _elementwise.h: a plain loop stalled on
# every store when the output sits 16-63 bytes after the input modulo 1 MiB (3.5x slower).
cdef inline void _apply(const floating* x, floating* y, idx_t n,
                        double m, double sc, double b) noexcept nogil:
    """``y = (x - m) * sc + b`` in float64, rounded once (float32: ``x * sc + shift``, see
    ``fastbn_apply_f32``)."""
    if floating is float:
        fastbn_apply_f32(x, y, n, m, sc, b)
    else:
        fastbn_apply_f64(x, y, n, m, sc, b)


cdef inline void _apply_cols(const floating* x, floating* y, idx_t n, const double* m,
                             const double* sc, const double* b) noexcept nogil:
    """``_apply`` with constants per value; for float32, ``b`` holds the shifts
    (``_shift_table``) and ``m`` is not read."""
    if floating is float:
        fastbn_apply_cols_f32(x, y, n, sc, b)
    else:
        fastbn_apply_cols_f64(x, y, n, m, sc, b)


cdef inline void _shift_table(const double* m, const double* sc, double* b,
                              idx_t n) noexcept nogil:
    """``b[i] = b[i] - m[i] * sc[i]``: the shifts of the float32 apply tables
    (``fastbn_shift`` of _elementwise.h, value by value: the same bits)."""
    cdef idx_t i
    for i in range(n):
        b[i] = fastbn_shift(m[i], sc[i], b[i])


cdef inline void _dx(const floating* dy, const floating* x, floating* dx, idx_t n,
                     double m, double k, double a, double q) noexcept nogil:
    """``dx = k * ((dy - a) - (x - m) * q)`` in float64, rounded once."""
    if floating is float:
        fastbn_dx_f32(dy, x, dx, n, m, k, a, q)
    else:
        fastbn_dx_f64(dy, x, dx, n, m, k, a, q)


cdef inline void _dx_cols(const floating* dy, const floating* x, floating* dx, idx_t n,
                          const double* m, const double* k, const double* a,
                          const double* q) noexcept nogil:
    """``_dx`` with constants per value."""
    if floating is float:
        fastbn_dx_cols_f32(dy, x, dx, n, m, k, a, q)
    else:
        fastbn_dx_cols_f64(dy, x, dx, n, m, k, a, q)


cdef inline void _apply_out(const floating* x, floating* y, idx_t n, double m, double sc,
                            double b, bint stream) noexcept nogil:
    """``_apply``, with streaming stores when ``stream``."""
    if not stream:
        _apply(x, y, n, m, sc, b)
    elif floating is float:
        fastbn_apply_nt_f32(x, y, n, m, sc, b)
    else:
        fastbn_apply_nt_f64(x, y, n, m, sc, b)


cdef inline void _dx_out(const floating* dy, const floating* x, floating* dx, idx_t n,
                         double m, double k, double a, double q, bint stream) noexcept nogil:
    """``_dx``, with streaming stores when ``stream``."""
    if not stream:
        _dx(dy, x, dx, n, m, k, a, q)
    elif floating is float:
        fastbn_dx_nt_f32(dy, x, dx, n, m, k, a, q)
    else:
        fastbn_dx_nt_f64(dy, x, dx, n, m, k, a, q)


cdef inline void _chan(double* na, double* ma, double* m2a,
                       double nb, double mb, double m2b) noexcept nogil:
    """Merge the partial ``(nb, mb, m2b)`` into ``(na, ma, m2a)`` (Chan et al.)."""
    cdef double n, d
    if na[0] == 0.0:
        na[0] = nb
        ma[0] = mb
        m2a[0] = m2b
        return
    n = na[0] + nb
    d = mb - ma[0]
    ma[0] = ma[0] + d * (nb / n)
    m2a[0] = m2a[0] + m2b + d * d * (na[0] * nb / n)
    na[0] = n


# ---------------------------------------------------------------------------------------
# NCHW building blocks. `x` points at the first value of one channel (x + c*S); rows of
# that channel are `CS` values apart; `[a, b)` is a range of the flattened (n, s) index.
# ---------------------------------------------------------------------------------------
cdef void _nchw_prefetch(const floating* x, idx_t S, idx_t CS, idx_t a,
                         idx_t b) noexcept nogil:
    """Prefetch (into L2) the values ``[a, b)`` of one channel, one call per cache line."""
    cdef idx_t i, n, s, L, j
    cdef idx_t step = 64 // sizeof(floating)
    i = a
    n = i // S
    s = i - n * S
    while i < b:
        L = S - s
        if L > b - i:
            L = b - i
        j = 0
        while j < L:
            fastbn_prefetch(x + n * CS + s + j)
            j += step
        i += L
        n += 1
        s = 0


cdef inline void _nchw_span(const floating* g, const floating* x, idx_t S, idx_t CS, idx_t i,
                            idx_t e, int op, double m, double* la, double* lb) noexcept nogil:
    """Feed the values ``[i, e)`` of one channel, row piece by row piece, to the lanes:
    ``op`` 0 ``la += x``, 1 ``la += x - m, lb += (x - m)**2``, 2 ``la += g, lb += g*(x - m)``."""
    cdef idx_t n = i // S, s = i - n * S, L, o
    while i < e:
        L = S - s
        if L > e - i:
            L = e - i
        o = n * CS + s
        if op == 0:
            _acc_sum(x + o, L, la)
        elif op == 1:
            _acc_dev_sq(x + o, L, m, la, lb)
        else:
            _acc_sum_dot(g + o, x + o, L, m, la, lb)
        i += L
        n += 1
        s = 0


cdef inline idx_t _nchw_part(idx_t S, idx_t a, idx_t b) noexcept nogil:
    """Values per stream when ``[a, b)`` of a channel is read as FBN_STREAMS streams (0: not).

    As the long runs of _lanes.h: the range starts with FBN_STREAMS parts of the same whole
    number of rows, read _PIECE values of each part in turn, so that a core reads from
    several rows at once (a whole channel of (64, 256, 56, 56) is 64 rows 3.2 MB apart);
    the rest is read in order. Rows shorter than FBN_STREAMS pieces (7x7 images) and parts
    shorter than a chunk are read in order.
    """
    cdef idx_t p = (b - a) // (FBN_STREAMS * S) * S
    if S < FBN_STREAMS * _PIECE or p < _NCHW_CHUNK:
        return 0
    return p


cdef inline void _nchw_chunk(const floating* g, const floating* x, idx_t S, idx_t CS,
                             idx_t c0, idx_t c1, idx_t part, int op, double m, double* la,
                             double* lb) noexcept nogil:
    """Feed the FBN_STREAMS spans ``[c0 + j*part, c1 + j*part)`` of one channel to the lanes
    (as ``_nchw_span``), _PIECE values of each in turn; ``part`` is whole rows, so the spans
    are the same row pieces of rows ``part / S`` apart."""
    cdef idx_t i, j, n, s, L, o, k, w
    cdef idx_t d = part // S * CS
    i = c0
    n = i // S
    s = i - n * S
    while i < c1:
        L = S - s
        if L > c1 - i:
            L = c1 - i
        o = n * CS + s
        k = 0
        while k < L:
            w = L - k if L - k < _PIECE else _PIECE
            for j in range(FBN_STREAMS):
                if op == 0:
                    _acc_sum(x + o + j * d + k, w, la)
                elif op == 1:
                    _acc_dev_sq(x + o + j * d + k, w, m, la, lb)
                else:
                    _acc_sum_dot(g + o + j * d + k, x + o + j * d + k, w, m, la, lb)
            k += w
        i += L
        n += 1
        s = 0


cdef void _nchw_chunk_prefetch(const floating* x, idx_t S, idx_t CS, idx_t c0, idx_t c1,
                               idx_t part) noexcept nogil:
    """``_nchw_prefetch`` of the spans of ``_nchw_chunk``."""
    cdef idx_t j
    for j in range(FBN_STREAMS):
        _nchw_prefetch(x, S, CS, c0 + j * part, c1 + j * part)


cdef inline void _merge_chunk(double* cnt, double* mean, double* m2, double k, double kc,
                              const double* lanes, const double* lanes2) noexcept nogil:
    """Merge a chunk of ``k`` values centred on ``kc`` (lanes: ``sum(x - kc)``, lanes2:
    ``sum((x - kc)**2)``) into the partial ``(cnt, mean, m2)``: its exact
    ``(k, kc + sd/k, sdd - sd**2/k)``, Chan's formula."""
    cdef double sd = _fold(lanes)
    cdef double sdd = _fold(lanes2)
    cdef double cm2 = sdd - sd * sd / k
    if cm2 < 0.0:
        cm2 = 0.0
    _chan(cnt, mean, m2, k, kc + sd / k, cm2)


cdef void _nchw_moments_run(const floating* x, idx_t S, idx_t CS, idx_t a, idx_t b,
                            double* cnt, double* mean, double* m2) noexcept nogil:
    """Exact (count, mean, M2) of the values ``[a, b)`` of one channel, chunk by chunk, in
    order.

    Each chunk (in cache) is centred on ``K``: the mean of the chunks before it, or, for
    the first chunk, its own float64 mean (one extra loop). Then ``sd = sum(x - K)`` and
    ``sdd = sum((x - K)**2)`` give the exact partial ``(k, K + sd/k, sdd - sd**2/k)``,
    merged with Chan's formula in chunk order.
    """
    cdef idx_t ca, cb
    cdef double k, kc
    cdef double lanes[16]
    cdef double lanes2[16]
    cnt[0] = 0.0
    mean[0] = 0.0
    m2[0] = 0.0
    ca = a
    while ca < b:
        cb = ca + _NCHW_CHUNK
        if cb > b:
            cb = b
        k = <double>(cb - ca)
        if ca == a:
            _zero(lanes)
            _nchw_span(x, x, S, CS, ca, cb, 0, 0.0, lanes, lanes)
            kc = _fold(lanes) / k
        else:
            kc = mean[0]
        # The next chunk streams in from memory while this one is worked on in cache.
        _nchw_prefetch(x, S, CS, cb, cb + _NCHW_CHUNK if cb + _NCHW_CHUNK < b else b)
        _zero(lanes)
        _zero(lanes2)
        _nchw_span(x, x, S, CS, ca, cb, 1, kc, lanes, lanes2)
        _merge_chunk(cnt, mean, m2, k, kc, lanes, lanes2)
        ca = cb


cdef void _nchw_moments(const floating* x, idx_t S, idx_t CS, idx_t a, idx_t b,
                        double* cnt, double* mean, double* m2) noexcept nogil:
    """``_nchw_moments_run``; a long range starts with streams (``_nchw_part``).

    The streamed parts go chunk by chunk too: chunk ``j`` is the ``j``-th run of
    ``NCHW_CHUNK / FBN_STREAMS`` values of every part, centred and merged as in
    ``_nchw_moments_run``; the rest of the range is merged after them (Chan).
    """
    cdef idx_t part = _nchw_part(S, a, b)
    cdef idx_t q = _NCHW_CHUNK // FBN_STREAMS
    cdef idx_t end = a + part, ca, cb
    cdef double k, kc, rn, rm, rm2
    cdef double lanes[16]
    cdef double lanes2[16]
    if part == 0:
        _nchw_moments_run(x, S, CS, a, b, cnt, mean, m2)
        return
    cnt[0] = 0.0
    mean[0] = 0.0
    m2[0] = 0.0
    ca = a
    while ca < end:
        cb = ca + q if ca + q < end else end
        k = <double>((cb - ca) * FBN_STREAMS)
        if ca == a:
            _zero(lanes)
            _nchw_chunk(x, x, S, CS, ca, cb, part, 0, 0.0, lanes, lanes)
            kc = _fold(lanes) / k
        else:
            kc = mean[0]
        # The next chunk streams in from memory while this one is worked on in cache.
        if cb < end:
            _nchw_chunk_prefetch(x, S, CS, cb, cb + q if cb + q < end else end, part)
        _zero(lanes)
        _zero(lanes2)
        _nchw_chunk(x, x, S, CS, ca, cb, part, 1, kc, lanes, lanes2)
        _merge_chunk(cnt, mean, m2, k, kc, lanes, lanes2)
        ca = cb
    if a + FBN_STREAMS * part < b:
        _nchw_moments_run(x, S, CS, a + FBN_STREAMS * part, b, &rn, &rm, &rm2)
        _chan(cnt, mean, m2, rn, rm, rm2)


cdef inline void _rows_apply_nt(const floating* x, floating* y, idx_t nr, idx_t S, idx_t C,
                                idx_t c0, const double* m, const double* sc,
                                const double* b) noexcept nogil:
    """Streamed ``_apply`` of ``nr`` consecutive rows of ``S`` values, channel
    ``(c0 + r) % C``, walked as interleaved streams (_stream_stores.h). Only for data read
    from memory: the fused kernels apply a channel they have just read, from cache, where
    the streams measured 5-7% slower on (32, 64, 56, 56)."""
    if floating is float:
        fastbn_apply_rows_nt_f32(x, y, nr, S, C, c0, m, sc, b)
    else:
        fastbn_apply_rows_nt_f64(x, y, nr, S, C, c0, m, sc, b)


cdef void _nchw_apply(const floating* x, floating* y, idx_t S, idx_t CS, idx_t a, idx_t b,
                      double m, double sc, double bias, bint stream) noexcept nogil:
    cdef idx_t i, n, s, L
    i = a
    n = i // S
    s = i - n * S
    while i < b:
        L = S - s
        if L > b - i:
            L = b - i
        _apply_out(x + n * CS + s, y + n * CS + s, L, m, sc, bias, stream)
        i += L
        n += 1
        s = 0
    if stream:
        fastbn_sfence()


cdef void _nchw_rows_apply(const floating* x, floating* y, idx_t S, idx_t C, idx_t r0,
                           idx_t r1, const double* m, const double* sc,
                           const double* b, bint stream) noexcept nogil:
    """Normalize rows ``[r0, r1)`` of the ``(N*C, S)`` view, channel ``r % C``."""
    cdef idx_t r, c = r0 % C
    if stream:
        _rows_apply_nt(x + r0 * S, y + r0 * S, r1 - r0, S, C, c, m, sc, b)
        fastbn_sfence()
        return
    for r in range(r0, r1):
        _apply(x + r * S, y + r * S, S, m[c], sc[c], b[c])
        c += 1
        if c == C:
            c = 0


cdef void _nchw_bsums(const floating* dy, const floating* x, idx_t S, idx_t CS,
                      idx_t a, idx_t b, double m, double* sdy, double* sxm) noexcept nogil:
    """``sum(dy)`` and ``sum(dy * (x - m))`` over ``[a, b)`` of one channel (16 lanes); a
    long range is read as streams (``_nchw_part``), the rest in order."""
    cdef idx_t part = _nchw_part(S, a, b)
    cdef double la[16]
    cdef double lb[16]
    _zero(la)
    _zero(lb)
    if part:
        _nchw_chunk(dy, x, S, CS, a, a + part, part, 2, m, la, lb)
    _nchw_span(dy, x, S, CS, a + FBN_STREAMS * part, b, 2, m, la, lb)
    sdy[0] = _fold(la)
    sxm[0] = _fold(lb)


cdef void _nchw_dx(const floating* dy, const floating* x, floating* dx, idx_t S, idx_t CS,
                   idx_t a, idx_t b, double m, double k, double am, double q,
                   bint stream) noexcept nogil:
    cdef idx_t i, n, s, L
    i = a
    n = i // S
    s = i - n * S
    while i < b:
        L = S - s
        if L > b - i:
            L = b - i
        _dx_out(dy + n * CS + s, x + n * CS + s, dx + n * CS + s, L, m, k, am, q, stream)
        i += L
        n += 1
        s = 0
    if stream:
        fastbn_sfence()


cdef void _nchw_forward_channel(const floating* x, floating* y, idx_t S, idx_t CS, idx_t M,
                                double w, double bias, double eps, double* mean,
                                double* var, double* invstd, bint stream) noexcept nogil:
    """Statistics of one whole channel, then normalize it while it is in cache."""
    cdef double cnt, m, m2, v, inv
    _nchw_moments(x, S, CS, 0, M, &cnt, &m, &m2)
    v = m2 / <double>M
    inv = 1.0 / sqrt(v + eps)
    mean[0] = m
    var[0] = v
    invstd[0] = inv
    _nchw_apply(x, y, S, CS, 0, M, m, w * inv, bias, stream)


cdef void _nchw_backward_channel(const floating* dy, const floating* x, floating* dx,
                                 idx_t S, idx_t CS, idx_t M, double m, double inv, double w,
                                 double* sum_dy, double* sum_dy_xmu,
                                 bint stream) noexcept nogil:
    """Backward sums of one whole channel, then its ``dx`` while it is in cache."""
    cdef double sdy, sxm
    _nchw_bsums(dy, x, S, CS, 0, M, m, &sdy, &sxm)
    sum_dy[0] = sdy
    sum_dy_xmu[0] = sxm
    _nchw_dx(dy, x, dx, S, CS, 0, M, m, w * inv, sdy / <double>M,
             inv * inv * sxm / <double>M, stream)


cdef inline void _prefetch_run(const void* p, idx_t nbytes, bint write) noexcept nogil:
    """Prefetch (into L2) the contiguous bytes ``[p, p + nbytes)``, one call per line."""
    cdef const char* q = <const char*>p
    cdef idx_t j
    for j in range(0, nbytes, 64):
        if write:
            fastbn_prefetch_w(q + j)
        else:
            fastbn_prefetch(q + j)


cdef inline void _group_tile(const floating* g, const floating* x, int nr, idx_t CS, idx_t W,
                             int op, const double* m, double* a, double* b,
                             int nnr) noexcept nogil:
    """Samples ``x + j*CS`` (``j < nr``) of ``W`` positions, in order, onto positional
    accumulators: ``op`` 0 ``a += x``, 1 ``a += x - m, b += (x - m)**2``,
    2 ``a += g, b += g*(x - m)`` (``m`` per position); the ``nnr`` samples after them are
    requested as the positions are read (``_group_pass``)."""
    cdef idx_t ahead = nr * CS
    if floating is float:
        if op == 0:
            fastbn_rows_add_f32(x, nr, CS, W, a, ahead, nnr)
        elif op == 1:
            fastbn_rows_dev_sq_f32(x, nr, CS, W, m, a, b, ahead, nnr)
        else:
            fastbn_rows_sum_dot_f32(g, x, nr, CS, W, m, a, b, ahead, nnr)
    else:
        if op == 0:
            fastbn_rows_add_f64(x, nr, CS, W, a, ahead, nnr)
        elif op == 1:
            fastbn_rows_dev_sq_f64(x, nr, CS, W, m, a, b, ahead, nnr)
        else:
            fastbn_rows_sum_dot_f64(g, x, nr, CS, W, m, a, b, ahead, nnr)


cdef void _group_pass(const floating* g, const floating* x, idx_t S, idx_t CS, idx_t N,
                      idx_t c0, idx_t G, int op, const double* m, double* a,
                      double* b) noexcept nogil:
    """``_group_tile`` over every sample of channels ``[c0, c0 + G)``, from zero.

    Position ``w = j*S + s`` is value ``s`` of channel ``c0 + j``: a group's sample is one
    contiguous run of ``W = G*S`` values, and the samples are taken ``_GROUP_TILE`` at a
    time, in order, the accumulators loaded and stored once per tile. The runs are on other
    pages sample after sample, which the hardware prefetcher does not follow: the next
    tile's runs are requested while this one is summed, a line of each at every line of
    the positions read, when ``_tile_requests`` (a core's L2 larger than a group).
    Requested all at once at the start of the tile instead, the statistics of
    (128, 512, 7, 7) float32 took 1.10x-1.18x as long on 2 threads.
    """
    cdef idx_t W = G * S, n, o
    cdef int nr, nnr
    for o in range(W):
        a[o] = 0.0
        if op:
            b[o] = 0.0
    n = 0
    while n < N:
        nr = _GROUP_TILE if n + _GROUP_TILE <= N else <int>(N - n)
        nnr = _GROUP_TILE if n + nr + _GROUP_TILE <= N else <int>(N - n - nr)
        o = n * CS + c0 * S
        _group_tile(g + o, x + o, nr, CS, W, op, m, a, b, nnr if _tile_requests else 0)
        n += _GROUP_TILE


cdef inline double _pos_sum(const double* pos, idx_t S) noexcept nogil:
    """The positions of one channel added up: position ``s`` to lane ``s % 16``, folded."""
    cdef double lanes[16]
    _zero(lanes)
    _acc_sum(pos, S, lanes)
    return _fold(lanes)


cdef inline void _expand(double* e, const double* v, idx_t S, idx_t G) noexcept nogil:
    """``e[j*S + s] = v[j]``: a per-channel value at every position of a group (``e`` may
    be ``v``: the channels are taken last first)."""
    cdef idx_t j, s
    cdef double vj
    for j in range(G - 1, -1, -1):
        vj = v[j]
        for s in range(S):
            e[j * S + s] = vj


cdef void _nchw_group_moments(const floating* x, idx_t S, idx_t CS, idx_t N, idx_t c0,
                              idx_t c1, double* mean, double* m2) noexcept nogil:
    """Exact ``(mean, M2)`` of each channel of ``[c0, c1)``.

    One pass over the group centred on ``K``, the float64 mean of its first
    ``_GROUP_TILE`` samples (summed first; the pass reads them again from cache):
    ``sd = sum(x - K)`` and ``sdd = sum((x - K)**2)`` give ``mean = K + sd/M`` and
    ``M2 = sdd - sd**2/M`` exactly, as a chunk centred on the chunks before it. Each pass sums every position of the group
    over the samples in order (``_group_pass``), then the positions of a channel
    (``_pos_sum``): with short rows (7x7) a walk channel by channel made one call per 49
    values on the same accumulators.
    """
    cdef double t[3 * _GROUP_W_MAX]
    cdef idx_t G = c1 - c0, W = G * S, M = N * S, j
    cdef idx_t n0 = N if N < _GROUP_TILE else _GROUP_TILE
    cdef double* a = t
    cdef double* b = t + W
    cdef double* k = t + 2 * W
    cdef double sd, cm2
    _group_pass(x, x, S, CS, n0, c0, G, 0, k, a, b)
    for j in range(G):
        mean[c0 + j] = _pos_sum(a + j * S, S) / <double>(n0 * S)
    _expand(k, mean + c0, S, G)
    _group_pass(x, x, S, CS, N, c0, G, 1, k, a, b)
    for j in range(G):
        sd = _pos_sum(a + j * S, S)
        cm2 = _pos_sum(b + j * S, S) - sd * sd / <double>M
        mean[c0 + j] = k[j * S] + sd / <double>M
        m2[c0 + j] = 0.0 if cm2 < 0.0 else cm2  # a NaN stays NaN


cdef void _nchw_group_bsums(const floating* dy, const floating* x, idx_t S, idx_t CS,
                            idx_t N, idx_t c0, idx_t c1, const double* mean, double* sum_dy,
                            double* sum_dy_xmu) noexcept nogil:
    """``sum(dy)`` and ``sum(dy * (x - mean))`` of each channel of ``[c0, c1)`` in one pass
    over the group (``_group_pass``)."""
    cdef double t[3 * _GROUP_W_MAX]
    cdef idx_t G = c1 - c0, W = G * S, j
    _expand(t + 2 * W, mean + c0, S, G)
    _group_pass(dy, x, S, CS, N, c0, G, 2, t + 2 * W, t, t + W)
    for j in range(G):
        sum_dy[c0 + j] = _pos_sum(t + j * S, S)
        sum_dy_xmu[c0 + j] = _pos_sum(t + W + j * S, S)


cdef void _nchw_forward_group(const floating* x, floating* y, idx_t S, idx_t CS, idx_t N,
                              idx_t c0, idx_t c1, const double* w, const double* bias,
                              double eps, double* mean, double* var, double* invstd,
                              bint stream) noexcept nogil:
    """``_nchw_forward_channel`` for channels ``[c0, c1)``, ``y`` written sample by sample
    (a run of ``G*S`` values with the constants of every position, same bits as row by
    row)."""
    cdef double t[3 * _GROUP_W_MAX]
    cdef idx_t G = c1 - c0, W = G * S, M = N * S, c, n, o
    _nchw_group_moments(x, S, CS, N, c0, c1, mean, var)
    for c in range(c0, c1):
        var[c] = var[c] / <double>M
        invstd[c] = 1.0 / sqrt(var[c] + eps)
        t[c - c0] = w[c] * invstd[c]
    _expand(t + W, t, S, G)
    _expand(t, mean + c0, S, G)
    _expand(t + 2 * W, bias + c0, S, G)
    if floating is float:
        _shift_table(t, t + W, t + 2 * W, W)
    for n in range(N):
        o = n * CS + c0 * S
        if stream:
            if floating is float:
                fastbn_apply_cols_nt_f32(x + o, y + o, W, W, t + W, t + 2 * W)
            else:
                fastbn_apply_cols_nt_f64(x + o, y + o, W, W, t, t + W, t + 2 * W)
            continue
        # A group's runs are on other pages sample after sample: the hardware prefetcher
        # does not follow, so the output lines of a later sample are requested now.
        if n + _NCHW_GROUP_AHEAD < N:
            _prefetch_run(y + o + _NCHW_GROUP_AHEAD * CS, W * sizeof(floating), True)
        _apply_cols(x + o, y + o, W, t, t + W, t + 2 * W)
    if stream:
        fastbn_sfence()


cdef void _nchw_backward_group(const floating* dy, const floating* x, floating* dx, idx_t S,
                               idx_t CS, idx_t N, idx_t c0, idx_t c1, const double* mean,
                               const double* invstd, const double* w, double* sum_dy,
                               double* sum_dy_xmu, bint stream) noexcept nogil:
    """``_nchw_backward_channel`` for channels ``[c0, c1)``, read sample by sample (``dx``
    as ``y`` in ``_nchw_forward_group``)."""
    cdef double t[4 * _GROUP_W_MAX]
    cdef idx_t G = c1 - c0, W = G * S, M = N * S, c, n, o
    cdef double inv
    _nchw_group_bsums(dy, x, S, CS, N, c0, c1, mean, sum_dy, sum_dy_xmu)
    # k, a, mean, q at every position: t, t + W, t + 2W, t + 3W.
    for c in range(c0, c1):
        inv = invstd[c]
        t[c - c0] = w[c] * inv
        t[W + c - c0] = sum_dy[c] / <double>M
        t[3 * W + c - c0] = inv * inv * sum_dy_xmu[c] / <double>M
    _expand(t + 3 * W, t + 3 * W, S, G)
    _expand(t + 2 * W, mean + c0, S, G)
    _expand(t + W, t + W, S, G)
    _expand(t, t, S, G)
    for n in range(N):
        o = n * CS + c0 * S
        if stream:
            if floating is float:
                fastbn_dx_cols_nt_f32(dy + o, x + o, dx + o, W, W, t + 2 * W, t, t + W,
                                      t + 3 * W)
            else:
                fastbn_dx_cols_nt_f64(dy + o, x + o, dx + o, W, W, t + 2 * W, t, t + W,
                                      t + 3 * W)
            continue
        if n + _NCHW_GROUP_AHEAD < N:
            _prefetch_run(dx + o + _NCHW_GROUP_AHEAD * CS, W * sizeof(floating), True)
        _dx_cols(dy + o, x + o, dx + o, W, t + 2 * W, t, t + W, t + 3 * W)
    if stream:
        fastbn_sfence()


cdef void _merge_partials(idx_t C, idx_t ns, const double* pn, const double* pm,
                          const double* pm2, double* mean, double* m2) noexcept nogil:
    """Merge the ``ns`` stripe partials of every channel in stripe order."""
    cdef idx_t c, k, u
    cdef double cnt, mm, mm2
    for c in range(C):
        cnt = 0.0
        mm = 0.0
        mm2 = 0.0
        for k in range(ns):
            u = c * ns + k
            _chan(&cnt, &mm, &mm2, pn[u], pm[u], pm2[u])
        mean[c] = mm
        m2[c] = mm2


cdef double* _alloc(idx_t n) except NULL:
    cdef double* p = <double*>malloc((n if n > 0 else 1) * sizeof(double))
    if p == NULL:
        raise MemoryError(f"fastbn: cannot allocate {n} float64 temporaries")
    return p


cdef inline int _check_vec(const double[::1] v, idx_t C, str name) except -1:
    if v.shape[0] != C:
        raise ValueError(f"{name} has shape ({v.shape[0]},), expected ({C},)")
    return 0


cdef inline int _check_same3(const idx_t* a, const idx_t* b, str name) except -1:
    if a[0] != b[0] or a[1] != b[1] or a[2] != b[2]:
        raise ValueError(f"{name} has shape {(b[0], b[1], b[2])}, expected "
                         f"{(a[0], a[1], a[2])}")
    return 0


cdef inline int _check_same2(const idx_t* a, const idx_t* b, str name) except -1:
    if a[0] != b[0] or a[1] != b[1]:
        raise ValueError(f"{name} has shape {(b[0], b[1])}, expected {(a[0], a[1])}")
    return 0


cdef inline int _check_nonempty(idx_t M, idx_t C) except -1:
    if M < 1 or C < 1:
        raise ValueError(f"empty input: M={M}, C={C}")
    return 0


# ---------------------------------------------------------------------------------------
# NCHW kernels: x is (N, C, S)
# ---------------------------------------------------------------------------------------
def nchw_stats(const floating[:, :, ::1] x, double[::1] mean, double[::1] var, int nthreads):
    """Per-channel mean and population variance of an ``(N, C, S)`` array.

    Parameters
    ----------
    x : ndarray of shape (N, C, S), float32 or float64, C-contiguous
        The data.
    mean, var : ndarray of shape (C,), float64
        Outputs: the mean and ``M2 / M``.
    nthreads : int
        Threads to use; the result does not depend on it.
    """
    cdef idx_t N = x.shape[0], C = x.shape[1], S = x.shape[2]
    cdef idx_t M = N * S, CS = C * S
    _check_nonempty(M, C)
    _check_vec(mean, C, "mean")
    _check_vec(var, C, "var")
    cdef idx_t sl = _nchw_stripe_len(C, M)
    cdef idx_t ns = _ceil_div(M, sl)
    cdef idx_t nu = C * ns, u, c, k, e
    cdef int nt = _team(nthreads, nu, M * C)
    cdef const floating* xp = &x[0, 0, 0]
    cdef double* mp = &mean[0]
    cdef double* vp = &var[0]
    cdef double* pn
    cdef double* pm
    cdef double* pm2
    cdef idx_t g = _nchw_group(C, S, M, 1, False) if ns == 1 else 1
    if g > 1:
        # Short rows: groups of channels, walked sample by sample (the fused kernels' grid).
        nt = _team(nthreads, _ceil_div(C, g), M * C)
        with nogil:
            for u in prange(_ceil_div(C, g), schedule="static", num_threads=nt):
                e = _group_end(u, g, C)
                _nchw_group_moments(xp, S, CS, N, u * g, e, mp, vp)
            for c in range(C):
                vp[c] = vp[c] / <double>M
        return
    pn = _alloc(nu)
    try:
        pm = _alloc(nu)
        try:
            pm2 = _alloc(nu)
            with nogil:
                for u in prange(nu, schedule="static", num_threads=nt):
                    c = u // ns
                    k = u - c * ns
                    e = (k + 1) * sl
                    if e > M:
                        e = M
                    _nchw_moments(xp + c * S, S, CS, k * sl, e, &pn[u], &pm[u], &pm2[u])
                _merge_partials(C, ns, pn, pm, pm2, mp, vp)
                for c in range(C):
                    vp[c] = vp[c] / <double>M
            free(pm2)
        finally:
            free(pm)
    finally:
        free(pn)


def nchw_train_forward(const floating[:, :, ::1] x, const double[::1] weight,
                       const double[::1] bias, double eps, floating[:, :, ::1] y,
                       double[::1] mean, double[::1] var, double[::1] invstd, int nthreads):
    """Training forward on ``(N, C, S)``: batch statistics, then ``y``.

    Parameters
    ----------
    x : ndarray of shape (N, C, S), float32 or float64, C-contiguous
        The data.
    weight, bias : ndarray of shape (C,), float64
        Affine parameters.
    eps : float
        Added to the variance.
    y : ndarray like x
        Output ``(x - mean) * (weight * invstd) + bias``; may be ``x`` itself.
    mean, var, invstd : ndarray of shape (C,), float64
        Outputs: batch mean, population variance and ``1 / sqrt(var + eps)``.
    nthreads : int
        Threads to use; the result does not depend on it.
    """
    cdef idx_t N = x.shape[0], C = x.shape[1], S = x.shape[2]
    cdef idx_t M = N * S, CS = C * S
    _check_nonempty(M, C)
    _check_same3(x.shape, y.shape, "y")
    _check_vec(weight, C, "weight")
    _check_vec(bias, C, "bias")
    _check_vec(mean, C, "mean")
    _check_vec(var, C, "var")
    _check_vec(invstd, C, "invstd")
    cdef idx_t sl = _nchw_stripe_len(C, M)
    cdef idx_t ns = _ceil_div(M, sl)
    cdef idx_t nu = C * ns, u, c, k, e
    cdef int nt = _team(nthreads, nu, M * C)
    cdef const floating* xp = &x[0, 0, 0]
    cdef floating* yp = &y[0, 0, 0]
    cdef const double* wp = &weight[0]
    cdef const double* bp = &bias[0]
    cdef double* mp = &mean[0]
    cdef double* vp = &var[0]
    cdef double* ip = &invstd[0]
    cdef double* pn
    cdef double* pm
    cdef double* pm2
    cdef bint st = _use_stream(yp, xp, xp, M * C * sizeof(floating), S)
    cdef idx_t g = _nchw_group(C, S, M, 1, False) if ns == 1 else 1
    if g > 1:
        # A group writes runs of g*S values (the last group's may be shorter).
        st = _use_stream(yp, xp, xp, M * C * sizeof(floating), (C - (C - 1) // g * g) * S)
        nt = _team(nthreads, _ceil_div(C, g), M * C)
        with nogil:
            for u in prange(_ceil_div(C, g), schedule="static", num_threads=nt):
                e = _group_end(u, g, C)
                _nchw_forward_group(xp, yp, S, CS, N, u * g, e, wp, bp, eps, mp, vp, ip, st)
        return
    if ns == 1:
        with nogil:
            for c in prange(C, schedule="static", num_threads=nt):
                _nchw_forward_channel(xp + c * S, yp + c * S, S, CS, M, wp[c], bp[c], eps,
                                      &mp[c], &vp[c], &ip[c], st)
        return
    pn = _alloc(nu)
    try:
        pm = _alloc(nu)
        try:
            pm2 = _alloc(nu)
            with nogil:
                for u in prange(nu, schedule="static", num_threads=nt):
                    c = u // ns
                    k = u - c * ns
                    e = (k + 1) * sl
                    if e > M:
                        e = M
                    _nchw_moments(xp + c * S, S, CS, k * sl, e, &pn[u], &pm[u], &pm2[u])
                _merge_partials(C, ns, pn, pm, pm2, mp, vp)
                for c in range(C):
                    vp[c] = vp[c] / <double>M
                    ip[c] = 1.0 / sqrt(vp[c] + eps)
                for u in prange(nu, schedule="static", num_threads=nt):
                    c = u // ns
                    k = u - c * ns
                    e = (k + 1) * sl
                    if e > M:
                        e = M
                    _nchw_apply(xp + c * S, yp + c * S, S, CS, k * sl, e, mp[c],
                                wp[c] * ip[c], bp[c], st)
            free(pm2)
        finally:
            free(pm)
    finally:
        free(pn)


def nchw_normalize(const floating[:, :, ::1] x, const double[::1] mean,
                   const double[::1] scale, const double[::1] bias, floating[:, :, ::1] y,
                   int nthreads):
    """``y = (x - mean) * scale + bias`` per channel on ``(N, C, S)``.

    Parameters
    ----------
    x : ndarray of shape (N, C, S), float32 or float64, C-contiguous
        The data.
    mean, scale, bias : ndarray of shape (C,), float64
        Per-channel constants.
    y : ndarray like x
        Output; may be ``x`` itself.
    nthreads : int
        Threads to use; the result does not depend on it.
    """
    cdef idx_t N = x.shape[0], C = x.shape[1], S = x.shape[2]
    cdef idx_t M = N * S
    _check_nonempty(M, C)
    _check_same3(x.shape, y.shape, "y")
    _check_vec(mean, C, "mean")
    _check_vec(scale, C, "scale")
    _check_vec(bias, C, "bias")
    # Blocks of whole rows (one row = one channel of one sample), about NCHW_CHUNK values.
    cdef idx_t nrows = N * C, r, c, blk, e
    cdef idx_t rb = _NCHW_CHUNK // S if S < _NCHW_CHUNK else 1
    cdef idx_t nblk = _ceil_div(nrows, rb)
    cdef int nt = _team(nthreads, nblk, M * C)
    cdef const floating* xp = &x[0, 0, 0]
    cdef floating* yp = &y[0, 0, 0]
    cdef const double* mp = &mean[0]
    cdef const double* sp = &scale[0]
    cdef const double* bp = &bias[0]
    cdef bint st = _use_stream(yp, xp, xp, M * C * sizeof(floating), S)
    if st:
        # Streamed: one block of consecutive rows per thread, walked as interleaved streams.
        rb = _ceil_div(nrows, nt)
        nblk = _ceil_div(nrows, rb)
    with nogil:
        for blk in prange(nblk, schedule="static", num_threads=nt):
            e = (blk + 1) * rb
            if e > nrows:
                e = nrows
            _nchw_rows_apply(xp, yp, S, C, blk * rb, e, mp, sp, bp, st)


def nchw_backward_reduce(const floating[:, :, ::1] dy, const floating[:, :, ::1] x,
                         const double[::1] mean, double[::1] sum_dy, double[::1] sum_dy_xmu,
                         int nthreads):
    """Per-channel ``sum(dy)`` and ``sum(dy * (x - mean))`` on ``(N, C, S)``.

    Parameters
    ----------
    dy, x : ndarray of shape (N, C, S), float32 or float64, C-contiguous
        Gradient of the output and the forward input.
    mean : ndarray of shape (C,), float64
        The mean used by the forward.
    sum_dy, sum_dy_xmu : ndarray of shape (C,), float64
        Outputs.
    nthreads : int
        Threads to use; the result does not depend on it.
    """
    cdef idx_t N = x.shape[0], C = x.shape[1], S = x.shape[2]
    cdef idx_t M = N * S, CS = C * S
    _check_nonempty(M, C)
    _check_same3(x.shape, dy.shape, "dy")
    _check_vec(mean, C, "mean")
    _check_vec(sum_dy, C, "sum_dy")
    _check_vec(sum_dy_xmu, C, "sum_dy_xmu")
    cdef idx_t sl = _nchw_stripe_len(C, M)
    cdef idx_t ns = _ceil_div(M, sl)
    cdef idx_t nu = C * ns, u, c, k, e
    cdef int nt = _team(nthreads, nu, M * C)
    cdef const floating* gp = &dy[0, 0, 0]
    cdef const floating* xp = &x[0, 0, 0]
    cdef const double* mp = &mean[0]
    cdef double* sp = &sum_dy[0]
    cdef double* qp = &sum_dy_xmu[0]
    cdef double* ps
    cdef idx_t g = _nchw_group(C, S, M, 1, True) if ns == 1 else 1
    if g > 1:
        # Short rows: the sums of the fused kernel's groups, walked sample by sample.
        nt = _team(nthreads, _ceil_div(C, g), M * C)
        with nogil:
            for u in prange(_ceil_div(C, g), schedule="static", num_threads=nt):
                e = _group_end(u, g, C)
                _nchw_group_bsums(gp, xp, S, CS, N, u * g, e, mp, sp, qp)
        return
    ps = _alloc(2 * nu)
    try:
        with nogil:
            for u in prange(nu, schedule="static", num_threads=nt):
                c = u // ns
                k = u - c * ns
                e = (k + 1) * sl
                if e > M:
                    e = M
                _nchw_bsums(gp + c * S, xp + c * S, S, CS, k * sl, e, mp[c],
                            &ps[2 * u], &ps[2 * u + 1])
            for c in range(C):
                sp[c] = ps[2 * c * ns]
                qp[c] = ps[2 * c * ns + 1]
                for k in range(1, ns):
                    sp[c] = sp[c] + ps[2 * (c * ns + k)]
                    qp[c] = qp[c] + ps[2 * (c * ns + k) + 1]
    finally:
        free(ps)


def nchw_backward_train(const floating[:, :, ::1] dy, const floating[:, :, ::1] x,
                        const double[::1] mean, const double[::1] invstd,
                        const double[::1] weight, floating[:, :, ::1] dx,
                        double[::1] sum_dy, double[::1] sum_dy_xmu, int nthreads):
    """Training backward on ``(N, C, S)``: the two sums, then ``dx``.

    Parameters
    ----------
    dy, x : ndarray of shape (N, C, S), float32 or float64, C-contiguous
        Gradient of the output and the forward input.
    mean, invstd, weight : ndarray of shape (C,), float64
        Saved statistics and the scale parameter.
    dx : ndarray like x
        Output ``weight*invstd*(dy - sum_dy/M - (x-mean)*invstd**2*sum_dy_xmu/M)``; may be
        ``dy`` itself.
    sum_dy, sum_dy_xmu : ndarray of shape (C,), float64
        Outputs: ``sum(dy)`` and ``sum(dy * (x - mean))``.
    nthreads : int
        Threads to use; the result does not depend on it.
    """
    cdef idx_t N = x.shape[0], C = x.shape[1], S = x.shape[2]
    cdef idx_t M = N * S, CS = C * S
    _check_nonempty(M, C)
    _check_same3(x.shape, dy.shape, "dy")
    _check_same3(x.shape, dx.shape, "dx")
    _check_vec(mean, C, "mean")
    _check_vec(invstd, C, "invstd")
    _check_vec(weight, C, "weight")
    _check_vec(sum_dy, C, "sum_dy")
    _check_vec(sum_dy_xmu, C, "sum_dy_xmu")
    cdef idx_t sl = _nchw_stripe_len(C, M)
    cdef idx_t ns = _ceil_div(M, sl)
    cdef idx_t nu = C * ns, u, c, k, e
    cdef int nt = _team(nthreads, nu, M * C)
    cdef const floating* gp = &dy[0, 0, 0]
    cdef const floating* xp = &x[0, 0, 0]
    cdef floating* dp = &dx[0, 0, 0]
    cdef const double* mp = &mean[0]
    cdef const double* ip = &invstd[0]
    cdef const double* wp = &weight[0]
    cdef double* sp = &sum_dy[0]
    cdef double* qp = &sum_dy_xmu[0]
    cdef double* ps
    cdef double inv
    cdef bint st = _use_stream(dp, gp, xp, M * C * sizeof(floating), S)
    cdef idx_t g = _nchw_group(C, S, M, 2, True) if ns == 1 else 1
    if g > 1:
        # A group writes runs of g*S values (the last group's may be shorter).
        st = _use_stream(dp, gp, xp, M * C * sizeof(floating), (C - (C - 1) // g * g) * S)
        nt = _team(nthreads, _ceil_div(C, g), M * C)
        with nogil:
            for u in prange(_ceil_div(C, g), schedule="static", num_threads=nt):
                e = _group_end(u, g, C)
                _nchw_backward_group(gp, xp, dp, S, CS, N, u * g, e, mp, ip, wp, sp, qp, st)
        return
    if ns == 1:
        with nogil:
            for c in prange(C, schedule="static", num_threads=nt):
                _nchw_backward_channel(gp + c * S, xp + c * S, dp + c * S, S, CS, M,
                                       mp[c], ip[c], wp[c], &sp[c], &qp[c], st)
        return
    ps = _alloc(2 * nu)
    try:
        with nogil:
            for u in prange(nu, schedule="static", num_threads=nt):
                c = u // ns
                k = u - c * ns
                e = (k + 1) * sl
                if e > M:
                    e = M
                _nchw_bsums(gp + c * S, xp + c * S, S, CS, k * sl, e, mp[c],
                            &ps[2 * u], &ps[2 * u + 1])
            for c in range(C):
                sp[c] = ps[2 * c * ns]
                qp[c] = ps[2 * c * ns + 1]
                for k in range(1, ns):
                    sp[c] = sp[c] + ps[2 * (c * ns + k)]
                    qp[c] = qp[c] + ps[2 * (c * ns + k) + 1]
            for u in prange(nu, schedule="static", num_threads=nt):
                c = u // ns
                k = u - c * ns
                e = (k + 1) * sl
                if e > M:
                    e = M
                inv = ip[c]
                _nchw_dx(gp + c * S, xp + c * S, dp + c * S, S, CS, k * sl, e, mp[c],
                         wp[c] * inv, sp[c] / <double>M, inv * inv * qp[c] / <double>M, st)
    finally:
        free(ps)


# ---------------------------------------------------------------------------------------
# NHWC building blocks: x is (R, C), loops run across the contiguous channels
# ---------------------------------------------------------------------------------------
cdef inline idx_t _nhwc_part(idx_t C, idx_t r0, idx_t r1, idx_t br) noexcept nogil:
    """Rows per stream when the statistics read rows ``[r0, r1)`` as FBN_STREAMS streams.

    The stripe is read as FBN_STREAMS parts of the same number of rows, a row of each part
    in turn into per-column accumulators (_lanes.h ``fastbn_rows_*``): a core reads from
    four places at once, in order within each (the column blocks of ``_cols_*`` read a chunk
    across its rows: (64, 56, 56, 256) statistics measured 20-23 ms that way in a C harness
    against 15 ms with four row streams). A chunk is ``br / FBN_STREAMS`` rows of each part
    (the last one shorter); the fewer than FBN_STREAMS rows left over make a chunk of their
    own. Parts of whole chunks only left up to 3 chunks of a stripe to the column blocks:
    (100352, 64) float32 statistics 1.36x faster on one core and on two, the training
    forward 1.26x (same process, old against new build).
    Rows of fewer than ``_NHWC_ROW_MIN_C`` channels, and stripes of less than a chunk, are
    read chunk by chunk in order (0).
    """
    cdef idx_t p
    if C < _NHWC_ROW_MIN_C:
        return 0
    p = (r1 - r0) // FBN_STREAMS
    return p if p * FBN_STREAMS >= br else 0


cdef inline void _nhwc_rows_acc(const floating* x, idx_t C, idx_t ra, idx_t rb, idx_t part,
                                bint dev, double* kc, double* sd,
                                double* sdd) noexcept nogil:
    """Rows ``[ra + j*part, rb + j*part)`` for each stream ``j``, a row of each in turn, into
    ``kc`` (``dev`` false: ``kc += x``) or ``sd``, ``sdd`` (deviations from ``kc``)."""
    cdef idx_t r
    for r in range(ra, rb):
        if floating is float:
            if dev:
                fastbn_rows_dev_sq_f32(x + r * C, FBN_STREAMS, part * C, C, kc, sd, sdd, 0, 0)
            else:
                fastbn_rows_add_f32(x + r * C, FBN_STREAMS, part * C, C, kc, 0, 0)
        else:
            if dev:
                fastbn_rows_dev_sq_f64(x + r * C, FBN_STREAMS, part * C, C, kc, sd, sdd, 0, 0)
            else:
                fastbn_rows_add_f64(x + r * C, FBN_STREAMS, part * C, C, kc, 0, 0)


cdef inline idx_t _nhwc_period(idx_t C) noexcept nogil:
    """Values per period of the flat NHWC sums (``_nhwc_period_acc``): a multiple of ``C``
    and of 8, at least 64; 0 from ``_NHWC_PERIOD_C`` channels on (rows summed as such)."""
    cdef idx_t t
    if C >= _NHWC_PERIOD_C:
        return 0
    t = C * 8 // _gcd(C, 8)
    return t * _ceil_div(64, t)


cdef void _nhwc_period_acc(const floating* g, const floating* x, idx_t C, idx_t ra,
                           idx_t rb, idx_t per, int op, const double* m, double* a,
                           double* b) noexcept nogil:
    """Rows ``[ra, rb)`` of narrow rows (``C < _NHWC_PERIOD_C``) onto per-channel
    accumulators as ``_group_tile``'s ``op`` (0: ``a += x``; 1: ``a += x - m``, ``b +=
    (x - m)**2``; 2: ``a += g``, ``b += g*(x - m)``).

    Summed row after row (``_cols_*``, ``_nhwc_bsums``), a channel is one chain of additions,
    each waiting for the one before: with 3 channels, 3 chains, far below memory speed. The
    rows are read instead as one flat run cut into periods of ``per`` values (whole rows:
    position ``p`` is channel ``p % C``), each position summed over the periods,
    ``_GROUP_TILE`` at a time, then folded into its channel in order; the rows of an
    unfinished period follow row by row. (The numba backend's ``nhwc_period``.)
    """
    cdef double pa[_NHWC_PERIOD_MAX]
    cdef double pb[_NHWC_PERIOD_MAX]
    cdef double mp[_NHWC_PERIOD_MAX]
    cdef idx_t k = per // C, n = (rb - ra) // k, q, p, j, c
    cdef int nr
    cdef const floating* xf = x + ra * C
    cdef const floating* gf = (g if op == 2 else x) + ra * C
    for p in range(per):
        pa[p] = 0.0
        pb[p] = 0.0
        mp[p] = m[p % C] if op else 0.0
    q = 0
    while q < n:
        nr = <int>(n - q if n - q < _GROUP_TILE else _GROUP_TILE)
        _group_tile(gf + q * per, xf + q * per, nr, per, per, op, mp, pa, pb, 0)
        q += nr
    for j in range(k):
        for c in range(C):
            a[c] += pa[j * C + c]
            if op:
                b[c] += pb[j * C + c]
    if n * k < rb - ra:
        _group_tile(gf + n * per, xf + n * per, <int>(rb - ra - n * k), C, C, op, m, a, b, 0)


cdef inline void _nhwc_chunk_acc(const floating* x, idx_t C, idx_t ra, idx_t rb, bint dev,
                                 double* kc, double* sd, double* sdd) noexcept nogil:
    """Rows ``[ra, rb)`` in order into ``kc`` (``dev`` false: ``kc = sum(x)``) or ``sd``,
    ``sdd`` (``+= x - kc``, ``(x - kc)**2``), one chunk in cache.

    Column blocks (``_cols_*``: 16 columns down all the rows, accumulators in registers),
    except for rows a multiple of 2 KiB apart: the loads of a block then fall in one or two
    L1 sets, and (512, 1024) float32 statistics took 1.35-1.46x as long as with tiles of
    ``_GROUP_TILE`` rows in address order (``_group_tile``, accumulators loaded and stored
    once per tile). The additions, and so the bits, are the same either way.
    """
    cdef idx_t r, c
    cdef idx_t per = _nhwc_period(C)
    if per:
        if not dev:
            for c in range(C):
                kc[c] = -0.0  # -0.0 + v is v, signed zeros included: the sum from row ra
        _nhwc_period_acc(x, x, C, ra, rb, per, dev, kc, sd if dev else kc, sdd)
        return
    if (C * sizeof(floating)) % 2048:
        if dev:
            _cols_dev_sq(x + ra * C, rb - ra, C, kc, sd, sdd)
        else:
            _cols_sum(x + ra * C, rb - ra, C, kc)
        return
    if not dev:
        for c in range(C):
            kc[c] = -0.0  # -0.0 + v is v, signed zeros included: the sum from row ra
    r = ra
    while r < rb:
        _group_tile(x, x + r * C, _GROUP_TILE if r + _GROUP_TILE <= rb else <int>(rb - r),
                    C, C, dev, kc, sd if dev else kc, sdd, 0)
        r += _GROUP_TILE


cdef void _nhwc_moments(const floating* x, idx_t C, idx_t r0, idx_t r1, idx_t br,
                        double* smean, double* sm2, double* t) noexcept nogil:
    """(mean, M2) per channel of rows ``[r0, r1)``, chunk by chunk; ``t`` is 3*C scratch.

    Each chunk of ``br`` rows is centred on ``K``: the running mean of the stripe's chunks
    before it (one pass: ``sum(x - K)`` and ``sum((x - K)**2)`` together, see _lanes.h), or,
    for the first chunk, its own float64 mean (one extra pass). A long stripe starts with
    streams (``_nhwc_part``): chunk ``j`` is then the ``j``-th ``br / FBN_STREAMS`` rows of
    every part (``br`` rows in all); the rest follows in ordinary chunks.
    """
    cdef double* kc = t
    cdef double* sd = t + C
    cdef double* sdd = t + 2 * C
    cdef idx_t part = _nhwc_part(C, r0, r1, br)
    cdef idx_t sb = br // FBN_STREAMS if br >= FBN_STREAMS else 1
    cdef idx_t ra, rb, c
    cdef bint streamed
    cdef double na = 0.0, k, ik, tot, w, f, d, cm, cm2
    ra = r0
    while ra < r1:
        streamed = ra < r0 + part
        if streamed:
            rb = ra + sb
            if rb > r0 + part:
                rb = r0 + part
            k = <double>((rb - ra) * FBN_STREAMS)
        else:
            rb = ra + br
            if rb > r1:
                rb = r1
            k = <double>(rb - ra)
            # The next chunk streams in while this one is summed column block by column
            # block.
            if rb < r1:
                _prefetch_run(x + rb * C,
                              (br if rb + br <= r1 else r1 - rb) * C * sizeof(floating), False)
        if na == 0.0:
            if streamed:
                for c in range(C):
                    kc[c] = 0.0
                _nhwc_rows_acc(x, C, ra, rb, part, False, kc, sd, sdd)
            else:
                _nhwc_chunk_acc(x, C, ra, rb, False, kc, sd, sdd)
            for c in range(C):
                kc[c] = kc[c] / k
        else:
            for c in range(C):
                kc[c] = smean[c]
        for c in range(C):
            sd[c] = 0.0
            sdd[c] = 0.0
        if streamed:
            _nhwc_rows_acc(x, C, ra, rb, part, True, kc, sd, sdd)
        else:
            _nhwc_chunk_acc(x, C, ra, rb, True, kc, sd, sdd)
        ik = 1.0 / k
        if na == 0.0:
            for c in range(C):
                smean[c] = kc[c] + sd[c] * ik
                cm2 = sdd[c] - sd[c] * sd[c] * ik
                sm2[c] = 0.0 if cm2 < 0.0 else cm2  # a NaN stays NaN
        else:
            tot = na + k
            w = k / tot
            f = na * k / tot
            for c in range(C):
                cm = kc[c] + sd[c] * ik
                cm2 = sdd[c] - sd[c] * sd[c] * ik
                if cm2 < 0.0:
                    cm2 = 0.0
                d = cm - smean[c]
                smean[c] = smean[c] + d * w
                sm2[c] = sm2[c] + cm2 + d * d * f
        na = na + k
        ra = rb
        if streamed and ra == r0 + part:
            ra = r0 + FBN_STREAMS * part


cdef void _nhwc_merge(idx_t C, idx_t R, idx_t sr, idx_t ns, const double* pm,
                      const double* pm2, double* mean, double* m2) noexcept nogil:
    """Merge stripe partials (stripe ``k`` holds rows ``[k*sr, (k+1)*sr)``) in order."""
    cdef idx_t c, k, e
    cdef double na, nb, tot, w, f, d
    for c in range(C):
        mean[c] = pm[c]
        m2[c] = pm2[c]
    na = <double>(sr if sr < R else R)
    for k in range(1, ns):
        e = (k + 1) * sr
        if e > R:
            e = R
        nb = <double>(e - k * sr)
        tot = na + nb
        w = nb / tot
        f = na * nb / tot
        for c in range(C):
            d = pm[k * C + c] - mean[c]
            mean[c] = mean[c] + d * w
            m2[c] = m2[c] + pm2[k * C + c] + d * d * f
        na = tot


cdef inline idx_t _nhwc_slice_rows(idx_t C) noexcept nogil:
    """Rows per slice of an NHWC output written with ordinary stores (``_nhwc_apply``):
    rows of fewer than ``_NHWC_SLICE_C`` channels the most that make a multiple of 16 values
    (whole vectors) of at most ``_NHWC_SLICE`` values; wider rows one at a time (slices of 8
    rows of 64 channels took 1.08x-1.11x as long, same process, 2 threads)."""
    cdef idx_t t
    if C >= _NHWC_SLICE_C:
        return 1
    t = 16 // _gcd(C, 16)  # rows per multiple of 16 values
    return _NHWC_SLICE // (t * C) * t


cdef inline idx_t _nhwc_table_len(idx_t C) noexcept nogil:
    """Values of a wrapped table: a streamed block from any channel on, or a slice."""
    cdef idx_t n = _nhwc_slice_rows(C) * C
    return n if n > C + FBN_SBLOCK else C + FBN_SBLOCK


cdef void _nhwc_apply(const floating* x, floating* y, idx_t C, idx_t r0, idx_t r1,
                      const double* m, const double* sc, const double* b,
                      bint stream) noexcept nogil:
    """Rows ``[r0, r1)``; with ``stream``, one flat run with streaming stores.

    ``m``, ``sc`` and ``b`` are wrapped tables (``_wrapped``). For float32, ``b`` holds the
    shifts (``_shift_table``) and ``m`` is not read. Not streamed, the rows are written
    ``_nhwc_slice_rows`` at a time, a run of the tables' positions: row by row, rows of a few
    channels cost a call each ((100352, 3) float32 inference took 4.5x the time of slices,
    and 7x-9x that of the NCHW layout).
    """
    cdef idx_t r = r0, rows = _nhwc_slice_rows(C), e
    if stream:
        if floating is float:
            fastbn_apply_cols_nt_f32(x + r0 * C, y + r0 * C, (r1 - r0) * C, C, sc, b)
        else:
            fastbn_apply_cols_nt_f64(x + r0 * C, y + r0 * C, (r1 - r0) * C, C, m, sc, b)
        fastbn_sfence()
        return
    while r < r1:
        e = r + rows if r + rows < r1 else r1
        _apply_cols(x + r * C, y + r * C, (e - r) * C, m, sc, b)
        r = e


cdef void _nhwc_bsums(const floating* dy, const floating* x, idx_t C, idx_t r0, idx_t r1,
                      const double* m, double* sdy, double* sxm) noexcept nogil:
    """``sum(dy)`` and ``sum(dy * (x - m))`` per channel over rows ``[r0, r1)``.

    Rows of at least ``_NHWC_ROW_MIN_C`` channels are read as FBN_STREAMS parts of the same
    number of rows, a row of each in turn (``fastbn_rows_sum_dot``; see ``_nhwc_part``);
    the rest, and narrower rows, ``_GROUP_TILE`` rows at a time in order (row by row, each
    column's sums were stored and loaded again every row: (25088, 16) float32 backward
    0.80 of the time, same bits).
    """
    cdef idx_t r, c
    cdef idx_t part = (r1 - r0) // FBN_STREAMS if C >= _NHWC_ROW_MIN_C else 0
    cdef idx_t per = _nhwc_period(C)
    cdef int nr
    for c in range(C):
        sdy[c] = 0.0
        sxm[c] = 0.0
    if per:
        _nhwc_period_acc(dy, x, C, r0, r1, per, 2, m, sdy, sxm)
        return
    for r in range(r0, r0 + part):
        if floating is float:
            fastbn_rows_sum_dot_f32(dy + r * C, x + r * C, FBN_STREAMS, part * C, C, m,
                                    sdy, sxm, 0, 0)
        else:
            fastbn_rows_sum_dot_f64(dy + r * C, x + r * C, FBN_STREAMS, part * C, C, m,
                                    sdy, sxm, 0, 0)
    r = r0 + FBN_STREAMS * part
    while r < r1:
        nr = _GROUP_TILE if r + _GROUP_TILE <= r1 else <int>(r1 - r)
        if floating is float:
            fastbn_rows_sum_dot_f32(dy + r * C, x + r * C, nr, C, C, m, sdy, sxm, 0, 0)
        else:
            fastbn_rows_sum_dot_f64(dy + r * C, x + r * C, nr, C, C, m, sdy, sxm, 0, 0)
        r += nr


cdef void _nhwc_dx(const floating* dy, const floating* x, floating* dx, idx_t C,
                   idx_t r0, idx_t r1, const double* m, const double* k, const double* a,
                   const double* q, bint stream) noexcept nogil:
    """Rows ``[r0, r1)`` of ``dx``; constants and slices as in ``_nhwc_apply``."""
    cdef idx_t r = r0, rows = _nhwc_slice_rows(C), e, o = r0 * C
    if stream:
        if floating is float:
            fastbn_dx_cols_nt_f32(dy + o, x + o, dx + o, (r1 - r0) * C, C, m, k, a, q)
        else:
            fastbn_dx_cols_nt_f64(dy + o, x + o, dx + o, (r1 - r0) * C, C, m, k, a, q)
        fastbn_sfence()
        return
    while r < r1:
        e = r + rows if r + rows < r1 else r1
        if floating is float:
            fastbn_dx_cols_f32(dy + r * C, x + r * C, dx + r * C, (e - r) * C, m, k, a, q)
        else:
            fastbn_dx_cols_f64(dy + r * C, x + r * C, dx + r * C, (e - r) * C, m, k, a, q)
        r = e


cdef double* _wrapped(idx_t C, int ntables) except NULL:
    """Room for ``ntables`` wrapped tables of ``_nhwc_table_len(C)`` values (see
    _stream_stores.h)."""
    return _alloc(ntables * _nhwc_table_len(C))


cdef inline void _nhwc_sum_stripes(idx_t C, idx_t ns, const double* ps, double* sdy,
                                   double* sxm) noexcept nogil:
    """Add the stripe sums (stripe ``k`` at ``ps[2*k*C:]``) in stripe order."""
    cdef idx_t c, k
    for c in range(C):
        sdy[c] = ps[c]
        sxm[c] = ps[C + c]
    for k in range(1, ns):
        for c in range(C):
            sdy[c] = sdy[c] + ps[2 * k * C + c]
            sxm[c] = sxm[c] + ps[2 * k * C + C + c]


# ---------------------------------------------------------------------------------------
# NHWC kernels: x is (R, C)
# ---------------------------------------------------------------------------------------
cdef int _nhwc_stats_into(const floating* xp, idx_t R, idx_t C, int nthreads,
                          double* mp, double* vp) except -1:
    """Stripe moments in parallel, merged in order: writes mean and population var."""
    cdef idx_t br = _nhwc_chunk_rows(C)
    cdef idx_t sr = _nhwc_stripe_rows(R, C)
    cdef idx_t ns = _ceil_div(R, sr), k, e, c
    cdef int nt = _team(nthreads, ns, R * C)
    cdef double* part = _alloc(2 * ns * C)
    cdef double* scratch
    try:
        # One cache line of padding between the threads' scratch: the lanes are written
        # for every value, and a line shared by two threads would ping-pong between cores.
        scratch = _alloc((3 * C + 8) * nt)
        try:
            with nogil:
                for k in prange(ns, schedule="static", num_threads=nt):
                    e = (k + 1) * sr
                    if e > R:
                        e = R
                    _nhwc_moments(xp, C, k * sr, e, br, part + k * C, part + (ns + k) * C,
                                  scratch + (3 * C + 8) * threadid())
                _nhwc_merge(C, R, sr, ns, part, part + ns * C, mp, vp)
                for c in range(C):
                    vp[c] = vp[c] / <double>R
        finally:
            free(scratch)
    finally:
        free(part)
    return 0


def nhwc_stats(const floating[:, ::1] x, double[::1] mean, double[::1] var, int nthreads):
    """Per-channel mean and population variance of an ``(R, C)`` array.

    Parameters
    ----------
    x : ndarray of shape (R, C), float32 or float64, C-contiguous
        The data.
    mean, var : ndarray of shape (C,), float64
        Outputs: the mean and ``M2 / R``.
    nthreads : int
        Threads to use; the result does not depend on it.
    """
    cdef idx_t R = x.shape[0], C = x.shape[1]
    _check_nonempty(R, C)
    _check_vec(mean, C, "mean")
    _check_vec(var, C, "var")
    _nhwc_stats_into(&x[0, 0], R, C, nthreads, &mean[0], &var[0])


cdef int _nhwc_apply_into(const floating* xp, floating* yp, idx_t R, idx_t C,
                          const double* m, const double* sc, const double* b,
                          int nthreads) except -1:
    """``y = (x - m) * sc + b`` on ``(R, C)``, stripes in parallel, streamed by the store rule.

    The stripes are taken last to first, each thread's in reverse: the rows that the
    statistics (or the backward's sums) read last are the ones still in cache, so an
    array about the size of the L3 is read again mostly from there. Elementwise: the
    order does not change a bit.
    """
    cdef idx_t sr = _nhwc_stripe_rows(R, C)
    cdef idx_t ns = _ceil_div(R, sr), k, j, e
    cdef int nt = _team(nthreads, ns, R * C)
    cdef idx_t W = _nhwc_table_len(C)
    cdef bint st = _use_stream(yp, xp, xp, R * C * sizeof(floating), sr * C)
    cdef double* t = _wrapped(C, 3)
    try:
        with nogil:
            fastbn_wrap(t, m, C, W)
            fastbn_wrap(t + W, sc, C, W)
            fastbn_wrap(t + 2 * W, b, C, W)
            if floating is float:
                _shift_table(t, t + W, t + 2 * W, W)
            for k in prange(ns, schedule="static", num_threads=nt):
                j = ns - 1 - k  # last stripe first: see _nhwc_apply_into
                e = (j + 1) * sr
                if e > R:
                    e = R
                _nhwc_apply(xp, yp, C, j * sr, e, t, t + W, t + 2 * W, st)
    finally:
        free(t)
    return 0


def nhwc_train_forward(const floating[:, ::1] x, const double[::1] weight,
                       const double[::1] bias, double eps, floating[:, ::1] y,
                       double[::1] mean, double[::1] var, double[::1] invstd, int nthreads):
    """Training forward on ``(R, C)``: batch statistics, then ``y``.

    Parameters
    ----------
    x : ndarray of shape (R, C), float32 or float64, C-contiguous
        The data.
    weight, bias : ndarray of shape (C,), float64
        Affine parameters.
    eps : float
        Added to the variance.
    y : ndarray like x
        Output ``(x - mean) * (weight * invstd) + bias``; may be ``x`` itself.
    mean, var, invstd : ndarray of shape (C,), float64
        Outputs: batch mean, population variance and ``1 / sqrt(var + eps)``.
    nthreads : int
        Threads to use; the result does not depend on it.
    """
    cdef idx_t R = x.shape[0], C = x.shape[1]
    _check_nonempty(R, C)
    _check_same2(x.shape, y.shape, "y")
    _check_vec(weight, C, "weight")
    _check_vec(bias, C, "bias")
    _check_vec(mean, C, "mean")
    _check_vec(var, C, "var")
    _check_vec(invstd, C, "invstd")
    cdef const floating* xp = &x[0, 0]
    cdef floating* yp = &y[0, 0]
    cdef double* mp = &mean[0]
    cdef double* vp = &var[0]
    cdef double* ip = &invstd[0]
    cdef const double* wp = &weight[0]
    cdef const double* bp = &bias[0]
    cdef idx_t c
    _nhwc_stats_into(xp, R, C, nthreads, mp, vp)
    cdef double* sc = _alloc(C)
    try:
        with nogil:
            for c in range(C):
                ip[c] = 1.0 / sqrt(vp[c] + eps)
                sc[c] = wp[c] * ip[c]
        _nhwc_apply_into(xp, yp, R, C, mp, sc, bp, nthreads)
    finally:
        free(sc)


def nhwc_normalize(const floating[:, ::1] x, const double[::1] mean, const double[::1] scale,
                   const double[::1] bias, floating[:, ::1] y, int nthreads):
    """``y = (x - mean) * scale + bias`` per channel on ``(R, C)``.

    Parameters
    ----------
    x : ndarray of shape (R, C), float32 or float64, C-contiguous
        The data.
    mean, scale, bias : ndarray of shape (C,), float64
        Per-channel constants.
    y : ndarray like x
        Output; may be ``x`` itself.
    nthreads : int
        Threads to use; the result does not depend on it.
    """
    cdef idx_t R = x.shape[0], C = x.shape[1]
    _check_nonempty(R, C)
    _check_same2(x.shape, y.shape, "y")
    _check_vec(mean, C, "mean")
    _check_vec(scale, C, "scale")
    _check_vec(bias, C, "bias")
    _nhwc_apply_into(&x[0, 0], &y[0, 0], R, C, &mean[0], &scale[0], &bias[0], nthreads)


cdef int _nhwc_bsums_into(const floating* gp, const floating* xp, idx_t R, idx_t C,
                          const double* mp, int nthreads, double* sp,
                          double* qp) except -1:
    cdef idx_t sr = _nhwc_stripe_rows(R, C)
    cdef idx_t ns = _ceil_div(R, sr), k, e
    cdef int nt = _team(nthreads, ns, R * C)
    cdef double* part = _alloc(2 * ns * C)
    try:
        with nogil:
            for k in prange(ns, schedule="static", num_threads=nt):
                e = (k + 1) * sr
                if e > R:
                    e = R
                _nhwc_bsums(gp, xp, C, k * sr, e, mp, part + 2 * k * C,
                            part + 2 * k * C + C)
            _nhwc_sum_stripes(C, ns, part, sp, qp)
    finally:
        free(part)
    return 0


def nhwc_backward_reduce(const floating[:, ::1] dy, const floating[:, ::1] x,
                         const double[::1] mean, double[::1] sum_dy, double[::1] sum_dy_xmu,
                         int nthreads):
    """Per-channel ``sum(dy)`` and ``sum(dy * (x - mean))`` on ``(R, C)``.

    Parameters
    ----------
    dy, x : ndarray of shape (R, C), float32 or float64, C-contiguous
        Gradient of the output and the forward input.
    mean : ndarray of shape (C,), float64
        The mean used by the forward.
    sum_dy, sum_dy_xmu : ndarray of shape (C,), float64
        Outputs.
    nthreads : int
        Threads to use; the result does not depend on it.
    """
    cdef idx_t R = x.shape[0], C = x.shape[1]
    _check_nonempty(R, C)
    _check_same2(x.shape, dy.shape, "dy")
    _check_vec(mean, C, "mean")
    _check_vec(sum_dy, C, "sum_dy")
    _check_vec(sum_dy_xmu, C, "sum_dy_xmu")
    _nhwc_bsums_into(&dy[0, 0], &x[0, 0], R, C, &mean[0], nthreads, &sum_dy[0],
                     &sum_dy_xmu[0])


def nhwc_backward_train(const floating[:, ::1] dy, const floating[:, ::1] x,
                        const double[::1] mean, const double[::1] invstd,
                        const double[::1] weight, floating[:, ::1] dx,
                        double[::1] sum_dy, double[::1] sum_dy_xmu, int nthreads):
    """Training backward on ``(R, C)``: the two sums, then ``dx``.

    Parameters
    ----------
    dy, x : ndarray of shape (R, C), float32 or float64, C-contiguous
        Gradient of the output and the forward input.
    mean, invstd, weight : ndarray of shape (C,), float64
        Saved statistics and the scale parameter.
    dx : ndarray like x
        Output ``weight*invstd*(dy - sum_dy/R - (x-mean)*invstd**2*sum_dy_xmu/R)``; may be
        ``dy`` itself.
    sum_dy, sum_dy_xmu : ndarray of shape (C,), float64
        Outputs: ``sum(dy)`` and ``sum(dy * (x - mean))``.
    nthreads : int
        Threads to use; the result does not depend on it.
    """
    cdef idx_t R = x.shape[0], C = x.shape[1]
    _check_nonempty(R, C)
    _check_same2(x.shape, dy.shape, "dy")
    _check_same2(x.shape, dx.shape, "dx")
    _check_vec(mean, C, "mean")
    _check_vec(invstd, C, "invstd")
    _check_vec(weight, C, "weight")
    _check_vec(sum_dy, C, "sum_dy")
    _check_vec(sum_dy_xmu, C, "sum_dy_xmu")
    cdef const floating* gp = &dy[0, 0]
    cdef const floating* xp = &x[0, 0]
    cdef floating* dp = &dx[0, 0]
    cdef const double* mp = &mean[0]
    cdef double* sp = &sum_dy[0]
    cdef double* qp = &sum_dy_xmu[0]
    cdef idx_t sr = _nhwc_stripe_rows(R, C)
    cdef idx_t ns = _ceil_div(R, sr), k, j, e, c
    cdef int nt = _team(nthreads, ns, R * C)
    cdef double inv
    cdef idx_t W = _nhwc_table_len(C)
    cdef bint st = _use_stream(dp, gp, xp, R * C * sizeof(floating), sr * C)
    _nhwc_bsums_into(gp, xp, R, C, mp, nthreads, sp, qp)
    cdef double* t = _wrapped(C, 4)
    try:
        with nogil:
            for c in range(C):
                inv = invstd[c]
                t[W + c] = weight[c] * inv
                t[2 * W + c] = sp[c] / <double>R
                t[3 * W + c] = inv * inv * qp[c] / <double>R
            fastbn_wrap(t, mp, C, W)
            for k in range(1, 4):
                fastbn_wrap(t + k * W, t + k * W, C, W)
            for k in prange(ns, schedule="static", num_threads=nt):
                j = ns - 1 - k  # last stripe first, as _nhwc_apply_into
                e = (j + 1) * sr
                if e > R:
                    e = R
                _nhwc_dx(gp, xp, dp, C, j * sr, e, t, t + W, t + 2 * W, t + 3 * W, st)
    finally:
        free(t)


# ---------------------------------------------------------------------------------------
# The benchmark's floor: the least memory traffic of an operation (fastbn-bench)
# ---------------------------------------------------------------------------------------
def traffic_floor(const unsigned char[::1] x, const unsigned char[::1] dy,
                  unsigned char[::1] y, unsigned char[::1] dx, bint read_first, int nthreads):
    """Move the bytes an operation must move, and nothing else (fastbn-bench's floor).

    ``y = x`` and ``dx = x | dy`` (bitwise), each thread on one contiguous slice, with the
    kernels' store rule (streaming stores for outputs of at least `stream_min_bytes`). With
    `read_first`, every thread first reads its slices of ``x`` (and ``dy``) and all wait for
    each other before any byte is written: the order of a training pass whose statistics
    span the whole array.

    Parameters
    ----------
    x : ndarray of uint8, C-contiguous
        The input's bytes.
    dy : ndarray of uint8 like x, or None
        A second input (the output gradient): read, ORed into ``dx``.
    y, dx : ndarray of uint8 like x, or None
        Outputs (``dx`` needs ``dy``).
    read_first : bool
        Read the inputs in full before writing.
    nthreads : int
        Threads (slices).

    Returns
    -------
    int
        The OR of every byte read first (0 without `read_first`): returned so that the
        compiler cannot drop the reads.
    """
    cdef idx_t n = x.shape[0], per, k, lo, hi
    cdef int nt = nthreads if nthreads > 0 else 1
    cdef const unsigned char* xp = &x[0] if n else NULL
    cdef const unsigned char* gp = NULL
    cdef unsigned char* yp = NULL
    cdef unsigned char* dp = NULL
    cdef bint sy = False, sd = False
    cdef unsigned long long* sink
    for name, a in (("dy", dy), ("y", y), ("dx", dx)):
        if a is not None and a.shape[0] != n:
            raise ValueError(f"{name} has {a.shape[0]} bytes, x has {n}")
    if dx is not None and dy is None:
        raise ValueError("dx = x | dy needs dy")
    if n == 0:
        return 0
    if dy is not None:
        gp = &dy[0]
    if y is not None:
        yp = &y[0]
        sy = _use_stream(yp, xp, gp, n, n)
    if dx is not None:
        dp = &dx[0]
        sd = _use_stream(dp, xp, gp, n, n)
    # Slices of whole 64-byte lines; one line of sink per thread (no shared line).
    per = _ceil_div(_ceil_div(n, nt), 64) * 64
    sink = <unsigned long long*>calloc(8 * nt, sizeof(unsigned long long))
    if sink == NULL:
        raise MemoryError()
    try:
        with nogil, parallel(num_threads=nt):
            for k in prange(nt, schedule="static"):  # ends with a barrier
                lo = k * per
                hi = lo + per if lo + per < n else n
                if read_first and lo < hi:
                    sink[8 * k] = fastbn_traffic_read(xp + lo, hi - lo)
                    if gp != NULL:
                        sink[8 * k] |= fastbn_traffic_read(gp + lo, hi - lo)
            for k in prange(nt, schedule="static"):
                lo = k * per
                hi = lo + per if lo + per < n else n
                if lo < hi:
                    if yp != NULL:
                        fastbn_traffic_write(yp + lo, xp + lo, NULL, hi - lo, sy)
                    if dp != NULL:
                        fastbn_traffic_write(dp + lo, xp + lo, gp + lo, hi - lo, sd)
                    if sy or sd:
                        fastbn_sfence()
        for k in range(1, nt):
            sink[0] |= sink[8 * k]
        return sink[0]
    finally:
        free(sink)
