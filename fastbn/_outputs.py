"""The output cache: fresh outputs in the memory of outputs the program has released.

A fresh output larger than the C allocator's mmap ceiling (32 MiB with glibc) arrives as new
pages on every call, and the operating system faults in and zeroes each page when the kernel
first writes it: on (64, 256, 56, 56) float32 that costs about as much as the batch norm.
fastbn allocates its outputs of at least 1 MiB under a NumPy memory handler (NEP 49) that
keeps the buffers of freed outputs, up to a byte limit, and gives one back for the next
output of exactly that size. The arrays are ordinary NumPy arrays that own their memory; a
buffer is handed out again only after NumPy has freed every array that used it.
"""

from __future__ import annotations

import math
import os

import numpy as np

from ._stores import check_nbytes

try:
    from . import _output_cache as _cache
except ImportError as exc:  # an install without the compiled extensions
    _cache = None
    _UNAVAILABLE = f"fastbn._output_cache did not import ({exc})"
else:
    _UNAVAILABLE = ""

_MAX_DEFAULT_LIMIT = 1 << 30


def default_output_cache_limit() -> int:
    """1 GiB, or a sixteenth of the physical memory if that is less."""
    try:
        physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return _MAX_DEFAULT_LIMIT
    return min(_MAX_DEFAULT_LIMIT, physical // 16)


def empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A fresh output: ``np.empty``, from the cache when it is large enough to pay off."""
    if _cache is not None and math.prod(shape) * dtype.itemsize >= _cache.MIN_SIZE:
        return _cache.empty(shape, dtype)
    return np.empty(shape, dtype)


def get_output_cache_limit() -> int:
    """Return the most bytes of released outputs kept for reuse.

    Returns
    -------
    int
        The limit `set_output_cache_limit` set, by default 1 GiB or a sixteenth of the
        physical memory if that is less; 0 when the cache is off or not built.
    """
    return 0 if _cache is None else _cache.get_limit()


def set_output_cache_limit(nbytes: int | None) -> None:
    """Set how many bytes of released outputs fastbn keeps to allocate the next ones in.

    Parameters
    ----------
    nbytes : int or None
        The limit for the whole process. 0 turns the cache off and frees what it holds; a
        lower limit frees the oldest buffers down to it; ``None`` restores the default.

    Raises
    ------
    TypeError, ValueError
        If `nbytes` is not an integer (or None), or is negative.
    """
    nbytes = check_nbytes(default_output_cache_limit() if nbytes is None else nbytes)
    if _cache is not None:
        _cache.set_limit(min(nbytes, 2**63))  # a size_t in C


def clear_output_cache() -> None:
    """Free every buffer the output cache holds (the limit stays)."""
    if _cache is not None:
        _cache.clear()


def output_cache_info() -> dict[str, int | str]:
    """What the output cache holds and has done.

    Returns
    -------
    dict
        ``limit`` and ``held`` (bytes), ``buffers`` held, ``hits`` (outputs given a kept
        buffer) and ``misses`` (outputs of at least 1 MiB that were allocated new), counted
        since import; with ``unavailable`` (why) when the cache is not built.
    """
    if _cache is None:
        counts = dict.fromkeys(("limit", "held", "buffers", "hits", "misses"), 0)
        return {**counts, "unavailable": _UNAVAILABLE}
    return {"limit": _cache.get_limit(), **_cache.stats()}


if _cache is not None:
    _cache.set_limit(default_output_cache_limit())
