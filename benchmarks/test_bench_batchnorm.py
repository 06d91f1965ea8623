"""pytest-benchmark suite: training forward, inference, backward and forward+backward.

Every case of :func:`fastbn.bench.default_cases` (the tool's default table: (32, 64, 56, 56),
(64, 256, 56, 56), (128, 512, 7, 7) in NCHW and NHWC, and (4096, 1024), float32) on every
fastbn CPU backend (fresh output and ``out=``) and on plain NumPy. Tests of one case share
a ``benchmark.group``, so pytest-benchmark's table compares the implementations directly.
Peers (PyTorch, ONNX Runtime) and the copy roofline are measured by ``fastbn-bench``.
``test_layout_pairs`` puts both layouts of a few more shapes side by side.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

import fastbn
from fastbn import bench

THREADS = fastbn.get_num_threads()
IMPLS = [*bench.fastbn_backends(), bench.BASELINE]


def _params() -> list[object]:
    params = []
    for case in bench.default_cases():
        for impl in IMPLS:
            for mode in bench.impl_modes(impl, case, bench.MODES):
                params.append(pytest.param(case, impl, mode, id=f"{case.id}-{impl}-{mode}"))
    return params


@pytest.mark.parametrize(("case", "impl", "mode"), _params())
def test_batchnorm(
    benchmark: object,
    case_data: Callable[[bench.Case], bench.Data],
    case: bench.Case,
    impl: str,
    mode: str,
) -> None:
    data = case_data(case)
    func = bench.make_callable(impl, case, data, mode, THREADS)
    with fastbn.num_threads(THREADS):
        func()  # compile and fault the pages outside the measurement
        benchmark.group = f"{case.id} {THREADS} thread(s)"
        benchmark.extra_info.update(
            {
                "shape": list(case.shape),
                "layout": case.layout,
                "op": case.op,
                "impl": impl,
                "mode": mode,
                "threads": THREADS,
                "nbytes": case.nbytes,
                "passes": bench.PASSES[case.op][0],
            }
        )
        benchmark(func)


#: Shapes outside the default table on which one layout once took several times the other's
#: time (found by sweeps of both layouts; 3-24 channels channels-last, rows of 100 values
#: channels-first). Each shape and operation is one group holding both layouts on every
#: fastbn CPU backend (``out=``), so pytest-benchmark's table shows their ratio.
LAYOUT_PAIR_SHAPES = [(8, 3, 112, 112), (32, 16, 28, 28), (32, 24, 28, 28), (32, 64, 10, 10)]


def _layout_pair_params() -> list[object]:
    return [
        pytest.param(case, impl, id=f"{case.id}-{impl}")
        for case in bench.default_cases(LAYOUT_PAIR_SHAPES)
        for impl in bench.fastbn_backends()
    ]


@pytest.mark.parametrize(("case", "impl"), _layout_pair_params())
def test_layout_pairs(
    benchmark: object,
    case_data: Callable[[bench.Case], bench.Data],
    case: bench.Case,
    impl: str,
) -> None:
    data = case_data(case)
    func = bench.make_callable(impl, case, data, "out", THREADS)
    with fastbn.num_threads(THREADS):
        func()
        dims = "x".join(map(str, case.shape))
        benchmark.group = f"layouts {case.op}-{dims}-{case.dtype} {THREADS} thread(s)"
        benchmark.extra_info.update(
            {"shape": list(case.shape), "layout": case.layout, "op": case.op, "impl": impl}
        )
        benchmark(func)


def _memory_params() -> list[object]:
    return [
        pytest.param(case, impl, id=f"{case.id}-{impl}")
        for case in bench.default_cases()
        for impl in bench.fastbn_backends()
    ]


@pytest.mark.parametrize(("case", "impl"), _memory_params())
def test_extra_memory_is_per_channel(
    case_data: Callable[[bench.Case], bench.Data], case: bench.Case, impl: str
) -> None:
    """With ``out=``, a call allocates nothing larger than O(C x threads) (tracemalloc).

    tracemalloc sees NumPy's allocations (the Python layer's temporaries); memory a
    compiled kernel allocates on its own (numba's runtime, OpenMP) is not traced.
    """
    data = case_data(case)
    func = bench.make_callable(impl, case, data, "out", THREADS)
    with fastbn.num_threads(THREADS):
        func()
        extra = bench.peak_extra_bytes(func, case, "out")
    budget = 64 * 8 * case.channels * max(THREADS, os.cpu_count() or 1) + 256 * 1024
    assert extra <= budget, (
        f"{impl} {case.id}: {extra} bytes allocated beyond the output, "
        f"budget O(C x threads) = {budget} (tensor: {case.nbytes})"
    )
