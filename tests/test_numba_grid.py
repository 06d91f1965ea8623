"""The numba backend's NHWC reductions on grids the public shapes reach only when large.

The statistics and the backward sums read a stripe of rows as interleaved streams
(``row_parts`` of ``fastbn/backends/_numba_kernels.py``) once a stripe holds several chunks
of rows; with the real chunk size (32768 values) that takes arrays of millions of values.
Here the kernels are called with small chunks, against the float64 reference.
"""

from __future__ import annotations

import numpy as np
import pytest

from fastbn.backends import numba_cpu

from .conftest import DTYPES

CASES = [(200, 64, 8, 2), (203, 70, 5, 3), (64, 130, 2, 1), (50, 3, 4, 2)]


def _ids(case: tuple[int, int, int, int]) -> str:
    return "R{}xC{}-rows{}-stripes{}".format(*case)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_nhwc_streamed_reductions_match_reference(case, dtype) -> None:
    n_rows, n_ch, rows, stripes = case
    rng = np.random.default_rng(n_rows * n_ch)
    x = (rng.standard_normal((n_rows, n_ch)) * 3 + 100).astype(dtype)
    dy = rng.standard_normal((n_rows, n_ch)).astype(dtype)
    k = numba_cpu._compiled()
    what = f"numba nhwc {dtype.__name__} shape=({n_rows}, {n_ch}) rows={rows} stripes={stripes}"

    counts = np.empty(stripes)
    means = np.empty((stripes, n_ch))
    m2s = np.empty((stripes, n_ch))
    k["nhwc_stats_stripes"](x, rows, stripes, counts, means, m2s)
    mean = np.empty(n_ch)
    var = np.empty(n_ch)
    k["nhwc_merge"](counts, means, m2s, mean, var)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(mean, x64.mean(axis=0), rtol=1e-13, err_msg=f"mean, {what}")
    np.testing.assert_allclose(var, x64.var(axis=0), rtol=1e-11, err_msg=f"var, {what}")

    sums_dy = np.empty((stripes, n_ch))
    sums_dy_xmu = np.empty((stripes, n_ch))
    k["nhwc_backward_reduce_stripes"](dy, x, mean, stripes, sums_dy, sums_dy_xmu)
    dy64 = dy.astype(np.float64)
    np.testing.assert_allclose(
        sums_dy.sum(axis=0), dy64.sum(axis=0), rtol=1e-11, atol=1e-11, err_msg=f"sum(dy), {what}"
    )
    np.testing.assert_allclose(
        sums_dy_xmu.sum(axis=0),
        (dy64 * (x64 - mean)).sum(axis=0),
        rtol=1e-11,
        atol=1e-9,
        err_msg=f"sum(dy * (x - mean)), {what}",
    )
