"""Shared fixtures and helpers of the fastbn test suite.

- ``backend``: every CPU backend that `fastbn.available_backends()` reports (the CUDA
  backend is tested elsewhere, under the simulator).
- ``SHAPES``: one table of shapes in NCHW terms ``(N, C, *spatial)``; `make_data` derives the
  channels-last array by moving the channel axis, so both layouts share the table.
- `tol` / `assert_close`: the tolerances of the suite (float64 1e-12, float32 1e-5 relative),
  applied against an error bound of the data's scale, with messages that name the case.
- A hypothesis profile ``ci`` (no deadline: the first call of a kernel compiles it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

import fastbn

# ------------------------------------------------------------------ hypothesis

settings.register_profile(
    "ci",
    deadline=None,
    max_examples=30,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile("dev", parent=settings.get_profile("ci"), max_examples=10)
settings.register_profile("thorough", parent=settings.get_profile("ci"), max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# ------------------------------------------------------------------ backends

#: Backends tested here: every available one except the GPU (tested under the simulator).
CPU_BACKENDS = [name for name in fastbn.available_backends() if name != "cuda"]
LAYOUTS = ("NCHW", "NHWC")
DTYPES = (np.float32, np.float64)


@pytest.fixture(scope="session", params=CPU_BACKENDS)
def backend(request) -> str:
    """Name of a CPU backend; the Cython backend joins automatically once it is built."""
    return request.param


@pytest.fixture(params=LAYOUTS)
def layout(request) -> str:
    return request.param


@pytest.fixture(params=DTYPES, ids=lambda d: np.dtype(d).name)
def dtype(request) -> np.dtype:
    return np.dtype(request.param)


# ------------------------------------------------------------------ shapes

#: Shapes in NCHW terms (N, C, *spatial). The numba kernels cut an NCHW channel into chunks
#: of CHUNK = 4096 values and (R, C) arrays into chunks of whole rows of about
#: NHWC_CHUNK = 32768 values, and split the chunks into at most MAX_STRIPES = 16 stripes; NCHW
#: with C >= 16 (or M <= CHUNK) runs one channel per thread (short rows: a group of
#: adjacent channels per thread), C < 16 with M > CHUNK runs the stripe path; S >= CHUNK
#: cuts rows into pieces, CHUNK / 2 < S <= CHUNK makes one row per chunk; S == 1 and (N, C)
#: run as (R, C).
SHAPES = [
    # (N, C)
    (2, 1),  # C=1, M=2: the smallest training input
    (7, 3),
    (40000, 3),  # (R, C): M > CHUNK, four row chunks
    (560001, 1),  # (R, C): 18 chunks > MAX_STRIPES, uneven stripes
    (33, 130),  # many channels, fewer rows per chunk than channels
    (300, 512),  # rows 2 KiB apart (float32): chunks read in row tiles; the last is short
    # (N, C, L)
    (2, 1, 1),  # S == 1, M == 2
    (3, 5, 1),  # S == 1
    (4, 3, 7),  # odd sizes, per-channel path (M <= CHUNK)
    (2, 3, 5003),  # S >= CHUNK: row pieces; C < 16, M > CHUNK: stripe path
    (1, 2, 8193),  # N == 1, S > 2*CHUNK, three uneven pieces
    (3, 17, 4099),  # C >= 16 with row pieces
    # (N, C, H, W)
    (1, 1, 1, 2),  # C=1, N=1, M=2
    (2, 3, 5, 7),
    (9, 20, 5, 3),  # C >= 16, whole rows per chunk
    (6, 16, 48, 48),  # C >= 16, one row per chunk: numba reads four rows in lockstep, then 2
    (70, 2, 31, 31),  # stripe path with 18 row blocks > MAX_STRIPES
    (70, 2, 50, 50),  # stripe path, one row per chunk: stripes of 4-5 rows read in lockstep
    (5, 4, 33, 31),  # stripe path, rows do not divide CHUNK
    (200, 37, 7, 7),  # short rows: groups of 13 channels, the last one short; 3 row blocks
    (21, 100, 3, 3),  # short rows: groups of 64 + 36 channels, 21 samples = 8 + 8 + 5
    (9, 20, 20, 20),  # rows of 400: forward groups of 3 channels, backward one at a time
    (4, 18, 10, 10),  # rows of 100, 4 samples: one channel at a time
    # (N, C, D, H, W)
    (2, 3, 3, 4, 5),
    (3, 17, 2, 3, 3),
    (2, 2, 9, 23, 21),  # stripe path, M = 8694
]

#: A smaller table for the tests that make many calls per shape (threads, out=, ...).
PATH_SHAPES = [
    (7, 3),
    (40000, 3),
    (3, 5, 1),
    (4, 3, 7),
    (2, 3, 5003),
    (3, 17, 4099),
    (9, 20, 5, 3),
    (70, 2, 31, 31),
    (200, 37, 7, 7),
    (2, 3, 3, 4, 5),
]


def shape_id(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def to_layout(a: np.ndarray, layout: str) -> np.ndarray:
    """An NCHW array in `layout`, C-contiguous (a copy for NHWC)."""
    if layout == "NCHW" or a.ndim == 2:
        return np.ascontiguousarray(a)
    return np.ascontiguousarray(np.moveaxis(a, 1, -1))


def layout_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    """`shape` given in NCHW terms, as the array shape in `layout`."""
    if layout == "NCHW" or len(shape) == 2:
        return tuple(shape)
    return (shape[0], *shape[2:], shape[1])


def channel_axis(ndim: int, layout: str) -> int:
    return 1 if layout == "NCHW" else ndim - 1


def make_data(
    shape: tuple[int, ...],
    dtype,
    layout: str = "NCHW",
    *,
    seed: int = 0,
    loc: float = 3.0,
    scale: float = 2.5,
) -> np.ndarray:
    """Random data of NCHW `shape` in `layout` with per-channel nonzero means and scales.

    Channel c has mean about ``loc * u_c`` (u_c in [-1, -0.5] or [0.5, 1]) and standard
    deviation about ``scale * s_c`` (s_c in [0.5, 1.5]): nonzero mean, non-unit scale,
    different from channel to channel.
    """
    rng = np.random.default_rng(seed)
    c = shape[1]
    means = loc * rng.uniform(0.5, 1.0, c) * rng.choice([-1.0, 1.0], c)
    stds = scale * rng.uniform(0.5, 1.5, c)
    bshape = [1] * len(shape)
    bshape[1] = c
    a = rng.standard_normal(shape) * stds.reshape(bshape) + means.reshape(bshape)
    return to_layout(a.astype(dtype), layout)


def make_vector(c: int, seed: int, *, loc: float = 1.0, spread: float = 0.5) -> np.ndarray:
    """A float64 (C,) vector (weights, biases, running statistics) with varied values."""
    rng = np.random.default_rng(seed)
    return loc + spread * rng.uniform(-1.0, 1.0, c)


# ------------------------------------------------------------------ tolerances

RTOL = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 1e-5}


def tol(dtype) -> float:
    """Relative tolerance of outputs in `dtype`."""
    return RTOL[np.dtype(dtype)]


#: Statistics (mean, var, invstd, dweight, dbias) are float64 accumulations whatever the
#: input dtype (API.md), so they are held to float64's tolerance.
STATS_RTOL = RTOL[np.dtype(np.float64)]


@dataclass(frozen=True)
class Case:
    """What a failure message must name."""

    backend: str | None
    dtype: object
    shape: tuple[int, ...]
    layout: str
    extra: str = ""

    def __str__(self) -> str:
        text = (
            f"backend={self.backend} dtype={np.dtype(self.dtype).name} "
            f"shape={tuple(self.shape)} layout={self.layout}"
        )
        return f"{text} {self.extra}".rstrip()


def assert_close(name: str, actual, expected, rtol: float, case: Case, bound=None) -> None:
    """Assert ``|actual - expected| <= rtol * bound`` elementwise.

    `bound` is the scale of the computation that produced `expected` (for example
    ``|x - mean| * |scale| + |bias|`` summed term by term): it broadcasts against
    `expected` and defaults to ``|expected|`` (a plain relative check). A small floor of
    ``rtol * 1e-300`` keeps exact zeros comparable.
    """
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (
        f"{name}: shape {actual.shape} != expected {expected.shape} [{case}]"
    )
    bound = np.abs(expected) if bound is None else np.asarray(bound, dtype=np.float64)
    err = np.abs(actual - expected)
    limit = np.broadcast_to(rtol * np.maximum(bound, 1e-300), err.shape)
    bad = ~(err <= limit)
    if bad.any():
        i = np.unravel_index(np.argmax(np.where(bad, err / limit, 0.0)), bad.shape)
        raise AssertionError(
            f"{name} differs from the reference at {bad.sum()} of {bad.size} positions "
            f"[{case}]: worst at index {tuple(int(j) for j in i)}: got {actual[i]!r}, "
            f"expected {expected[i]!r}, error {err[i]:.3e} > allowed {limit[i]:.3e} "
            f"(rtol {rtol:g})"
        )


def assert_same_bits(name: str, a: np.ndarray, b: np.ndarray, case: Case) -> None:
    """Assert two arrays are bitwise identical (dtype, shape, every bit, NaNs included)."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, (
        f"{name}: {a.dtype}{a.shape} vs {b.dtype}{b.shape} [{case}]"
    )
    same = a.view(np.uint8) == b.view(np.uint8) if a.size else np.array(True)
    if not np.all(same):
        diff = np.flatnonzero(np.ascontiguousarray(a).ravel() != np.ascontiguousarray(b).ravel())
        raise AssertionError(
            f"{name} is not bitwise identical [{case}]: {diff.size} values differ, first at "
            f"flat index {diff[:1].tolist()}"
        )


def per_channel(a: np.ndarray, layout: str) -> np.ndarray:
    """`a` as float64 (C, M)."""
    axis = channel_axis(a.ndim, layout)
    m = np.moveaxis(np.asarray(a, dtype=np.float64), axis, 0)
    return m.reshape(m.shape[0], -1)


def bcast(v: np.ndarray, ndim: int, layout: str) -> np.ndarray:
    """Shape a (C,) vector to broadcast along the channel axis of an `ndim` array."""
    shape = [1] * ndim
    shape[channel_axis(ndim, layout)] = -1
    return np.asarray(v, dtype=np.float64).reshape(shape)


def normalize_bound(x, mean, invstd, weight, bias, layout) -> np.ndarray:
    """Error scale of ``y = (x - mean) * invstd * weight + bias``, elementwise."""
    w = np.ones_like(mean) if weight is None else np.asarray(weight, dtype=np.float64)
    b = np.zeros_like(mean) if bias is None else np.asarray(bias, dtype=np.float64)
    nd = x.ndim
    k = bcast(np.abs(invstd * w), nd, layout)
    xa = np.abs(np.asarray(x, dtype=np.float64))
    return (xa + bcast(np.abs(mean), nd, layout)) * k + bcast(np.abs(b), nd, layout)


def backward_bounds(dy, x, mean, invstd, weight, layout):
    """Error scales of (dx, dweight, dbias) of the training backward."""
    w = np.ones_like(mean) if weight is None else np.asarray(weight, dtype=np.float64)
    dyf, xf = per_channel(dy, layout), per_channel(x, layout)
    m = xf.shape[1]
    ady, axm = np.abs(dyf), np.abs(xf) + np.abs(mean)[:, None]
    sum_ady = ady.sum(axis=1)
    sum_adyx = (ady * axm).sum(axis=1)
    k = bcast(np.abs(w * invstd), x.ndim, layout)
    per = (sum_ady / m)[:, None] + axm * (invstd**2 * sum_adyx / m)[:, None]
    dx_bound = k * (np.abs(np.asarray(dy, dtype=np.float64)) + from_per_channel(per, x, layout))
    return dx_bound, sum_adyx * invstd, sum_ady


def from_per_channel(per: np.ndarray, like: np.ndarray, layout: str) -> np.ndarray:
    """Inverse of `per_channel`: a (C, M) array back onto the shape of `like`."""
    axis = channel_axis(like.ndim, layout)
    moved = np.moveaxis(np.empty(like.shape, dtype=np.uint8), axis, 0).shape
    return np.moveaxis(per.reshape(moved), 0, axis)
