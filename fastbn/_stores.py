"""The size from which the CPU backends write outputs with streaming stores.

A streaming (non-temporal) store writes a whole cache line to memory without reading it
first: an output larger than the caches costs one memory pass less, and is in memory rather
than in cache when the call returns. Speed only: the results are the same bits either way.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterator

from .backends import cython_cpu, numba_cpu


def check_nbytes(nbytes: object) -> int:
    """`nbytes` as an int >= 0 (a byte-count setting); TypeError or ValueError otherwise."""
    if isinstance(nbytes, bool):
        raise TypeError("nbytes must be an integer or None, got bool")
    try:
        value = operator.index(nbytes)
    except TypeError:
        raise TypeError(
            f"nbytes must be an integer or None, got {type(nbytes).__name__}"
        ) from None
    if value < 0:
        raise ValueError(f"nbytes must be >= 0, got {value}")
    return value


def get_stream_threshold() -> int:
    """Return the output size in bytes from which the CPU backends use streaming stores.

    Returns
    -------
    int
        Twice a core's L2 cache unless `set_stream_threshold` changed it.
    """
    return numba_cpu.stream_min_bytes()


def set_stream_threshold(nbytes: int | None) -> None:
    """Set, for the whole process and both CPU backends, where streaming stores begin.

    Parameters
    ----------
    nbytes : int or None
        Outputs of at least this many bytes (written out of place, in runs of at least 256
        values) get streaming stores; ``None`` restores the default, twice a core's L2
        cache. A very large value turns them off, e.g. when the next step reads the output
        at once and it fits in the last-level cache.

    Raises
    ------
    TypeError
        If `nbytes` is not an integer (or None).
    ValueError
        If `nbytes` is negative.
    """
    nbytes = check_nbytes(numba_cpu.DEFAULT_STREAM_MIN_BYTES if nbytes is None else nbytes)
    numba_cpu.stream_min_bytes(nbytes)
    if cython_cpu.is_available():
        cython_cpu.stream_min_bytes(nbytes)


@contextlib.contextmanager
def stream_threshold(nbytes: int | None) -> Iterator[None]:
    """Set the streaming-store threshold (`set_stream_threshold`) for a ``with`` block.

    The previous threshold is restored on exit, also after an exception. Like
    `set_stream_threshold`, this is a process-wide setting, not a per-thread one.

    Parameters
    ----------
    nbytes : int or None
        As for `set_stream_threshold` (None: the default).
    """
    old = get_stream_threshold()
    set_stream_threshold(nbytes)
    try:
        yield
    finally:
        set_stream_threshold(old)
