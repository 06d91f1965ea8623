"""``out=`` (fresh vs given output, in place, bad outputs) and memory order of inputs."""

from __future__ import annotations

import numpy as np
import pytest

import fastbn
from fastbn import reference as ref
from fastbn.backends import cython_cpu, numba_cpu

from .conftest import (
    PATH_SHAPES,
    Case,
    assert_close,
    assert_same_bits,
    backward_bounds,
    make_data,
    make_vector,
    normalize_bound,
    shape_id,
    tol,
)

path_shapes = pytest.mark.parametrize("shape", PATH_SHAPES, ids=shape_id)


def assert_in_place_close(name, got, fresh, case):
    """In place, the compiler may pick another loop version (its runtime alias check
    fails), which can round differently: the same numbers to the dtype's tolerance."""
    assert_close(name, got, fresh, tol(got.dtype), case, np.abs(fresh).max())


def forward_ops(backend, layout, c):
    """(name, f(x, out) -> y) for every op that writes an x-shaped output."""
    w, b = make_vector(c, 1), make_vector(c, 2, loc=0.0)
    rm, rv = make_vector(c, 3, loc=0.0, spread=2.0), make_vector(c, 4, loc=3.0)

    def train(x, out):
        return fastbn.batch_norm_train(x, w, b, layout=layout, out=out, backend=backend)[0]

    def training(x, out):
        return fastbn.batch_norm(
            x, None, None, w, b, True, layout=layout, out=out, backend=backend
        )

    def evaluate(x, out):
        return fastbn.batch_norm(x, rm, rv, w, b, False, layout=layout, out=out, backend=backend)

    return [("batch_norm_train", train), ("batch_norm(training)", training), ("eval", evaluate)]


# ------------------------------------------------------------------ out=


@path_shapes
def test_out_same_bits_as_fresh(backend, dtype, layout, shape):
    """A separate out= gives the very bits of a fresh output; out=x / out=dy work."""
    x = make_data(shape, dtype, layout)
    dy = make_data(shape, dtype, layout, seed=1, loc=0.2)
    c = shape[1]
    for name, op in forward_ops(backend, layout, c):
        case = Case(backend, dtype, x.shape, layout, name)
        fresh = op(x, None)
        out = np.full_like(x, np.nan)
        got = op(x, out)
        assert got is out, f"out= must be returned [{case}]"
        assert_same_bits("y (out=)", out, fresh, case)
        # in place: out=x
        xi = x.copy()
        got = op(xi, xi)
        assert got is xi, case
        assert_in_place_close("y (out=x)", xi, fresh, case)

    _, mean, invstd = fastbn.batch_norm_train(x, layout=layout, backend=backend)
    w = make_vector(c, 5)
    for training in (True, False):
        case = Case(backend, dtype, x.shape, layout, f"backward training={training}")

        def bwd(dy_, x_, out, training=training):
            return fastbn.batch_norm_backward(
                dy_,
                x_,
                mean,
                invstd,
                w,
                layout=layout,
                out=out,
                backend=backend,
                training=training,
            )

        fresh, fdw, fdb = bwd(dy, x, None)
        out = np.full_like(x, np.nan)
        got, dw, db = bwd(dy, x, out)
        assert got is out, case
        assert_same_bits("dx (out=)", out, fresh, case)
        assert_same_bits("dweight (out=)", dw, fdw, case)
        assert_same_bits("dbias (out=)", db, fdb, case)
        for target in ("dy", "x"):
            xi, dyi = x.copy(), dy.copy()
            o = dyi if target == "dy" else xi
            got, dw, db = bwd(dyi, xi, o)
            assert got is o, case
            assert_in_place_close(f"dx (out={target})", o, fresh, case)
            assert_same_bits(f"dweight (out={target})", dw, fdw, case)
            assert_same_bits(f"dbias (out={target})", db, fdb, case)


def line_offset_like(x: np.ndarray, shift: int) -> np.ndarray:
    """An empty array like `x` starting `shift` elements after a cache-line boundary."""
    buf = np.empty(x.size + 64, x.dtype)
    start = (-buf.ctypes.data // x.itemsize) % (64 // x.itemsize) + shift
    return buf[start : start + x.size].reshape(x.shape)


@pytest.mark.parametrize("shape", [(4, 67, 20, 20), (3, 5, 17, 17)], ids=shape_id)
def test_streaming_stores_same_bits(backend, dtype, layout, shape):
    """Outputs written with streaming stores (threshold 0) have the bits of ordinary stores,
    whatever the output's offset from a cache line (heads, blocks, tails; NHWC blocks
    crossing rows)."""
    x = make_data(shape, dtype, layout)
    dy = make_data(shape, dtype, layout, seed=1, loc=0.2)
    c = shape[1]
    w = make_vector(c, 1)
    _, mean, invstd = fastbn.batch_norm_train(x, layout=layout, backend=backend)
    ops = forward_ops(backend, layout, c)
    ops.append(
        (
            "backward",
            lambda x_, out: fastbn.batch_norm_backward(
                dy, x_, mean, invstd, w, layout=layout, out=out, backend=backend
            )[0],
        )
    )
    for name, op in ops:
        case = Case(backend, dtype, x.shape, layout, name)
        with fastbn.stream_threshold(1 << 62):
            want = op(x, None)
        with fastbn.stream_threshold(0):
            for shift in (0, 1, 3, 5, 9):
                out = line_offset_like(x, shift)
                op(x, out)
                assert_same_bits(f"streamed, {shift} values after a line", out, want, case)


def test_stream_threshold_set_get_and_bad_values():
    """The threshold is shared by both CPU backends; None restores the default; bad values
    raise and change nothing."""
    default = fastbn.get_stream_threshold()
    assert default == numba_cpu.DEFAULT_STREAM_MIN_BYTES > 0
    try:
        fastbn.set_stream_threshold(12345)
        assert fastbn.get_stream_threshold() == 12345
        if cython_cpu.is_available():
            assert cython_cpu.stream_min_bytes() == 12345
        for bad, exc in [(-1, ValueError), (1.5, TypeError), ("4", TypeError), (True, TypeError)]:
            with pytest.raises(exc, match="nbytes"):
                fastbn.set_stream_threshold(bad)
            assert fastbn.get_stream_threshold() == 12345
        fastbn.set_stream_threshold(None)
        assert fastbn.get_stream_threshold() == default
        if cython_cpu.is_available():
            assert cython_cpu.stream_min_bytes() == default
    finally:
        fastbn.set_stream_threshold(None)


def test_stream_threshold_context_restores_the_previous_value():
    default = fastbn.get_stream_threshold()
    with fastbn.stream_threshold(4096):
        assert fastbn.get_stream_threshold() == 4096
        if cython_cpu.is_available():
            assert cython_cpu.stream_min_bytes() == 4096
        with pytest.raises(RuntimeError, match="inside"), fastbn.stream_threshold(None):
            assert fastbn.get_stream_threshold() == default
            raise RuntimeError("inside")
        assert fastbn.get_stream_threshold() == 4096
    assert fastbn.get_stream_threshold() == default
    with pytest.raises(ValueError, match="nbytes"), fastbn.stream_threshold(-1):
        pass
    assert fastbn.get_stream_threshold() == default


def bad_outs(x: np.ndarray):
    """(id, out, message fragment) for outputs that must be refused."""
    other = np.float32 if x.dtype == np.float64 else np.float64
    big = np.zeros((x.shape[0], *x.shape[1:-1], 2 * x.shape[-1]), x.dtype)
    readonly = np.zeros_like(x)
    readonly.flags.writeable = False
    fortran = np.asfortranarray(np.zeros_like(x))
    return [
        ("shape", np.zeros((x.shape[0] + 1, *x.shape[1:]), x.dtype), "shape"),
        ("transposed-shape", np.zeros(x.shape[::-1], x.dtype), "shape"),
        ("dtype", np.zeros(x.shape, other), "dtype"),
        ("non-contiguous", big[..., ::2], "contiguous"),
        ("fortran", fortran, "contiguous"),
        ("read-only", readonly, "writ"),
        ("list", np.zeros_like(x).tolist(), "array"),
    ]


@pytest.mark.parametrize("shape", [(6, 3, 5, 7), (40, 3)], ids=shape_id)
def test_bad_out_raises_and_changes_nothing(backend, dtype, layout, shape):
    x = make_data(shape, dtype, layout)
    c = shape[1]
    x0 = x.copy()
    rm, rv = make_vector(c, 3, loc=0.0), make_vector(c, 4, loc=3.0)
    rm0, rv0 = rm.copy(), rv.copy()
    mean, invstd = np.zeros(c), np.ones(c)
    dy = make_data(shape, dtype, layout, seed=2)
    dy0 = dy.copy()
    for label, out, match in bad_outs(x):
        before = np.array(out, copy=True)
        calls = {
            "train": lambda out=out: fastbn.batch_norm_train(
                x, layout=layout, out=out, backend=backend
            ),
            "training": lambda out=out: fastbn.batch_norm(
                x, rm, rv, None, None, True, layout=layout, out=out, backend=backend
            ),
            "eval": lambda out=out: fastbn.batch_norm(
                x, rm, rv, layout=layout, out=out, backend=backend
            ),
            "backward": lambda out=out: fastbn.batch_norm_backward(
                dy, x, mean, invstd, layout=layout, out=out, backend=backend
            ),
        }
        for name, call in calls.items():
            case = Case(backend, dtype, x.shape, layout, f"{name} bad out={label}")
            with pytest.raises(ValueError, match=match):
                call()
            np.testing.assert_array_equal(x, x0, err_msg=f"x changed [{case}]")
            np.testing.assert_array_equal(dy, dy0, err_msg=f"dy changed [{case}]")
            np.testing.assert_array_equal(rm, rm0, err_msg=f"running_mean changed [{case}]")
            np.testing.assert_array_equal(rv, rv0, err_msg=f"running_var changed [{case}]")
            np.testing.assert_array_equal(np.asarray(out), before, err_msg=f"out changed [{case}]")


def test_out_partial_overlap_raises(backend, dtype, layout):
    """An out that shares memory with x (or dy) without being it is refused untouched."""
    shape = (4, 3, 6, 5)
    buf = make_data((8, 3, 6, 5), dtype, layout)
    x = buf[:4]
    out = buf[2:6]  # overlaps x by half, C-contiguous, right shape and dtype
    assert out.flags.c_contiguous and np.shares_memory(x, out)
    buf0 = buf.copy()
    c = shape[1]
    rm, rv = np.zeros(c), np.ones(c)
    case = Case(backend, dtype, x.shape, layout, "partial overlap")
    with pytest.raises(ValueError, match="overlap"):
        fastbn.batch_norm_train(x, layout=layout, out=out, backend=backend)
    with pytest.raises(ValueError, match="overlap"):
        fastbn.batch_norm(x, rm, rv, training=True, layout=layout, out=out, backend=backend)
    with pytest.raises(ValueError, match="overlap"):
        fastbn.batch_norm(x, rm, rv, layout=layout, out=out, backend=backend)
    np.testing.assert_array_equal(rm, 0.0, err_msg=str(case))
    np.testing.assert_array_equal(rv, 1.0, err_msg=str(case))
    # backward: out overlapping dy (x elsewhere) and overlapping x
    xx = make_data(shape, dtype, layout, seed=3)
    with pytest.raises(ValueError, match="overlap"):
        fastbn.batch_norm_backward(
            x, xx, np.zeros(c), np.ones(c), layout=layout, out=out, backend=backend
        )
    with pytest.raises(ValueError, match="overlap"):
        fastbn.batch_norm_backward(
            xx, x, np.zeros(c), np.ones(c), layout=layout, out=out, backend=backend
        )
    np.testing.assert_array_equal(buf, buf0, err_msg=f"buffer changed [{case}]")


def test_out_owning_its_memory_viewed_by_the_input_raises(backend, dtype, layout):
    """An out that owns its memory is refused when x (or dy) views it through other arrays
    (the ownership shortcut of the overlap check must not hide that)."""
    out = make_data((4, 3, 6, 5), dtype, layout).copy()
    before = out.copy()
    views = {"reversed": out[::-1], "through a view": out.reshape(-1)[::-1].reshape(out.shape)}
    c = out.shape[1]
    for label, x in views.items():
        case = Case(backend, dtype, x.shape, layout, f"x {label} of out")
        assert out.flags.owndata and not x.flags.owndata and x.base is not None
        with pytest.raises(ValueError, match="overlap"):
            fastbn.batch_norm(x, np.zeros(c), np.ones(c), layout=layout, out=out, backend=backend)
        with pytest.raises(ValueError, match="overlap"):
            fastbn.batch_norm_backward(
                x.copy(), x, np.zeros(c), np.ones(c), layout=layout, out=out, backend=backend
            )
        np.testing.assert_array_equal(out, before, err_msg=f"out changed [{case}]")


# ------------------------------------------------------------------ memory order


@pytest.mark.parametrize(
    "shape", [(4, 3, 5, 7), (3, 17, 4099), (70, 2, 31, 31), (2, 3, 3, 4, 5)], ids=shape_id
)
def test_other_memory_order_through_transposed_view(backend, dtype, shape):
    """Channels-last data handed over as NCHW via a transposed view (and vice versa):
    same numbers as a contiguous copy, output with the input's strides."""
    for stored, given in (("NHWC", "NCHW"), ("NCHW", "NHWC")):
        base = make_data(shape, dtype, stored, seed=4)
        # a view of `base` with the axes of `given`
        view = np.moveaxis(base, -1, 1) if stored == "NHWC" else np.moveaxis(base, 1, -1)
        assert not view.flags.c_contiguous
        contiguous = np.ascontiguousarray(view)
        dy = np.ascontiguousarray(make_data(shape, dtype, stored, seed=5))
        dy_view = np.moveaxis(dy, -1, 1) if stored == "NHWC" else np.moveaxis(dy, 1, -1)
        case = Case(backend, dtype, view.shape, given, f"stored as {stored}")
        c = shape[1]
        w, b = make_vector(c, 1), make_vector(c, 2, loc=0.0)
        y, m, s = fastbn.batch_norm_train(view, w, b, layout=given, backend=backend)
        yc, mc, sc = fastbn.batch_norm_train(contiguous, w, b, layout=given, backend=backend)
        assert y.strides == view.strides, f"y strides {y.strides} != {view.strides} [{case}]"
        rtol = tol(dtype)
        assert_close("y", y, yc, rtol, case, normalize_bound(view, mc, sc, w, b, given))
        assert_close("mean", m, mc, 1e-12, case, np.abs(mc) + 1)
        assert_close("invstd", s, sc, 1e-12, case)
        ye = fastbn.batch_norm(view, mc, 1 / sc**2 - 1e-5, w, b, layout=given, backend=backend)
        assert ye.strides == view.strides, case
        assert_close("y eval", ye, yc, rtol, case, normalize_bound(view, mc, sc, w, b, given))
        dx, dw, db = fastbn.batch_norm_backward(
            dy_view, view, mc, sc, w, layout=given, backend=backend
        )
        rdx, rdw, rdb = ref.backward(dy_view, view, mc, sc, w, given)
        bdx, bdw, bdb = backward_bounds(dy_view, view, mc, sc, w, given)
        assert dx.strides == view.strides, case
        assert_close("dx", dx, rdx, rtol, case, bdx)
        assert_close("dweight", dw, rdw, 1e-12, case, bdw)
        assert_close("dbias", db, rdb, 1e-12, case, bdb)
        mm, vv = fastbn.moments(view, layout=given, backend=backend)
        assert_close("moments mean", mm, mc, 1e-12, case, np.abs(mc) + 1)
        assert_close("moments var", vv, 1 / sc**2 - 1e-5, 1e-12, case, 1 / sc**2)


def strided_views(x: np.ndarray):
    """Non-contiguous views of the same logical shape family."""
    return {
        "step-first": x[::2],
        "step-last": x[..., ::3],
        "reversed": x[::-1, ..., ::-1],
        "fortran": np.asfortranarray(x),
    }


@pytest.mark.parametrize("shape", [(8, 4, 9, 12), (9, 20, 15), (400, 3)], ids=shape_id)
def test_non_contiguous_inputs(backend, dtype, layout, shape):
    full = make_data(shape, dtype, layout, seed=6)
    for label, x in strided_views(full).items():
        c = x.shape[1] if layout == "NCHW" else x.shape[-1]
        case = Case(backend, dtype, x.shape, layout, f"view={label} strides={x.strides}")
        x0 = x.copy()
        w, b = make_vector(c, 1), make_vector(c, 2, loc=0.0)
        y, mean, invstd = fastbn.batch_norm_train(x, w, b, layout=layout, backend=backend)
        ry, rmean, rinv = ref.train_forward(x, w, b, 1e-5, layout)
        assert_close("y", y, ry, tol(dtype), case, normalize_bound(x, rmean, rinv, w, b, layout))
        assert_close("invstd", invstd, rinv, 1e-12, case)
        dy = make_data(shape, dtype, layout, seed=7)[tuple(slice(None, s) for s in x.shape)]
        dy = dy[::-1]
        dx, dw, db = fastbn.batch_norm_backward(
            dy, x, mean, invstd, w, layout=layout, backend=backend
        )
        rdx, rdw, rdb = ref.backward(dy, x, mean, invstd, w, layout)
        bdx, bdw, bdb = backward_bounds(dy, x, mean, invstd, w, layout)
        assert_close("dx", dx, rdx, tol(dtype), case, bdx)
        assert_close("dweight", dw, rdw, 1e-12, case, bdw)
        assert_close("dbias", db, rdb, 1e-12, case, bdb)
        mm, vv = fastbn.moments(x, layout=layout, backend=backend)
        rm_, rv_ = ref.moments(x, layout)
        assert_close("mean", mm, rm_, 1e-12, case, np.abs(rm_) + np.abs(x).max())
        assert_close("var", vv, rv_, 1e-12, case, rv_ + 1e-8 * np.abs(x).max() ** 2)
        np.testing.assert_array_equal(x, x0, err_msg=f"input modified [{case}]")
        # out= into a contiguous array works for non-contiguous inputs too
        out = np.empty(x.shape, dtype)
        fastbn.batch_norm_train(x, w, b, layout=layout, out=out, backend=backend)
        assert_close(
            "y (out=)", out, ry, tol(dtype), case, normalize_bound(x, rmean, rinv, w, b, layout)
        )


def test_array_like_inputs(backend):
    """Objects NumPy views without copying (memoryview, __array_interface__) are accepted."""
    x = make_data((6, 3, 4), np.float64, "NCHW")
    y_ref = fastbn.batch_norm_train(x, backend=backend)[0]
    y = fastbn.batch_norm_train(memoryview(x), backend=backend)[0]
    assert_same_bits("y (memoryview)", y, y_ref, Case(backend, np.float64, x.shape, "NCHW"))
