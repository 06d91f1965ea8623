"""The jitted functions of the ``"numba"`` backend (imported on first use only).

They are defined at module level, not inside a factory: numba keys its disk cache on a
function's closure variables too, and a closure over other jitted functions gets a new key
in every process (the cache would never hit). ``numba_cpu`` holds the layout-level
drivers, the chunk-grid constants are shared from there.
"""

import math

import numpy as np
from numba import njit, prange

from ._numba_stream import (
    BLOCK,
    LINE,
    VECTOR,
    apart,
    apply,
    at,
    fence,
    keep,
    output_constants,
    plain_apply,
    plain_apply_vector,
    plain_dx,
    positions,
    request,
    span,
    stream_apply,
    stream_apply_line,
    stream_dx,
    stream_dx_line,
    tile_add_line,
    tile_add_one,
    tile_add_quad,
    tile_deviations_line,
    tile_deviations_one,
    tile_deviations_quad,
    tile_grad_sums_line,
    tile_grad_sums_one,
    tile_grad_sums_quad,
    unowned,
    wrap,
)
from .numba_cpu import (
    _FASTMATH,
    CHUNK,
    COL_TILE,
    GROUP_BACKWARD_ROW,
    GROUP_CACHE,
    GROUP_MAX,
    GROUP_SHORT_ROW,
    GROUP_TILE,
    GROUP_VALUES,
    NHWC_CHUNK,
    NHWC_PERIOD_C,
    NHWC_ROW_MIN_C,
    STREAM_PARTS,
    TILE_REQUESTS,
    UNIT_SPANS,
    _cache_enabled,
)

_cache = _cache_enabled()
#: numba (0.68) keys its disk cache on a hash of this file's text alone, while the kernels
#: also compile the intrinsics of _numba_stream.py and the constants of numba_cpu.py: this
#: digest of those two files (the first 16 hex digits of the SHA-256 of their bytes, in
#: that order) makes a change to either a change to this file, so that no process loads
#: kernels compiled from their old text. tests/test_numba_codegen.py checks it and prints
#: the new value.
SOURCES_DIGEST = "9aae61095e8c65de"
# Fast-math (reassociation) only where it is needed: the float64 sums over one row or row
# block, which LLVM vectorizes with it. Everything else (per-channel arithmetic, Chan
# merges, elementwise outputs) is plain IEEE arithmetic in source order: with reassociation
# allowed there, LLVM's choices differed between a fresh compile and the code loaded from
# the disk cache (1-ulp differences in dx between processes).
reduction = njit(nogil=True, fastmath=_FASTMATH, cache=_cache)
serial = njit(nogil=True, cache=_cache)
inline = njit(inline="always", nogil=True)
parallel = njit(parallel=True, nogil=True, cache=_cache)

# ------------------------------------------------------------ row primitives


@reduction
def row_sum(xr):
    total = 0.0
    for i in range(xr.shape[0]):
        total += xr[i]
    return total


@reduction
def row_deviations(xr, m):
    """(sum(x - m), sum((x - m)**2)) in float64."""
    sd = 0.0
    sq = 0.0
    for i in range(xr.shape[0]):
        dev = xr[i] - m
        sd += dev
        sq += dev * dev
    return sd, sq


@reduction
def rows4_deviations(x0, x1, x2, x3, m):
    """``row_deviations`` of four rows of one length, read in lockstep: one core reads
    memory faster from four places at once (kernels/_simd.h). Returns (sd, sq) of each."""
    s0 = q0 = s1 = q1 = s2 = q2 = s3 = q3 = 0.0
    for i in range(x0.shape[0]):
        d0 = x0[i] - m
        d1 = x1[i] - m
        d2 = x2[i] - m
        d3 = x3[i] - m
        s0 += d0
        q0 += d0 * d0
        s1 += d1
        q1 += d1 * d1
        s2 += d2
        q2 += d2 * d2
        s3 += d3
        q3 += d3 * d3
    return s0, q0, s1, q1, s2, q2, s3, q3


@serial
def block_normalize(xb, mean, scale, bias, yb, stream):
    """Rows of a (channels, S) block: yb[j] = (xb[j] - mean[j]) * scale[j] + bias[j] (mean
    None: xb[j] * scale[j] + bias[j], see ``apply``), BLOCK values at a time (``plain_apply``
    or ``stream_apply``), then the row's tail. Streamed, the caller fences after its last
    block (and passes unowned arrays: see ``unowned``)."""
    if stream:
        for j in range(xb.shape[0]):
            stream_normalize(xb[j], yb[j], at(mean, j), scale[j], bias[j], 1)
        return
    n = xb.shape[1]
    for j in range(xb.shape[0]):
        m = at(mean, j)
        sc = scale[j]
        b = bias[j]
        xr = xb[j]
        yr = yb[j]
        i = 0
        while i + BLOCK <= n:
            plain_apply(xr, yr, i, m, sc, b, 0)
            i += BLOCK
        while i + VECTOR <= n:
            plain_apply_vector(xr, yr, i, m, sc, b, 0)
            i += VECTOR
        for r in range(i, n):
            yr[r] = apply(xr[r], m, sc, b)


@reduction
def row_grad_sums(dr, xr, mu):
    """(sum(dy), sum(dy * (x - mu))) in float64."""
    sdy = 0.0
    sdyx = 0.0
    for i in range(xr.shape[0]):
        g = dr[i] * 1.0
        sdy += g
        sdyx += g * (xr[i] - mu)
    return sdy, sdyx


@reduction
def rows4_grad_sums(g0, g1, g2, g3, x0, x1, x2, x3, mu):
    """``row_grad_sums`` of four rows of one length, read in lockstep (as
    ``rows4_deviations``). Returns (sum(dy), sum(dy * (x - mu))) of each."""
    a0 = b0 = a1 = b1 = a2 = b2 = a3 = b3 = 0.0
    for i in range(x0.shape[0]):
        v0 = g0[i] * 1.0
        v1 = g1[i] * 1.0
        v2 = g2[i] * 1.0
        v3 = g3[i] * 1.0
        a0 += v0
        b0 += v0 * (x0[i] - mu)
        a1 += v1
        b1 += v1 * (x1[i] - mu)
        a2 += v2
        b2 += v2 * (x2[i] - mu)
        a3 += v3
        b3 += v3 * (x3[i] - mu)
    return a0, b0, a1, b1, a2, b2, a3, b3


@inline
def block_dx(db, xb, mean, k, shift, proj, outb, stream):
    """Rows of a (channels, S) block: k*(dy - shift - (x - mean)*proj), per channel j (LLVM's
    own loop: 4.0 G values/s on one core in L2, against 3.4-3.8 with BLOCK-value intrinsic
    blocks as ``plain_apply``'s). Inlined: the per-channel backward calls it once per row,
    and as a call it took 1.01x-1.08x the time on 2 threads (same process; (128, 512, 7, 7)
    and (32, 64, 56, 56) float32). ``block_normalize`` stays a call: inlined into
    ``nchw_normalize`` it made the 7x7 normalize 4x slower. Streamed, as block_normalize."""
    if stream:
        for j in range(xb.shape[0]):
            stream_grad(db[j], xb[j], outb[j], mean[j], k[j], shift[j], proj[j], 1)
        return
    for j in range(xb.shape[0]):
        m = mean[j]
        kj = k[j]
        a = shift[j]
        q = proj[j]
        for i in range(xb.shape[1]):
            outb[j, i] = kj * (db[j, i] - a - (xb[j, i] - m) * q)


# Column sums of a (rows, C) block take COL_TILE rows at a time, each column's accumulator
# loaded once, added to down the tile's rows in order and stored once (the same additions
# as row by row): row by row, every row waited on the store and reload of the row before.


@reduction
def cols_add(xb, acc):
    """acc[j] += sum of column j of the (rows, C) block xb, rows in order."""
    n = xb.shape[0]
    t = n - n % COL_TILE
    for r in range(0, t, COL_TILE):
        for j in range(xb.shape[1]):
            a = acc[j]
            for i in range(COL_TILE):
                a += xb[r + i, j]
            acc[j] = a
    for r in range(t, n):
        for j in range(xb.shape[1]):
            acc[j] += xb[r, j]


@reduction
def cols_deviations(xb, m, sd, sq):
    """sd[j] += sum(xb[:, j] - m[j]) and sq[j] += sum((xb[:, j] - m[j])**2), rows in order."""
    n = xb.shape[0]
    t = n - n % COL_TILE
    for r in range(0, t, COL_TILE):
        for j in range(xb.shape[1]):
            a = sd[j]
            b = sq[j]
            for i in range(COL_TILE):
                dev = xb[r + i, j] - m[j]
                a += dev
                b += dev * dev
            sd[j] = a
            sq[j] = b
    for r in range(t, n):
        for j in range(xb.shape[1]):
            dev = xb[r, j] - m[j]
            sd[j] += dev
            sq[j] += dev * dev


@reduction
def cols_grad_sums(db, xb, mean, a, b):
    """a[j] += sum(dy[:, j]) and b[j] += sum(dy[:, j] * (x[:, j] - mean[j])), rows in order."""
    n = xb.shape[0]
    t = n - n % COL_TILE
    for r in range(0, t, COL_TILE):
        for j in range(xb.shape[1]):
            sa = a[j]
            sb = b[j]
            for i in range(COL_TILE):
                g = db[r + i, j] * 1.0
                sa += g
                sb += g * (xb[r + i, j] - mean[j])
            a[j] = sa
            b[j] = sb
    for r in range(t, n):
        for j in range(xb.shape[1]):
            g = db[r, j] * 1.0
            a[j] += g
            b[j] += g * (xb[r, j] - mean[j])


# NHWC rows of fewer than NHWC_PERIOD_C channels: column sums down the rows (cols_*) wait
# on each row's addition before the next (one chain per channel: 3 channels, 3 chains), so
# a block's whole rows are read as one flat run instead, cut into periods of ``per`` values
# (a multiple of the channel count: position p of every period is channel p % C), each
# position summed over the periods, GROUP_TILE periods at a time (tile_deviations_line and
# tile_grad_sums_line, a cache line of positions each, as the groups of short NCHW rows;
# the first sum of a stripe by tile_add_line), then the positions folded into their channels
# in order (the rows of an unfinished period follow by cols_*). Same process, old against
# new kernels, 2 threads, float32: (262144, 4) statistics 0.22, training forward 0.36,
# backward 0.47 of the time; (75264, 3) 0.20, 0.43, 0.67; (65536, 8) 0.50, 0.62, 0.74;
# (32768, 15) 0.57, 0.76, 0.82; at 16-48 channels periods took 0.92-1.04 of the columns'
# time (no gain), so the columns stay there. The scratch must be
# allocated array by array: arrays unpacked from one 2-D allocation are typed
# non-contiguous, and the loops on them were not vectorized (2-4x slower).


@serial
def nhwc_period(n_ch):
    """Values per period of the flat NHWC sums: a multiple of n_ch and of 16 (whole cache
    lines of float32 positions), at least 64 (0: rows of NHWC_PERIOD_C channels or more,
    summed as columns)."""
    if n_ch >= NHWC_PERIOD_C:
        return 0
    step = n_ch * 16 // math.gcd(n_ch, 16)
    return step * ((64 + step - 1) // step)


@inline
def period_run(xb, per):
    """(xf, whole rows): the rows of xb that fill whole periods, as one flat run."""
    rows = xb.shape[0] - xb.shape[0] % (per // xb.shape[1])
    return xb[:rows].reshape(-1), rows


@inline
def period(xf, q, per):
    """Period q of the flat run xf (a view)."""
    return xf[q * per : (q + 1) * per]


@inline
def period_start(m, n_ch, mp, pa, pb):
    """mp[p] = m[p % C] (the per-channel constants by position); pa = pb = 0."""
    for p in range(mp.shape[0]):
        mp[p] = m[p % n_ch]
    pa[:] = 0.0
    pb[:] = 0.0


@inline
def fold_periods(pa, n_ch, acc):
    """acc[c] += pa[c] + pa[c + C] + ... (the positions of channel c, in order)."""
    for j in range(pa.shape[0] // n_ch):
        for c in range(n_ch):
            acc[c] += pa[j * n_ch + c]


@serial
def period_add(xb, per, acc, pa):
    """cols_add on a (rows, C) block by periods, GROUP_TILE at a time (pa: scratch of per
    values)."""
    xf, rows = period_run(xb, per)
    n = xf.shape[0] // per
    pa[:] = 0.0
    q = 0
    step = LINE // xb.itemsize
    while q + GROUP_TILE <= n:
        for j in range(0, per, step):
            tile_add_line(xf, q * per, per, j, pa)
        q += GROUP_TILE
    while q < n:
        pos_add(period(xf, q, per), pa)
        q += 1
    fold_periods(pa, xb.shape[1], acc)
    cols_add(xb[rows:], acc)


@serial
def period_sums(db, xb, per, m, a, b, pa, pb, mp):
    """cols_deviations (db None: a += x - m, b += (x - m)**2) or cols_grad_sums (a += dy,
    b += dy * (x - m)) on (rows, C) blocks by periods (pa, pb, mp: scratch)."""
    n_ch = xb.shape[1]
    xf, rows = period_run(xb, per)
    n = xf.shape[0] // per
    period_start(m, n_ch, mp, pa, pb)
    q = 0
    step = LINE // xb.itemsize
    if db is None:
        while q + GROUP_TILE <= n:
            for j in range(0, per, step):
                tile_deviations_line(xf, q * per, per, j, mp, pa, pb)
            q += GROUP_TILE
        for r in range(q, n):
            pos_deviations(period(xf, r, per), mp, pa, pb)
    else:
        gf = period_run(db, per)[0]
        while q + GROUP_TILE <= n:
            for j in range(0, per, step):
                tile_grad_sums_line(gf, xf, q * per, per, j, mp, pa, pb)
            q += GROUP_TILE
        for r in range(q, n):
            pos_grad_sums(period(gf, r, per), period(xf, r, per), mp, pa, pb)
    fold_periods(pa, n_ch, a)
    fold_periods(pb, n_ch, b)
    if db is None:
        cols_deviations(xb[rows:], m, a, b)
    else:
        cols_grad_sums(db[rows:], xb[rows:], m, a, b)


# Per-position sums of a group of short NCHW rows (group_moments): a sample of channels
# c0..c0+gl is the run x2[n, lo:lo + w] of the (n_rows, n_ch * s) view. Each position
# receives the samples in order: the tile_* intrinsics take GROUP_TILE = 8 samples (a
# cache line of positions, then 4 and 1 at a time for a run's last positions: tile_*_run),
# pos_* one sample. The last positions went through a loop over 8 row views per tile
# before (a call with 11 arrays): numba's (128, 512, 7, 7) statistics took 1.16x-1.25x
# the Cython kernel's time then, with 4 of a run's 980 positions left after its lines.


@inline
def tile_add_run(xf, b, w, width, acc):
    """tile_add_line over positions [0, width) of the tile at xf[b:] (rows w apart)."""
    step = LINE // xf.itemsize
    j = 0
    while j + step <= width:
        tile_add_line(xf, b, w, j, acc)
        j += step
    while j + 4 <= width:
        tile_add_quad(xf, b, w, j, acc)
        j += 4
    while j < width:
        tile_add_one(xf, b, w, j, acc)
        j += 1


@inline
def tile_deviations_tail(xf, b, w, j, width, k, sd, sq):
    """tile_deviations_line over positions [j, width), fewer than a cache line."""
    while j + 4 <= width:
        tile_deviations_quad(xf, b, w, j, k, sd, sq)
        j += 4
    while j < width:
        tile_deviations_one(xf, b, w, j, k, sd, sq)
        j += 1


@inline
def tile_grad_sums_tail(gf, xf, b, w, j, width, m, sa, sb):
    """tile_grad_sums_line over positions [j, width), fewer than a cache line."""
    while j + 4 <= width:
        tile_grad_sums_quad(gf, xf, b, w, j, m, sa, sb)
        j += 4
    while j < width:
        tile_grad_sums_one(gf, xf, b, w, j, m, sa, sb)
        j += 1


@serial
def pos_add(r, acc):
    """acc[j] += r[j]."""
    for j in range(acc.shape[0]):
        acc[j] += r[j]


@serial
def pos_deviations(r, m, sd, sq):
    """sd[j] += r[j] - m[j], sq[j] += (r[j] - m[j])**2."""
    for j in range(sd.shape[0]):
        d = r[j] - m[j]
        sd[j] += d
        sq[j] += d * d


@serial
def pos_grad_sums(g, r, m, a, b):
    """a[j] += g[j], b[j] += g[j] * (r[j] - m[j])."""
    for j in range(a.shape[0]):
        e = g[j] * 1.0
        a[j] += e
        b[j] += e * (r[j] - m[j])


# ------------------------------------------------------------ streamed outputs
# Large outputs are written with streaming stores (no read-for-ownership of the output's
# lines; see _numba_stream and the Cython kernels' store rule): ordinary stores up to the
# first cache line of the output, then blocks of BLOCK values, then the whole lines left
# one at a time (ordinary stores for them cost a read of each line: (32, 64, 56, 56)
# training forward and backward 1.02x-1.07x slower), then ordinary stores. A run
# is one row of one channel (scalar constants, n_ch = 1) or whole rows of n_ch channels
# (NHWC; the constants are wrapped tables, t[j] = t[j % n_ch]), written in order. The
# expressions are those of the plain loops, hence the same bits.
#
# In order, not as the Cython kernels' four interleaved parts (FBN_STREAMS): numba's
# streamed NHWC normalize with four parts took 1.1x-2.1x the Cython kernel's time in
# benchmark-like runs (calls of several implementations in random order, 5 ms apart; (6272,
# 512) 1.23-1.25 against 0.69-0.73 ms in order, (4096, 1024) 2.0-2.07 against 0.97 ms), and in
# order it is as fast as Cython's or faster (one run per thread: (200704, 256) 8.6 ms against
# Cython's 8.4).


@inline
def line_head(out, n):
    """Values of out before its first cache-line-aligned one (n if there is none)."""
    addr = out.ctypes.data
    if addr % out.itemsize:
        return n
    return min(n, (LINE - addr % LINE) % LINE // out.itemsize)


@inline
def next_channel(c, step, n_ch):
    """The channel ``step`` values (``step < n_ch``) after channel ``c`` of a run."""
    c += step
    return c - n_ch if c >= n_ch else c


@inline
def apply_values(xf, yf, i0, i1, m, sc, b, c, n_ch):
    """``yf[i] = apply(xf[i], ...)`` for ``i`` in ``[i0, i1)``, one value at a time from
    channel ``c`` on (the heads and tails of the runs below); returns the channel after."""
    for i in range(i0, i1):
        yf[i] = apply(xf[i], at(m, c), at(sc, c), at(b, c))
        c = c + 1 if c + 1 < n_ch else 0
    return c


@inline
def dx_values(gf, xf, df, i0, i1, m, k, a, q, c, n_ch):
    """``apply_values`` for ``df = k * (gf - a - (xf - m) * q)``."""
    for i in range(i0, i1):
        df[i] = at(k, c) * (gf[i] - at(a, c) - (xf[i] - at(m, c)) * at(q, c))
        c = c + 1 if c + 1 < n_ch else 0
    return c


@serial
def stream_normalize(xf, yf, m, sc, b, n_ch):
    """yf = (xf - m) * sc + b (``apply``) over one run, streamed in order."""
    n = xf.shape[0]
    i = line_head(yf, n)
    c = apply_values(xf, yf, 0, i, m, sc, b, 0, n_ch)
    step = BLOCK % n_ch
    while i + BLOCK <= n:
        stream_apply(xf, yf, i, m, sc, b, c)
        i += BLOCK
        c = next_channel(c, step, n_ch)
    line = LINE // yf.itemsize
    step = line % n_ch
    while i + line <= n:
        stream_apply_line(xf, yf, i, m, sc, b, c)
        i += line
        c = next_channel(c, step, n_ch)
    apply_values(xf, yf, i, n, m, sc, b, c, n_ch)


@serial
def run_normalize(xf, yf, m, sc, b, n_ch):
    """``stream_normalize`` with ordinary stores (``plain_apply``): a run of whole rows of
    n_ch channels and wrapped tables, a block from any channel on, then the tail 8 values
    at a time (``plain_apply_vector``); with ``n_ch`` the run's length, tables of the run's
    positions."""
    n = xf.shape[0]
    i = 0
    c = 0
    step = BLOCK % n_ch
    while i + BLOCK <= n:
        plain_apply(xf, yf, i, m, sc, b, c)
        i += BLOCK
        c = next_channel(c, step, n_ch)
    step = VECTOR % n_ch
    while i + VECTOR <= n:
        plain_apply_vector(xf, yf, i, m, sc, b, c)
        i += VECTOR
        c = next_channel(c, step, n_ch)
    apply_values(xf, yf, i, n, m, sc, b, c, n_ch)


# The group forward calls these once per sample (runs of G*S values); inlined there, its
# (128, 512, 7, 7) training forward took 0.94x-0.97x the time (same process, against the
# calls). Elsewhere they are called once per row or per thread and stay calls: inlined
# everywhere, a fresh compile of the kernels took 1.2x as long.
stream_normalize_inline = inline(stream_normalize.py_func)
run_normalize_inline = inline(run_normalize.py_func)


@serial
def run_grad(gf, xf, df, m, k, a, q, n_ch):
    """``stream_grad`` with ordinary stores (``plain_dx``), as ``run_normalize``."""
    n = xf.shape[0]
    i = 0
    c = 0
    step = BLOCK % n_ch
    while i + BLOCK <= n:
        plain_dx(gf, xf, df, i, m, k, a, q, c)
        i += BLOCK
        c = next_channel(c, step, n_ch)
    dx_values(gf, xf, df, i, n, m, k, a, q, c, n_ch)


@serial
def stream_grad(gf, xf, df, m, k, a, q, n_ch):
    """df = k * (gf - a - (xf - m) * q) over one run, streamed in order."""
    n = xf.shape[0]
    i = line_head(df, n)
    c = dx_values(gf, xf, df, 0, i, m, k, a, q, 0, n_ch)
    step = BLOCK % n_ch
    while i + BLOCK <= n:
        stream_dx(gf, xf, df, i, m, k, a, q, c)
        i += BLOCK
        c = next_channel(c, step, n_ch)
    line = LINE // df.itemsize
    step = line % n_ch
    while i + line <= n:
        stream_dx_line(gf, xf, df, i, m, k, a, q, c)
        i += line
        c = next_channel(c, step, n_ch)
    dx_values(gf, xf, df, i, n, m, k, a, q, c, n_ch)


# ------------------------------------------------------------ grid and merging


@inline
def merge(na, ma, m2a, nb, mb, m2b):
    """Chan's merge of two (count, mean, M2) partials."""
    n = na + nb
    if n == 0.0:
        return 0.0, 0.0, 0.0
    delta = mb - ma
    f = nb / n
    return n, ma + delta * f, m2a + m2b + delta * delta * na * f


@serial
def nchw_grid(n_rows, s):
    """Chunk grid of one channel: (rows per chunk, row blocks, piece length, pieces)."""
    if s >= CHUNK:
        pieces = (s + CHUNK - 1) // CHUNK
        piece = (s + pieces - 1) // pieces
        pieces = (s + piece - 1) // piece
        return 1, n_rows, piece, pieces
    rows = max(1, CHUNK // s)
    return rows, (n_rows + rows - 1) // rows, s, 1


@serial
def nchw_group(n_rows, n_ch, s):
    """Channels per work unit of the per-channel kernels (1: one channel at a time).

    With short rows (``s = 49``) one channel is ``n_rows`` scattered runs of a few cache
    lines, which the hardware prefetcher does not follow; ``g`` adjacent channels are
    ``n_rows`` contiguous runs of ``g * s`` values, walked sample by sample. ``g * s`` aims
    at ``GROUP_VALUES``, a group holds at most ``GROUP_CACHE`` values of one array (it is
    read again from cache for the output) and at most ``GROUP_MAX`` channels. A channel's
    results do not depend on ``g``, only on whether the shape takes the group path
    (``g > 1``: group_moments, centred on its first samples; 1: nchw_fold's chunks), which
    ``nchw_sum_group`` decides; the elementwise kernels take groups as work units only.
    """
    g = min((GROUP_VALUES + s - 1) // s, GROUP_MAX, GROUP_CACHE // max(1, n_rows * s), n_ch)
    return max(1, g)


@serial
def nchw_sum_group(n_rows, n_ch, s, backward):
    """``nchw_group`` for the kernels that sum a group position by position (statistics,
    training forward; the `backward` sums with ``backward=True``), or 1.

    The per-position sums pay only over enough samples and short rows: rows of
    ``GROUP_SHORT_ROW`` values or more are grouped from ``GROUP_TILE`` samples on, and
    the `backward` sums (``group_grad_sums``) group them below ``GROUP_BACKWARD_ROW``
    values only. Against grouping every row below ``GROUP_VALUES`` (2 threads, float32,
    same process, two runs): (1, 256, 28, 28) statistics 0.30-0.35, forward 0.40-0.44,
    backward 0.58-0.66 of the time; (4, 256, 28, 28) 0.51-0.54, 0.67-0.70, 0.64-0.66;
    (4, 64, 14, 14) 0.74, 0.69-0.83, 0.82-0.84; backward (16, 64, 28, 28) 0.69,
    (64, 128, 28, 28) 0.72-0.80, (32, 128, 20, 20) 0.75-0.79. With many
    samples the statistics and forward of (64, 128, 28, 28) and (64, 64, 20, 20) take
    1.2x-1.6x as long one channel at a time, so they stay grouped; 7x7 rows are grouped
    even with one sample (1.2x-1.4x faster).
    """
    if s >= GROUP_SHORT_ROW and (n_rows < GROUP_TILE or (backward and s >= GROUP_BACKWARD_ROW)):
        return 1
    return nchw_group(n_rows, n_ch, s)


@inline
def nchw_fold(x, c0, gl, k0, k1, n_rows, s, rows, piece, pieces, cnt, m, m2, t, sd, sq):
    """Fold chunks k0..k1 of channels c0..c0+gl into per-channel (count, mean, M2), in order.

    ``cnt``, ``m``, ``m2`` receive the partials; ``t``, ``sd``, ``sq`` are scratch (all of
    length >= gl). Chunk k covers rows n0..n1 and columns s0..s1 of each channel. Its
    deviations are taken from ``K``: the chunk's own mean for chunk k0 (one extra pass over
    the cached chunk), then the running mean of the chunks before it; ``sd = sum(x - K)``
    and ``sq = sum((x - K)**2)`` give the partial ``(nb, K + sd/nb, sq - sd**2/nb)``, merged
    with Chan's formula. Rows are walked sample by sample, the ``gl`` channels of a sample
    being adjacent in memory. When a chunk is one whole row, four chunks at a time are read
    in lockstep (``rows4_deviations``), all centred on the running mean before them.
    """
    for j in range(gl):
        cnt[j] = 0.0
        m[j] = 0.0
        m2[j] = 0.0
    k = k0
    while k < k1:
        if rows == 1 and pieces == 1 and k + 4 <= k1:
            nb = float(s)
            for j in range(gl):
                c = c0 + j
                t[j] = row_sum(x[k, c]) / nb if k == k0 else m[j]
                r = rows4_deviations(x[k, c], x[k + 1, c], x[k + 2, c], x[k + 3, c], t[j])
                for i in range(4):
                    d1 = r[2 * i]
                    cnt[j], m[j], m2[j] = merge(
                        cnt[j], m[j], m2[j], nb, t[j] + d1 / nb, r[2 * i + 1] - d1 * d1 / nb
                    )
            k += 4
            continue
        rb = k // pieces
        n0 = rb * rows
        n1 = min(n_rows, n0 + rows)
        s0 = (k - rb * pieces) * piece
        s1 = min(s, s0 + piece)
        nb = float((n1 - n0) * (s1 - s0))
        for j in range(gl):
            t[j] = m[j]
            sd[j] = 0.0
            sq[j] = 0.0
        if k == k0:
            for n in range(n0, n1):
                for j in range(gl):
                    t[j] += row_sum(x[n, c0 + j, s0:s1])
            for j in range(gl):
                t[j] /= nb
        for n in range(n0, n1):
            for j in range(gl):
                d1, d2 = row_deviations(x[n, c0 + j, s0:s1], t[j])
                sd[j] += d1
                sq[j] += d2
        for j in range(gl):
            cnt[j], m[j], m2[j] = merge(
                cnt[j], m[j], m2[j], nb, t[j] + sd[j] / nb, sq[j] - sd[j] * sd[j] / nb
            )
        k += 1


@inline
def group_run(x, c0, gl):
    """(x2, lo, hi): the (n_rows, n_ch * s) view of x and the bounds of channels c0..c0+gl
    in it, so that x2[n, lo:hi] is the group's sample n (one contiguous run)."""
    n_rows, n_ch, s = x.shape
    return x.reshape(n_rows, n_ch * s), c0 * s, (c0 + gl) * s


@inline
def group_moments(x, c0, gl, m, m2):
    """m[j], m2[j] = exact mean and M2 of channel c0 + j, j < gl (a group of short rows).

    A sample of the group is one contiguous run of ``gl * s`` values: each position of it
    is summed over the samples in order (tile_*, pos_*), then the positions of a channel
    (row_sum). One pass centred on ``K``, the mean of the first GROUP_TILE samples (summed
    first, then in cache): ``sd = sum(x - K)`` and ``sq = sum((x - K)**2)`` give
    ``(K + sd/M, sq - sd**2/M)``, as the Cython kernels do. The deviations take a tile of
    GROUP_TILE samples a cache line of positions at a time (tile_deviations_line) and
    request the same line of the next tile's samples after each (request): those runs are
    on other pages, and requested line by line, as the Cython kernels' ``fastbn_rows_*`` do,
    the (128, 512, 7, 7) statistics took 0.88-0.95 of the time on a CPU with 1 MiB of L2
    (same bits; nothing requested, the same time as the plain loop). Only when
    ``TILE_REQUESTS``: with an L2 that a group fills (512 KiB), the training backward of
    (128, 512, 7, 7) and (128, 256, 14, 14) float32 took 0.90-0.96 of the time without
    them, the training forward 0.99-1.03.
    """
    n_rows, _, s = x.shape
    x2, lo, hi = group_run(x, c0, gl)
    sd = np.zeros(gl * s)
    sq = np.zeros(gl * s)
    k = np.zeros(gl * s)
    xf = x.reshape(-1)
    w = x2.shape[1]
    width = hi - lo
    n0 = min(n_rows, GROUP_TILE)
    if n0 == GROUP_TILE:
        tile_add_run(xf, lo, w, width, k)
    else:
        for n in range(n0):
            pos_add(x2[n, lo:hi], k)
    for j in range(gl):
        k[j * s : (j + 1) * s] = row_sum(k[j * s : (j + 1) * s]) / float(n0 * s)
    step = LINE // x.itemsize  # one cache line of positions
    lines = width - width % step
    n = 0
    while n + GROUP_TILE <= n_rows:
        nnr = min(GROUP_TILE, n_rows - n - GROUP_TILE) if TILE_REQUESTS else 0
        b = n * w + lo
        for j in range(0, lines, step):
            tile_deviations_line(xf, b, w, j, k, sd, sq)
            for i in range(nnr):
                request(xf, b + (GROUP_TILE + i) * w + j)
        tile_deviations_tail(xf, b, w, lines, width, k, sd, sq)
        n += GROUP_TILE
    while n < n_rows:
        pos_deviations(x2[n, lo:hi], k, sd, sq)
        n += 1
    count = float(n_rows * s)
    for j in range(gl):
        d1 = row_sum(sd[j * s : (j + 1) * s])
        cm2 = row_sum(sq[j * s : (j + 1) * s]) - d1 * d1 / count
        m[j] = k[j * s] + d1 / count
        m2[j] = 0.0 if cm2 < 0.0 else cm2  # a NaN stays NaN


@inline
def group_grad_sums(dy, x, c0, gl, mean, a, b):
    """a[j], b[j] = sum(dy) and sum(dy*(x-mean)) of channel c0 + j (as group_moments, a
    tile's cache line of positions at a time, tile_grad_sums_line, the next tile's lines of
    both arrays requested after each when ``TILE_REQUESTS``)."""
    n_rows, _, s = x.shape
    g2 = group_run(dy, c0, gl)[0]
    x2, lo, hi = group_run(x, c0, gl)
    pa = np.zeros(gl * s)
    pb = np.zeros(gl * s)
    m = np.empty(gl * s)
    for j in range(gl):
        m[j * s : (j + 1) * s] = mean[c0 + j]
    gf = dy.reshape(-1)
    xf = x.reshape(-1)
    w = x2.shape[1]
    width = hi - lo
    step = LINE // x.itemsize
    lines = width - width % step
    n = 0
    while n + GROUP_TILE <= n_rows:
        nnr = min(GROUP_TILE, n_rows - n - GROUP_TILE) if TILE_REQUESTS else 0
        b0 = n * w + lo
        for j in range(0, lines, step):
            tile_grad_sums_line(gf, xf, b0, w, j, m, pa, pb)
            for i in range(nnr):
                request(gf, b0 + (GROUP_TILE + i) * w + j)
                request(xf, b0 + (GROUP_TILE + i) * w + j)
        tile_grad_sums_tail(gf, xf, b0, w, lines, width, m, pa, pb)
        n += GROUP_TILE
    while n < n_rows:
        pos_grad_sums(g2[n, lo:hi], x2[n, lo:hi], m, pa, pb)
        n += 1
    for j in range(gl):
        a[j] = row_sum(pa[j * s : (j + 1) * s])
        b[j] = row_sum(pb[j * s : (j + 1) * s])


@inline
def nchw_units(x):
    """(g, ng, units, spans) of the elementwise NCHW kernels on x: a work unit is one
    sample's group of g channels (ng groups per sample), taken in at most UNIT_SPANS spans."""
    n_rows, n_ch, s = x.shape
    g = nchw_group(n_rows, n_ch, s)
    ng = (n_ch + g - 1) // g
    units = n_rows * ng
    return g, ng, units, min(units, UNIT_SPANS)


@inline
def nchw_unit_block(u, ng, g, n_ch):
    """(sample, first channel, end channel) of elementwise work unit u (ng groups of g)."""
    n = u // ng
    c0 = (u - n * ng) * g
    return n, c0, min(n_ch, c0 + g)


@inline
def nchw_unit_moments(x, u, g, rows, blocks, piece, pieces):
    """(c0, gl, cnt, m, m2, scratch) of work unit u: the moments of channels c0..c0+gl."""
    n_rows, n_ch, s = x.shape
    c0 = u * g
    gl = min(n_ch - c0, g)
    cnt, m, m2, t, sd, sq = np.empty((6, g))
    if g > 1:
        group_moments(x, c0, gl, m, m2)
        cnt[:] = float(n_rows * s)
    else:
        nchw_fold(
            x, c0, gl, 0, blocks * pieces, n_rows, s, rows, piece, pieces, cnt, m, m2, t, sd, sq
        )
    return c0, gl, cnt, m, m2, t


@inline
def nchw_grad_sums(dy, x, c0, gl, mean, n0, n1, a, b):
    """a[j], b[j] = sum(dy) and sum(dy*(x-mean)) over rows n0..n1 of channel c0+j: the sums
    of the rows, added in row order (four rows at a time read in lockstep)."""
    for j in range(gl):
        c = c0 + j
        a[j] = 0.0
        b[j] = 0.0
        n = n0
        while n + 4 <= n1:
            r = rows4_grad_sums(
                dy[n, c], dy[n + 1, c], dy[n + 2, c], dy[n + 3, c],
                x[n, c], x[n + 1, c], x[n + 2, c], x[n + 3, c], mean[c],
            )  # fmt: skip
            for i in range(4):
                a[j] += r[2 * i]
                b[j] += r[2 * i + 1]
            n += 4
        while n < n1:
            da, db = row_grad_sums(dy[n, c], x[n, c], mean[c])
            a[j] += da
            b[j] += db
            n += 1


# ---------------------------------------------------------------- nchw


@parallel
def nchw_stats_channels(x, mean, var):
    n_rows, n_ch, s = x.shape
    rows, blocks, piece, pieces = nchw_grid(n_rows, s)
    g = nchw_sum_group(n_rows, n_ch, s, False)
    for u in prange((n_ch + g - 1) // g):
        c0, gl, cnt, m, m2, _ = nchw_unit_moments(x, u, g, rows, blocks, piece, pieces)
        for j in range(gl):
            mean[c0 + j] = m[j]
            var[c0 + j] = m2[j] / cnt[j]


@parallel
def nchw_stats_stripes(x, stripes, part):
    """part[c, p] = (count, mean, M2) of stripe p of channel c."""
    n_rows, n_ch, s = x.shape
    rows, blocks, piece, pieces = nchw_grid(n_rows, s)
    nchunks = blocks * pieces
    for u in prange(n_ch * stripes):
        c = u // stripes
        p = u - c * stripes
        k0 = p * nchunks // stripes
        k1 = (p + 1) * nchunks // stripes
        cnt, m, m2, t, sd, sq = np.empty((6, 1))
        nchw_fold(x, c, 1, k0, k1, n_rows, s, rows, piece, pieces, cnt, m, m2, t, sd, sq)
        part[c, p, 0] = cnt[0]
        part[c, p, 1] = m[0]
        part[c, p, 2] = m2[0]


@serial
def merge_parts(part, mean, var):
    """Merge part[c, :] (count, mean, M2) in stripe order into mean and var."""
    for c in range(part.shape[0]):
        cnt = 0.0
        m = 0.0
        m2 = 0.0
        for p in range(part.shape[1]):
            cnt, m, m2 = merge(cnt, m, m2, part[c, p, 0], part[c, p, 1], part[c, p, 2])
        mean[c] = m
        var[c] = m2 / cnt


@parallel
def nchw_train_forward_channels(x, weight, bias, eps, y, mean, var, invstd, stream):
    """One channel per work unit: its statistics, then its output while it is in cache
    (groups of short rows: nchw_train_forward_groups)."""
    n_rows, n_ch, s = x.shape
    rows, blocks, piece, pieces = nchw_grid(n_rows, s)
    stream = stream and apart(y, x)
    x = unowned(x)
    y = unowned(y)
    for u in prange(n_ch):
        c0, gl, cnt, m, m2, t = nchw_unit_moments(x, u, 1, rows, blocks, piece, pieces)
        c1 = c0 + gl
        for j in range(gl):
            c = c0 + j
            v = m2[j] / cnt[j]
            inv = 1.0 / math.sqrt(v + eps)
            mean[c] = m[j]
            var[c] = v
            invstd[c] = inv
            t[j] = weight[c] * inv
        mt, bt = output_constants(x, m[:gl], t[:gl], bias[c0:c1])
        mu, tu, bu = unowned(mt), unowned(t), unowned(bt)
        for n in range(n_rows):
            block_normalize(x[n, c0:c1], mu, tu[:gl], bu, y[n, c0:c1], stream)
        if stream:
            fence()
        keep(m)
        keep(t)
        keep(bt)


@parallel
def nchw_train_forward_groups(x, weight, bias, eps, y, mean, var, invstd, stream):
    """Groups of short rows (``nchw_group`` > 1): a group's statistics (group_moments),
    then its output while it is in cache, sample by sample, each sample's run of ``gl * s``
    values written at once with the constants of every position (stream_normalize, inlined,
    with tables of one run; ``stream``: the run is streamed). Same arithmetic as the
    statistics followed by nchw_normalize, hence the same bits."""
    n_rows, n_ch, s = x.shape
    g = nchw_sum_group(n_rows, n_ch, s, False)
    w = n_ch * s
    count = float(n_rows * s)
    stream = stream and apart(y, x)
    xf, yf = unowned(x).reshape(-1), unowned(y).reshape(-1)
    for u in prange((n_ch + g - 1) // g):
        c0 = u * g
        gl = min(n_ch - c0, g)
        m, m2, sc = np.empty((3, gl))
        group_moments(x, c0, gl, m, m2)
        for j in range(gl):
            c = c0 + j
            v = m2[j] / count
            inv = 1.0 / math.sqrt(v + eps)
            mean[c] = m[j]
            var[c] = v
            invstd[c] = inv
            sc[j] = weight[c] * inv
        mt, bt = output_constants(x, m, sc, bias[c0 : c0 + gl])
        pm, ps, pb = positions(mt, s, gl), positions(sc, s, gl), positions(bt, s, gl)
        mu, su, bu = unowned(pm), unowned(ps), unowned(pb)
        run = gl * s
        for n in range(n_rows):
            o = n * w + c0 * s
            if stream:
                stream_normalize_inline(xf[o : o + run], yf[o : o + run], mu, su, bu, run)
            else:
                run_normalize_inline(xf[o : o + run], yf[o : o + run], mu, su, bu, run)
        if stream:
            fence()
        keep(pm)
        keep(ps)
        keep(pb)


@parallel
def nchw_normalize(x, mean, scale, bias, y, stream):
    """y = (x - mean) * scale + bias (float32: ``output_constants``), one (sample, channel
    group) block per work unit; streamed row by row (a walk of four rows at a time, as the
    Cython kernels write, was 1.3-1.5x slower here)."""
    g, ng, units, spans = nchw_units(x)
    mt, bt = output_constants(x, mean, scale, bias)
    stream = stream and apart(y, x)
    x, y, scale, mu, bu = unowned(x), unowned(y), unowned(scale), unowned(mt), unowned(bt)
    n_ch = x.shape[1]
    for p in prange(spans):
        for u in range(p * units // spans, (p + 1) * units // spans):
            n, c0, c1 = nchw_unit_block(u, ng, g, n_ch)
            block_normalize(
                x[n, c0:c1], span(mu, c0, c1), scale[c0:c1], bu[c0:c1], y[n, c0:c1], stream
            )
        if stream:
            fence()
    keep(bt)


@parallel
def nchw_backward_reduce_channels(dy, x, mean, sum_dy, sum_dy_xmu):
    n_rows, n_ch, s = x.shape
    g = nchw_sum_group(n_rows, n_ch, s, True)
    for u in prange((n_ch + g - 1) // g):
        c0 = u * g
        gl = min(n_ch - c0, g)
        a, b = np.empty((2, g))
        if g > 1:
            group_grad_sums(dy, x, c0, gl, mean, a, b)
        else:
            nchw_grad_sums(dy, x, c0, gl, mean, 0, n_rows, a, b)
        sum_dy[c0 : c0 + gl] = a[:gl]
        sum_dy_xmu[c0 : c0 + gl] = b[:gl]


@parallel
def nchw_backward_reduce_stripes(dy, x, mean, stripes, part):
    """part[:, p, c] = (sum dy, sum dy*(x-mean)) of stripe p (a range of rows)."""
    n_rows, n_ch, _ = x.shape
    for u in prange(n_ch * stripes):
        c = u // stripes
        p = u - c * stripes
        a, b = np.empty((2, 1))
        nchw_grad_sums(dy, x, c, 1, mean, p * n_rows // stripes, (p + 1) * n_rows // stripes, a, b)
        part[0, p, c] = a[0]
        part[1, p, c] = b[0]


@parallel
def nchw_backward_train_channels(dy, x, mean, invstd, weight, dx, sum_dy, sum_dy_xmu, stream):
    n_rows, n_ch, s = x.shape
    count = float(n_rows * s)
    g = nchw_sum_group(n_rows, n_ch, s, True)
    stream = stream and apart(dx, dy) and apart(dx, x)
    dy, x, mean, dx = unowned(dy), unowned(x), unowned(mean), unowned(dx)
    for u in prange((n_ch + g - 1) // g):
        c0 = u * g
        gl = min(n_ch - c0, g)
        c1 = c0 + gl
        t = np.empty((5, g))
        a, b, k, shift, proj = unowned(t)
        if g > 1:
            group_grad_sums(dy, x, c0, gl, mean, a, b)
        else:
            nchw_grad_sums(dy, x, c0, gl, mean, 0, n_rows, a, b)
        for j in range(gl):
            c = c0 + j
            inv = invstd[c]
            sum_dy[c] = a[j]
            sum_dy_xmu[c] = b[j]
            k[j] = weight[c] * inv
            shift[j] = a[j] / count
            proj[j] = inv * inv * b[j] / count
        for n in range(n_rows):
            block_dx(
                dy[n, c0:c1],
                x[n, c0:c1],
                mean[c0:c1],
                k[:gl],
                shift[:gl],
                proj[:gl],
                dx[n, c0:c1],
                stream,
            )
        if stream:
            fence()
        keep(t)


@parallel
def nchw_dx(dy, x, mean, k, shift, proj, dx, stream):
    """dx = k*(dy - shift - (x - mean)*proj) per channel, one block per work unit."""
    g, ng, units, spans = nchw_units(x)
    stream = stream and apart(dx, dy) and apart(dx, x)
    dy, x, dx = unowned(dy), unowned(x), unowned(dx)
    mean, k, shift, proj = unowned(mean), unowned(k), unowned(shift), unowned(proj)
    n_ch = x.shape[1]
    for p in prange(spans):
        for u in range(p * units // spans, (p + 1) * units // spans):
            n, c0, c1 = nchw_unit_block(u, ng, g, n_ch)
            block_dx(
                dy[n, c0:c1],
                x[n, c0:c1],
                mean[c0:c1],
                k[c0:c1],
                shift[c0:c1],
                proj[c0:c1],
                dx[n, c0:c1],
                stream,
            )
        if stream:
            fence()


# ---------------------------------------------------------------- nhwc


@reduction
def rows_add(x, r0, r1, d, acc):
    """acc[j] += x[r + i*d, j] for r in [r0, r1), i = 0 .. STREAM_PARTS - 1 in turn."""
    for r in range(r0, r1):
        for j in range(x.shape[1]):
            a = acc[j]
            for i in range(STREAM_PARTS):
                a += x[r + i * d, j]
            acc[j] = a


@reduction
def rows_deviations(x, r0, r1, d, m, sd, sq):
    """rows_add's walk: sd[j] += x - m[j], sq[j] += (x - m[j])**2."""
    for r in range(r0, r1):
        for j in range(x.shape[1]):
            a = sd[j]
            b = sq[j]
            for i in range(STREAM_PARTS):
                dev = x[r + i * d, j] - m[j]
                a += dev
                b += dev * dev
            sd[j] = a
            sq[j] = b


@reduction
def rows_grad_sums(dy, x, r0, r1, d, mean, a, b):
    """rows_add's walk: a[j] += dy, b[j] += dy * (x - mean[j])."""
    for r in range(r0, r1):
        for j in range(x.shape[1]):
            sa = a[j]
            sb = b[j]
            for i in range(STREAM_PARTS):
                g = dy[r + i * d, j] * 1.0
                sa += g
                sb += g * (x[r + i * d, j] - mean[j])
            a[j] = sa
            b[j] = sb


@inline
def row_parts(n_ch, rows, r0, r1):
    """Rows per part when rows [r0, r1) are read as STREAM_PARTS parts of equal length (0:
    in order), as the Cython kernels' ``_nhwc_part``: the fewer than STREAM_PARTS rows left
    over follow as a chunk of their own. One core reads memory faster from four places at
    once; the accumulators are loaded and stored once per STREAM_PARTS rows (see rows_add).
    Parts of whole chunks only (as before) left up to three chunks of a stripe to the
    column blocks: (6272, 512) float32 statistics took 0.71-0.92 of the time this way
    (0.93-1.03 with the caches flushed), (25088, 64) 0.73-0.86 (same process, old against
    new kernels, 2 threads)."""
    if n_ch < NHWC_ROW_MIN_C:
        return 0
    part = (r1 - r0) // STREAM_PARTS
    return part if part * STREAM_PARTS >= rows else 0


@parallel
def nhwc_stats_stripes(x, rows, stripes, counts, means, m2s):
    """Stripe p folds its row chunks into counts[p], means[p, :], m2s[p, :].

    A chunk's deviations are taken from ``K``: the chunk's own mean for the first chunk of
    the stripe (one extra pass), then the stripe's running mean (one pass: ``sd = sum(x -
    K)`` and ``sq = sum((x - K)**2)`` give the partial ``(nb, K + sd/nb, sq - sd**2/nb)``).
    A stripe of rows of at least NHWC_ROW_MIN_C channels is read as STREAM_PARTS parts
    (row_parts) a row of each in turn: chunk i is then rows [i*sb, (i+1)*sb) of every part
    (sb = rows / STREAM_PARTS; the last one shorter); the rows left over follow as an
    ordinary chunk.
    """
    n_rows, n_ch = x.shape
    nchunks = (n_rows + rows - 1) // rows
    sb = max(1, rows // STREAM_PARTS)
    per = nhwc_period(n_ch)
    for p in prange(stripes):
        pm = means[p]
        pm2 = m2s[p]
        pm[:] = 0.0
        pm2[:] = 0.0
        kc = np.zeros(n_ch)
        sd = np.empty(n_ch)
        sq = np.empty(n_ch)
        pa, pb, mp = np.empty(max(per, 1)), np.empty(max(per, 1)), np.empty(max(per, 1))
        cnt = 0.0
        start = p * nchunks // stripes * rows
        stop = min(n_rows, (p + 1) * nchunks // stripes * rows)
        part = row_parts(n_ch, rows, start, stop)
        ra = start
        while ra < stop:
            if ra < start + part:
                rb = min(ra + sb, start + part)
                nb = float((rb - ra) * STREAM_PARTS)
            else:
                rb = min(ra + rows, stop)
                nb = float(rb - ra)
            streamed = ra < start + part
            if cnt == 0.0:
                if streamed:
                    kc[:] = 0.0
                    rows_add(x, ra, rb, part, kc)
                elif per:
                    period_add(x[ra:rb], per, kc, pa)
                else:
                    cols_add(x[ra:rb], kc)
                kc /= nb
            else:
                kc[:] = pm
            sd[:] = 0.0
            sq[:] = 0.0
            if streamed:
                rows_deviations(x, ra, rb, part, kc, sd, sq)
            elif per:
                period_sums(None, x[ra:rb], per, kc, sd, sq, pa, pb, mp)
            else:
                cols_deviations(x[ra:rb], kc, sd, sq)
            n = cnt + nb
            f = nb / n
            g = cnt * f
            for j in range(n_ch):
                delta = kc[j] + sd[j] / nb - pm[j]
                pm[j] += delta * f
                pm2[j] += sq[j] - sd[j] * sd[j] / nb + delta * delta * g
            cnt = n
            ra = rb
            if streamed and ra == start + part:
                ra = start + STREAM_PARTS * part
        counts[p] = cnt


@serial
def scale_constants(var, eps, weight, invstd):
    """invstd = 1/sqrt(var + eps); returns the scale weight * invstd (the constants of an
    unfused training forward's normalize, one call instead of four NumPy operations)."""
    scale = np.empty(var.shape[0])
    for c in range(var.shape[0]):
        invstd[c] = 1.0 / math.sqrt(var[c] + eps)
        scale[c] = weight[c] * invstd[c]
    return scale


@serial
def dx_constants(invstd, weight, sum_dy, sum_dy_xmu, count):
    """(k, shift, proj) of ``dx = k * (dy - shift - (x - mean) * proj)`` from the sums."""
    n = invstd.shape[0]
    k, shift, proj = np.empty(n), np.empty(n), np.empty(n)
    for c in range(n):
        inv = invstd[c]
        k[c] = weight[c] * inv
        shift[c] = sum_dy[c] / count
        proj[c] = inv * inv * sum_dy_xmu[c] / count
    return k, shift, proj


@serial
def nhwc_merge(counts, means, m2s, mean, var):
    mean[:] = 0.0
    var[:] = 0.0
    cnt = 0.0
    for p in range(counts.shape[0]):
        nb = counts[p]
        n = cnt + nb
        f = nb / n
        g = cnt * f
        for j in range(mean.shape[0]):
            delta = means[p, j] - mean[j]
            mean[j] += delta * f
            var[j] += m2s[p, j] + delta * delta * g
        cnt = n
    var /= cnt


@parallel
def nhwc_normalize(x, mean, scale, bias, y, runs):
    """y = (x - mean) * scale + bias (float32: ``output_constants``). With ``runs > 0`` and
    ``y`` not ``x``, y is streamed as that many runs of whole rows (one per thread; the
    split does not change the bits), else written a chunk of rows at a time (run_normalize);
    both read wrapped tables (see stream_normalize)."""
    n_rows, n_ch = x.shape
    rows = max(1, NHWC_CHUNK // n_ch)
    xf = x.reshape(-1)
    yf = y.reshape(-1)
    mt, bt = output_constants(x, mean, scale, bias)
    mw, sw, bw = wrap(mt, BLOCK), wrap(scale, BLOCK), wrap(bt, BLOCK)
    if runs and apart(y, x):
        for t in prange(runs):
            a = t * n_rows // runs * n_ch
            e = (t + 1) * n_rows // runs * n_ch
            stream_normalize(xf[a:e], yf[a:e], mw, sw, bw, n_ch)
            fence()
        return
    xu, yu, mu, su, bu = unowned(xf), unowned(yf), unowned(mw), unowned(sw), unowned(bw)
    nk = (n_rows + rows - 1) // rows
    for u in prange(nk):
        # Last chunk first, each thread's in reverse: the rows that the statistics (or the
        # backward's sums) read last are still in cache. Elementwise: same bits.
        a = (nk - 1 - u) * rows * n_ch
        e = min(n_rows, (nk - u) * rows) * n_ch
        run_normalize(xu[a:e], yu[a:e], mu, su, bu, n_ch)
    keep(mw)
    keep(sw)
    keep(bw)


@parallel
def nhwc_backward_reduce_stripes(dy, x, mean, stripes, sums_dy, sums_dy_xmu):
    n_rows = x.shape[0]
    for p in prange(stripes):
        a = sums_dy[p]
        b = sums_dy_xmu[p]
        a[:] = 0.0
        b[:] = 0.0
        r0 = p * n_rows // stripes
        r1 = (p + 1) * n_rows // stripes
        part = (r1 - r0) // STREAM_PARTS if x.shape[1] >= NHWC_ROW_MIN_C else 0
        rows_grad_sums(dy, x, r0, r0 + part, part, mean, a, b)
        r0 += STREAM_PARTS * part
        per = nhwc_period(x.shape[1])
        if per:
            pa, pb, mp = np.empty(per), np.empty(per), np.empty(per)
            period_sums(dy[r0:r1], x[r0:r1], per, mean, a, b, pa, pb, mp)
        else:
            cols_grad_sums(dy[r0:r1], x[r0:r1], mean, a, b)


@serial
def add_rows(parts, out):
    """out = parts[0] + parts[1] + ... strictly in row order."""
    out[:] = 0.0
    for p in range(parts.shape[0]):
        for j in range(out.shape[0]):
            out[j] += parts[p, j]


@parallel
def nhwc_dx(dy, x, mean, k, shift, proj, dx, runs):
    """dx per channel; ``runs`` as in nhwc_normalize (the runs read wrapped tables, see
    stream_grad and run_grad)."""
    n_rows, n_ch = x.shape
    rows = max(1, NHWC_CHUNK // n_ch)
    gf = dy.reshape(-1)
    xf = x.reshape(-1)
    df = dx.reshape(-1)
    mw, kw, sw, pw = wrap(mean, BLOCK), wrap(k, BLOCK), wrap(shift, BLOCK), wrap(proj, BLOCK)
    if runs and apart(dx, dy) and apart(dx, x):
        for t in prange(runs):
            a = t * n_rows // runs * n_ch
            e = (t + 1) * n_rows // runs * n_ch
            stream_grad(gf[a:e], xf[a:e], df[a:e], mw, kw, sw, pw, n_ch)
            fence()
        return
    gu, xu, du = unowned(gf), unowned(xf), unowned(df)
    mu, ku, su, pu = unowned(mw), unowned(kw), unowned(sw), unowned(pw)
    nk = (n_rows + rows - 1) // rows
    for u in prange(nk):
        a = (nk - 1 - u) * rows * n_ch  # last chunk first, as nhwc_normalize
        e = min(n_rows, (nk - u) * rows) * n_ch
        run_grad(gu[a:e], xu[a:e], du[a:e], mu, ku, su, pu, n_ch)
    keep(mw)
    keep(kw)
    keep(sw)
    keep(pw)
