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
from typing import Any

import numpy as np

from ._threads import get_num_threads
from .backends import choose_backend

LAYOUTS = ("NCHW", "NHWC")
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


# ------------------------------------------------------------------ validation


def as_array(a: Any, name: str) -> np.ndarray:
    """View `a` as an ndarray without copying; anything that is not array-like is a TypeError."""
    if isinstance(a, np.ndarray):
        return a
    if (
        hasattr(a, "__array_interface__")
        or hasattr(a, "__array_struct__")
        or hasattr(a, "__array__")
    ):
        return np.asarray(a)
    raise TypeError(f"{name} must be a NumPy array (or array-like object), got {type(a).__name__}")


def check_layout(layout: object) -> str:
    """Return `layout` if it is "NCHW" or "NHWC", else raise ValueError."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be 'NCHW' or 'NHWC', got {layout!r}")
    return str(layout)


def channel_axis(ndim: int, layout: str) -> int:
    """Axis of the channels of an `ndim`-D array in `layout`."""
    return 1 if layout == "NCHW" else ndim - 1


def check_input(x: Any, layout: str, name: str = "x") -> np.ndarray:
    """Validate a data array: float32/float64, ndim >= 2, not empty."""
    x = as_array(x, name)
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


def check_vector(v: Any, channels: int, name: str) -> np.ndarray:
    """Validate a per-channel array of shape (C,) and floating dtype."""
    v = as_array(v, name)
    if not np.issubdtype(v.dtype, np.floating):
        raise TypeError(f"{name} must have a floating dtype, got {v.dtype}")
    if v.shape != (channels,):
        raise ValueError(f"{name} must have shape ({channels},), got {v.shape}")
    return v


def vector_or(v: Any, channels: int, name: str, fill: float) -> np.ndarray:
    """A float64 (C,) copy of `v`, or `fill` everywhere when `v` is None."""
    if v is None:
        return np.full(channels, fill)
    return np.ascontiguousarray(check_vector(v, channels, name), dtype=np.float64)


def check_number(value: Any, name: str, *, minimum: float | None = None) -> float:
    """A finite real number (optionally >= `minimum`) as a Python float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ValueError(f"{name} must be a finite number{bound}, got {value}")
    return value


def check_writable_vector(v: Any, channels: int, name: str) -> np.ndarray:
    """A (C,) floating ndarray that can be updated in place."""
    v = check_vector(v, channels, name)
    if not isinstance(v, np.ndarray) or not v.flags.writeable:
        raise ValueError(f"{name} must be a writable array: it is updated in place")
    return v


def check_out(out: Any, x: np.ndarray, allowed_aliases: tuple[np.ndarray, ...]) -> np.ndarray:
    """Validate ``out=``: C-contiguous, writable, x's shape and dtype, no partial overlap."""
    if not isinstance(out, np.ndarray):
        raise ValueError(f"out must be a NumPy array, got {type(out).__name__}")
    if out.shape != x.shape or out.dtype != x.dtype:
        raise ValueError(
            f"out must have shape {x.shape} and dtype {x.dtype}, got shape {out.shape} and "
            f"dtype {out.dtype}"
        )
    if not out.flags.c_contiguous:
        raise ValueError("out must be C-contiguous")
    if not out.flags.writeable:
        raise ValueError("out must be writable")
    for a in allowed_aliases:
        if out is a:
            return out
    for a in allowed_aliases:
        if np.may_share_memory(out, a):
            raise ValueError("out overlaps an input without being that input")
    return out


# ------------------------------------------------------------------ canonical views


@dataclass(frozen=True)
class Plan:
    """How one call maps user arrays to a canonical view and back.

    `perm` is the transpose that makes the data C-contiguous in memory (identity, or
    the channel axis moved to the other end when the input is stored in the other
    layout); `kind` is "nchw" or "nhwc"; `shape` the canonical shape.
    """

    user_shape: tuple[int, ...]
    perm: tuple[int, ...]
    kind: str
    shape: tuple[int, ...]
    channels: int

    @property
    def count(self) -> int:
        """Values per channel, M."""
        return math.prod(self.shape) // self.channels

    def view(self, a: np.ndarray) -> np.ndarray:
        """`a` (user shape) as the canonical view, copying once if its memory needs it."""
        t = a.transpose(self.perm)
        if not t.flags.c_contiguous:
            t = np.ascontiguousarray(t)
        return t.reshape(self.shape)

    def empty(self, dtype: np.dtype) -> np.ndarray:
        """A fresh output in canonical form."""
        return np.empty(self.shape, dtype=dtype)

    def restore(self, a: np.ndarray) -> np.ndarray:
        """Map a canonical array back to the user's shape (and memory order)."""
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
    identity = tuple(range(x.ndim))
    perm, memory_layout = identity, layout
    if keep_strides and not x.flags.c_contiguous and x.ndim > 2:
        moved = [i for i in identity if i != axis]
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

    @property
    def kernels(self) -> dict:
        return self.backend.kernels(self.plan.kind)

    def output(self, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
        """(canonical output to write, user-facing array to return)."""
        if self.out is not None:
            return self.out.reshape(self.plan.shape), self.out
        yc = self.plan.empty(dtype)
        return yc, self.plan.restore(yc)


def prepare(
    x: Any,
    layout: str,
    backend: str | None,
    out: Any = None,
    *,
    aliases: tuple[np.ndarray, ...] = (),
    name: str = "x",
) -> Call:
    """Validate `x`, `layout`, `out` and `backend`; return the call's plan."""
    layout = check_layout(layout)
    x = check_input(x, layout, name)
    if out is not None:
        out = check_out(out, x, (x, *aliases))
    module = choose_backend(backend)
    p = plan(x, layout, keep_strides=out is None)
    return Call(module, p, p.view(x), out)


def train_forward(call: Call, weight: np.ndarray, bias: np.ndarray, eps: float):
    """Run the training forward; return (y, mean, var, invstd)."""
    c = call.plan.channels
    mean, var, invstd = np.empty(c), np.empty(c), np.empty(c)
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
