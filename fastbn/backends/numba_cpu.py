"""Parallel Numba JIT kernels: the ``"numba"`` backend.

The kernels follow ``CONTRACT.md`` beside this file. Everything here works on the two
canonical views, ``(N, C, S)`` ("nchw") and ``(R, C)`` ("nhwc"), and on float64
per-channel arrays.

Determinism comes from a chunk grid that depends on the shape only:

- nchw: a channel is cut into chunks of about ``CHUNK`` values: groups of whole rows
  when ``S < CHUNK``, otherwise equal pieces of a row. When ``C >= MIN_CHANNELS_PER_CHANNEL_PATH``
  each channel is reduced by one thread, chunk after chunk, and normalized right away while
  its slice is still in cache (2 passes over memory instead of 3); with short rows a thread
  takes a group of adjacent channels and walks their rows sample by sample (contiguous
  runs), one partial per channel centred on the mean of its first ``GROUP_TILE`` samples
  (``group_moments``), and a training forward writes a group's output while it is in cache,
  sample by sample (``nchw_train_forward_groups``). With fewer channels the
  chunks of a channel are split into at most ``MAX_STRIPES`` fixed stripes, reduced in
  parallel and merged in stripe order.
- nhwc: rows are cut into chunks of about ``NHWC_CHUNK`` values (whole rows), the chunks into at
  most ``MAX_STRIPES`` fixed stripes, each reduced into a (C,) partial, merged in order.

A chunk's ``(count, mean, M2)`` comes from the deviations from a shift, in float64: the
chunk's own mean for a stripe's first chunk (one more pass over the cached chunk), then the
running mean of the chunks before it; partials are merged with Chan's formula. Chunks of
one whole row (``CHUNK / 2 < S <= CHUNK``) are read four at a time in lockstep (four rows of
the channel, far apart in memory: one core reads faster from four places at once), all four
centred on the running mean before them; the backward sums read four rows at a time too.
Float32 outputs are ``x * scale + shift`` (``output_constants`` of _numba_stream), as the
Cython kernels'.
The number of threads only changes who computes which stripe, never what is computed, so
results are bitwise identical for every thread count.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from functools import cache
from typing import Any

import numpy as np

NAME = "numba"

#: Values per chunk of the fixed reduction grid (NCHW).
CHUNK = 4096
#: Values per chunk of whole rows (NHWC); a chunk's per-channel bookkeeping (shift, merge)
#: costs O(C), so a chunk holds many rows whatever C (the Cython kernels' value).
NHWC_CHUNK = 32768
#: NHWC rows of at least this many channels are read as STREAM_PARTS interleaved streams of
#: rows by the statistics and the backward sums (``row_parts`` of _numba_kernels).
NHWC_ROW_MIN_C = 64
#: NHWC rows of fewer channels are summed as one flat run cut into periods of whole rows
#: (``nhwc_period`` of _numba_kernels), not as columns.
NHWC_PERIOD_C = 16
#: Rows per tile of the NHWC column sums (``cols_*`` of _numba_kernels).
COL_TILE = 8
#: Upper bound on the number of stripes a reduction is split into (temporary memory
#: is O(C * MAX_STRIPES)).
MAX_STRIPES = 16
#: Inputs with fewer values than this run on one thread.
SERIAL_BELOW = 1 << 15
#: NCHW inputs with at least this many channels are processed one channel per thread.
MIN_CHANNELS_PER_CHANNEL_PATH = 16
#: Short NCHW rows: the per-channel kernels take groups of adjacent channels whose rows
#: of one sample make a contiguous run of about GROUP_VALUES values, at most GROUP_MAX
#: channels and GROUP_CACHE values of one array per group (see ``nchw_group``).
GROUP_VALUES = 1024
GROUP_MAX = 64
GROUP_CACHE = 131072
#: Rows of at least GROUP_SHORT_ROW values are summed by group only with GROUP_TILE
#: samples or more, and by the backward only when shorter than GROUP_BACKWARD_ROW values
#: (``nchw_sum_group``).
GROUP_SHORT_ROW = 64
GROUP_BACKWARD_ROW = 320
#: A group's statistics are centred on the mean of its first GROUP_TILE samples, and its
#: per-position sums take GROUP_TILE samples at a time (``tile_*`` of _numba_stream take 8).
GROUP_TILE = 8

#: Outputs of at least ``stream_min_bytes()`` bytes, written in contiguous runs of at least
#: STREAM_MIN_RUN values and not in place, are written with streaming stores (the store
#: rule of the Cython kernels; see ``_numba_stream``). Speed only: the bits are the same.
STREAM_MIN_RUN = 256
#: The elementwise NCHW kernels take their work units in at most this many spans, and fence
#: their streaming stores once per span (a fence waits for them to reach memory).
UNIT_SPANS = 256
#: Values per streamed block (4 cache lines of float32).
STREAM_BLOCK = 64
#: The NHWC statistics and backward sums read a stripe of rows as STREAM_PARTS interleaved
#: parts (as FBN_STREAMS of the Cython kernels: one core reads memory faster from four
#: places at once). Streamed outputs are written in order (see ``_numba_kernels``).
STREAM_PARTS = 4

# Reassociation lets LLVM vectorize the float64 accumulations of the row-reduction
# primitives (only those are compiled with it, see _numba_kernels); it is decided at compile
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


def _l2_bytes() -> int:
    """One core's L2 cache in bytes, from sysfs (0 when the OS does not say)."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for index in sorted(os.listdir(base)):
            with open(f"{base}/{index}/level") as f:
                if f.read().strip() != "2":
                    continue
            with open(f"{base}/{index}/size") as f:
                size = f.read().strip().upper()
            scale = {"K": 1 << 10, "M": 1 << 20}.get(size[-1:], 1)
            return int(size.rstrip("KM")) * scale
    except (OSError, ValueError):
        pass
    return 0


_L2_BYTES = _l2_bytes()
#: The store rule's size threshold by default: twice a core's L2 cache (4 MiB if unknown).
DEFAULT_STREAM_MIN_BYTES = 2 * _L2_BYTES or 4 << 20
#: Whether the group walks (short NCHW rows) request the next tile's lines as they read:
#: when a core's L2 holds more than a group (GROUP_CACHE values, 512 KiB of float32), as
#: the Cython kernels decide (``tile_requests``, with the measurements). A constant of the
#: compiled code (numba's disk cache is per CPU model).
TILE_REQUESTS = _L2_BYTES <= 0 or _L2_BYTES > 4 * GROUP_CACHE
_stream_min_bytes = DEFAULT_STREAM_MIN_BYTES


def stream_min_bytes(n: int | None = None) -> int:
    """Return (and optionally set) the output size from which streaming stores are used.

    Parameters
    ----------
    n : int, optional
        New threshold in bytes (``0`` streams every output whose runs are long enough and
        that is not written in place). Meant for tests and benchmarks.

    Returns
    -------
    int
        The threshold before the call (twice a core's L2 cache by default).
    """
    global _stream_min_bytes
    old = _stream_min_bytes
    if n is not None:
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        _stream_min_bytes = int(n)
    return old


def _stream(out: np.ndarray, run: int) -> bool:
    """Whether `out`, written in contiguous runs of `run` values, is large enough for
    streaming stores (the kernels also check that it is not written in place)."""
    return out.nbytes >= _stream_min_bytes and run >= STREAM_MIN_RUN


def _cache_enabled() -> bool:
    return os.environ.get("FASTBN_NUMBA_CACHE", "1") != "0"


@cache
def _compiled() -> dict[str, Callable]:
    """The jitted functions by name (numba is imported here, on first use)."""
    from . import _numba_kernels

    return {name: fn for name, fn in vars(_numba_kernels).items() if hasattr(fn, "py_func")}


# -------------------------------------------------------------------- threads

_call_lock = threading.Lock()
_concurrency_safe: bool | None = None


@cache
def _thread_count() -> tuple[Callable[[], int], Callable[[int], None], int]:
    """numba's get and set of the calling thread's thread count, and its most threads.

    ``numba.get_num_threads`` and ``set_num_threads`` take two locks on every call (1.3 and
    1.9 us here, more than a small kernel's own dispatch); once numba's threads run, the
    ctypes functions they end in are called directly (0.2 and 0.5 us). Should a numba
    release move them, the public functions are used.
    """
    import numba
    from numba.np.ufunc import parallel

    numba.get_num_threads()  # starts numba's threads, which binds the functions below
    get = getattr(parallel, "_get_num_threads", None)
    set_ = getattr(parallel, "_set_num_threads", None)
    if not (callable(get) and callable(set_)):
        get, set_ = numba.get_num_threads, numba.set_num_threads
    return get, set_, max_threads()


def _run(fn: Callable, nthreads: int, *args) -> None:
    """Call a jitted kernel with numba's (thread-local) thread count set to `nthreads`
    (``_threads``)."""
    _call(fn, _threads(args[0], nthreads), *args)


def _threads(x: np.ndarray, nthreads: int) -> int:
    """The threads a kernel on the input ``x`` runs on: inputs smaller than
    ``SERIAL_BELOW`` values run on one thread (waking a second one costs more than it saves
    there)."""
    return 1 if x.size < SERIAL_BELOW else max(1, min(int(nthreads), _thread_count()[2]))


def _call(fn: Callable, n: int, *args) -> None:
    """Call a jitted kernel on `n` threads. Numba's ``workqueue`` threading layer aborts on
    concurrent calls: until the first kernel has shown which layer numba chose, and for
    good when it is ``workqueue``, calls are serialized with a lock."""
    global _concurrency_safe
    get, set_, _ = _thread_count()
    if _concurrency_safe:
        _call_with_threads(get, set_, fn, n, args)
        return
    with _call_lock:
        _call_with_threads(get, set_, fn, n, args)
        _concurrency_safe = threading_layer() not in (None, "workqueue")


def _call_with_threads(get, set_, fn: Callable, n: int, args: tuple) -> None:
    previous = get()
    if previous == n:
        fn(*args)
        return
    set_(n)
    try:
        fn(*args)
    finally:
        set_(previous)


def _stripes(nchunks: int) -> int:
    return max(1, min(MAX_STRIPES, nchunks))


def _nhwc_rows(n_ch: int) -> int:
    return max(1, NHWC_CHUNK // n_ch)


def _run_length(x: np.ndarray) -> int:
    """Values an output is written in at a time: an NCHW row, or an NHWC chunk of rows."""
    return x.shape[2] if x.ndim == 3 else _nhwc_rows(x.shape[1]) * x.shape[1]


def _per_channel_path(x: np.ndarray) -> bool:
    return x.shape[1] >= MIN_CHANNELS_PER_CHANNEL_PATH or x.shape[0] * x.shape[2] <= CHUNK


def _run_elementwise(op: str, x: np.ndarray, out: np.ndarray, nthreads: int, args) -> None:
    """The elementwise kernel `op` ("normalize" or "dx") of x's layout on `args`, with the
    store rule as its last argument: an NCHW output streamed row by row or not (a bool), an
    NHWC one streamed as one run of whole rows per thread (the run count; 0: ordinary
    stores)."""
    n = _threads(x, nthreads)
    stream = _stream(out, _run_length(x))
    if x.ndim == 3:
        _call(_compiled()[f"nchw_{op}"], n, *args, stream)
    else:
        _call(_compiled()[f"nhwc_{op}"], n, *args, n if stream else 0)


def _run_normalize(x, mean, scale, bias, y, nthreads):
    """y = (x - mean) * scale + bias (float32: ``x * scale + shift``, see the kernels'
    ``output_constants``), streamed by the store rule."""
    _run_elementwise("normalize", x, y, nthreads, (x, mean, scale, bias, y))


def _run_dx(dy, x, mean, k, shift, proj, dx, nthreads):
    """dx = k * (dy - shift - (x - mean) * proj) per channel, streamed by the store rule."""
    _run_elementwise("dx", x, dx, nthreads, (dy, x, mean, k, shift, proj, dx))


def _normalize_with(x, weight, bias, eps, y, mean, var, invstd, nthreads):
    """Second half of an unfused training forward: invstd from var, then normalize."""
    scale = _compiled()["scale_constants"](var, float(eps), weight, invstd)
    _run_normalize(x, mean, scale, bias, y, nthreads)


def _dx_with(dy, x, mean, invstd, weight, dx, sum_dy, sum_dy_xmu, nthreads):
    """Second half of an unfused backward: dx from the two per-channel sums."""
    count = float(x.size // x.shape[1])
    k, shift, proj = _compiled()["dx_constants"](invstd, weight, sum_dy, sum_dy_xmu, count)
    _run_dx(dy, x, mean, k, shift, proj, dx, nthreads)


# -------------------------------------------------------------------- nchw kernels


def _nchw_stats(x, mean, var, nthreads):
    k = _compiled()
    if _per_channel_path(x):
        _run(k["nchw_stats_channels"], nthreads, x, mean, var)
        return
    _, blocks, _, pieces = k["nchw_grid"](x.shape[0], x.shape[2])
    stripes = _stripes(blocks * pieces)
    part = np.empty((x.shape[1], stripes, 3))
    _run(k["nchw_stats_stripes"], nthreads, x, stripes, part)
    k["merge_parts"](part, mean, var)


def _nchw_train_forward(x, weight, bias, eps, y, mean, var, invstd, nthreads):
    """Fused per channel or per group of short rows (statistics, then the output while it
    is in cache), except for the stripes of few channels: statistics, then a normalize
    pass. Same arithmetic, hence the same bits, either way.

    Short rows: the fused group kernel lost to the two passes in earlier versions (2
    threads, ``(128, 512, 7, 7)`` 1.84 against 1.52 ms) because each sample's run was
    written by a call taking array views, and numba counts their references with locked
    instructions, which wait for the streaming stores before them (see ``unowned`` of
    _numba_stream). With the arrays unowned it takes 0.83-0.92 of the two passes' time
    with the caches flushed first ((128, 512, 7, 7), same process, old against new
    kernels; 0.89-1.02 warm).
    """
    k = _compiled()
    if _per_channel_path(x):
        g = k["nchw_sum_group"](x.shape[0], x.shape[1], x.shape[2], False)
        fn = k["nchw_train_forward_channels" if g == 1 else "nchw_train_forward_groups"]
        stream = _stream(y, _run_length(x) * g)
        _run(fn, nthreads, x, weight, bias, float(eps), y, mean, var, invstd, stream)
        return
    _nchw_stats(x, mean, var, nthreads)
    _normalize_with(x, weight, bias, eps, y, mean, var, invstd, nthreads)


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
            _stream(dx, _run_length(x)),
        )
        return
    _nchw_backward_reduce(dy, x, mean, sum_dy, sum_dy_xmu, nthreads)
    _dx_with(dy, x, mean, invstd, weight, dx, sum_dy, sum_dy_xmu, nthreads)


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
    _normalize_with(x, weight, bias, eps, y, mean, var, invstd, nthreads)


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
    _dx_with(dy, x, mean, invstd, weight, dx, sum_dy, sum_dy_xmu, nthreads)


def _read_only(a: np.ndarray) -> np.ndarray:
    view = a.view()
    view.setflags(write=False)
    return view


def _inputs_read_only(fn: Callable, n_inputs: int) -> Callable:
    """Hand the data inputs (``x``, or ``dy`` and ``x``) to `fn` as read-only views.

    Numba types read-only and writable arrays differently: by always passing read-only
    views, a read-only input (a memory map, a broadcast) reuses the kernels compiled for
    writable ones instead of compiling a second set.
    """

    if n_inputs == 1:

        def call(x, *args):
            fn(_read_only(x), *args)
    else:

        def call(dy, x, *args):
            fn(_read_only(dy), _read_only(x), *args)

    call.__name__ = call.__qualname__ = fn.__name__
    call.__doc__ = fn.__doc__
    return call


#: How many leading arguments of each kernel are data inputs.
_INPUTS = {
    "stats": 1,
    "train_forward": 1,
    "normalize": 1,
    "backward_reduce": 2,
    "backward_train": 2,
}

_TABLE = {
    layout: {op: _inputs_read_only(fn, _INPUTS[op]) for op, fn in table.items()}
    for layout, table in {
        "nchw": {
            "stats": _nchw_stats,
            "train_forward": _nchw_train_forward,
            "normalize": _run_normalize,
            "backward_reduce": _nchw_backward_reduce,
            "backward_train": _nchw_backward_train,
        },
        "nhwc": {
            "stats": _nhwc_stats,
            "train_forward": _nhwc_train_forward,
            "normalize": _run_normalize,
            "backward_reduce": _nhwc_backward_reduce,
            "backward_train": _nhwc_backward_train,
        },
    }.items()
}


def kernels(layout: str, dtype: Any = None) -> dict[str, Callable]:
    """The kernel table of CONTRACT.md for the canonical `layout` ("nchw" or "nhwc").

    The same table for every `dtype` (numba's dispatchers compile one version per dtype).
    """
    return _TABLE[layout]
