"""The Cython/OpenMP backend: compiled kernels, no JIT compilation at all.

The kernels live in the extension module ``fastbn._cython_kernels`` (sources in
``kernels/``), built by meson with OpenMP when the compiler has it. On x86-64 the build also
compiles the same source for x86-64-v3 (AVX2) and x86-64-v4 (AVX-512) as
``fastbn._cython_kernels_v3`` and ``_v4``; the widest one the CPU supports is used (all give
the same bits; only the speed differs). Set the environment variable ``FASTBN_CYTHON_SIMD``
to ``baseline``, ``v3`` or ``v4`` to cap the choice.

This module only fills the backend table of ``fastbn/backends/CONTRACT.md``:
``kernels(layout)`` returns the compiled functions themselves, so a call goes straight from
the dispatch layer into C.

It never imports numba: using this backend compiles nothing at run time.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np

__all__ = [
    "KERNEL_NAMES",
    "NAME",
    "build_info",
    "is_available",
    "kernels",
    "max_threads",
    "openmp_enabled",
    "stream_min_bytes",
    "traffic_floor",
    "unavailable_reason",
]

NAME = "cython"

#: The keys of the backend table, in the order of CONTRACT.md.
KERNEL_NAMES: tuple[str, ...] = (
    "stats",
    "train_forward",
    "normalize",
    "backward_reduce",
    "backward_train",
)

_LAYOUTS = ("nchw", "nhwc")
_EXTENSION = "fastbn._cython_kernels"
#: The x86-64 microarchitecture levels built besides the portable build, narrowest first.
_LEVELS = ("v3", "v4")
_SIMD_ENV = "FASTBN_CYTHON_SIMD"

_module: ModuleType | None = None
_import_error: str | None = None
_tables: dict[tuple[str, Any], dict[str, Callable[..., None]]] = {}
#: The C type of each data dtype: the key of the fused kernels' specializations.
_C_TYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}


def _pick(base: ModuleType) -> ModuleType:
    """Choose the widest build the CPU supports (unless told otherwise).

    Parameters
    ----------
    base : module
        The portable build, which also reports the CPU's features.

    Returns
    -------
    module
        The build to use.
    """
    want = os.environ.get(_SIMD_ENV, "auto").strip().lower() or "auto"
    if want not in ("auto", "baseline", *_LEVELS):
        raise ValueError(f"{_SIMD_ENV} must be 'auto', 'baseline', 'v3' or 'v4', got {want!r}")
    if want == "baseline":
        return base
    top = len(_LEVELS) if want == "auto" else _LEVELS.index(want) + 1
    for level in reversed(_LEVELS[:top]):
        if base.cpu_has_x86_64(level):
            try:
                return importlib.import_module(f"{_EXTENSION}_{level}")
            except ImportError:
                if want == level:
                    raise
    return base


def _extension() -> ModuleType | None:
    """Import the compiled extension once; remember why when it cannot be imported.

    Returns
    -------
    module or None
        ``fastbn._cython_kernels`` (or its x86-64-v3/v4 twin), or ``None`` when it is not
        importable.
    """
    global _module, _import_error
    if _module is None and _import_error is None:
        try:
            _module = _pick(importlib.import_module(_EXTENSION))
        except ImportError as exc:
            _import_error = f"{type(exc).__name__}: {exc}"
    return _module


def is_available() -> bool:
    """Return whether the compiled Cython kernels can be used in this process.

    Cheap: imports the extension module (no compilation happens).

    Returns
    -------
    bool
        ``True`` when ``fastbn._cython_kernels`` imports.
    """
    return _extension() is not None


def unavailable_reason() -> str:
    """Explain why the backend is unavailable and what to do about it.

    Returns
    -------
    str
        An empty string when the backend is available; otherwise the import error and how
        to build the extension.
    """
    if is_available():
        return ""
    return (
        f"the compiled extension {_EXTENSION} cannot be imported ({_import_error}); "
        "fastbn was installed without its compiled part. Reinstall from source with a C "
        "compiler, e.g. `pip install .` (build requirements: meson-python, meson, ninja, "
        "Cython, numpy); for an editable install use `pip install --no-build-isolation -e .`"
    )


def kernels(layout: str, dtype: Any = None) -> dict[str, Callable[..., None]]:
    """Return the kernel table for one canonical view.

    Parameters
    ----------
    layout : {"nchw", "nhwc"}
        ``"nchw"`` for ``(N, C, S)`` arrays, ``"nhwc"`` for ``(R, C)`` arrays.
    dtype : dtype, optional
        float32 or float64: the kernels specialized to data of that dtype. The compiled
        functions are fused over both dtypes and otherwise pick one at every call (2-3 us
        of a single-image inference after a pause).

    Returns
    -------
    dict of str to callable
        The five kernels of CONTRACT.md (``stats``, ``train_forward``, ``normalize``,
        ``backward_reduce``, ``backward_train``). Each releases the GIL, takes ``nthreads``
        as its last argument and returns ``None``. The table is shared (one per layout and
        dtype, as numba's): read it, do not modify it.

    Raises
    ------
    ValueError
        If `layout` is not one of the two canonical views.
    RuntimeError
        If the extension is not available (see `unavailable_reason`).
    """
    table = _tables.get((layout, dtype))
    if table is None:
        if layout not in _LAYOUTS:
            raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
        mod = _extension()
        if mod is None:
            raise RuntimeError(f"the cython backend is unavailable: {unavailable_reason()}")
        table = {name: getattr(mod, f"{layout}_{name}") for name in KERNEL_NAMES}
        if dtype is not None:
            c_type = _C_TYPES.get(np.dtype(dtype))
            if c_type is None:
                raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
            table = {name: fn[c_type] for name, fn in table.items()}
        _tables[(layout, dtype)] = table
    return table


def traffic_floor(
    x: Any,
    dy: Any,
    y: Any,
    dx: Any,
    read_first: bool,
    nthreads: int,
) -> int:
    """The least memory traffic of an operation, for fastbn-bench's floor.

    Parameters
    ----------
    x, dy : ndarray of uint8, C-contiguous
        Input bytes (`dy` may be None).
    y, dx : ndarray of uint8 like `x`, or None
        Receive ``x`` and ``x | dy`` (bitwise), with the kernels' store rule.
    read_first : bool
        Read the inputs in full (every thread) before the first write.
    nthreads : int
        Threads, one contiguous slice each.

    Returns
    -------
    int
        The OR of the bytes read first (it keeps the reads from being optimized away).

    Raises
    ------
    RuntimeError
        If the extension is not available (see `unavailable_reason`).
    """
    mod = _extension()
    if mod is None:
        raise RuntimeError(f"the cython backend is unavailable: {unavailable_reason()}")
    return int(mod.traffic_floor(x, dy, y, dx, read_first, nthreads))


def stream_min_bytes(n: int | None = None) -> int:
    """Return (and optionally set) the extension's streaming-store size threshold in bytes.

    Parameters
    ----------
    n : int, optional
        The new threshold (see CONTRACT.md, store rule).

    Returns
    -------
    int
        The threshold before the call; 0 when the extension is not available.
    """
    mod = _extension()
    return 0 if mod is None else int(mod.stream_min_bytes(n))


def openmp_enabled() -> bool:
    """Return whether the extension was compiled with OpenMP.

    Returns
    -------
    bool
        ``False`` when the extension is missing or was built without OpenMP (kernels then
        run serially).
    """
    mod = _extension()
    return bool(mod is not None and mod.openmp_enabled())


def max_threads() -> int:
    """Return the maximum team size the OpenMP runtime reports (``omp_get_max_threads``).

    Returns
    -------
    int
        Honours ``OMP_NUM_THREADS``; 1 without OpenMP or without the extension.
    """
    mod = _extension()
    return int(mod.openmp_max_threads()) if mod is not None else 1


def build_info() -> dict[str, Any]:
    """Describe the compiled extension, for ``fastbn.show_config()``.

    Returns
    -------
    dict
        ``available``, ``module`` (the extension in use), ``simd`` (the instruction set
        it was compiled for), ``openmp`` (compiled in), ``openmp_version`` (the
        ``_OPENMP`` date, 0 without OpenMP), ``max_threads`` and ``reason`` (empty when
        available).
    """
    mod = _extension()
    return {
        "available": mod is not None,
        "module": mod.__name__ if mod is not None else "",
        "simd": mod.build_simd() if mod is not None else "",
        "openmp": openmp_enabled(),
        "openmp_version": int(mod.openmp_version()) if mod is not None else 0,
        "max_threads": max_threads(),
        "reason": unavailable_reason(),
    }


def describe() -> dict[str, Any]:
    """Facts for `fastbn.show_config`: the build in use, SIMD level, OpenMP, threads."""
    return {k: v for k, v in build_info().items() if k not in ("available", "reason")}
