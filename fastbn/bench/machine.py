"""The machine: CPUs, L2 size, installed versions and the copy bandwidth."""

from __future__ import annotations

import contextlib
import importlib
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

import fastbn

from .impls import PEER_NEEDS, PEERS, fastbn_backends


def available_cpus() -> int:
    """Number of CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def l2_cache_bytes(default: int = 2 * 1024 * 1024) -> int:
    """Per-core L2 size from sysfs, or `default` when it cannot be read."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in sorted(os.listdir(base)):
            path = os.path.join(base, entry)
            with open(os.path.join(path, "level")) as f:
                level = f.read().strip()
            with open(os.path.join(path, "type")) as f:
                kind = f.read().strip()
            if level == "2" and kind in ("Unified", "Data"):
                with open(os.path.join(path, "size")) as f:
                    text = f.read().strip()
                mult = {"K": 1024, "M": 1024**2}.get(text[-1], 1)
                return int(text.rstrip("KM")) * mult
    except (OSError, ValueError):
        pass
    return default


def peer_version(name: str) -> str | None:
    """Version of an installed peer (or numba), None when it cannot be imported."""
    try:
        module = importlib.import_module(name)
    except Exception:  # ImportError, or a broken install
        return None
    return str(getattr(module, "__version__", "unknown"))


def peer_missing(name: str) -> str | None:
    """The first module a peer needs that cannot be imported (None: the peer is usable)."""
    for module in (name, *PEER_NEEDS.get(name, ())):
        if peer_version(module) is None:
            return module
    return None


def _median_time(func: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        func()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


_NUMBA_COPY: Callable[..., None] | None = None


def _numba_copy() -> Callable[..., None] | None:
    """A compiled parallel copy loop, or None without numba."""
    global _NUMBA_COPY
    if _NUMBA_COPY is None:
        try:
            import numba
        except ImportError:
            return None

        @numba.njit(parallel=True, nogil=True, cache=True)
        def copy(src: np.ndarray, dst: np.ndarray) -> None:  # pragma: no cover - jitted
            n = src.size
            nchunks = 256
            for k in numba.prange(nchunks):
                for i in range(k * n // nchunks, (k + 1) * n // nchunks):
                    dst[i] = src[i]

        _NUMBA_COPY = copy
    return _NUMBA_COPY


@contextlib.contextmanager
def _numba_threads(n: int) -> Iterator[None]:
    import numba

    old = numba.get_num_threads()
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    try:
        yield
    finally:
        numba.set_num_threads(old)


def measure_copy_bandwidth(threads: int, nbytes: int, repeat: int = 7) -> dict[str, Any]:
    """Measure the parallel copy bandwidth (read + write bytes per second).

    Parameters
    ----------
    threads : int
        Number of threads that copy.
    nbytes : int
        Size of the copied array.
    repeat : int
        Median over this many copies.

    Returns
    -------
    dict
        ``threads``, ``nbytes``, ``gbps`` (best method), ``method``, ``methods``
        (GB/s per method) and ``fresh_gbps`` (copy into a new array, page faults included).
    """
    n = max(nbytes // 4, 1024)
    src = np.ones(n, dtype=np.float32)
    dst = np.zeros_like(src)
    bounds = [(i * n // threads, (i + 1) * n // threads) for i in range(threads)]
    methods: dict[str, float] = {}
    with ThreadPoolExecutor(threads) as pool:

        def copy_into(target: np.ndarray) -> None:
            list(pool.map(lambda b: np.copyto(target[b[0] : b[1]], src[b[0] : b[1]]), bounds))

        copy_into(dst)
        t = _median_time(lambda: copy_into(dst), repeat)
        methods["numpy-copyto-threads"] = 2 * src.nbytes / t / 1e9
        t = _median_time(lambda: copy_into(np.empty_like(src)), max(3, repeat // 2))
        fresh = 2 * src.nbytes / t / 1e9
    kernel = _numba_copy()
    if kernel is not None:
        with _numba_threads(threads):
            kernel(src, dst)
            t = _median_time(lambda: kernel(src, dst), repeat)
        methods["numba-prange-loop"] = 2 * src.nbytes / t / 1e9
    best = max(methods, key=methods.__getitem__)
    return {
        "threads": threads,
        "nbytes": int(src.nbytes),
        "gbps": methods[best],
        "method": best,
        "methods": methods,
        "fresh_gbps": fresh,
    }


def machine_info(l2: int) -> dict[str, Any]:
    """Versions and hardware facts recorded in the report."""
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cpus": available_cpus(),
        "l2_bytes": l2,
        "numpy": np.__version__,
        "fastbn": str(getattr(fastbn, "__version__", "unknown")),
        "backends": fastbn_backends(),
        "peers": {name: peer_version(name) for name in (*PEERS, "numba")},
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
