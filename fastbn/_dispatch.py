"""The one layer between the public API and the kernels.

It validates every argument before anything is written, reduces the input to one of the
two canonical views of ``backends/CONTRACT.md`` (``(N, C, S)`` "nchw" or ``(R, C)`` "nhwc"),
allocates outputs, picks the backend, passes the thread count and maps results back to the
user's shape. Kernels see nothing else.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np

from ._outputs import empty as fresh_output
from ._threads import get_num_threads
from .backends import BACKENDS, choose_backend, usable_backend

try:
    from . import _channel_terms
except ImportError:  # an install without the compiled extensions: NumPy does the same
    _channel_terms = None

LAYOUTS = ("NCHW", "NHWC")
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_F64 = FLOAT_DTYPES[1]


# ------------------------------------------------------------------ array operations


class HostOps:
    """The array operations of this layer on host memory (NumPy).

    A backend whose data lives elsewhere (``cuda``) provides the same methods through a
    module-level ``array_ops()`` hook and ``is_device_array(x)``; `ops_for` picks the
    implementation once per call, and the code below never asks where the data is.
    """

    device = False

    def owns(self, a: Any) -> bool:
        return not _is_foreign_device_array(a)

    def asarray(self, a: Any, name: str) -> np.ndarray:
        return as_array(a, name)

    def c_contiguous(self, a: np.ndarray) -> bool:
        return bool(a.flags.c_contiguous)

    def writable(self, a: Any) -> bool:
        return isinstance(a, np.ndarray) and bool(a.flags.writeable)

    def from_host(self, a: np.ndarray) -> np.ndarray:
        return a

    def to_host(self, a: np.ndarray) -> np.ndarray:
        return a

    def vectors(self, k: int, n: int) -> tuple[np.ndarray, ...]:
        """`k` uninitialized float64 arrays of shape (n,) (the rows of one allocation)."""
        return tuple(np.empty((k, n)))

    def output(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        return fresh_output(shape, dtype)

    def full(self, n: int, value: float, dtype: Any = np.float64) -> np.ndarray:
        return np.full(n, value, dtype=dtype)

    def astype(self, v: np.ndarray, dtype: Any) -> np.ndarray:
        return np.asarray(v).astype(dtype)

    def f64(self, v: Any) -> np.ndarray:
        return np.ascontiguousarray(v, dtype=np.float64)

    def mul(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return a * b

    def invstd(self, var: np.ndarray, eps: float) -> np.ndarray:
        return self.div_sqrt(1.0, var, eps)

    def div_sqrt(self, w: np.ndarray | float, var: np.ndarray, eps: float) -> np.ndarray:
        # float64 ``w / sqrt(var + eps)`` in one new array (a call per microsecond counts
        # on small inputs).
        t = np.add(var, eps, dtype=np.float64)
        np.sqrt(t, out=t)
        return np.divide(w, t, out=t)

    def update_running(self, running_mean, running_var, mean, var, count, momentum) -> None:
        update_running(running_mean, running_var, mean, var, count, momentum)


HOST = HostOps()


def _is_foreign_device_array(a: Any) -> bool:
    """Device memory that NumPy must not touch (``np.asarray`` would copy it or fail)."""
    return hasattr(a, "__cuda_array_interface__") or bool(getattr(a, "__cuda_ndarray__", False))


def backend_ops(module: ModuleType) -> Any:
    """The array operations a backend keeps its state with (a layer's parameters)."""
    hook = getattr(module, "array_ops", None)
    return HOST if hook is None else hook()


def ops_for(x: Any, backend: str | None) -> Any:
    """The array operations of a call on `x`: the backend's when `x` is its device array."""
    if type(x) is not np.ndarray and backend in BACKENDS and _is_foreign_device_array(x):
        module = usable_backend(backend)
        if module is not None and hasattr(module, "array_ops") and module.is_device_array(x):
            return module.array_ops()
    return HOST


# ------------------------------------------------------------------ validation


def as_array(a: Any, name: str) -> np.ndarray:
    """View `a` as an ndarray without copying; anything that is not array-like is a TypeError."""
    if isinstance(a, np.ndarray):
        return a
    if _is_foreign_device_array(a):
        raise TypeError(
            f"{name} is a GPU array: pass backend='cuda' (or copy it to the host first)"
        )
    if (
        hasattr(a, "__array_interface__")
        or hasattr(a, "__array_struct__")
        or hasattr(a, "__array__")
    ):
        return np.asarray(a)
    try:  # the buffer protocol (memoryview, array.array, ...): NumPy views it without a copy
        memoryview(a)
    except TypeError:
        raise TypeError(
            f"{name} must be a NumPy array (or array-like object), got {type(a).__name__}"
        ) from None
    return np.asarray(a)


def check_layout(layout: object) -> str:
    """Return `layout` if it is "NCHW" or "NHWC", else raise ValueError."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be 'NCHW' or 'NHWC', got {layout!r}")
    return str(layout)


def channel_axis(ndim: int, layout: str) -> int:
    """Axis of the channels of an `ndim`-D array in `layout`."""
    return 1 if layout == "NCHW" else ndim - 1


def check_input(x: Any, layout: str, name: str = "x", ops: Any = HOST) -> np.ndarray:
    """Validate a data array: float32/float64, ndim >= 2, not empty."""
    if ops is not HOST or type(x) is not np.ndarray:
        x = ops.asarray(x, name)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype float32 or float64, got {x.dtype}")
    if x.ndim < 2:
        raise ValueError(
            f"{name} must have at least 2 dimensions ((N, C, ...) for NCHW, (N, ..., C) for "
            f"NHWC), got shape {x.shape}"
        )
    if x.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {x.shape}")
    return x


def check_vector(v: Any, channels: int, name: str, ops: Any = HOST) -> np.ndarray:
    """Validate a per-channel array of shape (C,) and floating dtype."""
    if ops is not HOST or type(v) is not np.ndarray:
        v = ops.asarray(v, name)
    if v.dtype.kind != "f":  # the floating dtypes (np.issubdtype costs microseconds)
        raise TypeError(f"{name} must have a floating dtype, got {v.dtype}")
    if tuple(v.shape) != (channels,):
        raise ValueError(f"{name} must have shape ({channels},), got {v.shape}")
    return v


def f64_vector(v: Any, channels: int, name: str, ops: Any = HOST) -> np.ndarray:
    """A validated (C,) floating array as a contiguous float64 one (copied if it is not)."""
    if ops is HOST and type(v) is np.ndarray and v.dtype is _F64 and v.shape == (channels,):
        if v.flags.c_contiguous:
            return v
    return ops.f64(check_vector(v, channels, name, ops))


def vector_or(v: Any, channels: int, name: str, fill: float, ops: Any = HOST) -> np.ndarray:
    """`f64_vector(v)`, or `fill` everywhere when `v` is None."""
    if v is None:
        return ops.full(channels, fill)
    return f64_vector(v, channels, name, ops)


def check_number(value: Any, name: str, *, minimum: float | None = None) -> float:
    """A finite real number (optionally >= `minimum`) as a Python float."""
    if type(value) is not float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
        value = float(value)
    if not math.isfinite(value) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ValueError(f"{name} must be a finite number{bound}, got {value}")
    return value


def check_writable_vector(v: Any, channels: int, name: str, ops: Any = HOST) -> np.ndarray:
    """A (C,) floating ndarray that can be updated in place."""
    given = v
    v = check_vector(v, channels, name, ops)
    if not ops.writable(v) or (ops.device and v is not given):
        raise ValueError(f"{name} must be a writable array: it is updated in place")
    return v


def check_out(
    out: Any, x: np.ndarray, allowed_aliases: tuple[np.ndarray, ...], ops: Any = HOST
) -> np.ndarray:
    """Validate ``out=``: C-contiguous, writable, x's shape and dtype, no partial overlap."""
    if ops.device:
        # Device memory: same checks; aliasing is only detected as identity.
        if not ops.owns(out):
            raise ValueError(f"out must be a device array like x, got {type(out).__name__}")
        if tuple(out.shape) != tuple(x.shape) or out.dtype != x.dtype:
            raise ValueError(
                f"out must have shape {x.shape} and dtype {x.dtype}, got shape {out.shape} "
                f"and dtype {out.dtype}"
            )
        if not ops.c_contiguous(out):
            raise ValueError("out must be C-contiguous")
        return out
    if not isinstance(out, np.ndarray):
        raise ValueError(f"out must be a NumPy array, got {type(out).__name__}")
    if out.shape != x.shape or out.dtype != x.dtype:
        raise ValueError(
            f"out must have shape {x.shape} and dtype {x.dtype}, got shape {out.shape} and "
            f"dtype {out.dtype}"
        )
    flags = out.flags
    if not flags.c_contiguous:
        raise ValueError("out must be C-contiguous")
    if not flags.writeable:
        raise ValueError("out must be writable")
    for a in allowed_aliases:
        if out is a:
            return out
    for a in allowed_aliases:
        owner = _owner(a) if flags.owndata else None
        if (owner is None or owner is out) and np.may_share_memory(out, a):
            raise ValueError("out overlaps an input without being that input")
    return out


def _owner(a: np.ndarray) -> np.ndarray | None:
    """The array that owns the memory `a` views (None if no array does).

    Two different arrays that own their memory do not overlap, so an ``out`` that owns its
    memory is checked against an input by identity of owners; ``np.may_share_memory`` is
    left for the other cases (its first call after a pause costs 2-6 us, a tenth of a
    single-image inference).
    """
    while not a.flags.owndata:
        a = a.base
        if type(a) is not np.ndarray:
            return None
    return a


# ------------------------------------------------------------------ canonical views


class Plan(NamedTuple):
    """How one call maps user arrays to a canonical view and back.

    `perm` is the transpose that makes the data C-contiguous in memory: None when it already
    is, or the channel axis moved to the other end when the input is stored in the other
    layout; `kind` is "nchw" or "nhwc"; `shape` the canonical shape. (A named tuple: it is
    built on every call, and a frozen dataclass costs microseconds to construct.)
    """

    user_shape: tuple[int, ...]
    perm: tuple[int, ...] | None
    kind: str
    shape: tuple[int, ...]
    channels: int

    @property
    def count(self) -> int:
        """Values per channel, M."""
        return math.prod(self.shape) // self.channels

    def view(self, a: np.ndarray) -> np.ndarray:
        """`a` (user shape) as the canonical view, copying once if its memory needs it."""
        t = a if self.perm is None else a.transpose(self.perm)  # always None on a device
        if isinstance(t, np.ndarray) and not t.flags.c_contiguous:
            t = np.ascontiguousarray(t)
        return t.reshape(self.shape)

    def restore(self, a: np.ndarray) -> np.ndarray:
        """Map a canonical array back to the user's shape (and memory order)."""
        if self.perm is None:
            return a.reshape(self.user_shape)
        transposed = tuple(self.user_shape[p] for p in self.perm)
        return a.reshape(transposed).transpose(np.argsort(self.perm))


def plan(x: np.ndarray, layout: str, *, keep_strides: bool) -> Plan:
    """Choose the canonical view of `x` given in `layout`.

    With `keep_strides` (no ``out=``), an array stored in the other layout (for example a
    channels-last array handed over as NCHW through a transposed view) is processed where
    it lies, without a copy, and the output gets the same memory order.
    """
    axis = channel_axis(x.ndim, layout)
    channels = x.shape[axis]
    perm, memory_layout = None, layout
    if keep_strides and isinstance(x, np.ndarray) and not x.flags.c_contiguous and x.ndim > 2:
        moved = [i for i in range(x.ndim) if i != axis]
        swapped = (moved[0], axis, *moved[1:]) if layout == "NHWC" else (*moved, axis)
        if x.transpose(swapped).flags.c_contiguous:
            perm, memory_layout = swapped, ("NCHW" if layout == "NHWC" else "NHWC")
    m = x.size // channels
    if memory_layout == "NCHW" and x.ndim > 2 and m // x.shape[0] > 1:
        return Plan(x.shape, perm, "nchw", (x.shape[0], channels, m // x.shape[0]), channels)
    return Plan(x.shape, perm, "nhwc", (m, channels), channels)


# ------------------------------------------------------------------ operations


@dataclass
class Call:
    """A validated call: backend, plan, canonical input and the output to fill."""

    backend: ModuleType
    plan: Plan
    xc: np.ndarray
    out: np.ndarray | None
    ops: Any = HOST

    @property
    def kernels(self) -> dict:
        return self.backend.kernels(self.plan.kind, self.xc.dtype)

    def output(self, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
        """(canonical output to write, user-facing array to return)."""
        if self.out is not None:
            return self.out.reshape(self.plan.shape), self.out
        yc = self.ops.output(self.plan.shape, dtype)
        return yc, self.plan.restore(yc)


#: (shape, strides, dtype, layout, backend, out is None) of a NumPy input -> (backend
#: module, plan, whether the canonical view is a reshape) of the calls already validated.
_PLANS: dict[tuple, tuple[ModuleType, Plan, bool]] = {}
_PLANS_MAX = 256


def prepare(
    x: Any,
    layout: str,
    backend: str | None,
    out: Any = None,
    *,
    aliases: tuple[np.ndarray, ...] = (),
    name: str = "x",
) -> Call:
    """Validate `x`, `layout`, `out` and `backend`; return the call's plan.

    What an ndarray input's checks and plan depend on (its shape, strides and dtype, the
    layout, the backend, whether there is an ``out``) is looked up in `_PLANS` first;
    ``out`` is checked on every call. After a pause, with its code and data out of the
    caches, a call spends 60-160 us outside its kernel, a few microseconds per Python
    function call; the lookup took 5-17 us off that (float32, 2 threads, ``(1, 64, 56,
    56)`` and ``(128, 512, 7, 7)``, training forward, inference and backward).
    """
    key = None
    if type(x) is np.ndarray and type(layout) is str and (backend is None or type(backend) is str):
        key = (x.shape, x.strides, x.dtype, layout, backend, out is None)
        known = _PLANS.get(key)
        if known is not None:
            module, p, direct = known
            if out is not None:
                out = check_out(out, x, (x, *aliases))
            return Call(module, p, x.reshape(p.shape) if direct else p.view(x), out)
    layout = check_layout(layout)
    ops = HOST if type(x) is np.ndarray else ops_for(x, backend)
    x = check_input(x, layout, name, ops)
    if out is not None:
        out = check_out(out, x, (x, *aliases), ops)
    module = choose_backend(backend)
    if ops.device and not ops.c_contiguous(x):
        raise ValueError(f"{name} on the device must be C-contiguous")
    p = plan(x, layout, keep_strides=out is None)
    if key is not None:
        if len(_PLANS) >= _PLANS_MAX:
            _PLANS.clear()
        _PLANS[key] = (module, p, p.perm is None and bool(x.flags.c_contiguous))
    return Call(module, p, p.view(x), out, ops)


def train_forward(call: Call, weight: np.ndarray, bias: np.ndarray, eps: float):
    """Run the training forward; return (y, mean, var, invstd)."""
    c = call.plan.channels
    mean, var, invstd = call.ops.vectors(3, c)
    yc, y = call.output(call.xc.dtype)
    call.kernels["train_forward"](
        call.xc, weight, bias, eps, yc, mean, var, invstd, get_num_threads()
    )
    return y, mean, var, invstd


def normalize(call: Call, mean: np.ndarray, scale: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """y = (x - mean) * scale + bias per channel."""
    yc, y = call.output(call.xc.dtype)
    call.kernels["normalize"](call.xc, mean, scale, bias, yc, get_num_threads())
    return y


def infer(
    call: Call,
    weight: Any,
    bias: Any,
    running_mean: Any,
    running_var: Any,
    eps: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inference with running statistics: validate the vectors (`weight` and `bias` may be
    None), normalize; return ``(y, mean, invstd)``, the last two float64 for an eval-mode
    backward."""
    c, ops = call.plan.channels, call.ops
    w = None if weight is None else check_vector(weight, c, "weight", ops)
    b = None if bias is None else check_vector(bias, c, "bias", ops)
    rm = check_vector(running_mean, c, "running_mean", ops)
    rv = check_vector(running_var, c, "running_var", ops)
    mean, invstd, scale, shift = inference_terms(ops, w, b, rm, rv, eps)
    return normalize(call, mean, scale, shift), mean, invstd


def inference_terms(
    ops: Any,
    weight: np.ndarray | None,
    bias: np.ndarray | None,
    running_mean: np.ndarray,
    running_var: np.ndarray,
    eps: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """float64 ``(mean, invstd, scale, bias)`` of an inference with running statistics:
    ``invstd = 1 / sqrt(running_var + eps)`` (for an eval-mode backward) and
    ``scale = weight / sqrt(running_var + eps)``; `normalize` takes mean, scale and bias.

    The vectors are validated (C,) floating arrays; `weight` and `bias` may be None (ones
    and zeros). On the host one compiled call does it all (``fastbn._channel_terms``, the
    same IEEE operations and bits as the NumPy below, which has a call per step).
    """
    if ops is HOST and _channel_terms is not None:
        return _channel_terms.inference_terms(weight, bias, running_mean, running_var, eps)
    n = running_mean.shape[0]
    w = ops.full(n, 1.0) if weight is None else ops.f64(weight)
    b = ops.full(n, 0.0) if bias is None else ops.f64(bias)
    scale = ops.div_sqrt(w, running_var, eps)
    return ops.f64(running_mean), ops.invstd(running_var, eps), scale, b


def update_running(
    running_mean: np.ndarray,
    running_var: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    count: int,
    momentum: float,
) -> None:
    """Exponential (or, with momentum 1/n, cumulative) update with the unbiased variance."""
    new_mean = (1.0 - momentum) * running_mean + momentum * mean
    new_var = (1.0 - momentum) * running_var + momentum * (var * (count / (count - 1)))
    running_mean[...] = new_mean
    running_var[...] = new_var
