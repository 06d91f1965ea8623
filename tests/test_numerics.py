"""Numerics: |mean|/std = 1e5 over channels of 2**25 float32 values, and the float32
output formula of the CPU backends where |mean|/std is large (at the end).

The statistics must be within 1e-6 relative of an exact float64 computation. A test-local
``E[x^2] - E[x]^2`` implementation (float64 accumulators, as a plain loop kernel has them)
is run through the same check and must fail it, which proves the check can fail.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastbn

from .conftest import Case

N = 2**25
#: (mean, std) per channel: |mean| / std = 1e5.
CHANNELS = [(1.0e5, 1.0), (-3.0e5, 3.0)]
RTOL = 1e-6


@pytest.fixture(scope="module")
def big():
    """float32 data, channels last (N, 2), and its exact float64 statistics."""
    rng = np.random.default_rng(2025)
    x = np.empty((N, len(CHANNELS)), np.float32)
    for c, (mu, sd) in enumerate(CHANNELS):
        x[:, c] = rng.standard_normal(N, dtype=np.float32) * np.float32(sd) + np.float32(mu)
    exact = []
    for c in range(x.shape[1]):
        a = x[:, c].astype(np.float64)  # float32 -> float64 is exact
        mean = a.mean()  # pairwise float64 sum: relative error ~1e-16
        exact.append((mean, np.mean(np.square(a - mean))))  # two-pass: deviations are small
    return x, np.array(exact)


def naive_moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """E[x^2] - E[x]^2 with float64 running sums (what a one-loop kernel computes)."""
    a = x.astype(np.float64)
    s = np.cumsum(a, axis=0)[-1]  # sequential accumulation, like `for v in x: s += v`
    s2 = np.cumsum(a * a, axis=0)[-1]
    mean = s / x.shape[0]
    return mean, s2 / x.shape[0] - mean * mean


def relative_errors(mean, var, exact):
    return np.abs(mean - exact[:, 0]) / np.abs(exact[:, 0]), np.abs(var - exact[:, 1]) / exact[
        :, 1
    ]


def check(mean, var, exact, case) -> None:
    em, ev = relative_errors(np.asarray(mean), np.asarray(var), exact)
    assert np.all(em <= RTOL), f"mean relative error {em} > {RTOL} [{case}]"
    assert np.all(ev <= RTOL), f"var relative error {ev} > {RTOL} [{case}]"


@pytest.mark.parametrize("layout", ["NHWC", "NCHW", "NCHW rows"])
def test_large_mean_over_std(backend, layout, big):
    x, exact = big
    if layout == "NCHW":
        x = np.ascontiguousarray(x.T)[None]  # (1, 2, 2**25): the stripe path, row pieces
    elif layout == "NCHW rows":  # (8192, 2, 4096): one whole row per chunk
        x = np.ascontiguousarray(x.T.reshape(2, 8192, 4096).transpose(1, 0, 2))
        layout = "NCHW"
    case = Case(backend, np.float32, x.shape, layout, "|mean|/std = 1e5")
    mean, var = fastbn.moments(x, layout=layout, backend=backend)
    check(mean, var, exact, case)
    _, save_mean, save_invstd = fastbn.batch_norm_train(x, layout=layout, backend=backend)
    check(save_mean, 1.0 / save_invstd**2 - 1e-5, exact, case)
    # the layer's running variance is unbiased: M/(M-1) times the population variance
    bn = fastbn.BatchNorm(2, momentum=1.0, layout=layout, dtype=np.float64, backend=backend)
    bn(x)
    check(bn.running_mean, bn.running_var * (N - 1) / N, exact, case)


def test_naive_formula_fails_the_same_check(big):
    """The check above is able to fail: E[x^2] - E[x]^2 loses the variance's digits."""
    x, exact = big
    mean, var = naive_moments(x)
    with pytest.raises(AssertionError, match="var relative error"):
        check(mean, var, exact, "naive E[x^2]-E[x]^2")
    _, ev = relative_errors(mean, var, exact)
    assert np.all(ev > 1e3 * RTOL), ev  # it is not even close


#: (layout, shape): every kind of float32 output site of the CPU backends.
FLOAT32_SITES = [
    ("NCHW", (4, 16, 3136)),  # rows; numba: the fused per-channel training forward
    ("NCHW", (2, 3, 50001)),  # Cython: fused channels; numba: stripes
    ("NCHW", (64, 40, 7, 7)),  # groups of short rows (position tables)
    ("NHWC", (3000, 24)),  # per-channel tables, wrapped when streamed
    ("NHWC", (8, 28, 28, 64)),
]


@pytest.mark.parametrize("streamed", [False, True], ids=["stores", "streamed"])
@pytest.mark.parametrize(("layout", "shape"), FLOAT32_SITES, ids=lambda v: str(v))
def test_float32_outputs_are_x_times_scale_plus_shift(backend, layout, shape, streamed):
    """float32 outputs, inference and training, on every CPU backend: ``x * sc + (b - m *
    sc)`` in float64, rounded once (NumPy's float64 arithmetic gives the bits), with
    ``sc = w / sqrt(var + eps)`` (inference) or ``w * invstd`` (training). The data
    (|mean| / std ~ 3e4) is where that formula and ``(x - m) * sc + b`` round differently,
    so a site computing the other one fails (checked below)."""
    rng = np.random.default_rng(3)
    x = (1e5 + 3.0 * rng.standard_normal(shape)).astype(np.float32)
    axis = 1 if layout == "NCHW" else x.ndim - 1
    c = shape[axis]
    rm = 1e5 + rng.standard_normal(c)
    rv = 9.0 + rng.standard_normal(c) ** 2
    w = 0.9 + 0.01 * rng.standard_normal(c)
    b = rng.standard_normal(c)
    bshape = [1] * x.ndim
    bshape[axis] = c

    def expected(m: np.ndarray, sc: np.ndarray) -> np.ndarray:
        m, sc, shift = (v.reshape(bshape) for v in (m, sc, b - m * sc))
        return (x.astype(np.float64) * sc + shift).astype(np.float32)

    scale = w / np.sqrt(rv + 1e-5)
    other = ((x - rm.reshape(bshape)) * scale.reshape(bshape) + b.reshape(bshape)).astype(
        np.float32
    )
    assert np.count_nonzero(expected(rm, scale) != other) > 0  # the data tells them apart
    case = Case(backend, np.float32, shape, layout, "streamed" if streamed else "stores")
    with fastbn.stream_threshold(0 if streamed else 2**62):
        y = fastbn.batch_norm(x, rm, rv, w, b, layout=layout, backend=backend)
        assert y.tobytes() == expected(rm, scale).tobytes(), f"inference [{case}]"
        y, mean, invstd = fastbn.batch_norm_train(x, w, b, layout=layout, backend=backend)
        assert y.tobytes() == expected(mean, w * invstd).tobytes(), f"training [{case}]"
