"""Shared fixtures of the pytest-benchmark suites.

The cases come from :func:`fastbn.bench.default_cases`, the table the ``fastbn-bench`` tool
uses, so the suites and the tool always measure the same shapes and operations.
Run with ``pytest benchmarks --benchmark-enable`` (the project's pytest configuration
disables benchmarks by default); add ``--benchmark-json FILE`` to keep the numbers.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from fastbn import bench


@pytest.fixture(scope="session")
def case_data() -> Callable[[bench.Case], bench.Data]:
    """Return ``get(case) -> Data``, keeping only the latest shape's arrays alive.

    The tests are ordered case by case, so each large input is made once and the
    previous one is freed before the next is allocated.
    """
    held: dict[tuple[object, ...], bench.Data] = {}

    def get(case: bench.Case) -> bench.Data:
        key = (case.shape, case.layout, case.dtype)
        if key not in held:
            held.clear()
            held[key] = bench.make_data(case, seed=0)
        return held[key]

    return get
