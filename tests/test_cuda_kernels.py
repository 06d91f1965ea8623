"""The cuda backend's kernels against the float64 reference, under numba's CUDA simulator.

Run in its own process with the simulator on before numba is imported::

    NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/test_cuda_kernels.py

Without the simulator (and without a GPU) the kernel tests skip; the tests of the
unavailable backend and of the lazy import run in every invocation (in subprocesses).
Shapes are small (the simulator runs every CUDA thread as a Python thread) but span several
chunks of the fixed reduction grid, with ragged last chunks and channel tiles.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from fastbn import reference as ref
from fastbn.backends import cuda as B

CUDA = B.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason=B.unavailable_reason() or "cuda unavailable")

# Two launch configurations with different block and grid sizes (block shapes (32, 1) vs
# (16, 1) for NHWC, 32 vs 16 threads for NCHW, 4 vs 3 blocks): results must be bitwise equal.
LAUNCH_A = B.LaunchConfig(threads=32, blocks=4)
LAUNCH_B = B.LaunchConfig(threads=16, blocks=3)

# Canonical shapes: (N, C, S) with M = N*S > 256 (several NCHW chunks of 256 values, the
# last one ragged), and (R, C) with R > 8 (several NHWC chunks of 8 rows) and C > 32
# (two channel tiles, the second ragged). Plus degenerate ones: one chunk, C = 1, M = 1.
SHAPES = {
    "nchw": [(3, 2, 101), (1, 1, 7), (2, 3, 5)],
    "nhwc": [(45, 37), (3, 1), (1, 4)],
}
DTYPES = [np.float32, np.float64]
RTOL = {np.float32: 1e-5, np.float64: 1e-12}


def _layout(kind: str) -> str:
    return "NCHW" if kind == "nchw" else "NHWC"


def _data(shape: tuple[int, ...], dtype: Any, seed: int, loc: float = 3.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * 2.0 + loc).astype(dtype)


def _close(actual: np.ndarray, desired: np.ndarray, rtol: float, what: str) -> None:
    desired = np.asarray(desired, dtype=np.float64)
    scale = float(np.max(np.abs(desired))) if desired.size else 1.0
    np.testing.assert_allclose(
        np.asarray(actual, dtype=np.float64),
        desired,
        rtol=rtol,
        atol=rtol * scale,
        err_msg=f"{what}: dtype={actual.dtype}, shape={actual.shape}",
    )


def _dev(a: np.ndarray) -> Any:
    return B.to_device(a)


def _f64(c: int) -> Any:
    return B.empty(c, np.float64)


def _run_all(kind: str, x: np.ndarray, dy: np.ndarray, launch: B.LaunchConfig | None) -> dict:
    """Run the five kernels on device arrays; return every output on the host."""
    k = B.kernels(kind, launch=launch)
    c = x.shape[1]
    rng = np.random.default_rng(7)
    weight = rng.uniform(0.5, 1.5, c)
    bias = rng.uniform(-1.0, 1.0, c)
    xd, dyd, wd, bd = _dev(x), _dev(dy), _dev(weight), _dev(bias)
    out: dict[str, np.ndarray] = {}

    mean, var = _f64(c), _f64(c)
    k["stats"](xd, mean, var, 1)
    out["mean"], out["var"] = B.to_host(mean), B.to_host(var)

    y, tm, tv, inv = B.empty(x.shape, x.dtype), _f64(c), _f64(c), _f64(c)
    k["train_forward"](xd, wd, bd, 1e-5, y, tm, tv, inv, 1)
    out["y"], out["tmean"], out["tvar"], out["invstd"] = map(B.to_host, (y, tm, tv, inv))

    scale = B.to_device(weight * 0.75)
    yn = B.empty(x.shape, x.dtype)
    k["normalize"](xd, tm, scale, bd, yn, 1)
    out["yn"] = B.to_host(yn)

    sd, sdx = _f64(c), _f64(c)
    k["backward_reduce"](dyd, xd, tm, sd, sdx, 1)
    out["sum_dy"], out["sum_dy_xmu"] = B.to_host(sd), B.to_host(sdx)

    dx, sd2, sdx2 = B.empty(x.shape, x.dtype), _f64(c), _f64(c)
    k["backward_train"](dyd, xd, tm, inv, wd, dx, sd2, sdx2, 1)
    out["dx"], out["sum_dy2"], out["sum_dy_xmu2"] = map(B.to_host, (dx, sd2, sdx2))
    out["weight"], out["bias"] = weight, bias
    return out


@pytest.fixture(scope="module")
def results() -> Callable[[str, tuple[int, ...], Any, B.LaunchConfig | None], tuple]:
    """Cache of ``_run_all`` results: each configuration is simulated once."""
    cache: dict = {}

    def get(kind, shape, dtype, launch=LAUNCH_A):
        key = (kind, shape, np.dtype(dtype).name, launch)
        if key not in cache:
            x = _data(shape, dtype, 1)
            dy = _data(shape, dtype, 2, loc=0.5)
            cache[key] = (x, dy, _run_all(kind, x, dy, launch))
        return cache[key]

    return get


CASES = [(kind, shape) for kind, shapes in SHAPES.items() for shape in shapes]


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize(("kind", "shape"), CASES)
def test_kernels_match_reference(kind: str, shape: tuple, dtype: Any, results) -> None:
    x, dy, r = results(kind, shape, dtype)
    layout = _layout(kind)
    rtol = RTOL[dtype]
    mean, var = ref.moments(x, layout)
    # Statistics are float64 whatever the input dtype: compare them at float64 precision.
    _close(r["mean"], mean, 1e-12, "stats mean")
    _close(r["var"], var, 1e-12, "stats var")
    _close(r["tmean"], mean, 1e-12, "train_forward mean")
    _close(r["tvar"], var, 1e-12, "train_forward var")
    _close(r["invstd"], 1.0 / np.sqrt(var + 1e-5), 1e-12, "train_forward invstd")
    y, _, _ = ref.train_forward(x, r["weight"], r["bias"], 1e-5, layout)
    assert r["y"].dtype == x.dtype
    _close(r["y"], y, rtol, "train_forward y")
    # normalize with scale = 0.75*weight: the reference with invstd*weight = 0.75*weight.
    shift = 1.0 / 0.75**2 - 1e-5
    yn = ref.normalize(
        x, r["tmean"], np.full(x.shape[1], shift), r["weight"], r["bias"], 1e-5, layout
    )
    _close(r["yn"], yn, rtol, "normalize y")
    dx, dweight, dbias = ref.backward(dy, x, r["tmean"], r["invstd"], r["weight"], layout)
    _close(r["sum_dy"], dbias, 1e-12, "backward_reduce sum_dy")
    _close(r["sum_dy_xmu"] * r["invstd"], dweight, 1e-12, "backward_reduce sum_dy_xmu")
    _close(r["sum_dy2"], dbias, 1e-12, "backward_train sum_dy")
    _close(r["sum_dy_xmu2"] * r["invstd"], dweight, 1e-12, "backward_train sum_dy_xmu")
    assert r["dx"].dtype == x.dtype
    _close(r["dx"], dx, rtol, "backward_train dx")


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("kind", ["nchw", "nhwc"])
def test_launch_configuration_does_not_change_results(kind: str, dtype: Any, results) -> None:
    shape = SHAPES[kind][0]
    _, _, a = results(kind, shape, dtype, LAUNCH_A)
    _, _, b = results(kind, shape, dtype, LAUNCH_B)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=f"{key}: {kind} {shape}")


@needs_cuda
@pytest.mark.parametrize("kind", ["nchw", "nhwc"])
def test_in_place(kind: str, results) -> None:
    shape = SHAPES[kind][0]
    x, dy, expected = results(kind, shape, np.float32)
    k = B.kernels(kind, launch=LAUNCH_A)
    c = x.shape[1]
    xd = B.to_device(x)
    w, b = B.to_device(expected["weight"]), B.to_device(expected["bias"])
    mean, var, inv = _f64(c), _f64(c), _f64(c)
    k["train_forward"](xd, w, b, 1e-5, xd, mean, var, inv, 1)  # y is x
    np.testing.assert_array_equal(B.to_host(xd), expected["y"])
    xd = B.to_device(x)
    dyd = B.to_device(dy)
    sd, sdx = _f64(c), _f64(c)
    k["backward_train"](dyd, xd, mean, inv, w, dyd, sd, sdx, 1)  # dx is dy
    np.testing.assert_array_equal(B.to_host(dyd), expected["dx"])
    k["normalize"](xd, mean, B.to_device(expected["weight"] * 0.75), b, xd, 1)  # y is x
    np.testing.assert_array_equal(B.to_host(xd), expected["yn"])


@needs_cuda
def test_device_arrays_stay_on_the_device(monkeypatch, results) -> None:
    """With device arrays in, no kernel copies anything to or from the host."""
    from numba import cuda

    kind, shape = "nhwc", SHAPES["nhwc"][0]
    x, dy, expected = results(kind, shape, np.float64)
    c = x.shape[1]
    xd, dyd = B.to_device(x), B.to_device(dy)
    w, b = B.to_device(expected["weight"]), B.to_device(expected["bias"])
    y, mean, var, inv, sd, sdx = B.empty(x.shape, x.dtype), *(_f64(c) for _ in range(5))
    dx = B.empty(x.shape, x.dtype)
    rm, rv = B.to_device(np.zeros(c, np.float32)), B.to_device(np.ones(c, np.float32))

    def forbidden(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("host transfer during a device-array call")

    array_type = type(xd)
    monkeypatch.setattr(array_type, "copy_to_host", forbidden)
    monkeypatch.setattr(cuda, "to_device", forbidden)
    k = B.kernels(kind, launch=LAUNCH_A)
    k["train_forward"](xd, w, b, 1e-5, y, mean, var, inv, 1)
    k["backward_train"](dyd, xd, mean, inv, w, dx, sd, sdx, 1)
    B.update_running(rm, rv, mean, var, 0.1, x.shape[0])
    ones = B.full(c, 1.0, np.float64)
    B.copy_into(ones, rm)
    monkeypatch.undo()

    for a in (y, dx, mean, inv, sd, rm, rv, ones):
        assert B.is_device_array(a)
        assert not isinstance(a, np.ndarray)
    np.testing.assert_array_equal(B.to_host(y), expected["y"])
    np.testing.assert_array_equal(B.to_host(dx), expected["dx"])
    np.testing.assert_array_equal(B.to_host(rm), np.ones(c, np.float32))


@needs_cuda
@pytest.mark.parametrize("kind", ["nchw", "nhwc"])
def test_numpy_arguments_are_staged(kind: str, results) -> None:
    """NumPy arguments go through the device and outputs come back (aliases too)."""
    shape = SHAPES[kind][0]
    x, dy, expected = results(kind, shape, np.float64)
    k = B.kernels(kind, launch=LAUNCH_A)
    c = x.shape[1]
    y = np.empty_like(x)
    mean, var, inv = np.empty(c), np.empty(c), np.empty(c)
    k["train_forward"](x, expected["weight"], expected["bias"], 1e-5, y, mean, var, inv, 1)
    np.testing.assert_array_equal(y, expected["y"])
    np.testing.assert_array_equal(mean, expected["tmean"])
    xc = x.copy()
    k["train_forward"](xc, expected["weight"], expected["bias"], 1e-5, xc, mean, var, inv, 1)
    np.testing.assert_array_equal(xc, expected["y"])
    dyc, sd, sdx = dy.copy(), np.empty(c), np.empty(c)
    k["backward_train"](dyc, x, mean, inv, expected["weight"], dyc, sd, sdx, 1)
    np.testing.assert_array_equal(dyc, expected["dx"])
    np.testing.assert_array_equal(sd, expected["sum_dy2"])


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
def test_update_running(dtype: Any) -> None:
    rng = np.random.default_rng(3)
    c, m, momentum = 37, 45, 0.1
    rm0, rv0 = rng.standard_normal(c).astype(dtype), rng.uniform(0.5, 2, c).astype(dtype)
    mean, var = rng.standard_normal(c), rng.uniform(0.5, 2, c)
    rm, rv = B.to_device(rm0), B.to_device(rv0)
    B.update_running(rm, rv, B.to_device(mean), B.to_device(var), momentum, m)
    # The CPU path's arithmetic, rounded once to the running statistics' dtype.
    em = ((1.0 - momentum) * rm0.astype(np.float64) + momentum * mean).astype(dtype)
    ev = ((1.0 - momentum) * rv0.astype(np.float64) + momentum * (var * (m / (m - 1)))).astype(
        dtype
    )
    np.testing.assert_array_equal(B.to_host(rm), em)
    np.testing.assert_array_equal(B.to_host(rv), ev)
    want_m, want_v = ref.update_running(rm0, rv0, mean, var, m, momentum)
    _close(B.to_host(rm), want_m, RTOL[dtype], "running_mean")
    _close(B.to_host(rv), want_v, RTOL[dtype], "running_var")


@needs_cuda
def test_large_mean_small_spread_float32() -> None:
    """|mean|/std = 1e5: float64 statistics keep every digit (E[x^2]-E[x]^2 would not)."""
    rng = np.random.default_rng(5)
    x = (1e5 + rng.standard_normal((2, 2, 300))).astype(np.float32)
    mean, var = _f64(2), _f64(2)
    B.kernels("nchw", launch=LAUNCH_A)["stats"](B.to_device(x), mean, var, 1)
    want_mean, want_var = ref.moments(x, "NCHW")
    _close(B.to_host(mean), want_mean, 1e-6, "mean")
    np.testing.assert_allclose(B.to_host(var), want_var, rtol=1e-6)


@needs_cuda
def test_helpers() -> None:
    a = np.arange(6.0).reshape(2, 3)
    d = B.to_device(a)
    assert B.is_device_array(d) and not B.is_device_array(a) and not B.is_device_array(1.0)
    assert B.as_device(d) is d
    out = np.empty_like(a)
    assert B.to_host(d, out) is out
    np.testing.assert_array_equal(out, a)
    f = B.full(5, 2.5, np.float32)
    np.testing.assert_array_equal(B.to_host(f), np.full(5, 2.5, np.float32))
    g = B.empty(5, np.float64)
    B.copy_into(f, g)
    np.testing.assert_array_equal(B.to_host(g), np.full(5, 2.5))
    with pytest.raises(ValueError, match="shapes differ"):
        B.copy_into(f, B.empty(4, np.float64))
    with pytest.raises(TypeError, match="device array"):
        B.as_device(a)
    with pytest.raises(ValueError, match="layout"):
        B.kernels("NCHW")
    cfg = B.default_launch()
    assert cfg.threads >= 1 and cfg.blocks >= 1
    with pytest.raises(ValueError):
        B.LaunchConfig(threads=0, blocks=1)


# ------------------------------------------------------------------ without CUDA


def _python(code: str, *, sim: bool) -> str:
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    if sim:
        env["NUMBA_ENABLE_CUDASIM"] = "1"
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return done.stdout


def test_import_does_not_touch_cuda() -> None:
    out = _python(
        """
        import sys
        import fastbn.backends.cuda as b
        print("numba.cuda" in sys.modules, b.NAME)
        """,
        sim=False,
    )
    assert out.split() == ["False", "cuda"]


def test_unavailable_without_gpu_or_simulator() -> None:
    out = _python(
        """
        import fastbn.backends.cuda as b
        print(b.is_available())
        print(b.unavailable_reason())
        try:
            b.kernels("nchw")["stats"]
        except RuntimeError as exc:
            print("raised:", exc)
        """,
        sim=False,
    )
    if out.startswith("True"):
        pytest.skip("a usable GPU is present")
    assert out.startswith("False")
    assert 'pip install "fastbn[cuda]"' in out
    assert "GPU" in out
    assert "raised:" in out


def test_simulator_makes_it_available() -> None:
    pytest.importorskip("numba_cuda")
    out = _python(
        "import fastbn.backends.cuda as b; print(b.is_available(), repr(b.unavailable_reason()))",
        sim=True,
    )
    assert out.split() == ["True", "''"]
