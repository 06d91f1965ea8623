"""Parallel Numba JIT kernels: the ``"numba"`` backend.

The kernels follow ``CONTRACT.md`` beside this file. Everything here works on the two
canonical views, ``(N, C, S)`` ("nchw") and ``(R, C)`` ("nhwc"), and on float64
per-channel arrays.

Determinism comes from a chunk grid that depends on the shape only:

- nchw: a channel is cut into chunks of about ``CHUNK`` values: groups of whole rows
  when ``S < CHUNK``, otherwise equal pieces of a row. When ``C >= MIN_CHANNELS_PER_CHANNEL_PATH``
  each channel is reduced by one thread, chunk after chunk, and normalized right away while
  its slice is still in cache (2 passes over memory instead of 3). With fewer channels the
  chunks of a channel are split into at most ``MAX_STRIPES`` fixed stripes, reduced in
  parallel and merged in stripe order.
- nhwc: rows are cut into chunks of about ``CHUNK`` values (whole rows), the chunks into at
  most ``MAX_STRIPES`` fixed stripes, each reduced into a (C,) partial, merged in order.

A chunk's ``(count, mean, M2)`` comes from two passes over the cached chunk (mean, then
squared deviations with the ``(sum d)^2/n`` correction), in float64; partials are merged with
Chan's formula. The number of threads only changes who computes which stripe, never what is
computed, so results are bitwise identical for every thread count.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from functools import cache

import numpy as np

NAME = "numba"

#: Values per chunk of the fixed reduction grid.
CHUNK = 4096
#: Upper bound on the number of stripes a reduction is split into (temporary memory
#: is O(C * MAX_STRIPES)).
MAX_STRIPES = 16
#: NCHW inputs with at least this many channels are processed one channel per thread.
MIN_CHANNELS_PER_CHANNEL_PATH = 16

# Reassociation lets LLVM vectorize the float64 accumulations; it is decided at compile
# time, so it cannot make results depend on the thread count. No 'nnan'/'ninf': NaN and
# infinity propagate as in IEEE arithmetic.
_FASTMATH = {"reassoc", "contract", "nsz"}


def is_available() -> bool:
    """Return True when numba can be imported (it is a dependency of fastbn)."""
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def unavailable_reason() -> str:
    """Say why the backend is unavailable and what to install."""
    return "numba is not importable: install it with `pip install numba`."


def max_threads() -> int:
    """The most threads numba can run (``NUMBA_NUM_THREADS``, set before numba starts)."""
    import numba

    return int(numba.config.NUMBA_NUM_THREADS)


def threading_layer() -> str | None:
    """The threading layer numba chose, or None before its first parallel kernel ran."""
    import numba

    try:
        return str(numba.threading_layer())
    except ValueError:
        return None


def describe() -> dict[str, object]:
    """Facts for `fastbn.show_config`: numba version, threads, threading layer."""
    import numba

    layer = threading_layer()
    return {
        "numba version": numba.__version__,
        "max threads": max_threads(),
        "threading layer": layer or f"not chosen yet (configured: {numba.config.THREADING_LAYER})",
        "disk cache": _cache_enabled(),
    }


def _cache_enabled() -> bool:
    return os.environ.get("FASTBN_NUMBA_CACHE", "1") != "0"


@cache
def _compiled() -> dict[str, Callable]:
    """Define and return the jitted functions (numba is imported on first use only).

    The innermost loops are small serial functions over one contiguous row: each is
    compiled and vectorized on its own, so what LLVM makes of it does not depend on the
    loop nest around it (inlined into a large parallel body, it sometimes picked gathers).
    """
    from numba import njit, prange

    use_cache = _cache_enabled()
    inline = njit(inline="always", fastmath=_FASTMATH, nogil=True)
    parallel = njit(parallel=True, nogil=True, fastmath=_FASTMATH, cache=use_cache)
    serial = njit(nogil=True, fastmath=_FASTMATH, cache=use_cache)

    # ------------------------------------------------------------ row primitives

    @serial
    def row_sum(xr):
        total = 0.0
        for i in range(xr.shape[0]):
            total += xr[i]
        return total

    @serial
    def row_deviations(xr, m):
        """(sum(x - m), sum((x - m)**2)) in float64."""
        sd = 0.0
        sq = 0.0
        for i in range(xr.shape[0]):
            dev = xr[i] - m
            sd += dev
            sq += dev * dev
        return sd, sq

    @serial
    def row_normalize(xr, m, scale, b, yr):
        for i in range(xr.shape[0]):
            yr[i] = (xr[i] - m) * scale + b

    @serial
    def row_grad_sums(dr, xr, mu):
        """(sum(dy), sum(dy * (x - mu))) in float64."""
        sdy = 0.0
        sdyx = 0.0
        for i in range(xr.shape[0]):
            g = dr[i] * 1.0
            sdy += g
            sdyx += g * (xr[i] - mu)
        return sdy, sdyx

    @serial
    def row_dx(dr, xr, mu, k, shift, proj, outr):
        for i in range(xr.shape[0]):
            outr[i] = k * (dr[i] - shift - (xr[i] - mu) * proj)

    @serial
    def cols_add(xr, acc):
        for j in range(xr.shape[0]):
            acc[j] += xr[j]

    @serial
    def cols_deviations(xr, m, sd, sq):
        for j in range(xr.shape[0]):
            dev = xr[j] - m[j]
            sd[j] += dev
            sq[j] += dev * dev

    @serial
    def cols_normalize(xr, mean, scale, bias, yr):
        for j in range(xr.shape[0]):
            yr[j] = (xr[j] - mean[j]) * scale[j] + bias[j]

    @serial
    def cols_grad_sums(dr, xr, mean, a, b):
        for j in range(xr.shape[0]):
            g = dr[j] * 1.0
            a[j] += g
            b[j] += g * (xr[j] - mean[j])

    @serial
    def cols_dx(dr, xr, mean, k, shift, proj, outr):
        for j in range(xr.shape[0]):
            outr[j] = k[j] * (dr[j] - shift[j] - (xr[j] - mean[j]) * proj[j])

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

    @inline
    def nchw_grid(n_rows, s):
        """Chunk grid of one channel: (rows per chunk, row blocks, piece length, pieces)."""
        if s >= CHUNK:
            pieces = (s + CHUNK - 1) // CHUNK
            piece = (s + pieces - 1) // pieces
            pieces = (s + piece - 1) // piece
            return 1, n_rows, piece, pieces
        rows = max(1, CHUNK // s)
        return rows, (n_rows + rows - 1) // rows, s, 1

    @inline
    def nchw_fold(x, c, k0, k1, n_rows, s, rows, piece, pieces):
        """Fold chunks k0..k1 of channel c into one (count, mean, M2) partial, in order.

        Chunk k covers rows n0..n1 and columns s0..s1 of the channel; its partial comes
        from two passes over the (cached) chunk: the mean, then the squared deviations
        with the ``(sum d)**2 / n`` correction.
        """
        cnt = 0.0
        m = 0.0
        m2 = 0.0
        for k in range(k0, k1):
            rb = k // pieces
            n0 = rb * rows
            n1 = min(n_rows, n0 + rows)
            s0 = (k - rb * pieces) * piece
            s1 = min(s, s0 + piece)
            nb = float((n1 - n0) * (s1 - s0))
            total = 0.0
            for n in range(n0, n1):
                total += row_sum(x[n, c, s0:s1])
            mb = total / nb
            sd = 0.0
            sq = 0.0
            for n in range(n0, n1):
                d1, d2 = row_deviations(x[n, c, s0:s1], mb)
                sd += d1
                sq += d2
            cnt, m, m2 = merge(cnt, m, m2, nb, mb, sq - sd * sd / nb)
        return cnt, m, m2

    @inline
    def nchw_grad_sums(dy, x, c, mu, n0, n1):
        """sum(dy) and sum(dy*(x-mu)) over rows n0..n1 of channel c."""
        sdy = 0.0
        sdyx = 0.0
        for n in range(n0, n1):
            a, b = row_grad_sums(dy[n, c], x[n, c], mu)
            sdy += a
            sdyx += b
        return sdy, sdyx

    # ---------------------------------------------------------------- nchw

    @parallel
    def nchw_stats_channels(x, mean, var):
        n_rows, n_ch, s = x.shape
        rows, blocks, piece, pieces = nchw_grid(n_rows, s)
        for c in prange(n_ch):
            cnt, m, m2 = nchw_fold(x, c, 0, blocks * pieces, n_rows, s, rows, piece, pieces)
            mean[c] = m
            var[c] = m2 / cnt

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
            cnt, m, m2 = nchw_fold(x, c, k0, k1, n_rows, s, rows, piece, pieces)
            part[c, p, 0] = cnt
            part[c, p, 1] = m
            part[c, p, 2] = m2

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
    def nchw_train_forward_channels(x, weight, bias, eps, y, mean, var, invstd):
        n_rows, n_ch, s = x.shape
        rows, blocks, piece, pieces = nchw_grid(n_rows, s)
        for c in prange(n_ch):
            cnt, m, m2 = nchw_fold(x, c, 0, blocks * pieces, n_rows, s, rows, piece, pieces)
            v = m2 / cnt
            inv = 1.0 / math.sqrt(v + eps)
            mean[c] = m
            var[c] = v
            invstd[c] = inv
            scale = weight[c] * inv
            for n in range(n_rows):
                row_normalize(x[n, c], m, scale, bias[c], y[n, c])

    @parallel
    def nchw_normalize(x, mean, scale, bias, y):
        n_rows, n_ch, _ = x.shape
        for u in prange(n_rows * n_ch):
            n = u // n_ch
            c = u - n * n_ch
            row_normalize(x[n, c], mean[c], scale[c], bias[c], y[n, c])

    @parallel
    def nchw_backward_reduce_channels(dy, x, mean, sum_dy, sum_dy_xmu):
        n_rows, n_ch, _ = x.shape
        for c in prange(n_ch):
            a, b = nchw_grad_sums(dy, x, c, mean[c], 0, n_rows)
            sum_dy[c] = a
            sum_dy_xmu[c] = b

    @parallel
    def nchw_backward_reduce_stripes(dy, x, mean, stripes, part):
        """part[:, p, c] = (sum dy, sum dy*(x-mean)) of stripe p (a range of rows)."""
        n_rows, n_ch, _ = x.shape
        for u in prange(n_ch * stripes):
            c = u // stripes
            p = u - c * stripes
            a, b = nchw_grad_sums(
                dy, x, c, mean[c], p * n_rows // stripes, (p + 1) * n_rows // stripes
            )
            part[0, p, c] = a
            part[1, p, c] = b

    @parallel
    def nchw_backward_train_channels(dy, x, mean, invstd, weight, dx, sum_dy, sum_dy_xmu):
        n_rows, n_ch, s = x.shape
        count = float(n_rows * s)
        for c in prange(n_ch):
            mu = mean[c]
            a, b = nchw_grad_sums(dy, x, c, mu, 0, n_rows)
            sum_dy[c] = a
            sum_dy_xmu[c] = b
            inv = invstd[c]
            k = weight[c] * inv
            shift = a / count
            proj = inv * inv * b / count
            for n in range(n_rows):
                row_dx(dy[n, c], x[n, c], mu, k, shift, proj, dx[n, c])

    @parallel
    def nchw_dx(dy, x, mean, k, shift, proj, dx):
        """dx = k*(dy - shift - (x - mean)*proj) per channel."""
        n_rows, n_ch, _ = x.shape
        for u in prange(n_rows * n_ch):
            n = u // n_ch
            c = u - n * n_ch
            row_dx(dy[n, c], x[n, c], mean[c], k[c], shift[c], proj[c], dx[n, c])

    # ---------------------------------------------------------------- nhwc

    @parallel
    def nhwc_stats_stripes(x, rows, stripes, counts, means, m2s):
        """Stripe p folds its row chunks into counts[p], means[p, :], m2s[p, :]."""
        n_rows, n_ch = x.shape
        nchunks = (n_rows + rows - 1) // rows
        for p in prange(stripes):
            pm = means[p]
            pm2 = m2s[p]
            pm[:] = 0.0
            pm2[:] = 0.0
            mb = np.empty(n_ch)
            sd = np.empty(n_ch)
            sq = np.empty(n_ch)
            cnt = 0.0
            for k in range(p * nchunks // stripes, (p + 1) * nchunks // stripes):
                r0 = k * rows
                r1 = min(n_rows, r0 + rows)
                nb = float(r1 - r0)
                mb[:] = 0.0
                for r in range(r0, r1):
                    cols_add(x[r], mb)
                mb /= nb
                sd[:] = 0.0
                sq[:] = 0.0
                for r in range(r0, r1):
                    cols_deviations(x[r], mb, sd, sq)
                n = cnt + nb
                f = nb / n
                g = cnt * f
                for j in range(n_ch):
                    delta = mb[j] - pm[j]
                    pm[j] += delta * f
                    pm2[j] += sq[j] - sd[j] * sd[j] / nb + delta * delta * g
                cnt = n
            counts[p] = cnt

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
    def nhwc_normalize(x, mean, scale, bias, y):
        for r in prange(x.shape[0]):
            cols_normalize(x[r], mean, scale, bias, y[r])

    @parallel
    def nhwc_backward_reduce_stripes(dy, x, mean, stripes, sums_dy, sums_dy_xmu):
        n_rows = x.shape[0]
        for p in prange(stripes):
            a = sums_dy[p]
            b = sums_dy_xmu[p]
            a[:] = 0.0
            b[:] = 0.0
            for r in range(p * n_rows // stripes, (p + 1) * n_rows // stripes):
                cols_grad_sums(dy[r], x[r], mean, a, b)

    @serial
    def add_rows(parts, out):
        """out = parts[0] + parts[1] + ... strictly in row order."""
        out[:] = 0.0
        for p in range(parts.shape[0]):
            for j in range(out.shape[0]):
                out[j] += parts[p, j]

    @parallel
    def nhwc_dx(dy, x, mean, k, shift, proj, dx):
        for r in prange(x.shape[0]):
            cols_dx(dy[r], x[r], mean, k, shift, proj, dx[r])

    return {name: fn for name, fn in locals().items() if hasattr(fn, "py_func")}


# -------------------------------------------------------------------- threads

_call_lock = threading.Lock()
_concurrency_safe: bool | None = None


def _run(fn: Callable, nthreads: int, *args) -> None:
    """Call a jitted kernel with numba's (thread-local) thread count set to `nthreads`.

    Numba's ``workqueue`` threading layer aborts on concurrent calls: until the first
    kernel has shown which layer numba chose, and for good when it is ``workqueue``,
    calls are serialized with a lock.
    """
    global _concurrency_safe
    import numba

    n = max(1, min(int(nthreads), max_threads()))
    if _concurrency_safe:
        _call_with_threads(numba, fn, n, args)
        return
    with _call_lock:
        _call_with_threads(numba, fn, n, args)
        _concurrency_safe = threading_layer() not in (None, "workqueue")


def _call_with_threads(numba, fn: Callable, n: int, args: tuple) -> None:
    previous = numba.get_num_threads()
    numba.set_num_threads(n)
    try:
        fn(*args)
    finally:
        numba.set_num_threads(previous)


def _stripes(nchunks: int) -> int:
    return max(1, min(MAX_STRIPES, nchunks))


def _nchw_chunks(n_rows: int, s: int) -> int:
    """Number of chunks per channel of the nchw grid (mirrors ``nchw_grid``)."""
    if s >= CHUNK:
        pieces = -(-s // CHUNK)
        piece = -(-s // pieces)
        return n_rows * -(-s // piece)
    return -(-n_rows // max(1, CHUNK // s))


def _nhwc_rows(n_ch: int) -> int:
    return max(1, CHUNK // n_ch)


def _per_channel_path(x: np.ndarray) -> bool:
    return x.shape[1] >= MIN_CHANNELS_PER_CHANNEL_PATH or x.shape[0] * x.shape[2] <= CHUNK


# -------------------------------------------------------------------- nchw kernels


def _nchw_stats(x, mean, var, nthreads):
    k = _compiled()
    if _per_channel_path(x):
        _run(k["nchw_stats_channels"], nthreads, x, mean, var)
        return
    stripes = _stripes(_nchw_chunks(x.shape[0], x.shape[2]))
    part = np.empty((x.shape[1], stripes, 3))
    _run(k["nchw_stats_stripes"], nthreads, x, stripes, part)
    k["merge_parts"](part, mean, var)


def _nchw_train_forward(x, weight, bias, eps, y, mean, var, invstd, nthreads):
    k = _compiled()
    if _per_channel_path(x):
        _run(
            k["nchw_train_forward_channels"],
            nthreads,
            x,
            weight,
            bias,
            float(eps),
            y,
            mean,
            var,
            invstd,
        )
        return
    _nchw_stats(x, mean, var, nthreads)
    np.divide(1.0, np.sqrt(var + eps), out=invstd)
    _run(k["nchw_normalize"], nthreads, x, mean, weight * invstd, bias, y)


def _nchw_normalize(x, mean, scale, bias, y, nthreads):
    _run(_compiled()["nchw_normalize"], nthreads, x, mean, scale, bias, y)


def _nchw_backward_reduce(dy, x, mean, sum_dy, sum_dy_xmu, nthreads):
    k = _compiled()
    if _per_channel_path(x):
        _run(k["nchw_backward_reduce_channels"], nthreads, dy, x, mean, sum_dy, sum_dy_xmu)
        return
    stripes = _stripes(x.shape[0])
    part = np.empty((2, stripes, x.shape[1]))
    _run(k["nchw_backward_reduce_stripes"], nthreads, dy, x, mean, stripes, part)
    k["add_rows"](part[0], sum_dy)
    k["add_rows"](part[1], sum_dy_xmu)


def _nchw_backward_train(dy, x, mean, invstd, weight, dx, sum_dy, sum_dy_xmu, nthreads):
    k = _compiled()
    if _per_channel_path(x):
        _run(
            k["nchw_backward_train_channels"],
            nthreads,
            dy,
            x,
            mean,
            invstd,
            weight,
            dx,
            sum_dy,
            sum_dy_xmu,
        )
        return
    _nchw_backward_reduce(dy, x, mean, sum_dy, sum_dy_xmu, nthreads)
    count = x.shape[0] * x.shape[2]
    _run(
        k["nchw_dx"],
        nthreads,
        dy,
        x,
        mean,
        weight * invstd,
        sum_dy / count,
        invstd * invstd * sum_dy_xmu / count,
        dx,
    )


# -------------------------------------------------------------------- nhwc kernels


def _nhwc_stats(x, mean, var, nthreads):
    k = _compiled()
    rows = _nhwc_rows(x.shape[1])
    stripes = _stripes(-(-x.shape[0] // rows))
    counts = np.empty(stripes)
    means = np.empty((stripes, x.shape[1]))
    m2s = np.empty((stripes, x.shape[1]))
    _run(k["nhwc_stats_stripes"], nthreads, x, rows, stripes, counts, means, m2s)
    k["nhwc_merge"](counts, means, m2s, mean, var)


def _nhwc_train_forward(x, weight, bias, eps, y, mean, var, invstd, nthreads):
    _nhwc_stats(x, mean, var, nthreads)
    np.divide(1.0, np.sqrt(var + eps), out=invstd)
    _run(_compiled()["nhwc_normalize"], nthreads, x, mean, weight * invstd, bias, y)


def _nhwc_normalize(x, mean, scale, bias, y, nthreads):
    _run(_compiled()["nhwc_normalize"], nthreads, x, mean, scale, bias, y)


def _nhwc_backward_reduce(dy, x, mean, sum_dy, sum_dy_xmu, nthreads):
    k = _compiled()
    rows = _nhwc_rows(x.shape[1])
    stripes = _stripes(-(-x.shape[0] // rows))
    sums_dy = np.empty((stripes, x.shape[1]))
    sums_dy_xmu = np.empty((stripes, x.shape[1]))
    _run(k["nhwc_backward_reduce_stripes"], nthreads, dy, x, mean, stripes, sums_dy, sums_dy_xmu)
    k["add_rows"](sums_dy, sum_dy)
    k["add_rows"](sums_dy_xmu, sum_dy_xmu)


def _nhwc_backward_train(dy, x, mean, invstd, weight, dx, sum_dy, sum_dy_xmu, nthreads):
    _nhwc_backward_reduce(dy, x, mean, sum_dy, sum_dy_xmu, nthreads)
    count = x.shape[0]
    _run(
        _compiled()["nhwc_dx"],
        nthreads,
        dy,
        x,
        mean,
        weight * invstd,
        sum_dy / count,
        invstd * invstd * sum_dy_xmu / count,
        dx,
    )


_TABLE = {
    "nchw": {
        "stats": _nchw_stats,
        "train_forward": _nchw_train_forward,
        "normalize": _nchw_normalize,
        "backward_reduce": _nchw_backward_reduce,
        "backward_train": _nchw_backward_train,
    },
    "nhwc": {
        "stats": _nhwc_stats,
        "train_forward": _nhwc_train_forward,
        "normalize": _nhwc_normalize,
        "backward_reduce": _nhwc_backward_reduce,
        "backward_train": _nhwc_backward_train,
    },
}


def kernels(layout: str) -> dict[str, Callable]:
    """The kernel table of CONTRACT.md for the canonical `layout` ("nchw" or "nhwc")."""
    return _TABLE[layout]
