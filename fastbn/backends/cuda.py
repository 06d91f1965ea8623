"""The ``cuda`` backend: the kernel table of ``CONTRACT.md`` on NVIDIA GPUs via ``numba.cuda``.

Install with ``pip install "fastbn[cuda]"`` (the ``numba-cuda`` package, which brings
``cuda-bindings``); a GPU with its driver is needed at run time. The kernels also run on
the CPU under numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1`` set before numba is
imported), which is how the test suite checks them.

Importing this module never imports ``numba.cuda``: that happens on the first call of
:func:`is_available` or of any kernel or device helper below.

Hooks for the Python layer (``fastbn/_dispatch.py``)
----------------------------------------------------
Backend duties (same as every backend):

``NAME``, ``is_available()``, ``unavailable_reason()``, ``kernels(layout, *, launch=None)``
    The kernel table. Device arrays (numba ``DeviceNDArray`` or any
    ``__cuda_array_interface__`` object) are used in place, with no transfer, and the
    launches are asynchronous on the default stream. A NumPy argument is staged: copied to
    the device (outputs only allocated there) and, when it is an output, copied back after
    the launch (synchronizing). So NumPy callers need nothing special, and device callers
    never pay a host round trip. ``nthreads`` is accepted and ignored.

Device-array duties (only backends with their own memory have them; ``DEVICE = True``):

``is_device_array(obj) -> bool``
    ``obj`` lives on the GPU (``__cuda_array_interface__`` or a numba device array, also
    the simulator's). Never imports ``numba.cuda``.
``as_device(obj)``
    A numba device-array view of a device object, without copy.
``to_device(a)``
    Copy a host (NumPy) array to a new device array.
``to_host(d, out=None) -> np.ndarray``
    Copy a device array to the host (into ``out`` when given); synchronizes.
``empty(shape, dtype)`` / ``full(shape, value, dtype)``
    Allocate a device array (uninitialized / filled on the device).
``copy_into(src, dst)``
    ``dst[...] = src`` on the device for two arrays of the same shape (dtypes may differ).
``update_running(running_mean, running_var, mean, var, momentum, m)``
    In place on the device: ``running_mean = (1-momentum)*running_mean + momentum*mean``,
    ``running_var = (1-momentum)*running_var + momentum*var*m/(m-1)``.
``synchronize()``
    Wait for every kernel launched so far.
``array_ops() -> DeviceOps``
    The Python layer's array operations (allocation, transfers, per-channel maths,
    running-statistics update) on the device: ``fastbn._dispatch`` uses it instead of
    NumPy whenever the data of a call lives on the GPU, and a ``BatchNorm`` layer created
    with ``backend="cuda"`` keeps its parameters and running statistics with it.
``describe()``
    Device and launch configuration, for ``fastbn.show_config()``.
``LaunchConfig`` / ``default_launch()``
    Block and grid sizes, derived from the current device (``MAX_THREADS_PER_BLOCK``,
    ``MAX_THREADS_PER_MULTIPROCESSOR``, ``MULTIPROCESSOR_COUNT``); small under the
    simulator. Results never depend on them.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

__all__ = [
    "DEVICE",
    "NAME",
    "DeviceOps",
    "LaunchConfig",
    "array_ops",
    "as_device",
    "copy_into",
    "default_launch",
    "describe",
    "empty",
    "full",
    "is_available",
    "is_device_array",
    "kernels",
    "simulator_enabled",
    "synchronize",
    "to_device",
    "to_host",
    "unavailable_reason",
    "update_running",
]

NAME = "cuda"
#: This backend keeps its data in device memory (see the device-array hooks above).
DEVICE = True

_INSTALL = (
    'install the extra with `pip install "fastbn[cuda]"` (numba-cuda and cuda-bindings) '
    "and run on a machine with an NVIDIA GPU and its driver, or set NUMBA_ENABLE_CUDASIM=1 "
    "before numba is imported to run the kernels on the CPU simulator (slow, for tests)"
)


def simulator_enabled() -> bool:
    """Return whether numba's CUDA simulator is on in this process.

    Returns
    -------
    bool
        True when ``NUMBA_ENABLE_CUDASIM`` was set to a non-zero value (numba reads it
        once, when it is imported).
    """
    if "numba" in sys.modules:
        from numba import config

        return bool(config.ENABLE_CUDASIM)
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")


@lru_cache(maxsize=1)
def _probe() -> str | None:
    """Return ``None`` when the backend is usable, else the reason it is not (cached)."""
    if importlib.util.find_spec("numba_cuda") is None:
        return f"the cuda backend needs the numba-cuda package: {_INSTALL}"
    try:
        from numba import cuda
    except Exception as exc:  # pragma: no cover - depends on the installation
        return f"numba.cuda cannot be imported ({exc}): {_INSTALL}"
    if simulator_enabled():
        return None
    try:
        if cuda.is_available():
            return None
    except Exception as exc:  # pragma: no cover - depends on the driver
        return f"numba.cuda found no usable GPU ({exc}): {_INSTALL}"
    return f"numba.cuda found no usable GPU or CUDA driver: {_INSTALL}"


def is_available() -> bool:
    """Return whether the cuda backend can run in this process.

    True when ``numba-cuda`` is installed and either numba.cuda reports a usable GPU
    (driver initialized, no context created, no compilation) or the simulator is on. The
    answer is cached.

    Returns
    -------
    bool
        Whether :func:`kernels` can be used.
    """
    return _probe() is None


def unavailable_reason() -> str:
    """Return why the backend is unavailable, with the install command; ``""`` if it is.

    Returns
    -------
    str
        A message naming ``pip install "fastbn[cuda]"`` and the GPU/driver requirement.
    """
    return _probe() or ""


def _cuda():
    """Import and return ``numba.cuda``, raising a clear error when it is unusable."""
    reason = _probe()
    if reason is not None:
        raise RuntimeError(reason)
    from numba import cuda

    return cuda


def _k():
    """Import and return the kernel module (compiles nothing by itself)."""
    _cuda()
    from fastbn.backends import _cuda_kernels

    return _cuda_kernels


# ---------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LaunchConfig:
    """Block and grid sizes of the backend's launches.

    Parameters
    ----------
    threads : int
        Threads per block (reductions use at most 256 of them).
    blocks : int
        Largest number of blocks of a launch; every kernel loops over its work
        (grid-stride), so any value >= 1 is correct.
    """

    threads: int
    blocks: int

    def __post_init__(self) -> None:
        if self.threads < 1 or self.blocks < 1:
            raise ValueError(f"LaunchConfig needs threads >= 1 and blocks >= 1, got {self}")


#: Under the simulator every CUDA thread is a Python thread: keep blocks small.
_SIM_LAUNCH = LaunchConfig(threads=32, blocks=4)


@lru_cache(maxsize=8)
def _device_launch(device_id: int) -> LaunchConfig:
    cuda = _cuda()
    dev = cuda.get_current_device()
    threads = min(256, int(dev.MAX_THREADS_PER_BLOCK))
    per_sm = max(1, int(dev.MAX_THREADS_PER_MULTIPROCESSOR) // threads)
    # Four waves of resident blocks: enough to hide latency, few enough that the
    # grid-stride loops amortize the per-block setup.
    return LaunchConfig(threads=threads, blocks=int(dev.MULTIPROCESSOR_COUNT) * per_sm * 4)


def default_launch() -> LaunchConfig:
    """Return the launch configuration for the current device.

    Returns
    -------
    LaunchConfig
        ``threads = min(256, MAX_THREADS_PER_BLOCK)`` and enough blocks for four waves of
        ``MULTIPROCESSOR_COUNT * MAX_THREADS_PER_MULTIPROCESSOR // threads`` resident
        blocks; ``LaunchConfig(32, 4)`` under the simulator.
    """
    if simulator_enabled():
        return _SIM_LAUNCH
    return _device_launch(int(_cuda().get_current_device().id))


def _pow2_at_least(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


def _grid_1d(work: int, cfg: LaunchConfig) -> int:
    return max(1, min(work, cfg.blocks))


def _elementwise_launch(
    rows: int, cols: int, cfg: LaunchConfig
) -> tuple[tuple[int, int], tuple[int, int]]:
    """2-D ``(grid, block)`` for a loop over ``rows x cols`` (x along the columns)."""
    bx = min(cfg.threads, max(32, _pow2_at_least(cols)))
    by = max(1, cfg.threads // bx)
    gx = max(1, min(-(-cols // bx), cfg.blocks))
    gy = max(1, min(-(-rows // by), max(1, cfg.blocks // gx), 65535))
    return (gx, gy), (bx, by)


# ---------------------------------------------------------------------------------------
# The kernel table
# ---------------------------------------------------------------------------------------


def _require_device(*arrays: Any) -> None:
    for a in arrays:
        if isinstance(a, np.ndarray):
            raise TypeError(
                "the cuda kernels take device arrays, got a numpy.ndarray; "
                "move it with fastbn.backends.cuda.to_device first"
            )


class _Table:
    """The five kernels for one layout and one launch configuration."""

    def __init__(self, layout: str, launch: LaunchConfig | None) -> None:
        self.nchw = layout == "nchw"
        self.launch = launch
        self.k = _k()
        self.cuda = _cuda()

    # -- helpers -----------------------------------------------------------------------

    def _cfg(self) -> LaunchConfig:
        return self.launch if self.launch is not None else default_launch()

    def _dims(self, x: Any) -> tuple[int, int, int]:
        """Return ``(C, M, ncols)`` of a canonical view."""
        if self.nchw:
            n, c, s = x.shape
            return c, n * s, s
        r, c = x.shape
        return c, r, c

    def _reduce(self, kind: int, x: Any, dy: Any, mean: Any, cfg: LaunchConfig) -> tuple:
        """Launch the chunk-partial kernel; return ``(part, nchunks, M)``."""
        k = self.k
        nc, m_len, _ = self._dims(x)
        if self.nchw:
            kk, nchunks = k.chunk_geometry_nchw(m_len)
            block: int | tuple[int, int] = min(cfg.threads, k.LANES)
            nitems = nc * nchunks
            kernel = k.reduce_nchw(kind)
        else:
            kk, nchunks = k.chunk_geometry_nhwc(m_len)
            bx = min(cfg.threads, k.NHWC_TILE)
            by = max(1, min(cfg.threads // bx, k.NHWC_ROW_LANES))
            block = (bx, by)
            nitems = -(-nc // k.NHWC_TILE) * nchunks
            kernel = k.reduce_nhwc(kind)
        part = self.cuda.device_array((nc, nchunks, 3), dtype=np.float64)
        kernel[_grid_1d(nitems, cfg), block](x, dy, mean, kk, nchunks, part)
        return part, nchunks, m_len

    def _finalize_block(self, nchunks: int, cfg: LaunchConfig) -> int:
        return max(1, min(cfg.threads, _pow2_at_least(nchunks) // 2))

    def _elementwise(self, kernel_nchw, kernel_nhwc, x: Any, cfg: LaunchConfig, *args) -> None:
        nc, _, ncols = self._dims(x)
        if self.nchw:
            grid, block = _elementwise_launch(x.shape[0] * nc, ncols, cfg)
            kernel_nchw[grid, block](*args)
        else:
            grid, block = _elementwise_launch(x.shape[0], ncols, cfg)
            kernel_nhwc[grid, block](*args)

    # -- the contract --------------------------------------------------------------------

    def stats(self, x: Any, mean: Any, var: Any, nthreads: int = 1) -> None:
        """Per-channel mean and population variance of ``x``."""
        cfg = self._cfg()
        part, nchunks, m_len = self._reduce(self.k._STATS, x, x, mean, cfg)
        self.k.finalize_stats[_grid_1d(mean.shape[0], cfg), self._finalize_block(nchunks, cfg)](
            part, nchunks, m_len, 0.0, mean, mean, var, mean, mean, False
        )

    def train_forward(
        self,
        x: Any,
        weight: Any,
        bias: Any,
        eps: float,
        y: Any,
        mean: Any,
        var: Any,
        invstd: Any,
        nthreads: int = 1,
    ) -> None:
        """Batch statistics, ``invstd`` and ``y = (x - mean) * (weight*invstd) + bias``."""
        cfg = self._cfg()
        part, nchunks, m_len = self._reduce(self.k._STATS, x, x, mean, cfg)
        scale = self.cuda.device_array(mean.shape[0], dtype=np.float64)
        self.k.finalize_stats[_grid_1d(mean.shape[0], cfg), self._finalize_block(nchunks, cfg)](
            part, nchunks, m_len, float(eps), weight, mean, var, invstd, scale, True
        )
        self._elementwise(
            self.k.normalize_nchw, self.k.normalize_nhwc, x, cfg, x, mean, scale, bias, y
        )

    def normalize(
        self, x: Any, mean: Any, scale: Any, bias: Any, y: Any, nthreads: int = 1
    ) -> None:
        """``y = (x - mean) * scale + bias``."""
        self._elementwise(
            self.k.normalize_nchw, self.k.normalize_nhwc, x, self._cfg(), x, mean, scale, bias, y
        )

    def _sums(self, dy, x, mean, weight, invstd, sum_dy, sum_dy_xmu, cfg, with_coef):
        part, nchunks, m_len = self._reduce(self.k._SUMS, x, dy, mean, cfg)
        coef = self.cuda.device_array((mean.shape[0], 3), dtype=np.float64)
        self.k.finalize_sums[_grid_1d(mean.shape[0], cfg), self._finalize_block(nchunks, cfg)](
            part, nchunks, m_len, weight, invstd, sum_dy, sum_dy_xmu, coef, with_coef
        )
        return coef

    def backward_reduce(
        self, dy: Any, x: Any, mean: Any, sum_dy: Any, sum_dy_xmu: Any, nthreads: int = 1
    ) -> None:
        """Per-channel ``sum(dy)`` and ``sum(dy * (x - mean))``."""
        self._sums(dy, x, mean, mean, mean, sum_dy, sum_dy_xmu, self._cfg(), False)

    def backward_train(
        self,
        dy: Any,
        x: Any,
        mean: Any,
        invstd: Any,
        weight: Any,
        dx: Any,
        sum_dy: Any,
        sum_dy_xmu: Any,
        nthreads: int = 1,
    ) -> None:
        """The backward sums, then ``dx`` of a training-mode forward."""
        cfg = self._cfg()
        coef = self._sums(dy, x, mean, weight, invstd, sum_dy, sum_dy_xmu, cfg, True)
        self._elementwise(self.k.dx_nchw, self.k.dx_nhwc, x, cfg, dy, x, mean, coef, dx)

    def as_dict(self) -> dict[str, Callable[..., None]]:
        return {
            "stats": _staged(self.stats, (1, 2)),
            "train_forward": _staged(self.train_forward, (4, 5, 6, 7)),
            "normalize": _staged(self.normalize, (4,)),
            "backward_reduce": _staged(self.backward_reduce, (3, 4)),
            "backward_train": _staged(self.backward_train, (5, 6, 7)),
        }


def _staged(fn: Callable[..., None], outputs: tuple[int, ...]) -> Callable[..., None]:
    """Wrap a device kernel so that NumPy arguments are staged through the device.

    Device arrays are passed as they are (no copy). Each NumPy array is copied to the
    device once (or only allocated there when it is used only as an output), and the
    arguments at the ``outputs`` positions that were NumPy arrays are copied back into
    them after the launch (which synchronizes). Aliases (``y is x``) share one buffer.
    """

    @functools.wraps(fn)
    def run(*args: Any) -> None:
        if not any(isinstance(a, np.ndarray) for a in args):
            fn(*args)
            return
        dev = list(args)
        staged: dict[int, Any] = {}
        back = []
        for i, a in enumerate(args):
            if not isinstance(a, np.ndarray):
                continue
            d = staged.get(id(a))
            if d is None:
                uses = [j for j, b in enumerate(args) if b is a]
                written = any(j in outputs for j in uses)
                read = any(j not in outputs for j in uses)
                d = to_device(a) if read else empty(a.shape, a.dtype)
                staged[id(a)] = d
                if written:
                    back.append((d, a))
            dev[i] = d
        fn(*dev)
        for d, a in back:
            d.copy_to_host(a)

    return run


def kernels(
    layout: str, dtype: Any = None, *, launch: LaunchConfig | None = None
) -> dict[str, Callable[..., None]]:
    """Return the kernel table of ``CONTRACT.md`` for a canonical layout.

    Parameters
    ----------
    layout : {"nchw", "nhwc"}
        The canonical view: ``(N, C, S)`` or ``(R, C)``.
    dtype : dtype, optional
        The data's dtype; the same table for both (numba compiles one version per dtype).
    launch : LaunchConfig, optional
        Block and grid sizes; by default :func:`default_launch` at each call. Results are
        bitwise identical for every value.

    Returns
    -------
    dict
        ``stats``, ``train_forward``, ``normalize``, ``backward_reduce``,
        ``backward_train``, taking device arrays (see the module docstring).

    Raises
    ------
    ValueError
        For an unknown layout.
    RuntimeError
        When the backend is unavailable (the message says what to install).
    """
    if layout not in ("nchw", "nhwc"):
        raise ValueError(f"layout must be 'nchw' or 'nhwc', got {layout!r}")
    return _Table(layout, launch).as_dict()


# ---------------------------------------------------------------------------------------
# Device-array hooks
# ---------------------------------------------------------------------------------------


def is_device_array(obj: Any) -> bool:
    """Return whether ``obj`` is a GPU array (never imports ``numba.cuda``).

    Parameters
    ----------
    obj : object
        Anything.

    Returns
    -------
    bool
        True for objects with ``__cuda_array_interface__`` (numba, CuPy, PyTorch CUDA
        tensors...) and for numba device arrays, including the simulator's.
    """
    if hasattr(obj, "__cuda_array_interface__"):
        return True
    if isinstance(obj, np.ndarray) or "numba.cuda" not in sys.modules:
        return False
    return bool(getattr(obj, "__cuda_ndarray__", False))


def as_device(obj: Any) -> Any:
    """Return a numba device-array view of a device object, without copying.

    Parameters
    ----------
    obj : object
        A numba device array or any ``__cuda_array_interface__`` object.

    Returns
    -------
    numba device array
        ``obj`` itself when it already is one.

    Raises
    ------
    TypeError
        When ``obj`` is not a device array.
    """
    if not is_device_array(obj):
        raise TypeError(f"expected a CUDA device array, got {type(obj).__name__}")
    if getattr(obj, "__cuda_ndarray__", False):
        return obj
    return _cuda().as_cuda_array(obj)


def to_device(a: np.ndarray) -> Any:
    """Copy a host array to a new device array.

    Parameters
    ----------
    a : numpy.ndarray
        Host data (made C-contiguous first if it is not).

    Returns
    -------
    numba device array
        A C-contiguous device copy of ``a``.
    """
    return _cuda().to_device(np.ascontiguousarray(a))


def to_host(d: Any, out: np.ndarray | None = None) -> np.ndarray:
    """Copy a device array to the host (synchronizing first).

    Parameters
    ----------
    d : numba device array
        The source.
    out : numpy.ndarray, optional
        A C-contiguous host array of the same shape and dtype to copy into.

    Returns
    -------
    numpy.ndarray
        ``out`` when given, else a new array.
    """
    d = as_device(d)
    if out is None:
        return d.copy_to_host()
    d.copy_to_host(out)
    return out


def empty(shape: int | tuple[int, ...], dtype: Any) -> Any:
    """Allocate an uninitialized C-contiguous device array.

    Parameters
    ----------
    shape : int or tuple of int
        The shape.
    dtype : dtype-like
        The element type.

    Returns
    -------
    numba device array
        The new array.
    """
    return _cuda().device_array(shape, dtype=np.dtype(dtype))


def full(shape: int, value: float, dtype: Any) -> Any:
    """Allocate a 1-D device array filled with ``value`` on the device.

    Parameters
    ----------
    shape : int
        The length.
    value : float
        The fill value.
    dtype : dtype-like
        The element type.

    Returns
    -------
    numba device array
        The new array.
    """
    a = empty(shape, dtype)
    cfg = default_launch()
    if a.shape[0]:
        _k().fill[_grid_1d(-(-a.shape[0] // cfg.threads), cfg), cfg.threads](a, value)
    return a


def copy_into(src: Any, dst: Any) -> None:
    """Copy ``src`` into ``dst`` on the device (same shape; the dtype may differ).

    Parameters
    ----------
    src, dst : numba device arrays
        C-contiguous arrays of the same shape.

    Raises
    ------
    ValueError
        When the shapes differ.
    """
    src = as_device(src)
    dst = as_device(dst)
    if tuple(src.shape) != tuple(dst.shape):
        raise ValueError(f"copy_into: shapes differ, {src.shape} and {dst.shape}")
    if src.size == 0:
        return
    if src.dtype == dst.dtype:
        dst.copy_to_device(src)
        return
    s = src.reshape(src.size)
    d = dst.reshape(dst.size)
    cfg = default_launch()
    _k().copy_1d[_grid_1d(-(-s.shape[0] // cfg.threads), cfg), cfg.threads](s, d)


def update_running(
    running_mean: Any, running_var: Any, mean: Any, var: Any, momentum: float, m: int
) -> None:
    """Update running statistics in place on the device.

    Parameters
    ----------
    running_mean, running_var : numba device arrays
        ``(C,)`` running statistics (float32 or float64), updated in place. The arithmetic
        is the CPU path's: ``(1-momentum)*r + momentum*(var*(m/(m-1)))`` in float64.
    mean, var : numba device arrays
        ``(C,)`` float64 batch mean and population variance.
    momentum : float
        The update factor.
    m : int
        Values per channel in the batch (``>= 2``); the variance gets ``m/(m-1)``.
    """
    _require_device(running_mean, running_var, mean, var)
    nc = running_mean.shape[0]
    cfg = default_launch()
    threads = min(cfg.threads, 128)
    _k().update_running[max(1, -(-nc // threads)), threads](
        running_mean, running_var, mean, var, float(momentum), m / (m - 1)
    )


def synchronize() -> None:
    """Block until every kernel launched so far has finished."""
    _cuda().synchronize()


def _c_contiguous(a: Any) -> bool:
    flags = a.flags
    return bool(flags["C_CONTIGUOUS"] if isinstance(flags, dict) else flags.c_contiguous)


class DeviceOps:
    """The array operations the Python layer needs, on the device (``array_ops()``).

    ``fastbn._dispatch`` uses this object instead of NumPy for every allocation and
    per-channel computation when the data lives on the GPU, so that nothing is copied to
    the host. Per-channel arguments may be NumPy arrays (they are copied to the device);
    every result is a device array.
    """

    device = True

    def owns(self, a: Any) -> bool:
        """Whether ``a`` is a device array."""
        return is_device_array(a)

    def asarray(self, a: Any, name: str) -> Any:
        """``a`` as a device array: device objects as they are, host arrays copied over."""
        if is_device_array(a):
            return as_device(a)
        if isinstance(a, np.ndarray) or hasattr(a, "__array__"):
            return to_device(np.asarray(a))
        raise TypeError(f"{name} must be an array, got {type(a).__name__}")

    def c_contiguous(self, a: Any) -> bool:
        """Whether the device array ``a`` is C-contiguous."""
        return _c_contiguous(a)

    def writable(self, a: Any) -> bool:
        """Whether ``a`` can be updated in place on the device (device arrays only)."""
        return is_device_array(a)

    def from_host(self, a: np.ndarray) -> Any:
        """Copy a host array to the device."""
        return to_device(a)

    def to_host(self, a: Any) -> np.ndarray:
        """Copy a device array to a new host array."""
        return to_host(a)

    def output(self, shape: int | tuple[int, ...], dtype: Any) -> Any:
        """An uninitialized device array."""
        return empty(shape, dtype)

    def vectors(self, k: int, n: int) -> tuple[Any, ...]:
        """`k` uninitialized float64 device arrays of shape (n,)."""
        return tuple(empty(n, np.float64) for _ in range(k))

    def full(self, n: int, value: float, dtype: Any = np.float64) -> Any:
        """A ``(n,)`` device array filled with ``value``."""
        return full(n, value, dtype)

    def astype(self, v: Any, dtype: Any) -> Any:
        """A new 1-D device array with ``v``'s values converted to ``dtype``."""
        v = self.asarray(v, "array")
        out = empty(v.shape, dtype)
        copy_into(v, out)
        return out

    def f64(self, v: Any) -> Any:
        """``v`` as a C-contiguous float64 device array (``v`` itself when it is one)."""
        v = self.asarray(v, "array")
        if v.dtype == np.float64 and _c_contiguous(v):
            return v
        return self.astype(v, np.float64)

    def _math(self, op: int, a: Any, b: Any, eps: float) -> Any:
        a = self.asarray(a, "array")
        b = self.asarray(b, "array")
        out = empty(a.shape[0], np.float64)
        cfg = default_launch()
        n = max(1, a.shape[0])
        _k().channel_math[_grid_1d(-(-n // cfg.threads), cfg), cfg.threads](
            op, a, b, float(eps), out
        )
        return out

    def mul(self, a: Any, b: Any) -> Any:
        """``a * b`` in float64."""
        return self._math(0, a, b, 0.0)

    def invstd(self, var: Any, eps: float) -> Any:
        """``1 / sqrt(var + eps)`` in float64."""
        return self._math(1, var, var, eps)

    def div_sqrt(self, w: Any, var: Any, eps: float) -> Any:
        """``w / sqrt(var + eps)`` in float64."""
        return self._math(2, var, w, eps)

    def update_running(
        self, running_mean: Any, running_var: Any, mean: Any, var: Any, count: int, momentum: float
    ) -> None:
        """In-place running-statistics update (see :func:`update_running`)."""
        update_running(running_mean, running_var, self.f64(mean), self.f64(var), momentum, count)


_DEVICE_OPS = DeviceOps()


def array_ops() -> DeviceOps:
    """Return the device implementation of the Python layer's array operations.

    Returns
    -------
    DeviceOps
        Allocation, transfers and per-channel maths on the device.
    """
    return _DEVICE_OPS


def describe() -> dict[str, str]:
    """Facts for ``fastbn.show_config()``: device (or simulator) and launch configuration.

    Returns
    -------
    dict
        ``device`` and ``launch`` descriptions.
    """
    if simulator_enabled():
        device = "numba CUDA simulator (CPU)"
    else:
        dev = _cuda().get_current_device()
        name = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
        device = f"{name} (compute capability {dev.compute_capability})"
    cfg = default_launch()
    return {"device": device, "launch": f"{cfg.threads} threads/block, <= {cfg.blocks} blocks"}
