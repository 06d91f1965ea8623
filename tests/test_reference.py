"""Every operation of the functional API against the float64 NumPy reference.

One table of shapes (conftest.SHAPES, in NCHW terms) is run in both layouts and both
dtypes; a hypothesis property test draws further shapes and data.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastbn
from fastbn import reference as ref

from .conftest import (
    SHAPES,
    STATS_RTOL,
    Case,
    assert_close,
    backward_bounds,
    layout_shape,
    make_data,
    make_vector,
    normalize_bound,
    per_channel,
    shape_id,
    tol,
)


def layout_cases():
    """(layout, shape) pairs: every shape in both layouts, except that (N, C) is the same
    array in both, so only one 2-D shape is run as NHWC."""
    for layout in ("NCHW", "NHWC"):
        for shape in SHAPES:
            if layout == "NCHW" or len(shape) > 2 or shape == (7, 3):
                yield pytest.param(layout, shape, id=f"{layout}-{shape_id(shape)}")


shapes = pytest.mark.parametrize(("layout", "shape"), list(layout_cases()))


def stats_bounds(x, layout):
    """Error scales of the per-channel mean and population variance of `x`."""
    xf = per_channel(x, layout)
    mean_abs = np.abs(xf).mean(axis=1)
    var = xf.var(axis=1)
    return mean_abs, var + 1e-8 * np.abs(xf).max(axis=1) ** 2


def check_moments(mean, var, x, layout, case):
    rmean, rvar = ref.moments(x, layout)
    mb, vb = stats_bounds(x, layout)
    assert mean.dtype == np.float64 and var.dtype == np.float64, case
    assert_close("mean", mean, rmean, STATS_RTOL, case, mb)
    assert_close("var", var, rvar, STATS_RTOL, case, vb)


def check_output(y, x, case):
    """y has x's shape and dtype, and is a fresh array."""
    assert isinstance(y, np.ndarray), case
    assert y.shape == x.shape, f"shape {y.shape} != {x.shape} [{case}]"
    assert y.dtype == x.dtype, f"dtype {y.dtype} != {x.dtype} [{case}]"
    assert not np.shares_memory(y, x), f"output aliases the input [{case}]"


# ------------------------------------------------------------------ moments


@shapes
def test_moments(backend, dtype, layout, shape):
    x = make_data(shape, dtype, layout)
    case = Case(backend, dtype, x.shape, layout, "moments")
    mean, var = fastbn.moments(x, layout=layout, backend=backend)
    assert mean.shape == (shape[1],) and var.shape == (shape[1],), case
    check_moments(mean, var, x, layout, case)


# ------------------------------------------------------------------ training forward


@shapes
@pytest.mark.parametrize("affine", [False, True], ids=["noaffine", "affine"])
def test_batch_norm_train(backend, dtype, layout, shape, affine):
    x = make_data(shape, dtype, layout)
    x0 = x.copy()
    c = shape[1]
    w = make_vector(c, 1, loc=1.0, spread=0.8) if affine else None
    b = make_vector(c, 2, loc=-0.5, spread=2.0) if affine else None
    case = Case(backend, dtype, x.shape, layout, f"batch_norm_train affine={affine}")
    y, mean, invstd = fastbn.batch_norm_train(x, w, b, 1e-3, layout=layout, backend=backend)
    check_output(y, x, case)
    np.testing.assert_array_equal(x, x0, err_msg=f"input modified [{case}]")
    ry, rmean, rinvstd = ref.train_forward(x, w, b, 1e-3, layout)
    mb, _ = stats_bounds(x, layout)
    assert mean.dtype == np.float64 and invstd.dtype == np.float64, case
    assert_close("save_mean", mean, rmean, STATS_RTOL, case, mb)
    assert_close("save_invstd", invstd, rinvstd, STATS_RTOL, case)
    bound = normalize_bound(x, rmean, rinvstd, w, b, layout)
    assert_close("y", y, ry, tol(dtype), case, bound)


@shapes
@pytest.mark.parametrize("affine", [False, True], ids=["noaffine", "affine"])
@pytest.mark.parametrize("running", [False, True], ids=["norunning", "running"])
def test_batch_norm_training(backend, dtype, layout, shape, affine, running):
    x = make_data(shape, dtype, layout, seed=3)
    c = shape[1]
    m = x.size // c
    w = make_vector(c, 4, spread=0.9) if affine else None
    b = make_vector(c, 5, loc=0.3, spread=1.5) if affine else None
    rm = make_vector(c, 6, loc=0.2, spread=1.0) if running else None
    rv = make_vector(c, 7, loc=2.0, spread=1.0) if running else None
    rm0 = None if rm is None else rm.copy()
    rv0 = None if rv is None else rv.copy()
    case = Case(backend, dtype, x.shape, layout, f"batch_norm training affine={affine}")
    y = fastbn.batch_norm(x, rm, rv, w, b, True, 0.3, 1e-4, layout=layout, backend=backend)
    check_output(y, x, case)
    ry, rmean, rinvstd = ref.train_forward(x, w, b, 1e-4, layout)
    assert_close("y", y, ry, tol(dtype), case, normalize_bound(x, rmean, rinvstd, w, b, layout))
    if running:
        rvar = ref.moments(x, layout)[1]
        em, ev = ref.update_running(rm0, rv0, rmean, rvar, m, 0.3)
        mb, vb = stats_bounds(x, layout)
        assert_close("running_mean", rm, em, STATS_RTOL, case, 0.7 * np.abs(rm0) + 0.3 * mb)
        assert_close("running_var", rv, ev, STATS_RTOL, case, 0.7 * rv0 + 0.3 * vb * m / (m - 1))


@shapes
@pytest.mark.parametrize("affine", [False, True], ids=["noaffine", "affine"])
def test_batch_norm_eval(backend, dtype, layout, shape, affine):
    x = make_data(shape, dtype, layout, seed=8)
    c = shape[1]
    w = make_vector(c, 9, spread=0.9) if affine else None
    b = make_vector(c, 10, loc=0.3, spread=1.5) if affine else None
    rm = make_vector(c, 11, loc=0.0, spread=3.0)
    rv = make_vector(c, 12, loc=5.0, spread=4.0)
    rm0, rv0 = rm.copy(), rv.copy()
    case = Case(backend, dtype, x.shape, layout, f"batch_norm eval affine={affine}")
    y = fastbn.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5, layout=layout, backend=backend)
    check_output(y, x, case)
    np.testing.assert_array_equal(rm, rm0, err_msg=f"eval changed running_mean [{case}]")
    np.testing.assert_array_equal(rv, rv0, err_msg=f"eval changed running_var [{case}]")
    ry = ref.normalize(x, rm, rv, w, b, 1e-5, layout)
    invstd = 1 / np.sqrt(rv + 1e-5)
    assert_close("y", y, ry, tol(dtype), case, normalize_bound(x, rm, invstd, w, b, layout))


def test_batch_norm_eval_float32_running_stats(backend, layout):
    """Running statistics and parameters of the layer's float32 dtype are accepted."""
    x = make_data((4, 3, 5, 6), np.float32, layout)
    rm = make_vector(3, 1).astype(np.float32)
    rv = make_vector(3, 2, loc=3.0).astype(np.float32)
    w = make_vector(3, 3).astype(np.float32)
    b = make_vector(3, 4).astype(np.float32)
    case = Case(backend, np.float32, x.shape, layout, "float32 stats")
    y = fastbn.batch_norm(x, rm, rv, w, b, layout=layout, backend=backend)
    ry = ref.normalize(x, rm, rv, w, b, 1e-5, layout)
    invstd = 1 / np.sqrt(rv.astype(np.float64) + 1e-5)
    assert_close("y", y, ry, 1e-5, case, normalize_bound(x, rm, invstd, w, b, layout))


# ------------------------------------------------------------------ backward


@shapes
@pytest.mark.parametrize("affine", [False, True], ids=["noweight", "weight"])
def test_backward_training(backend, dtype, layout, shape, affine):
    x = make_data(shape, dtype, layout, seed=13)
    dy = make_data(shape, dtype, layout, seed=14, loc=0.7, scale=1.5)
    x0, dy0 = x.copy(), dy.copy()
    c = shape[1]
    w = make_vector(c, 15, spread=0.9) if affine else None
    case = Case(backend, dtype, x.shape, layout, f"batch_norm_backward weight={affine}")
    _, mean, invstd = fastbn.batch_norm_train(x, layout=layout, backend=backend)
    dx, dw, db = fastbn.batch_norm_backward(dy, x, mean, invstd, w, layout=layout, backend=backend)
    check_output(dx, x, case)
    assert not np.shares_memory(dx, dy), case
    np.testing.assert_array_equal(x, x0, err_msg=f"x modified [{case}]")
    np.testing.assert_array_equal(dy, dy0, err_msg=f"dy modified [{case}]")
    assert dw.shape == (c,) and db.shape == (c,), case
    rdx, rdw, rdb = ref.backward(dy, x, mean, invstd, w, layout)
    bdx, bdw, bdb = backward_bounds(dy, x, mean, invstd, w, layout)
    assert_close("dbias", db, rdb, STATS_RTOL, case, bdb)
    assert_close("dweight", dw, rdw, STATS_RTOL, case, bdw)
    assert_close("dx", dx, rdx, tol(dtype), case, bdx)


@shapes
@pytest.mark.parametrize("affine", [False, True], ids=["noweight", "weight"])
def test_backward_eval(backend, dtype, layout, shape, affine):
    x = make_data(shape, dtype, layout, seed=16)
    dy = make_data(shape, dtype, layout, seed=17, loc=0.7, scale=1.5)
    c = shape[1]
    w = make_vector(c, 18, spread=0.9) if affine else None
    rm = make_vector(c, 19, loc=0.0, spread=3.0)
    rv = make_vector(c, 20, loc=5.0, spread=4.0)
    invstd = 1.0 / np.sqrt(rv + 1e-5)
    case = Case(backend, dtype, x.shape, layout, f"eval backward weight={affine}")
    dx, dw, db = fastbn.batch_norm_backward(
        dy, x, rm, invstd, w, layout=layout, backend=backend, training=False
    )
    check_output(dx, x, case)
    rdx, rdw, rdb = ref.backward_eval(dy, x, rm, rv, w, 1e-5, layout)
    _, bdw, bdb = backward_bounds(dy, x, rm, invstd, w, layout)
    assert_close("dbias", db, rdb, STATS_RTOL, case, bdb)
    assert_close("dweight", dw, rdw, STATS_RTOL, case, bdw)
    assert_close("dx", dx, rdx, tol(dtype), case)


# ------------------------------------------------------------------ property test


@st.composite
def cases(draw):
    """An NCHW shape (at most ~30k values, M >= 2), a dtype, a layout and data parameters.

    Up to 70 channels: channels-last rows of 16-63 channels take other walks than narrower
    or wider ones (column blocks with an overlapping last block, row tiles, output slices).
    """
    ndim = draw(st.integers(2, 5))
    c = draw(st.integers(1, 70))
    spatial = draw(st.lists(st.integers(1, 40), min_size=ndim - 2, max_size=ndim - 2))
    if ndim == 3 and draw(st.booleans()):
        spatial = [draw(st.integers(4090, 4200))]  # row pieces
    budget = max(1, 30_000 // (c * int(np.prod(spatial, dtype=np.int64))))
    n = draw(st.integers(1, min(budget, 600)))
    shape = (n, c, *spatial)
    if n * int(np.prod(spatial, dtype=np.int64)) < 2:
        shape = (2, *shape[1:])
    return {
        "shape": shape,
        "dtype": draw(st.sampled_from([np.float32, np.float64])),
        "layout": draw(st.sampled_from(["NCHW", "NHWC"])),
        "seed": draw(st.integers(0, 2**32 - 1)),
        "loc": draw(st.sampled_from([0.0, 1.0, -7.5, 300.0])),
        "scale": draw(st.sampled_from([1e-3, 1.0, 40.0])),
        "affine": draw(st.booleans()),
    }


@given(p=cases())
def test_property_all_ops(backend, p):
    shape, dtype, layout = p["shape"], np.dtype(p["dtype"]), p["layout"]
    x = make_data(shape, dtype, layout, seed=p["seed"], loc=p["loc"], scale=p["scale"])
    dy = make_data(shape, dtype, layout, seed=p["seed"] + 1, loc=0.1, scale=1.0)
    c = shape[1]
    w = make_vector(c, p["seed"] % 1000, spread=0.9) if p["affine"] else None
    b = make_vector(c, p["seed"] % 999, spread=2.0) if p["affine"] else None
    case = Case(backend, dtype, layout_shape(shape, layout), layout, f"property {p}")

    mean, var = fastbn.moments(x, layout=layout, backend=backend)
    check_moments(mean, var, x, layout, case)

    y, smean, sinv = fastbn.batch_norm_train(x, w, b, layout=layout, backend=backend)
    ry, rmean, rinv = ref.train_forward(x, w, b, 1e-5, layout)
    assert_close("save_invstd", sinv, rinv, STATS_RTOL, case)
    assert_close("y", y, ry, tol(dtype), case, normalize_bound(x, rmean, rinv, w, b, layout))

    dx, dw, db = fastbn.batch_norm_backward(dy, x, smean, sinv, w, layout=layout, backend=backend)
    rdx, rdw, rdb = ref.backward(dy, x, smean, sinv, w, layout)
    bdx, bdw, bdb = backward_bounds(dy, x, smean, sinv, w, layout)
    assert_close("dbias", db, rdb, STATS_RTOL, case, bdb)
    assert_close("dweight", dw, rdw, STATS_RTOL, case, bdw)
    assert_close("dx", dx, rdx, tol(dtype), case, bdx)

    rv = var + 0.5
    ye = fastbn.batch_norm(x, mean, rv, w, b, layout=layout, backend=backend)
    rye = ref.normalize(x, mean, rv, w, b, 1e-5, layout)
    inv = 1 / np.sqrt(rv + 1e-5)
    assert_close("y eval", ye, rye, tol(dtype), case, normalize_bound(x, mean, inv, w, b, layout))


# ------------------------------------------------------------------ edge cases


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1, 1), (1, 1)], ids=shape_id)
def test_single_value_per_channel_outside_training(backend, dtype, layout, shape):
    """M == 1 is an error only when training: inference on one sample and moments work."""
    x = make_data(shape, dtype, layout)
    c = shape[1]
    rm, rv = make_vector(c, 1, loc=0.0), make_vector(c, 2, loc=2.0)
    case = Case(backend, dtype, x.shape, layout, "M == 1")
    y = fastbn.batch_norm(x, rm, rv, layout=layout, backend=backend)
    ry = ref.normalize(x, rm, rv, None, None, 1e-5, layout)
    assert_close("y", y, ry, tol(dtype), case, np.abs(ry) + np.abs(x).max())
    mean, var = fastbn.moments(x, layout=layout, backend=backend)
    assert_close("mean", mean, per_channel(x, layout)[:, 0], STATS_RTOL, case)
    np.testing.assert_array_equal(var, 0.0, err_msg=str(case))
    bn = fastbn.BatchNorm(c, layout=layout, backend=backend).eval()
    assert bn(x).shape == x.shape
    assert bn.backward(x).shape == x.shape


@pytest.mark.parametrize(
    "shape", [(6, 3, 5), (2, 3, 5003), (3, 17, 4099), (5000, 3)], ids=shape_id
)
def test_constant_channel(backend, dtype, layout, shape):
    """A channel with zero variance normalizes to its bias; other channels are unaffected."""
    x = make_data(shape, dtype, layout)
    xc = np.moveaxis(x, 1 if layout == "NCHW" else -1, 0)
    xc[0] = dtype.type(7.25)
    c = shape[1]
    w, b = make_vector(c, 1), make_vector(c, 2, loc=0.5)
    case = Case(backend, dtype, x.shape, layout, "constant channel 0")
    y, mean, invstd = fastbn.batch_norm_train(x, w, b, layout=layout, backend=backend)
    assert mean[0] == 7.25, f"mean of a constant channel is {mean[0]!r} [{case}]"
    assert_close("invstd", invstd[0], 1 / np.sqrt(1e-5), STATS_RTOL, case)
    np.testing.assert_array_equal(
        np.moveaxis(y, 1 if layout == "NCHW" else -1, 0)[0], dtype.type(b[0]), err_msg=str(case)
    )
    ry, rmean, rinv = ref.train_forward(x, w, b, 1e-5, layout)
    assert_close("y", y, ry, tol(dtype), case, normalize_bound(x, rmean, rinv, w, b, layout))


@pytest.mark.parametrize(
    "shape", [(6, 3, 5), (2, 3, 5003), (3, 17, 4099), (5000, 3)], ids=shape_id
)
def test_nan_stays_in_its_channel(backend, dtype, layout, shape):
    x = make_data(shape, dtype, layout)
    xc = np.moveaxis(x, 1 if layout == "NCHW" else -1, 0)
    xc[0][np.unravel_index(xc[0].size // 2, xc[0].shape)] = np.nan
    assert np.isnan(x).sum() == 1
    case = Case(backend, dtype, x.shape, layout, "NaN in channel 0")
    y, mean, invstd = fastbn.batch_norm_train(x, layout=layout, backend=backend)
    assert np.isnan(mean[0]) and np.isnan(invstd[0]), f"NaN lost [{case}]"
    assert np.all(np.isfinite(mean[1:])) and np.all(np.isfinite(invstd[1:])), case
    _, rmean, _ = ref.train_forward(x, None, None, 1e-5, layout)
    assert_close(
        "mean[1:]", mean[1:], rmean[1:], STATS_RTOL, case, np.abs(x[np.isfinite(x)]).max()
    )
    yc = np.moveaxis(y, 1 if layout == "NCHW" else -1, 0)
    assert np.all(np.isnan(yc[0])), case
    assert np.all(np.isfinite(yc[1:])), case


def test_running_stats_as_strided_views(backend, dtype, layout):
    """Running statistics that are views (a column of a buffer) are updated in place."""
    x = make_data((5, 3, 4, 2), dtype, layout)
    buf = np.zeros((3, 4))
    buf[:, 1] = 1.0
    rm, rv = buf[:, 0], buf[:, 1]
    fastbn.batch_norm(x, rm, rv, training=True, momentum=0.5, layout=layout, backend=backend)
    mean, var = ref.moments(x, layout)
    m = x.size // 3
    case = Case(backend, dtype, x.shape, layout, "strided running stats")
    assert_close("running_mean", buf[:, 0], 0.5 * mean, STATS_RTOL, case, np.abs(mean) + 1)
    assert_close("running_var", buf[:, 1], 0.5 + 0.5 * var * m / (m - 1), STATS_RTOL, case)
    np.testing.assert_array_equal(buf[:, 2:], 0.0)
