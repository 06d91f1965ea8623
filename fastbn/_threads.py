"""fastbn's thread count: one process-wide setting, with a per-thread scoped override.

The default follows the usual conventions (threadpoolctl, OpenMP): ``FASTBN_NUM_THREADS``,
then ``OMP_NUM_THREADS``, then the CPUs this process may run on. Backends clamp the value to
what their runtime can start (numba: ``NUMBA_NUM_THREADS``), so asking for more threads than
cores never oversubscribes beyond that.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

import numpy as np

__all__ = ["default_num_threads", "get_num_threads", "num_threads", "set_num_threads"]


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _env_threads(name: str) -> int | None:
    value = os.environ.get(name, "").split(",")[0].strip()
    if value.isdigit() and int(value) > 0:
        return int(value)
    return None


def default_num_threads() -> int:
    """Threads used when nobody called `set_num_threads`: env settings, else usable CPUs."""
    for name in ("FASTBN_NUM_THREADS", "OMP_NUM_THREADS"):
        value = _env_threads(name)
        if value is not None:
            return value
    return _usable_cpus()


class _Override(threading.local):
    """A Python thread's scoped thread count (`num_threads`); None: the global one. A class
    default rather than ``getattr(local, "n", None)``, which raises and catches an
    AttributeError inside on every call of a thread that never set it (0.4 us a call)."""

    n: int | None = None


_global = default_num_threads()
_local = _Override()


def _check(n: object) -> int:
    if isinstance(n, bool) or not isinstance(n, int | np.integer):
        raise TypeError(f"the number of threads must be an int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"the number of threads must be >= 1, got {n}")
    return int(n)


def set_num_threads(n: int) -> None:
    """Set the number of threads fastbn's kernels use, for the whole process.

    Parameters
    ----------
    n : int
        Threads per call, >= 1. Results do not depend on it (fixed reduction order).
    """
    global _global
    _global = _check(n)


def get_num_threads() -> int:
    """Return the number of threads the next call on this thread will use."""
    override = _local.n
    return _global if override is None else override


@contextlib.contextmanager
def num_threads(n: int) -> Iterator[None]:
    """Use `n` threads inside the ``with`` block on the calling thread, then restore.

    The override is thread-local, so concurrent Python threads can each scope their own
    count; the previous value comes back also when the block raises.
    """
    n = _check(n)
    previous = _local.n
    _local.n = n
    try:
        yield
    finally:
        _local.n = previous
