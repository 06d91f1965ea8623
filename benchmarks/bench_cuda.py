"""GPU benchmark of the cuda backend's kernels on device arrays.

Run on a machine with an NVIDIA GPU::

    python benchmarks/bench_cuda.py            # table on stdout
    python -m pytest benchmarks/bench_cuda.py  # the same, as a (skipping) pytest entry

Each kernel is timed on device arrays (no host transfer inside the timed region), after a
warm-up launch that compiles it, with ``cuda.synchronize()`` before the clock starts and
before it stops; the best of ``repeat`` runs is kept. The reported bandwidth is the bytes
the kernel must move at least (its passes over the tensor, see DESIGN.md) divided by the
time, next to the device-to-device copy bandwidth measured the same way (read + write).
Without a GPU (including under the CUDA simulator, whose timings mean nothing) it skips:
no number is produced that was not measured on a GPU.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from functools import partial

import numpy as np

SHAPES = {
    "nchw": [(32, 64, 56 * 56), (64, 256, 56 * 56), (128, 512, 7 * 7)],
    "nhwc": [(32 * 56 * 56, 64), (64 * 56 * 56, 256), (4096, 1024)],
}
# Minimum passes over the tensor: (reads + writes) of x-sized arrays.
PASSES = {
    "stats": 1,
    "train_forward": 3,
    "normalize": 2,
    "backward_reduce": 2,
    "backward_train": 5,
}


def gpu_reason() -> str | None:
    """Return why the benchmark cannot run here, or None when a real GPU is usable."""
    from fastbn.backends import cuda as backend

    if backend.simulator_enabled():
        return "the CUDA simulator is on: its timings are meaningless"
    if not backend.is_available():
        return backend.unavailable_reason()
    return None


def best_time(fn: Callable[[], None], repeat: int, synchronize: Callable[[], None]) -> float:
    """Best wall time of ``fn`` over ``repeat`` synchronized runs (after one warm-up)."""
    fn()
    synchronize()
    best = float("inf")
    for _ in range(repeat):
        synchronize()
        t0 = time.perf_counter()
        fn()
        synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def run(repeat: int = 20, dtype: type = np.float32) -> list[dict[str, object]]:
    """Time every kernel on every shape; return one row per (layout, shape, kernel)."""
    from fastbn.backends import cuda as backend

    sync = backend.synchronize
    rows: list[dict[str, object]] = []
    for layout, shapes in SHAPES.items():
        table = backend.kernels(layout)
        for shape in shapes:
            c = shape[1]
            rng = np.random.default_rng(0)
            x = backend.to_device(rng.standard_normal(shape).astype(dtype))
            dy = backend.to_device(rng.standard_normal(shape).astype(dtype))
            y, dx = backend.empty(shape, dtype), backend.empty(shape, dtype)
            w, b = backend.full(c, 1.0, np.float64), backend.full(c, 0.0, np.float64)
            mean, var, inv, s1, s2 = (backend.empty(c, np.float64) for _ in range(5))
            nbytes = x.size * x.dtype.itemsize
            copy_t = best_time(partial(y.copy_to_device, x), repeat, sync)
            copy_gbs = 2 * nbytes / copy_t / 1e9
            calls = {
                "stats": partial(table["stats"], x, mean, var, 1),
                "train_forward": partial(
                    table["train_forward"], x, w, b, 1e-5, y, mean, var, inv, 1
                ),
                "normalize": partial(table["normalize"], x, mean, inv, b, y, 1),
                "backward_reduce": partial(table["backward_reduce"], dy, x, mean, s1, s2, 1),
                "backward_train": partial(
                    table["backward_train"], dy, x, mean, inv, w, dx, s1, s2, 1
                ),
            }
            for name, fn in calls.items():
                t = best_time(fn, repeat, sync)
                gbs = PASSES[name] * nbytes / t / 1e9
                rows.append(
                    {
                        "layout": layout,
                        "shape": shape,
                        "kernel": name,
                        "ms": t * 1e3,
                        "GB/s": gbs,
                        "copy GB/s": copy_gbs,
                        "of copy": gbs / copy_gbs,
                    }
                )
    return rows


def main() -> int:
    """Print the table, or say why it cannot be measured here."""
    reason = gpu_reason()
    if reason is not None:
        print(f"skipped: {reason}")
        return 0
    from fastbn.backends import cuda as backend

    print(backend.describe())
    head = ("layout", "shape", "kernel", "ms", "GB/s", "copy GB/s", "%")
    print("{:6} {:>20} {:16} {:>9} {:>8} {:>10} {:>5}".format(*head))
    for r in run():
        print(
            f"{r['layout']:6} {r['shape']!s:>20} {r['kernel']:16} {r['ms']:9.3f} "
            f"{r['GB/s']:8.1f} {r['copy GB/s']:10.1f} {100 * r['of copy']:5.0f}"
        )
    return 0


def test_cuda_kernels_bandwidth() -> None:
    """The benchmark as a pytest entry: skips without a real GPU."""
    import pytest

    reason = gpu_reason()
    if reason is not None:
        pytest.skip(reason)
    rows = run(repeat=5)
    assert all(r["ms"] > 0 for r in rows)
    for r in rows:
        print(r)


if __name__ == "__main__":
    sys.exit(main())
