"""The BatchNorm layer: running statistics, modes, options, state dicts."""

from __future__ import annotations

import numpy as np
import pytest

import fastbn
from fastbn import reference as ref

from .conftest import (
    STATS_RTOL,
    Case,
    assert_close,
    make_data,
    make_vector,
    normalize_bound,
    per_channel,
    tol,
)

LAYER_SHAPES = [(6, 3), (4, 3, 5), (2, 3, 4, 5), (2, 3, 2, 3, 4), (3, 3, 2000)]


def batches(shape, dtype, layout, k, seed=60):
    """`k` batches with different statistics."""
    return [
        make_data(shape, dtype, layout, seed=seed + i, loc=2.0 * (i + 1), scale=0.5 + i)
        for i in range(k)
    ]


@pytest.mark.parametrize("shape", LAYER_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("pdtype", [np.float32, np.float64], ids=["param32", "param64"])
def test_momentum_update_unbiased(backend, dtype, layout, shape, pdtype):
    c = shape[1]
    bn = fastbn.BatchNorm(c, momentum=0.25, layout=layout, dtype=pdtype, backend=backend)
    assert bn.training and bn.num_batches_tracked == 0
    assert bn.running_mean.dtype == pdtype and bn.weight.dtype == pdtype
    em, ev = np.zeros(c), np.ones(c)
    for i, x in enumerate(batches(shape, dtype, layout, 3)):
        case = Case(backend, dtype, x.shape, layout, f"batch {i} params {np.dtype(pdtype)}")
        y = bn(x)
        assert y.dtype == x.dtype and y.shape == x.shape, case
        mean, var = ref.moments(x, layout)
        m = x.size // c
        em, ev = ref.update_running(em, ev, mean, var, m, 0.25)
        rt = STATS_RTOL if pdtype == np.float64 else 1e-6
        assert_close("running_mean", bn.running_mean, em, rt, case, np.abs(em) + 1)
        assert_close("running_var", bn.running_var, ev, rt, case)
        assert bn.num_batches_tracked == i + 1, case
        ry = ref.train_forward(x, None, None, bn.eps, layout)[0]
        assert_close("y", y, ry, tol(dtype), case, np.abs(ry).max() + 10)


def test_momentum_none_is_cumulative_average(backend, dtype, layout):
    shape = (5, 3, 4, 3)
    bn = fastbn.BatchNorm(3, momentum=None, layout=layout, dtype=np.float64, backend=backend)
    xs = batches(shape, dtype, layout, 4)
    means, uvars = [], []
    m = xs[0].size // 3
    for x in xs:
        bn(x)
        mean, var = ref.moments(x, layout)
        means.append(mean)
        uvars.append(var * m / (m - 1))
    case = Case(backend, dtype, shape, layout, "momentum=None")
    assert bn.num_batches_tracked == 4
    # the first batch replaces the initial zeros/ones entirely (factor 1/1)
    assert_close(
        "running_mean",
        bn.running_mean,
        np.mean(means, axis=0),
        1e-12,
        case,
        np.abs(np.mean(means, axis=0)) + 1,
    )
    assert_close("running_var", bn.running_var, np.mean(uvars, axis=0), 1e-12, case)


def test_track_running_stats_false_uses_batch_stats(backend, dtype, layout):
    shape = (4, 3, 5, 2)
    bn = fastbn.BatchNorm(3, track_running_stats=False, layout=layout, backend=backend)
    assert bn.running_mean is None and bn.running_var is None
    x = make_data(shape, dtype, layout)
    ry, mean, invstd = ref.train_forward(x, None, None, 1e-5, layout)
    for mode in (True, False):
        bn.train(mode)
        case = Case(backend, dtype, x.shape, layout, f"track_running_stats=False train={mode}")
        y = bn(x)
        assert_close(
            "y", y, ry, tol(dtype), case, normalize_bound(x, mean, invstd, None, None, layout)
        )
        assert bn.running_mean is None and bn.num_batches_tracked == 0, case
        dy = make_data(shape, dtype, layout, seed=3)
        dx = bn.backward(dy)
        rdx = ref.backward(dy, x, mean, invstd, None, layout)[0]
        assert_close("dx", dx, rdx, tol(dtype), case, np.abs(rdx).max() + np.abs(dy).max())
    assert bn.state_dict().keys() == {"weight", "bias"}


def test_affine_false(backend, layout):
    bn = fastbn.BatchNorm(3, affine=False, layout=layout, dtype=np.float64, backend=backend)
    assert bn.weight is None and bn.bias is None
    x = make_data((4, 3, 6), np.float64, layout)
    y = bn(x)
    ry = ref.train_forward(x, None, None, 1e-5, layout)[0]
    assert_close("y", y, ry, 1e-12, Case(backend, np.float64, x.shape, layout), 10.0)
    bn.backward(make_data((4, 3, 6), np.float64, layout, seed=2))
    assert bn.grad_weight is None and bn.grad_bias is None
    assert set(bn.state_dict()) == {"running_mean", "running_var", "num_batches_tracked"}


def test_eval_uses_running_stats_and_backward_is_scaled_dy(backend, dtype, layout):
    shape = (3, 4, 5, 2)
    c = 4
    bn = fastbn.BatchNorm(c, eps=1e-3, layout=layout, dtype=np.float64, backend=backend)
    bn.weight[:] = make_vector(c, 1, spread=0.9)
    bn.bias[:] = make_vector(c, 2, loc=0.0, spread=2.0)
    bn.running_mean[:] = make_vector(c, 3, loc=0.0, spread=3.0)
    bn.running_var[:] = make_vector(c, 4, loc=4.0, spread=3.0)
    assert bn.eval() is bn and not bn.training
    state = {k: v.copy() for k, v in bn.state_dict().items()}
    x = make_data(shape, dtype, layout)
    dy = make_data(shape, dtype, layout, seed=5, loc=0.3)
    case = Case(backend, dtype, x.shape, layout, "eval")
    y = bn(x)
    ry = ref.normalize(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, 1e-3, layout)
    invstd = 1 / np.sqrt(bn.running_var + 1e-3)
    bound = normalize_bound(x, bn.running_mean, invstd, bn.weight, bn.bias, layout)
    assert_close("y", y, ry, tol(dtype), case, bound)
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, state[k], err_msg=f"eval forward changed {k} [{case}]")
    dx = bn.backward(dy)
    rdx, rdw, rdb = ref.backward_eval(
        dy, x, bn.running_mean, bn.running_var, bn.weight, 1e-3, layout
    )
    axis = 1 if layout == "NCHW" else x.ndim - 1
    shape_c = [1] * x.ndim
    shape_c[axis] = c
    expected = dy.astype(np.float64) * (bn.weight * invstd).reshape(shape_c)
    assert_close("dx = dy*weight*invstd", dx, expected, tol(dtype), case)
    assert_close("dx", dx, rdx, tol(dtype), case)
    assert_close(
        "grad_weight",
        bn.grad_weight,
        rdw,
        1e-12,
        case,
        np.abs(per_channel(dy, layout)).sum(1) * 10,
    )
    assert_close(
        "grad_bias", bn.grad_bias, rdb, 1e-12, case, np.abs(per_channel(dy, layout)).sum(1)
    )


def test_eval_forward_is_batch_norm_with_running_stats(backend, dtype, layout):
    """The same bits as the functional call (one formula for ``weight / sqrt(var + eps)``)."""
    c = 257
    bn = fastbn.BatchNorm(c, eps=1e-3, layout=layout, dtype=np.float64, backend=backend)
    for i, name in enumerate(("weight", "bias", "running_mean")):
        getattr(bn, name)[:] = make_vector(c, i, loc=0.0, spread=3.0)
    bn.running_var[:] = make_vector(c, 4, loc=4.0, spread=3.0)
    x = make_data((3, c, 5), dtype, layout)
    want = fastbn.batch_norm(
        x, bn.running_mean, bn.running_var, bn.weight, bn.bias, eps=1e-3, layout=layout,
        backend=backend,
    )  # fmt: skip
    case = Case(backend, dtype, x.shape, layout, "eval")
    np.testing.assert_array_equal(bn.eval()(x), want, err_msg=f"layer != batch_norm [{case}]")


def test_train_eval_return_self():
    bn = fastbn.BatchNorm(2)
    assert bn.train() is bn and bn.training
    assert bn.eval() is bn and not bn.training
    assert bn.train(True) is bn and bn.training
    assert bn.train(False) is bn and not bn.training


def test_backward_needs_forward():
    with pytest.raises(RuntimeError, match="forward"):
        fastbn.BatchNorm(2).backward(np.zeros((3, 2), np.float32))


@pytest.mark.parametrize(
    ("affine", "track", "keys"),
    [
        (True, True, ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]),
        (False, True, ["running_mean", "running_var", "num_batches_tracked"]),
        (True, False, ["weight", "bias"]),
        (False, False, []),
    ],
)
def test_state_dict_keys_and_round_trip(backend, affine, track, keys):
    bn = fastbn.BatchNorm(3, affine=affine, track_running_stats=track, backend=backend)
    state = bn.state_dict()
    assert list(state) == keys
    if track:
        assert state["num_batches_tracked"].dtype == np.int64
        assert state["num_batches_tracked"].shape == ()
    x = make_data((5, 3, 4), np.float32, "NCHW")
    bn(x)
    bn(x + 1)
    if affine:
        bn.weight[:] = [0.5, 2.0, 3.0]
        bn.bias[:] = [1.0, -1.0, 0.0]
    trained = bn.state_dict()
    for k, v in trained.items():
        assert isinstance(v, np.ndarray), k
    if track:
        assert int(trained["num_batches_tracked"]) == 2
    # state_dict returns copies
    if track:
        trained["running_mean"][0] = 1234.0
        assert bn.running_mean[0] != 1234.0
        trained["running_mean"][0] = bn.running_mean[0]
    fresh = fastbn.BatchNorm(3, affine=affine, track_running_stats=track, backend=backend)
    fresh.load_state_dict(trained)
    for k, v in fresh.state_dict().items():
        np.testing.assert_array_equal(v, trained[k], err_msg=k)
    assert fresh.num_batches_tracked == bn.num_batches_tracked
    assert isinstance(fresh.num_batches_tracked, int)
    np.testing.assert_array_equal(fresh.eval()(x), bn.eval()(x))


def test_load_state_dict_accepts_torch_like_values():
    """Values that are array-like (lists, 0-d arrays, Python ints) are accepted."""
    bn = fastbn.BatchNorm(2, dtype=np.float64)
    bn.load_state_dict(
        {
            "weight": [1.5, 2.5],
            "bias": np.array([0.1, 0.2], np.float32),
            "running_mean": (3.0, 4.0),
            "running_var": np.array([5.0, 6.0]),
            "num_batches_tracked": 7,
        }
    )
    assert bn.weight.dtype == np.float64
    np.testing.assert_array_equal(bn.weight, [1.5, 2.5])
    np.testing.assert_array_equal(bn.running_var, [5.0, 6.0])
    assert bn.num_batches_tracked == 7


@pytest.mark.parametrize(
    ("change", "exc", "match"),
    [
        ("missing", KeyError, "missing"),
        ("unexpected", KeyError, "unexpected"),
        ("shape", ValueError, "shape"),
        ("nbt-shape", ValueError, "num_batches_tracked"),
    ],
)
def test_load_state_dict_mismatch_changes_nothing(change, exc, match):
    bn = fastbn.BatchNorm(3)
    bn(make_data((5, 3, 4), np.float32, "NCHW"))
    before = bn.state_dict()
    new = {k: np.asarray(v) + 1 for k, v in before.items()}
    if change == "missing":
        del new["running_var"]
    elif change == "unexpected":
        new["extra"] = np.zeros(3)
    elif change == "shape":
        new["running_var"] = np.ones(4)
    else:
        new["num_batches_tracked"] = np.array([1, 2])
    with pytest.raises(exc, match=match):
        bn.load_state_dict(new)
    after = bn.state_dict()
    assert list(after) == list(before)
    for k in before:
        np.testing.assert_array_equal(after[k], before[k], err_msg=f"{k} changed ({change})")


def test_load_state_dict_non_strict():
    bn = fastbn.BatchNorm(3)
    bn.load_state_dict({"running_mean": np.full(3, 2.0), "extra": 1}, strict=False)
    np.testing.assert_array_equal(bn.running_mean, 2.0)
    np.testing.assert_array_equal(bn.running_var, 1.0)


def test_reset_running_stats_and_parameters(backend):
    bn = fastbn.BatchNorm(3, backend=backend)
    bn(make_data((5, 3, 4), np.float32, "NCHW"))
    bn.weight[:] = 3.0
    bn.bias[:] = -2.0
    assert bn.num_batches_tracked == 1
    bn.reset_running_stats()
    np.testing.assert_array_equal(bn.running_mean, np.zeros(3))
    np.testing.assert_array_equal(bn.running_var, np.ones(3))
    assert bn.num_batches_tracked == 0
    np.testing.assert_array_equal(bn.weight, 3.0)  # parameters untouched
    bn(make_data((5, 3, 4), np.float32, "NCHW"))
    bn.reset_parameters()
    np.testing.assert_array_equal(bn.weight, np.ones(3))
    np.testing.assert_array_equal(bn.bias, np.zeros(3))
    np.testing.assert_array_equal(bn.running_mean, np.zeros(3))
    np.testing.assert_array_equal(bn.running_var, np.ones(3))
    assert bn.num_batches_tracked == 0
    assert bn.running_mean.dtype == np.float32 and bn.weight.dtype == np.float32


def test_layer_output_keeps_memory_order(backend):
    """A channels-last array given to an NCHW layer through a transposed view."""
    nhwc = make_data((4, 3, 5, 6), np.float32, "NHWC")
    view = np.moveaxis(nhwc, -1, 1)
    bn = fastbn.BatchNorm(3, backend=backend)
    y = bn(view)
    assert y.shape == view.shape and y.strides == view.strides
    ry = ref.train_forward(view, None, None, 1e-5, "NCHW")[0]
    assert_close("y", y, ry, 1e-5, Case(backend, np.float32, view.shape, "NCHW"), 10.0)
    dx = bn.backward(np.ones_like(view))
    assert dx.shape == view.shape


def test_layer_options_and_repr(backend):
    bn = fastbn.BatchNorm(
        4, eps=1e-3, momentum=0.2, layout="NHWC", dtype=np.float64, backend=backend
    )
    assert bn.num_features == 4 and bn.eps == 1e-3 and bn.momentum == 0.2
    assert bn.layout == "NHWC" and bn.backend == backend
    text = repr(bn)
    assert "BatchNorm(4" in text and "NHWC" in text
