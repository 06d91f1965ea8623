"""Backward against central finite differences (float64), and NCHW vs NHWC agreement."""

from __future__ import annotations

import numpy as np
import pytest

import fastbn

from .conftest import (
    SHAPES,
    STATS_RTOL,
    Case,
    assert_close,
    make_data,
    make_vector,
    shape_id,
    to_layout,
    tol,
)

FD_SHAPES = [(5, 3), (3, 2, 4), (2, 3, 2, 3), (2, 2, 1, 2, 3), (4, 1, 1)]
FD_RTOL = 1e-6  # central differences: O(h^2) truncation + O(eps/h) rounding


def central_difference(loss, a: np.ndarray, h: float) -> np.ndarray:
    """d loss / d a, elementwise, by central differences (modifies `a` and restores it)."""
    grad = np.empty(a.shape)
    flat, g = a.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        v = flat[i]
        step = h * max(1.0, abs(v))
        flat[i] = v + step
        up = loss()
        flat[i] = v - step
        down = loss()
        flat[i] = v
        g[i] = (up - down) / (2 * step)
    return grad


@pytest.mark.parametrize("shape", FD_SHAPES, ids=shape_id)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_backward_matches_finite_differences(backend, layout, shape, training):
    x = make_data(shape, np.float64, layout, seed=21, loc=1.5, scale=2.0)
    r = make_data(shape, np.float64, layout, seed=22, loc=0.3, scale=1.0)
    c = shape[1]
    w = make_vector(c, 23, spread=0.8)
    b = make_vector(c, 24, loc=0.0, spread=1.0)
    rm = make_vector(c, 25, loc=1.0, spread=1.0)
    rv = make_vector(c, 26, loc=3.0, spread=2.0)
    eps = 1e-3
    kw = {"layout": layout, "backend": backend}
    case = Case(backend, np.float64, x.shape, layout, f"finite differences training={training}")

    def loss() -> float:
        if training:
            y = fastbn.batch_norm_train(x, w, b, eps, **kw)[0]
        else:
            y = fastbn.batch_norm(x, rm, rv, w, b, False, 0.1, eps, **kw)
        return float(np.sum(y * r))

    if training:
        _, mean, invstd = fastbn.batch_norm_train(x, w, b, eps, **kw)
    else:
        mean, invstd = rm, 1.0 / np.sqrt(rv + eps)
    dx, dw, db = fastbn.batch_norm_backward(r, x, mean, invstd, w, training=training, **kw)

    h = 1e-5
    num_dx = central_difference(loss, x, h)
    num_dw = central_difference(loss, w, h)
    num_db = central_difference(loss, b, h)
    scale = float(np.max(np.abs(num_dx))) + 1.0
    assert_close("dx vs finite differences", dx, num_dx, FD_RTOL, case, scale)
    assert_close("dweight vs finite differences", dw, num_dw, FD_RTOL, case, np.abs(num_dw) + 1)
    assert_close("dbias vs finite differences", db, num_db, FD_RTOL, case, np.abs(num_db) + 1)


def test_layer_backward_matches_finite_differences(backend, layout):
    """The layer's backward (train and eval) against differences of its forward."""
    shape = (3, 2, 2, 3)
    x = make_data(shape, np.float64, layout, seed=31)
    r = make_data(shape, np.float64, layout, seed=32, loc=0.0)
    for training in (True, False):
        bn = fastbn.BatchNorm(2, layout=layout, dtype=np.float64, backend=backend)
        bn.weight[:] = [0.7, 1.6]
        bn.bias[:] = [0.1, -0.4]
        bn.running_mean[:] = [0.5, -1.0]
        bn.running_var[:] = [2.0, 0.5]
        bn.train(training)
        case = Case(backend, np.float64, x.shape, layout, f"layer training={training}")

        def loss(bn=bn) -> float:
            rm, rv = bn.running_mean.copy(), bn.running_var.copy()
            y = bn(x)
            bn.running_mean[:], bn.running_var[:] = rm, rv  # undo the running update
            return float(np.sum(y * r))

        bn(x)
        dx = bn.backward(r)
        num = central_difference(loss, x, 1e-5)
        assert_close("dx", dx, num, FD_RTOL, case, float(np.max(np.abs(num))) + 1)
        assert_close(
            "grad_weight",
            bn.grad_weight,
            central_difference(loss, bn.weight, 1e-5),
            FD_RTOL,
            case,
            1.0,
        )
        assert_close(
            "grad_bias", bn.grad_bias, central_difference(loss, bn.bias, 1e-5), FD_RTOL, case, 1.0
        )


# ------------------------------------------------------------------ layouts


@pytest.mark.parametrize("shape", [s for s in SHAPES if len(s) > 2], ids=shape_id)
def test_nchw_and_nhwc_agree(backend, dtype, shape):
    a = make_data(shape, dtype, "NCHW", seed=41)
    dy = make_data(shape, dtype, "NCHW", seed=42, loc=0.5)
    h, dyh = to_layout(a, "NHWC"), to_layout(dy, "NHWC")
    c = shape[1]
    w, b = make_vector(c, 43), make_vector(c, 44, loc=0.0)
    case = Case(backend, dtype, shape, "NCHW vs NHWC")
    nchw = {"layout": "NCHW", "backend": backend}
    nhwc = {"layout": "NHWC", "backend": backend}

    def back(arr):
        return np.moveaxis(arr, -1, 1)

    m1, v1 = fastbn.moments(a, **nchw)
    m2, v2 = fastbn.moments(h, **nhwc)
    assert_close("mean", m2, m1, STATS_RTOL, case, np.abs(a).max())
    assert_close("var", v2, v1, STATS_RTOL, case)
    y1, sm1, si1 = fastbn.batch_norm_train(a, w, b, **nchw)
    y2, sm2, si2 = fastbn.batch_norm_train(h, w, b, **nhwc)
    scale = np.max(np.abs(a)) * np.max(si1 * w) + np.max(np.abs(b))
    assert_close("y", back(y2), y1, tol(dtype), case, scale)
    assert_close("save_mean", sm2, sm1, STATS_RTOL, case, np.abs(a).max())
    assert_close("save_invstd", si2, si1, STATS_RTOL, case)
    ye1 = fastbn.batch_norm(a, m1, v1, w, b, **nchw)
    ye2 = fastbn.batch_norm(h, m1, v1, w, b, **nhwc)
    assert_close("y eval", back(ye2), ye1, tol(dtype), case, scale)
    dx1, dw1, db1 = fastbn.batch_norm_backward(dy, a, sm1, si1, w, **nchw)
    dx2, dw2, db2 = fastbn.batch_norm_backward(dyh, h, sm1, si1, w, **nhwc)
    gscale = np.max(np.abs(dy)) * np.max(w * si1) * 4
    assert_close("dx", back(dx2), dx1, tol(dtype), case, gscale)
    sums = np.abs(dy).astype(np.float64).sum() * (np.abs(a).max() + np.abs(sm1).max())
    assert_close("dweight", dw2, dw1, STATS_RTOL, case, sums * si1)
    assert_close("dbias", db2, db1, STATS_RTOL, case, np.abs(dy).astype(np.float64).sum())
