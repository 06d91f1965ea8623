"""CUDA kernels of the ``cuda`` backend (``numba.cuda``, package ``numba-cuda``).

This module imports ``numba.cuda`` at the top: only :mod:`fastbn.backends.cuda` imports it,
lazily, the first time a kernel or a device helper is needed. Kernels are compiled by
numba on their first launch (one compilation per argument-type signature).

Work decomposition (fixed by the shape only, never by the launch configuration)
--------------------------------------------------------------------------------
Reductions cut every channel into fixed *chunks* and every chunk into fixed *lanes*:

- ``"nchw"`` ``(N, C, S)``: channel ``c`` holds ``M = N*S`` values indexed by
  ``m = n*S + s``. A chunk is ``LANES * k`` consecutive values of ``m``; lane ``j`` of a
  chunk reads the values ``j, j + LANES, j + 2*LANES, ...`` of the chunk, so consecutive
  lanes read consecutive addresses (coalesced).
- ``"nhwc"`` ``(R, C)``: a work item is a tile of ``NHWC_TILE`` channels times a chunk of
  ``NHWC_ROW_LANES * k`` rows; the lane ``(l, ci)`` reads the rows ``l, l + NHWC_ROW_LANES,
  ...`` of the chunk in channel ``c0 + ci``. Threads run along the channels, so a warp
  reads consecutive channels of one row (coalesced).

Each lane is reduced sequentially in float64 (statistics: sum, mean, then the sum of
squared deviations with the ``-(sum d)^2/n`` correction, the second pass reading the lane
from cache; backward: plain float64 sums). Lane partials are merged by a fixed binary tree
in shared memory (slot ``i`` absorbs slot ``i + half``), chunk partials go to a global
``(C, nchunks, 3)`` scratch array, and a second kernel merges them per channel by the same
fixed tree (Chan's formula for ``(count, mean, M2)`` triplets, additions for the backward
sums). A thread only decides *which* fixed lane or pair it computes, never the order of
the arithmetic, so results are bitwise identical for every block size and grid size, and
there is no atomic operation and no warp shuffle (the simulator has none).

Elementwise kernels (normalize, dx) run a 2-D grid-stride loop over the canonical view seen
as rows: ``(N*C, S)`` rows for ``"nchw"`` (``c = row % C``) and ``(R, C)`` for ``"nhwc"``
(threads along ``C``). All arithmetic is float64 and rounded once to the output dtype.
Each element is read before it is written by the same thread, so ``y is x`` and ``dx is
dy`` are safe.
"""

from __future__ import annotations

import math
from functools import cache

from numba import cuda, float64

#: Lanes per NCHW chunk; also the largest useful block size of the NCHW reduction.
LANES = 256
#: Channels per NHWC reduction tile (one warp wide).
NHWC_TILE = 32
#: Row lanes per NHWC reduction tile (``NHWC_TILE * NHWC_ROW_LANES`` = 256 lanes).
NHWC_ROW_LANES = 8
#: Largest number of values a lane reduces per chunk (NCHW) / rows per lane (NHWC).
MAX_K_NCHW = 16
MAX_K_NHWC = 64

_STATS = 0
_SUMS = 1


def chunk_geometry_nchw(m: int) -> tuple[int, int]:
    """Return ``(k, nchunks)`` for a channel of ``m`` values in the NCHW reduction.

    A chunk holds ``LANES * k`` values. Depends on ``m`` only.
    """
    k = min(MAX_K_NCHW, max(1, m // (LANES * 16)))
    chunk = LANES * k
    return k, (m + chunk - 1) // chunk


def chunk_geometry_nhwc(r: int) -> tuple[int, int]:
    """Return ``(k, nchunks)`` for ``r`` rows in the NHWC reduction.

    A chunk holds ``NHWC_ROW_LANES * k`` rows. Depends on ``r`` only.
    """
    k = min(MAX_K_NHWC, max(1, r // (NHWC_ROW_LANES * 16)))
    chunk = NHWC_ROW_LANES * k
    return k, (r + chunk - 1) // chunk


# ---------------------------------------------------------------------------------------
# Device functions
# ---------------------------------------------------------------------------------------


@cuda.jit(device=True)
def _merge_rows(p, i, j, kind):
    """Merge row ``j`` of the ``(rows, 3)`` array ``p`` into row ``i`` (fixed order)."""
    if kind == _STATS:
        nb = p[j, 0]
        if nb == 0.0:
            return
        na = p[i, 0]
        if na == 0.0:
            p[i, 0] = nb
            p[i, 1] = p[j, 1]
            p[i, 2] = p[j, 2]
            return
        ma = p[i, 1]
        n = na + nb
        d = p[j, 1] - ma
        f = nb / n
        p[i, 0] = n
        p[i, 1] = ma + d * f
        p[i, 2] = p[i, 2] + p[j, 2] + d * d * na * f
    else:
        p[i, 0] = p[i, 0] + p[j, 0]
        p[i, 1] = p[i, 1] + p[j, 1]
        p[i, 2] = p[i, 2] + p[j, 2]


@cuda.jit(device=True)
def _tree(p, rows, unit, tid, nt, kind):
    """Fixed binary tree over ``rows`` (a power of two) groups of ``unit`` rows of ``p``.

    At each level row ``q`` absorbs row ``q + half*unit`` for ``q < half*unit``; every
    thread of the block must call this (it synchronizes the block).
    """
    half = rows // 2
    while half > 0:
        q = tid
        span = half * unit
        while q < span:
            _merge_rows(p, q, q + span, kind)
            q += nt
        cuda.syncthreads()
        half //= 2


@cuda.jit(device=True)
def _tree_ragged(p, count, tid, nt, kind):
    """Fixed binary tree over the first ``count`` rows of ``p`` (any ``count >= 1``)."""
    width = 1
    while width < count:
        width *= 2
    half = width // 2
    while half > 0:
        q = tid
        while q < half:
            if q + half < count:
                _merge_rows(p, q, q + half, kind)
            q += nt
        cuda.syncthreads()
        half //= 2


@cuda.jit(device=True)
def _lane_stats_nchw(x, c, s_len, start, stop, step):
    n = 0.0
    acc = 0.0
    m = start
    while m < stop:
        q = m // s_len
        acc += float(x[q, c, m - q * s_len])
        n += 1.0
        m += step
    if n == 0.0:
        return 0.0, 0.0, 0.0
    mu = acc / n
    sd = 0.0
    sd2 = 0.0
    m = start
    while m < stop:
        q = m // s_len
        d = float(x[q, c, m - q * s_len]) - mu
        sd += d
        sd2 += d * d
        m += step
    return n, mu + sd / n, sd2 - sd * sd / n


@cuda.jit(device=True)
def _lane_sums_nchw(dy, x, mu, c, s_len, start, stop, step):
    n = 0.0
    a = 0.0
    b = 0.0
    m = start
    while m < stop:
        q = m // s_len
        r = m - q * s_len
        g = float(dy[q, c, r])
        a += g
        b += g * (float(x[q, c, r]) - mu)
        n += 1.0
        m += step
    return n, a, b


@cuda.jit(device=True)
def _lane_stats_nhwc(x, c, start, stop, step):
    n = 0.0
    acc = 0.0
    r = start
    while r < stop:
        acc += float(x[r, c])
        n += 1.0
        r += step
    if n == 0.0:
        return 0.0, 0.0, 0.0
    mu = acc / n
    sd = 0.0
    sd2 = 0.0
    r = start
    while r < stop:
        d = float(x[r, c]) - mu
        sd += d
        sd2 += d * d
        r += step
    return n, mu + sd / n, sd2 - sd * sd / n


@cuda.jit(device=True)
def _lane_sums_nhwc(dy, x, mu, c, start, stop, step):
    n = 0.0
    a = 0.0
    b = 0.0
    r = start
    while r < stop:
        g = float(dy[r, c])
        a += g
        b += g * (float(x[r, c]) - mu)
        n += 1.0
        r += step
    return n, a, b


# ---------------------------------------------------------------------------------------
# Reduction kernels: one (count, mean, M2) or (count, sum_dy, sum_dy_xmu) row per chunk
# ---------------------------------------------------------------------------------------


@cache
def reduce_nchw(kind: int):
    """Chunk-partial kernel for ``"nchw"``; 1-D blocks, grid-stride over work items.

    Arguments ``(x, dy, mean, k, nchunks, part)``: ``part`` is ``(C, nchunks, 3)``
    float64; ``dy`` and ``mean`` are only read by the backward kind.
    """

    @cuda.jit
    def kernel(x, dy, mean, k, nchunks, part):
        sh = cuda.shared.array((LANES, 3), float64)
        tid = cuda.threadIdx.x
        nt = cuda.blockDim.x
        nc = x.shape[1]
        s_len = x.shape[2]
        m_len = x.shape[0] * s_len
        chunk = LANES * k
        nitems = nc * nchunks
        item = cuda.blockIdx.x
        while item < nitems:
            c = item // nchunks
            kk = item - c * nchunks
            base = kk * chunk
            stop = min(m_len, base + chunk)
            j = tid
            while j < LANES:
                if kind == _STATS:
                    a0, a1, a2 = _lane_stats_nchw(x, c, s_len, base + j, stop, LANES)
                else:
                    a0, a1, a2 = _lane_sums_nchw(dy, x, mean[c], c, s_len, base + j, stop, LANES)
                sh[j, 0] = a0
                sh[j, 1] = a1
                sh[j, 2] = a2
                j += nt
            cuda.syncthreads()
            _tree(sh, LANES, 1, tid, nt, kind)
            if tid == 0:
                part[c, kk, 0] = sh[0, 0]
                part[c, kk, 1] = sh[0, 1]
                part[c, kk, 2] = sh[0, 2]
            cuda.syncthreads()
            item += cuda.gridDim.x

    return kernel


@cache
def reduce_nhwc(kind: int):
    """Chunk-partial kernel for ``"nhwc"``; 2-D blocks (x along channels).

    Arguments ``(x, dy, mean, k, nchunks, part)`` as for :func:`reduce_nchw`.
    """

    @cuda.jit
    def kernel(x, dy, mean, k, nchunks, part):
        sh = cuda.shared.array((NHWC_ROW_LANES * NHWC_TILE, 3), float64)
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        bx = cuda.blockDim.x
        by = cuda.blockDim.y
        tid = ty * bx + tx
        nt = bx * by
        r_len = x.shape[0]
        nc = x.shape[1]
        ntiles = (nc + NHWC_TILE - 1) // NHWC_TILE
        chunk = NHWC_ROW_LANES * k
        nitems = ntiles * nchunks
        item = cuda.blockIdx.x
        while item < nitems:
            tile = item // nchunks
            kk = item - tile * nchunks
            c0 = tile * NHWC_TILE
            base = kk * chunk
            stop = min(r_len, base + chunk)
            lane = ty
            while lane < NHWC_ROW_LANES:
                ci = tx
                while ci < NHWC_TILE:
                    c = c0 + ci
                    a0 = 0.0
                    a1 = 0.0
                    a2 = 0.0
                    if c < nc:
                        if kind == _STATS:
                            a0, a1, a2 = _lane_stats_nhwc(x, c, base + lane, stop, NHWC_ROW_LANES)
                        else:
                            a0, a1, a2 = _lane_sums_nhwc(
                                dy, x, mean[c], c, base + lane, stop, NHWC_ROW_LANES
                            )
                    q = lane * NHWC_TILE + ci
                    sh[q, 0] = a0
                    sh[q, 1] = a1
                    sh[q, 2] = a2
                    ci += bx
                lane += by
            cuda.syncthreads()
            _tree(sh, NHWC_ROW_LANES, NHWC_TILE, tid, nt, kind)
            ci = tid
            while ci < NHWC_TILE:
                c = c0 + ci
                if c < nc:
                    part[c, kk, 0] = sh[ci, 0]
                    part[c, kk, 1] = sh[ci, 1]
                    part[c, kk, 2] = sh[ci, 2]
                ci += nt
            cuda.syncthreads()
            item += cuda.gridDim.x

    return kernel


# ---------------------------------------------------------------------------------------
# Per-channel merge + finalize kernels: one block per channel (grid-stride)
# ---------------------------------------------------------------------------------------


@cuda.jit
def finalize_stats(part, nchunks, m_len, eps, weight, mean, var, invstd, scale, with_scale):
    """Merge the chunk partials of each channel; write mean, var (and invstd, scale).

    With ``with_scale`` false ``eps``, ``weight``, ``invstd`` and ``scale`` are not used.
    """
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    c = cuda.blockIdx.x
    while c < part.shape[0]:
        p = part[c]
        _tree_ragged(p, nchunks, tid, nt, _STATS)
        if tid == 0:
            v = p[0, 2] / m_len
            mean[c] = p[0, 1]
            var[c] = v
            if with_scale:
                inv = 1.0 / math.sqrt(v + eps)
                invstd[c] = inv
                scale[c] = weight[c] * inv
        cuda.syncthreads()
        c += cuda.gridDim.x


@cuda.jit
def finalize_sums(part, nchunks, m_len, weight, invstd, sum_dy, sum_dy_xmu, coef, with_coef):
    """Merge the backward chunk sums of each channel; write the sums (and dx coefficients).

    ``coef`` is ``(C, 3)`` float64: ``weight*invstd``, ``sum_dy/M``,
    ``invstd**2 * sum_dy_xmu/M``; it is only written when ``with_coef`` is true.
    """
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    c = cuda.blockIdx.x
    while c < part.shape[0]:
        p = part[c]
        _tree_ragged(p, nchunks, tid, nt, _SUMS)
        if tid == 0:
            a = p[0, 1]
            b = p[0, 2]
            sum_dy[c] = a
            sum_dy_xmu[c] = b
            if with_coef:
                inv = invstd[c]
                coef[c, 0] = weight[c] * inv
                coef[c, 1] = a / m_len
                coef[c, 2] = inv * inv * b / m_len
        cuda.syncthreads()
        c += cuda.gridDim.x


# ---------------------------------------------------------------------------------------
# Elementwise kernels: 2-D grid-stride loops over (rows, columns)
# ---------------------------------------------------------------------------------------


@cuda.jit
def normalize_nchw(x, mean, scale, bias, y):
    """``y = (x - mean) * scale + bias`` on ``(N, C, S)`` (rows ``n*C + c``)."""
    nc = x.shape[1]
    s_len = x.shape[2]
    rows = x.shape[0] * nc
    col0, row = cuda.grid(2)
    sx, sy = cuda.gridsize(2)
    while row < rows:
        n = row // nc
        c = row - n * nc
        mu = mean[c]
        sc = scale[c]
        b = bias[c]
        s = col0
        while s < s_len:
            y[n, c, s] = (float(x[n, c, s]) - mu) * sc + b
            s += sx
        row += sy


@cuda.jit
def normalize_nhwc(x, mean, scale, bias, y):
    """``y = (x - mean) * scale + bias`` on ``(R, C)`` (threads along ``C``)."""
    rows = x.shape[0]
    nc = x.shape[1]
    c0, r = cuda.grid(2)
    sx, sy = cuda.gridsize(2)
    while r < rows:
        c = c0
        while c < nc:
            y[r, c] = (float(x[r, c]) - mean[c]) * scale[c] + bias[c]
            c += sx
        r += sy


@cuda.jit
def dx_nchw(dy, x, mean, coef, dx):
    """``dx = a*(dy - b - (x - mean)*k)`` with ``(a, b, k) = coef[c]`` on ``(N, C, S)``."""
    nc = x.shape[1]
    s_len = x.shape[2]
    rows = x.shape[0] * nc
    col0, row = cuda.grid(2)
    sx, sy = cuda.gridsize(2)
    while row < rows:
        n = row // nc
        c = row - n * nc
        mu = mean[c]
        a = coef[c, 0]
        b = coef[c, 1]
        k = coef[c, 2]
        s = col0
        while s < s_len:
            dx[n, c, s] = a * (float(dy[n, c, s]) - b - (float(x[n, c, s]) - mu) * k)
            s += sx
        row += sy


@cuda.jit
def dx_nhwc(dy, x, mean, coef, dx):
    """``dx = a*(dy - b - (x - mean)*k)`` with ``(a, b, k) = coef[c]`` on ``(R, C)``."""
    rows = x.shape[0]
    nc = x.shape[1]
    c0, r = cuda.grid(2)
    sx, sy = cuda.gridsize(2)
    while r < rows:
        c = c0
        while c < nc:
            dx[r, c] = coef[c, 0] * (
                float(dy[r, c]) - coef[c, 1] - (float(x[r, c]) - mean[c]) * coef[c, 2]
            )
            c += sx
        r += sy


# ---------------------------------------------------------------------------------------
# Small per-channel helpers
# ---------------------------------------------------------------------------------------


@cuda.jit
def update_running(running_mean, running_var, mean, var, momentum, correction):
    """In place: ``rm = (1-m)*rm + m*mean``, ``rv = (1-m)*rv + m*(var*correction)``.

    ``correction`` is ``M/(M-1)`` computed on the host, so that the arithmetic is the same
    as the CPU path's ``(1-m)*rv + m*(var*(M/(M-1)))``.
    """
    c = cuda.grid(1)
    if c < running_mean.shape[0]:
        unbiased = var[c] * correction
        running_mean[c] = (1.0 - momentum) * float(running_mean[c]) + momentum * mean[c]
        running_var[c] = (1.0 - momentum) * float(running_var[c]) + momentum * unbiased


@cuda.jit
def fill(a, value):
    """Set every element of the 1-D array ``a`` to ``value``."""
    i = cuda.grid(1)
    step = cuda.gridsize(1)
    while i < a.shape[0]:
        a[i] = value
        i += step


@cuda.jit
def copy_1d(src, dst):
    """``dst[:] = src`` for 1-D arrays (with a dtype conversion when they differ)."""
    i = cuda.grid(1)
    step = cuda.gridsize(1)
    while i < src.shape[0]:
        dst[i] = src[i]
        i += step


@cuda.jit
def channel_math(op, a, b, eps, out):
    """Per-channel maths in float64: ``op`` 0: ``a*b``; 1: ``1/sqrt(a+eps)``;
    2: ``b/sqrt(a+eps)`` (the same expressions as the Python layer's NumPy code)."""
    i = cuda.grid(1)
    step = cuda.gridsize(1)
    while i < out.shape[0]:
        if op == 0:
            out[i] = float(a[i]) * float(b[i])
        elif op == 1:
            out[i] = 1.0 / math.sqrt(float(a[i]) + eps)
        else:
            out[i] = float(b[i]) / math.sqrt(float(a[i]) + eps)
        i += step
