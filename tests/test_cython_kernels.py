"""Kernel-level tests of the Cython/OpenMP backend against the float64 NumPy reference.

These tests call the backend table of ``fastbn/backends/CONTRACT.md`` directly on the two
canonical views (``(N, C, S)`` for ``"nchw"``, ``(R, C)`` for ``"nhwc"``); they do not use
fastbn's public API. Every failure message names the kernel, layout, dtype and shape.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastbn import reference as ref
from fastbn.backends import cython_cpu

pytestmark = pytest.mark.skipif(
    not cython_cpu.is_available(), reason=cython_cpu.unavailable_reason() or "unavailable"
)

KERNELS = cython_cpu.KERNEL_NAMES
LAYOUTS = ("nchw", "nhwc")
DTYPES = (np.float32, np.float64)
RTOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}
EPS = 1e-5

# Shapes chosen around the fixed grid: C=1, M=1 and 2, odd sizes, sizes that do not divide
# the chunks (4096 values per NCHW chunk, 32768 // C rows per NHWC chunk), NCHW channels cut
# into several stripes (C < 16 and M >= 32 chunks), NHWC stripes with a short last one,
# NHWC with C larger than a chunk (one row per chunk), NCHW channels (whole, and in
# stripes) and NHWC stripes read as interleaved streams.
NCHW_SHAPES = [
    (1, 1, 1),
    (1, 1, 2),
    (2, 1, 1),
    (2, 3, 1),
    (3, 1, 5),
    (5, 7, 3),
    (4, 33, 17),
    (2, 16, 4097),
    (3, 5, 4095),
    (8, 20, 513),
    (3, 2, 50001),
    (7, 3, 30011),
    (1, 1, 600_001),
    (16, 16, 1100),
    (100, 2, 1400),
    (160, 26, 49),  # short rows: training backward groups of 8 channels, forward of 16
    (9, 20, 400),  # long rows: forward groups of 3 channels, backward one channel at a time
    (4, 18, 100),  # few samples: one channel at a time
]
NHWC_SHAPES = [
    (1, 1),
    (2, 1),
    (1, 3),
    (2, 5),
    (5, 7),
    (17, 3),
    (1000, 5),
    (4097, 2),
    (300, 1),
    (70_001, 3),
    (33_000, 64),
    (100, 8193),
    (3, 40_000),
    (2049, 129),
    (300, 512),  # rows 2 KiB apart (float32): chunks read in row tiles
    (1600, 2000),
]
CASES = [("nchw", s) for s in NCHW_SHAPES] + [("nhwc", s) for s in NHWC_SHAPES]


def _case_id(case: tuple[str, tuple[int, ...]]) -> str:
    layout, shape = case
    return f"{layout}-{'x'.join(map(str, shape))}"


def _what(kernel: str, layout: str, x: np.ndarray, extra: str = "") -> str:
    text = f"kernel={kernel} layout={layout} dtype={x.dtype} shape={x.shape}"
    return f"{text} {extra}".rstrip()


def _channels(layout: str, shape: tuple[int, ...]) -> int:
    return shape[1]


def _bcast(v: np.ndarray, layout: str) -> np.ndarray:
    """Shape a (C,) vector to broadcast against the canonical view."""
    return v[None, :, None] if layout == "nchw" else v[None, :]


def _data(
    shape: tuple[int, ...],
    layout: str,
    dtype: type,
    seed: int,
    offset: float = 3.0,
    spread: float = 2.0,
) -> np.ndarray:
    """Random data with a different mean and scale on every channel."""
    rng = np.random.default_rng(seed)
    c = _channels(layout, shape)
    loc = offset * rng.uniform(-1, 1, c)
    scale = spread * rng.uniform(0.5, 1.5, c)
    x = rng.standard_normal(shape) * _bcast(scale, layout) + _bcast(loc, layout)
    return np.ascontiguousarray(x, dtype=dtype)


def _params(c: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed + 1000)
    return rng.uniform(0.5, 1.5, c), rng.uniform(-1, 1, c)


def _close(
    got: np.ndarray, want: np.ndarray, rtol: float, what: str, atol: np.ndarray | float = 0.0
) -> None:
    """Assert `|got - want| <= rtol*|want| + max(atol, rtol*max|want|)` elementwise."""
    want = np.asarray(want, dtype=np.float64)
    got = np.asarray(got, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    floor = rtol * float(np.max(np.abs(want))) if want.size else 0.0
    bound = rtol * np.abs(want) + np.maximum(atol, floor)
    err = np.abs(got - want)
    bad = ~(err <= bound)
    if np.any(bad):
        i = np.unravel_index(np.argmax(np.where(bad, err - bound, -np.inf)), want.shape)
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {want.size} values off (rtol={rtol}); worst at "
            f"{tuple(int(j) for j in i)}: got {got[i]!r}, want {want[i]!r}, bound {bound[i]!r}"
        )


def run(
    kernel: str,
    layout: str,
    x: np.ndarray,
    nthreads: int,
    *,
    dy: np.ndarray | None = None,
    inplace: bool = False,
    seed: int = 0,
    module: ModuleType | None = None,
) -> dict[str, np.ndarray]:
    """Call one kernel of the table with deterministic parameters; return its outputs.

    `module` calls that compiled extension directly instead of the backend's table.
    """
    if module is None:
        k = cython_cpu.kernels(layout)[kernel]
    else:
        k = getattr(module, f"{layout}_{kernel}")
    c = x.shape[1]
    weight, bias = _params(c, seed)
    mean, var = ref.moments(x)
    invstd = 1.0 / np.sqrt(var + EPS)
    if kernel == "stats":
        out = {"mean": np.empty(c), "var": np.empty(c)}
        k(x, out["mean"], out["var"], nthreads)
    elif kernel == "train_forward":
        y = x if inplace else np.empty_like(x)
        out = {"y": y, "mean": np.empty(c), "var": np.empty(c), "invstd": np.empty(c)}
        k(x, weight, bias, EPS, y, out["mean"], out["var"], out["invstd"], nthreads)
    elif kernel == "normalize":
        y = x if inplace else np.empty_like(x)
        out = {"y": y}
        k(x, mean, weight * invstd, bias, y, nthreads)
    elif kernel == "backward_reduce":
        assert dy is not None
        out = {"sum_dy": np.empty(c), "sum_dy_xmu": np.empty(c)}
        k(dy, x, mean, out["sum_dy"], out["sum_dy_xmu"], nthreads)
    elif kernel == "backward_train":
        assert dy is not None
        dx = dy if inplace else np.empty_like(x)
        out = {"dx": dx, "sum_dy": np.empty(c), "sum_dy_xmu": np.empty(c)}
        k(dy, x, mean, invstd, weight, dx, out["sum_dy"], out["sum_dy_xmu"], nthreads)
    else:  # pragma: no cover - the parametrization only uses the table's keys
        raise KeyError(kernel)
    return out


def expected(
    kernel: str, layout: str, x: np.ndarray, *, dy: np.ndarray | None = None, seed: int = 0
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Reference outputs (float64) and, per output, the absolute error floor to allow."""
    c = x.shape[1]
    weight, bias = _params(c, seed)
    mean, var = ref.moments(x)
    invstd = 1.0 / np.sqrt(var + EPS)
    xf = x.astype(np.float64)
    axes = (0, 2) if layout == "nchw" else (0,)
    if kernel == "stats":
        return {"mean": mean, "var": var}, {}
    # float64 data: y = (x - mean) * scale + bias is only known to ~eps64*|x|*|scale| when
    # |mean| >> std, so judge it against the size of its terms. float32 data: the float64
    # maths must give y to float32 rounding, so no such floor.
    scale = _bcast(weight * invstd, layout)
    y_floor = np.abs(scale) * (np.abs(xf) + np.abs(_bcast(mean, layout)))
    y_floor = y_floor + np.abs(_bcast(bias, layout))
    if x.dtype != np.float64:
        y_floor = np.zeros_like(y_floor)
    if kernel == "train_forward":
        y, m, inv = ref.train_forward(x, weight, bias, EPS)
        return {"y": y, "mean": m, "var": var, "invstd": inv}, {"y": y_floor}
    if kernel == "normalize":
        y = (xf - _bcast(mean, layout)) * scale + _bcast(bias, layout)
        return {"y": y}, {"y": y_floor}
    assert dy is not None
    dyf = dy.astype(np.float64)
    prod = dyf * (xf - _bcast(mean, layout))
    sums = {"sum_dy": dyf.sum(axis=axes), "sum_dy_xmu": prod.sum(axis=axes)}
    # Sums that cancel are judged against the sum of the absolute values of their terms.
    floors = {"sum_dy": np.abs(dyf).sum(axis=axes), "sum_dy_xmu": np.abs(prod).sum(axis=axes)}
    if kernel == "backward_reduce":
        return sums, floors
    dx, _, _ = ref.backward(dy, x, mean, invstd, weight)
    # dx cancels its three terms (exactly, when M == 2): judge it against their size.
    m = x.size // c
    k = _bcast(weight * invstd, layout)
    proj = _bcast(invstd**2 * sums["sum_dy_xmu"] / m, layout)
    terms = np.abs(dyf) + np.abs(_bcast(sums["sum_dy"] / m, layout))
    floors["dx"] = np.abs(k) * (terms + np.abs((xf - _bcast(mean, layout)) * proj))
    return {"dx": dx, **sums}, floors


def _check(kernel: str, layout: str, x: np.ndarray, nthreads: int, **kw) -> None:
    dy = kw.pop("dy", None)
    got = run(kernel, layout, x.copy(), nthreads, dy=None if dy is None else dy.copy(), **kw)
    want, floors = expected(kernel, layout, x, dy=dy)
    rtol = RTOL[x.dtype]
    for name, value in want.items():
        what = _what(kernel, layout, x, f"output={name} nthreads={nthreads}")
        if name in ("y", "dx"):
            assert got[name].dtype == x.dtype, what
        atol = rtol * floors[name] if name in floors else 0.0
        _close(got[name], value, rtol, what, atol)


# ---------------------------------------------------------------------------------------
# Against the reference
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("kernel", KERNELS)
def test_matches_reference(kernel: str, case: tuple[str, tuple[int, ...]], dtype: type) -> None:
    layout, shape = case
    x = _data(shape, layout, dtype, seed=1)
    dy = _data(shape, layout, dtype, seed=2, offset=0.5, spread=1.0)
    _check(kernel, layout, x, 2, dy=dy)


def test_grid_covers_stripes() -> None:
    """The shape lists above really exercise the striped and multi-chunk paths."""
    from fastbn import _cython_kernels as ext

    nchw = [ext.grid("nchw", s) for s in NCHW_SHAPES]
    nhwc = [ext.grid("nhwc", s) for s in NHWC_SHAPES]
    assert any(g["stripes"] > 2 for g in nchw)
    assert any(g["stripes"] == 2 for g in nchw)
    assert any(
        g["fused"] and s[0] * s[2] > g["chunk"] for g, s in zip(nchw, NCHW_SHAPES, strict=True)
    )
    assert any(
        g["stripes"] > 2 and s[0] % g["stripe"] for g, s in zip(nhwc, NHWC_SHAPES, strict=True)
    )
    assert any(g["chunk"] == 1 for g in nhwc)
    # Short NCHW rows: several channels per fused unit, and several units.
    assert any(g["group"] > 1 for g in nchw)
    # ... also for ResNet's last stage at batch 512 (25088 values per channel), with groups
    # of about NCHW_GROUP_VALUES values per sample.
    assert ext.grid("nchw", (512, 512, 49))["group"] > 1
    assert ext.grid("nchw", (128, 512, 49))["group"] * 49 >= 1024 - 49
    assert any(1 < g["group"] < s[1] for g, s in zip(nchw, NCHW_SHAPES, strict=True))
    # The training backward's groups hold both dy and x: smaller ones, never below 3 (or the
    # forward's group) channels, and tested.
    assert any(1 < g["backward_group"] < g["group"] for g in nchw)
    for shape in ((128, 512, 49), (128, 512, 196), (1024, 64, 49), *NCHW_SHAPES):
        g = ext.grid("nchw", shape)
        n, _, s = shape
        assert g["backward_group"] <= g["group"], shape
        assert g["backward_group"] * 2 * n * s <= 131072 or g["backward_group"] <= 3, shape
        assert g["backward_group"] > 1 or g["group"] == 1 or s >= 320, shape
    # Rows of 64 values or more: grouped from 8 samples on, by the backward below 320.
    assert ext.grid("nchw", (9, 20, 400))["group"] > 1
    assert ext.grid("nchw", (9, 20, 400))["backward_group"] == 1
    assert ext.grid("nchw", (9, 20, 196))["backward_group"] > 1
    assert ext.grid("nchw", (4, 18, 100))["group"] == 1
    assert ext.grid("nchw", (4, 18, 49))["group"] > 1
    # Channels read as interleaved streams, whole and in stripes.
    assert any(g["streams"] and g["fused"] and g["group"] == 1 for g in nchw)
    assert any(g["streams"] and g["stripes"] > 1 for g in nchw)
    assert any(g["streams"] > 1 and g["chunk"] > 1 for g in nhwc)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layout=st.sampled_from(LAYOUTS),
    dims=st.tuples(st.integers(1, 9), st.integers(1, 12), st.integers(1, 700)),
    dtype=st.sampled_from(DTYPES),
    kernel=st.sampled_from(KERNELS),
    offset=st.sampled_from([0.0, 1.0, 100.0]),
    seed=st.integers(0, 2**16),
)
def test_matches_reference_hypothesis(
    layout: str,
    dims: tuple[int, int, int],
    dtype: type,
    kernel: str,
    offset: float,
    seed: int,
) -> None:
    n, c, s = dims
    shape = (n, c, s) if layout == "nchw" else (n * s, c)
    x = _data(shape, layout, dtype, seed=seed, offset=offset)
    dy = _data(shape, layout, dtype, seed=seed + 1, offset=0.5, spread=1.0)
    _check(kernel, layout, x, 2, dy=dy)


# ---------------------------------------------------------------------------------------
# Determinism, in-place, numerics
# ---------------------------------------------------------------------------------------
BIG_CASES = [
    ("nchw", (3, 2, 50001)),
    ("nchw", (7, 3, 30011)),
    ("nchw", (4, 33, 1025)),
    ("nchw", (2, 16, 4097)),
    ("nhwc", (70_001, 3)),
    ("nhwc", (33_000, 64)),
    ("nhwc", (100, 8193)),
    ("nhwc", (3, 40_000)),
    ("nhwc", (2049, 129)),
    ("nhwc", (1000, 512)),  # rows 2 KiB apart: chunks read in row tiles
    # Short rows: fused NCHW work units are groups of channels (two uneven groups here).
    ("nchw", (64, 40, 49)),
    # ... with a number of samples that is not a multiple of the group's tile of 8.
    ("nchw", (75, 40, 49)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", BIG_CASES, ids=_case_id)
@pytest.mark.parametrize("kernel", KERNELS)
def test_bitwise_identical_across_thread_counts(
    kernel: str, case: tuple[str, tuple[int, ...]], dtype: type
) -> None:
    layout, shape = case
    x = _data(shape, layout, dtype, seed=3)
    dy = _data(shape, layout, dtype, seed=4, offset=0.5, spread=1.0)
    base = run(kernel, layout, x, 1, dy=dy)
    for nthreads in (2, 3, 8):
        other = run(kernel, layout, x, nthreads, dy=dy)
        for name, value in base.items():
            what = _what(kernel, layout, x, f"output={name} nthreads=1 vs {nthreads}")
            assert value.tobytes() == other[name].tobytes(), what


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", BIG_CASES[:3] + BIG_CASES[4:6] + CASES[:3], ids=_case_id)
@pytest.mark.parametrize("kernel", ["train_forward", "normalize", "backward_train"])
def test_in_place(kernel: str, case: tuple[str, tuple[int, ...]], dtype: type) -> None:
    """`y is x` (forward) and `dx is dy` (backward) give the out-of-place bits."""
    layout, shape = case
    x = _data(shape, layout, dtype, seed=5)
    dy = _data(shape, layout, dtype, seed=6, offset=0.5, spread=1.0)
    apart = run(kernel, layout, x.copy(), 2, dy=dy.copy())
    xi, dyi = x.copy(), dy.copy()
    inplace = run(kernel, layout, xi, 2, dy=dyi, inplace=True)
    written = inplace["dx"] if kernel == "backward_train" else inplace["y"]
    assert written is (dyi if kernel == "backward_train" else xi)
    for name, value in apart.items():
        what = _what(kernel, layout, x, f"output={name} in-place")
        assert value.tobytes() == inplace[name].tobytes(), what


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize(
    "case",
    [("nchw", (4, 2, 2**18)), ("nchw", (2, 40, 5000)), ("nhwc", (2**19, 3))],
    ids=_case_id,
)
def test_large_mean_small_std(case: tuple[str, tuple[int, ...]], dtype: type) -> None:
    """|mean|/std = 1e5: statistics stay within 1e-6 (float32 data) of float64."""
    layout, shape = case
    rng = np.random.default_rng(7)
    x = np.ascontiguousarray(1e5 + rng.standard_normal(shape), dtype=dtype)
    out = run("stats", layout, x, 2)
    mean, var = ref.moments(x)
    rtol = 1e-6 if dtype == np.float32 else 1e-12
    _close(out["mean"], mean, rtol, _what("stats", layout, x, "mean, |mean|/std=1e5"))
    np.testing.assert_allclose(
        out["var"], var, rtol=rtol, err_msg=_what("stats", layout, x, "var, |mean|/std=1e5")
    )
    fwd = run("train_forward", layout, x, 2)
    want, floors = expected("train_forward", layout, x)
    rtol = RTOL[x.dtype]
    what = _what("train_forward", layout, x, "y, |mean|/std=1e5")
    _close(fwd["y"], want["y"], rtol, what, rtol * floors["y"])


def test_var_is_zero_for_constant_channels() -> None:
    for layout, shape in (("nchw", (3, 2, 9000)), ("nhwc", (9000, 5))):
        for dtype in DTYPES:
            x = np.full(shape, 0.1, dtype=dtype)
            out = run("stats", layout, x, 2)
            what = _what("stats", layout, x)
            assert np.all(out["var"] == 0.0), what
            assert np.all(out["mean"] == np.float64(dtype(0.1))), what


# ---------------------------------------------------------------------------------------
# Concurrency, errors, build information, no JIT
# ---------------------------------------------------------------------------------------
def test_concurrent_python_threads() -> None:
    """8 Python threads calling kernels at once get the serial, single-call results."""
    jobs: list[tuple[str, str, np.ndarray, np.ndarray]] = []
    for i in range(24):
        layout, shape = BIG_CASES[i % len(BIG_CASES)]
        dtype = DTYPES[i % 2]
        kernel = KERNELS[i % len(KERNELS)]
        jobs.append(
            (
                kernel,
                layout,
                _data(shape, layout, dtype, seed=100 + i),
                _data(shape, layout, dtype, seed=200 + i, offset=0.5, spread=1.0),
            )
        )
    serial = [run(k, lay, x, 2, dy=dy) for k, lay, x, dy in jobs]

    def work(job: tuple[str, str, np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
        k, lay, x, dy = job
        return run(k, lay, x, 2, dy=dy)

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(work, jobs * 2))
    for (k, lay, x, _), want, got in zip(jobs * 2, serial * 2, results, strict=True):
        for name, value in want.items():
            what = _what(k, lay, x, f"output={name} concurrent")
            assert value.tobytes() == got[name].tobytes(), what


def _builds() -> list[ModuleType]:
    """The portable build, then every wider build (v3, v4) this CPU can run."""
    mods = [importlib.import_module("fastbn._cython_kernels")]
    for level in ("v3", "v4"):
        if not mods[0].cpu_has_x86_64(level):
            break
        try:
            mods.append(importlib.import_module(f"fastbn._cython_kernels_{level}"))
        except ImportError:
            break
    return mods


@pytest.mark.skipif(len(_builds()) < 2, reason="no x86-64-v3 build or CPU without AVX2")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", BIG_CASES + CASES[:8], ids=_case_id)
@pytest.mark.parametrize("kernel", KERNELS)
def test_simd_builds_give_the_same_bits(
    kernel: str, case: tuple[str, tuple[int, ...]], dtype: type
) -> None:
    """The portable build and the x86-64-v3 and v4 builds agree bit for bit."""
    base, *wider = _builds()
    layout, shape = case
    x = _data(shape, layout, dtype, seed=11)
    dy = _data(shape, layout, dtype, seed=12, offset=0.5, spread=1.0)
    a = run(kernel, layout, x, 2, dy=dy, module=base)
    for module in wider:
        b = run(kernel, layout, x, 2, dy=dy, module=module)
        for name, value in a.items():
            what = _what(
                kernel, layout, x, f"output={name} {base.build_simd()} vs {module.build_simd()}"
            )
            assert value.tobytes() == b[name].tobytes(), what


def _unaligned_like(x: np.ndarray, shift: int) -> np.ndarray:
    """An empty array like `x` whose data starts `shift` elements after an aligned address."""
    buf = np.empty(x.size + 64, dtype=x.dtype)
    start = (-buf.ctypes.data // x.itemsize) % (64 // x.itemsize) + shift
    return buf[start : start + x.size].reshape(x.shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize(
    "case",
    [
        ("nchw", (3, 5, 37)),
        ("nchw", (2, 3, 4099)),
        ("nchw", (3, 2, 50001)),
        # rows walked as interleaved streams: normalize's row blocks, whole channels
        ("nchw", (16, 4, 300)),
        ("nchw", (9, 16, 1100)),
        # groups of short rows: runs of 21 * 49 values, whole lines streamed after the blocks
        ("nchw", (10, 26, 49)),
        ("nhwc", (301, 5)),
        ("nhwc", (97, 67)),
        ("nhwc", (40, 256)),
        ("nhwc", (5, 1000)),
    ],
    ids=_case_id,
)
@pytest.mark.parametrize("kernel", ["train_forward", "normalize", "backward_train"])
def test_streaming_stores_give_the_same_bits(
    kernel: str, case: tuple[str, tuple[int, ...]], dtype: type
) -> None:
    """Large outputs are written with streaming stores: same bits as ordinary stores.

    The size threshold is lowered to 0 so small arrays take the streaming path, with outputs
    at offsets from a cache-line-aligned address (heads up to a line, tails), on every
    build; in-place calls keep ordinary stores and still match.
    """
    layout, shape = case
    x = _data(shape, layout, dtype, seed=13)
    dy = _data(shape, layout, dtype, seed=14, offset=0.5, spread=1.0)
    want = run(kernel, layout, x, 2, dy=dy, module=_builds()[0])
    for module in _builds():
        old = module.stream_min_bytes(0)
        try:
            for shift in (0, 1, 3, 5, 9):
                for nthreads in (1, 2):
                    out = _unaligned_like(x, shift)
                    k = getattr(module, f"{layout}_{kernel}")
                    c = x.shape[1]
                    weight, bias = _params(c, 0)
                    mean, var = ref.moments(x)
                    invstd = 1.0 / np.sqrt(var + EPS)
                    if kernel == "train_forward":
                        v = [np.empty(c) for _ in range(3)]
                        k(x, weight, bias, EPS, out, *v, nthreads)
                    elif kernel == "normalize":
                        k(x, mean, weight * invstd, bias, out, nthreads)
                    else:
                        k(dy, x, mean, invstd, weight, out, np.empty(c), np.empty(c), nthreads)
                    name = "dx" if kernel == "backward_train" else "y"
                    what = _what(
                        kernel,
                        layout,
                        x,
                        f"output={name} streaming {module.build_simd()} shift={shift}",
                    )
                    assert out.tobytes() == want[name].tobytes(), what
            inplace = run(kernel, layout, x.copy(), 2, dy=dy.copy(), inplace=True, module=module)
            for name, value in want.items():
                what = _what(kernel, layout, x, f"output={name} in place, streaming on")
                assert value.tobytes() == inplace[name].tobytes(), what
        finally:
            module.stream_min_bytes(old)


@pytest.mark.parametrize("nbytes", [0, 1, 63, 64, 1000, 4099, 70_001])
def test_traffic_floor_moves_the_bytes(nbytes: int) -> None:
    """The bench's floor loop: ``y = x`` and ``dx = x | dy`` bit for bit, on every build,
    thread count, store kind (the threshold at 0 streams), output offset and read order."""
    rng = np.random.default_rng(nbytes)
    x = rng.integers(0, 256, nbytes, dtype=np.uint8)
    dy = rng.integers(0, 256, nbytes, dtype=np.uint8)
    for module in _builds():
        for threshold in (0, None):
            old = module.stream_min_bytes(threshold)
            try:
                for shift, nthreads, first in [(0, 1, True), (5, 2, False), (17, 3, True)]:
                    y, dx = (np.empty(nbytes + 128, np.uint8) for _ in range(2))
                    y = y[-y.ctypes.data % 64 + shift :][:nbytes]  # `shift` after a line
                    dx = dx[-dx.ctypes.data % 64 + shift + 3 :][:nbytes]
                    module.traffic_floor(x, dy, y, dx, first, nthreads)
                    what = f"{module.build_simd()} n={nbytes} shift={shift} threads={nthreads}"
                    assert np.array_equal(y, x), f"y {what}"
                    assert np.array_equal(dx, x | dy), f"dx {what}"
                    bits = module.traffic_floor(x, None, None, None, first, nthreads)
                    folded = np.bitwise_or.reduce(np.frombuffer(bits.to_bytes(8, "little"), "u1"))
                    assert folded == (np.bitwise_or.reduce(x) if first and nbytes else 0), what
            finally:
                module.stream_min_bytes(old)


def test_traffic_floor_checks_its_arrays() -> None:
    x = np.zeros(16, np.uint8)
    with pytest.raises(ValueError, match="needs dy"):
        cython_cpu.traffic_floor(x, None, None, x.copy(), False, 1)
    with pytest.raises(ValueError, match="y has 15 bytes"):
        cython_cpu.traffic_floor(x, None, x[:15].copy(), None, False, 1)


@pytest.mark.parametrize(
    "case",
    [
        ("nchw", (3, 5, 4099)),  # rows: scalar constants, streamed in row streams
        ("nchw", (2, 3, 50001)),  # a fused channel
        ("nchw", (64, 40, 49)),  # groups of 7x7 channels: per-position tables
        ("nhwc", (3000, 24)),  # wrapped per-channel tables
    ],
)
def test_float32_apply_is_x_times_scale_plus_shift(case: tuple[str, tuple[int, ...]]) -> None:
    """Every float32 apply (rows, channels, groups, NHWC; plain and streamed stores; every
    build) computes ``x * sc + (b - m * sc)`` in float64, rounded once: NumPy's float64
    arithmetic gives the expected bits. The data (|mean| / std ~ 3e4, scale 0.9) is where
    that formula and ``(x - m) * sc + b`` round differently, so a site computing the other
    one fails (checked below)."""
    layout, shape = case
    rng = np.random.default_rng(3)
    x = (1e5 + 3.0 * rng.standard_normal(shape)).astype(np.float32)
    c = shape[1]
    mean = 1e5 + rng.standard_normal(c)
    scale = 0.9 + 0.01 * rng.standard_normal(c)
    bias = rng.standard_normal(c)

    def expected(m: np.ndarray, sc: np.ndarray) -> np.ndarray:
        m, sc, b = (_bcast(v, layout) for v in (m, sc, bias))
        return (x.astype(np.float64) * sc + (b - m * sc)).astype(np.float32)

    want = expected(mean, scale)
    other = ((x - _bcast(mean, layout)) * _bcast(scale, layout) + _bcast(bias, layout)).astype(
        np.float32
    )
    assert np.count_nonzero(want != other) > 0  # the data tells the two formulas apart
    for module in _builds():
        for threshold in (0, None):
            old = module.stream_min_bytes(threshold)
            try:
                for nthreads in (1, 2):
                    what = _what("normalize", layout, x, f"{module.build_simd()} t={threshold}")
                    y = np.empty_like(x)
                    getattr(module, f"{layout}_normalize")(x, mean, scale, bias, y, nthreads)
                    assert y.tobytes() == want.tobytes(), what
                    v = [np.empty(c) for _ in range(3)]
                    w = scale / 100.0
                    getattr(module, f"{layout}_train_forward")(x, w, bias, EPS, y, *v, nthreads)
                    what = what.replace("normalize", "train_forward")
                    assert y.tobytes() == expected(v[0], w * v[2]).tobytes(), what
            finally:
                module.stream_min_bytes(old)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", [(16, 40, 49), (19, 9, 196), (9, 70, 25)], ids=str)
def test_tile_requests_give_the_same_bits(shape: tuple[int, ...], dtype: type) -> None:
    """Groups of short rows request the next tile of samples ahead of their reads or not
    (``tile_requests``, by default from the L2's size): the values are the same."""
    x = _data(shape, "nchw", dtype, seed=21)
    dy = _data(shape, "nchw", dtype, seed=22, offset=0.5, spread=1.0)
    for module in _builds():
        old = module.tile_requests()
        try:
            outs = {}
            for on in (True, False):
                assert module.tile_requests(on) in (True, False)
                for kernel in KERNELS:
                    outs[on, kernel] = run(kernel, "nchw", x, 2, dy=dy, module=module)
            for kernel in KERNELS:
                for name, value in outs[True, kernel].items():
                    what = _what(kernel, "nchw", x, f"output={name} {module.build_simd()}")
                    assert value.tobytes() == outs[False, kernel][name].tobytes(), what
        finally:
            module.tile_requests(old)
        assert module.tile_requests() == old


def test_stream_threshold() -> None:
    """The streaming threshold is positive by default, settable, and rejects negatives."""
    for module in _builds():
        old = module.stream_min_bytes()
        assert old > 0
        assert module.stream_min_bytes(123) == old
        assert module.stream_min_bytes(old) == 123
        with pytest.raises(ValueError, match="n must be >= 0"):
            module.stream_min_bytes(-1)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bad_arguments_raise(layout: str) -> None:
    table = cython_cpu.kernels(layout)
    shape = (2, 3, 4) if layout == "nchw" else (8, 3)
    x = np.ones(shape, dtype=np.float32)
    c3, c2 = np.ones(3), np.ones(2)
    with pytest.raises(ValueError, match="mean"):
        table["stats"](x, c2, c3, 1)
    with pytest.raises(ValueError, match="y"):
        bad = np.empty((*shape[:-1], shape[-1] + 1), dtype=np.float32)
        table["normalize"](x, c3, c3, c3, bad, 1)
    with pytest.raises((TypeError, ValueError)):
        table["normalize"](x, c3, c3, c3, np.empty(shape, dtype=np.float64), 1)
    with pytest.raises((TypeError, ValueError)):
        table["stats"](x.astype(np.int32), c3, c3, 1)
    with pytest.raises(ValueError):
        table["stats"](np.asfortranarray(np.ones((4, *shape), np.float32))[0], c3, c3, 1)
    with pytest.raises(ValueError, match="layout"):
        cython_cpu.kernels("NCHW")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_tables_specialized_to_a_dtype(layout: str) -> None:
    """``kernels(layout, dtype)`` holds the fused kernels' specializations: the same bits,
    only that dtype accepted."""
    shape = (2, 3, 40) if layout == "nchw" else (80, 3)
    c3 = np.ones(3)
    for dtype, other in ((np.float32, np.float64), (np.float64, np.float32)):
        table = cython_cpu.kernels(layout, np.dtype(dtype))
        assert table is cython_cpu.kernels(layout, np.dtype(dtype))
        assert set(table) == set(cython_cpu.KERNEL_NAMES)
        x = _data(shape, layout, dtype, seed=2)
        got, want = [np.empty(3), np.empty(3)], [np.empty(3), np.empty(3)]
        table["stats"](x, *got, 2)
        cython_cpu.kernels(layout)["stats"](x, *want, 2)
        np.testing.assert_array_equal(got, want, err_msg=f"{layout} {np.dtype(dtype)}")
        with pytest.raises(ValueError, match="dtype"):
            table["stats"](x.astype(other), c3, c3, 1)
    with pytest.raises(ValueError, match="float32 or float64"):
        cython_cpu.kernels(layout, np.dtype(np.float16))


def test_read_only_input() -> None:
    x = _data((4, 3, 100), "nchw", np.float32, seed=9)
    x.flags.writeable = False
    out = run("train_forward", "nchw", x, 2)
    want, _ = expected("train_forward", "nchw", x)
    _close(out["y"], want["y"], 1e-5, _what("train_forward", "nchw", x, "read-only x"))


def test_build_information() -> None:
    info = cython_cpu.build_info()
    assert info["available"] is True
    assert isinstance(info["openmp"], bool)
    assert info["max_threads"] >= 1
    assert info["reason"] == ""
    if not info["openmp"]:
        assert info["max_threads"] == 1
        assert info["openmp_version"] == 0
    if os.environ.get("FASTBN_EXPECT_OPENMP") == "1":
        assert info["openmp"], "built without OpenMP but FASTBN_EXPECT_OPENMP=1"


def test_cython_path_imports_no_numba() -> None:
    """Importing the backend and calling every kernel never imports (or compiles) numba."""
    code = textwrap.dedent(
        """
        import sys
        import numpy as np
        from fastbn.backends import cython_cpu
        assert cython_cpu.is_available(), cython_cpu.unavailable_reason()
        for layout, shape in (("nchw", (4, 3, 5000)), ("nhwc", (9000, 7))):
            t = cython_cpu.kernels(layout)
            for dtype in (np.float32, np.float64):
                x = np.random.default_rng(0).standard_normal(shape).astype(dtype)
                dy = np.ones_like(x)
                c = shape[1]
                m, v, s, q, w, b = (np.ones(c) for _ in range(6))
                t["stats"](x, m, v, 2)
                t["train_forward"](x, w, b, 1e-5, np.empty_like(x), m, v, s, 2)
                t["normalize"](x, m, s, b, np.empty_like(x), 2)
                t["backward_reduce"](dy, x, m, q, v, 2)
                t["backward_train"](dy, x, m, s, w, np.empty_like(x), q, v, 2)
        bad = sorted(k for k in sys.modules if k == "numba" or k.startswith("numba."))
        assert not bad, bad
        print("ok")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("ok")


@pytest.mark.parametrize("choice", ["baseline", "v3", "auto"])
def test_simd_choice_from_environment(choice: str) -> None:
    """FASTBN_CYTHON_SIMD caps the build: baseline, v3, or the widest the CPU runs (auto)."""
    code = "from fastbn.backends import cython_cpu; print(cython_cpu.build_info()['module'])"
    env = {**os.environ, "FASTBN_CYTHON_SIMD": choice}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    builds = _builds()
    cap = {"baseline": 1, "v3": 2, "auto": len(builds)}[choice]
    assert proc.stdout.strip() == builds[min(cap, len(builds)) - 1].__name__
