"""The error matrix of API.md: bad input raises at once and changes nothing."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

import fastbn
from fastbn.backends import BACKENDS

from .conftest import make_data

UNAVAILABLE = [name for name in BACKENDS if name not in fastbn.available_backends()]


@dataclass
class State:
    """Everything a failing call could touch; `snapshot` and `assert_unchanged` compare."""

    backend: str
    x: np.ndarray = field(default_factory=lambda: make_data((4, 3, 5), np.float32, "NCHW"))
    dy: np.ndarray = field(
        default_factory=lambda: make_data((4, 3, 5), np.float32, "NCHW", seed=1)
    )
    rm: np.ndarray = field(default_factory=lambda: np.array([0.5, -1.0, 2.0]))
    rv: np.ndarray = field(default_factory=lambda: np.array([1.5, 2.0, 0.5]))
    out: np.ndarray = field(default_factory=lambda: np.full((4, 3, 5), 7.0, np.float32))
    bn: fastbn.BatchNorm | None = None  # in training mode
    bn_eval: fastbn.BatchNorm | None = None  # in eval mode

    def __post_init__(self):
        self.bn = fastbn.BatchNorm(3, backend=self.backend)
        self.bn(self.x)  # one batch tracked, running statistics away from their defaults
        self.bn_eval = fastbn.BatchNorm(3, backend=self.backend)
        self.bn_eval(self.x + 1)
        self.bn_eval.eval()
        self._saved = self.snapshot()

    def snapshot(self):
        arrays = {k: getattr(self, k).copy() for k in ("x", "dy", "rm", "rv", "out")}
        layers = {
            k: (getattr(self, k).state_dict(), getattr(self, k).training)
            for k in ("bn", "bn_eval")
        }
        return arrays, layers

    def assert_unchanged(self, label: str):
        arrays, layers = self._saved
        for k, v in arrays.items():
            np.testing.assert_array_equal(getattr(self, k), v, err_msg=f"{k} changed by {label}")
        for name, (state, training) in layers.items():
            layer = getattr(self, name)
            now = layer.state_dict()
            assert list(now) == list(state), label
            for k, v in state.items():
                np.testing.assert_array_equal(now[k], v, err_msg=f"{name}.{k} changed by {label}")
            assert layer.training == training, label


def bn_(s: State, *args, **kw):
    return fastbn.batch_norm(*args, backend=kw.pop("backend", s.backend), **kw)


def train_(s: State, *args, **kw):
    return fastbn.batch_norm_train(*args, backend=kw.pop("backend", s.backend), **kw)


def bwd_(s: State, *args, **kw):
    return fastbn.batch_norm_backward(*args, backend=kw.pop("backend", s.backend), **kw)


def moments_(s: State, *args, **kw):
    return fastbn.moments(*args, backend=kw.pop("backend", s.backend), **kw)


ones3, zeros3 = np.ones(3), np.zeros(3)

#: (id, call(state), exception type, message fragment)
CASES = [
    # -- not an array / wrong dtype
    ("list-x", lambda s: bn_(s, s.x.tolist(), s.rm, s.rv, training=True), TypeError, "array"),
    ("none-x", lambda s: train_(s, None), TypeError, "array"),
    ("str-x", lambda s: moments_(s, "abc"), TypeError, "array"),
    (
        "int-x",
        lambda s: bn_(s, s.x.astype(np.int64), s.rm, s.rv, training=True),
        TypeError,
        "float32 or float64",
    ),
    (
        "float16-x",
        lambda s: bn_(s, s.x.astype(np.float16), s.rm, s.rv, training=True),
        TypeError,
        "float32 or float64",
    ),
    ("complex-x", lambda s: train_(s, s.x.astype(np.complex128)), TypeError, "float"),
    ("bool-x", lambda s: moments_(s, s.x > 0), TypeError, "float"),
    (
        "int-running",
        lambda s: bn_(s, s.x, np.zeros(3, int), s.rv, training=True),
        TypeError,
        "running_mean",
    ),
    ("int-dy", lambda s: bwd_(s, s.dy.astype(np.int32), s.x, zeros3, ones3), TypeError, "dy"),
    (
        "float64-dy",
        lambda s: bwd_(s, s.dy.astype(np.float64), s.x, zeros3, ones3),
        TypeError,
        "dtype",
    ),
    # -- ndim
    (
        "0d-x",
        lambda s: bn_(s, np.float32(1.0), s.rm, s.rv, training=True),
        ValueError,
        "2 dimensions",
    ),
    ("0d-array-x", lambda s: train_(s, np.array(1.0)), ValueError, "2 dimensions"),
    ("1d-x", lambda s: bn_(s, s.x[0, 0], s.rm, s.rv, training=True), ValueError, "2 dimensions"),
    ("1d-x-eval", lambda s: bn_(s, s.x[0, 0], s.rm, s.rv), ValueError, "2 dimensions"),
    ("1d-moments", lambda s: moments_(s, s.x[0, 0]), ValueError, "2 dimensions"),
    (
        "1d-backward",
        lambda s: bwd_(s, s.dy[0, 0], s.x[0, 0], zeros3, ones3),
        ValueError,
        "2 dimensions",
    ),
    # -- channel counts
    (
        "rm-channels",
        lambda s: bn_(s, s.x, np.zeros(4), s.rv, training=True),
        ValueError,
        "running_mean",
    ),
    (
        "rv-channels",
        lambda s: bn_(s, s.x, s.rm, np.ones(2), training=True),
        ValueError,
        "running_var",
    ),
    ("rv-channels-eval", lambda s: bn_(s, s.x, s.rm, np.ones(2)), ValueError, "running_var"),
    (
        "rm-2d",
        lambda s: bn_(s, s.x, np.zeros((1, 3)), s.rv, training=True),
        ValueError,
        "running_mean",
    ),
    (
        "weight-channels",
        lambda s: bn_(s, s.x, s.rm, s.rv, np.ones(5), training=True),
        ValueError,
        "weight",
    ),
    (
        "bias-channels",
        lambda s: bn_(s, s.x, s.rm, s.rv, None, np.ones(5), training=True),
        ValueError,
        "bias",
    ),
    ("weight-channels-eval", lambda s: bn_(s, s.x, s.rm, s.rv, np.ones(5)), ValueError, "weight"),
    (
        "nhwc-channels",
        lambda s: bn_(s, s.x, s.rm, s.rv, training=True, layout="NHWC"),
        ValueError,
        "running_mean",
    ),
    ("train-weight", lambda s: train_(s, s.x, np.ones(4)), ValueError, "weight"),
    ("backward-mean", lambda s: bwd_(s, s.dy, s.x, np.zeros(4), ones3), ValueError, "save_mean"),
    (
        "backward-invstd",
        lambda s: bwd_(s, s.dy, s.x, zeros3, np.ones(2)),
        ValueError,
        "save_invstd",
    ),
    (
        "backward-weight",
        lambda s: bwd_(s, s.dy, s.x, zeros3, ones3, np.ones(2)),
        ValueError,
        "weight",
    ),
    ("backward-dy-shape", lambda s: bwd_(s, s.dy[:3], s.x, zeros3, ones3), ValueError, "shape"),
    (
        "layer-channels",
        lambda s: s.bn(make_data((4, 5, 2), np.float32, "NCHW")),
        ValueError,
        "channels",
    ),
    (
        "layer-channels-eval",
        lambda s: s.bn_eval(make_data((4, 5, 2), np.float32, "NCHW")),
        ValueError,
        "channels",
    ),
    # -- layout
    (
        "layout-typo",
        lambda s: bn_(s, s.x, s.rm, s.rv, training=True, layout="NWHC"),
        ValueError,
        "layout",
    ),
    ("layout-lower", lambda s: train_(s, s.x, layout="nchw"), ValueError, "layout"),
    ("layout-none", lambda s: moments_(s, s.x, layout=None), ValueError, "layout"),
    (
        "layout-backward",
        lambda s: bwd_(s, s.dy, s.x, zeros3, ones3, layout="CHW"),
        ValueError,
        "layout",
    ),
    # -- out
    (
        "out-shape",
        lambda s: bn_(s, s.x, s.rm, s.rv, training=True, out=s.out[:3]),
        ValueError,
        "shape",
    ),
    (
        "out-dtype",
        lambda s: bn_(s, s.x, s.rm, s.rv, out=s.out.astype(np.float64)),
        ValueError,
        "dtype",
    ),
    (
        "out-strided",
        lambda s: train_(s, s.x[:, :, ::2], out=s.out[:, :, ::2]),
        ValueError,
        "contiguous",
    ),
    (
        "out-overlap",
        lambda s: bn_(s, s.out[:2], s.rm, s.rv, training=True, out=s.out[1:3]),
        ValueError,
        "overlap",
    ),
    (
        "out-backward",
        lambda s: bwd_(s, s.dy, s.x, zeros3, ones3, out=s.out[:3]),
        ValueError,
        "shape",
    ),
    # -- empty input
    ("empty-n", lambda s: bn_(s, s.x[:0], s.rm, s.rv, training=True), ValueError, "empty"),
    ("empty-spatial", lambda s: bn_(s, s.x[:, :, :0], s.rm, s.rv), ValueError, "empty"),
    ("empty-moments", lambda s: moments_(s, np.zeros((0, 3))), ValueError, "empty"),
    ("empty-layer", lambda s: s.bn(s.x[:0]), ValueError, "empty"),
    # -- training with one value per channel
    (
        "m1-batch_norm",
        lambda s: bn_(s, s.x[:1, :, :1], s.rm, s.rv, training=True),
        ValueError,
        "more than 1 value",
    ),
    (
        "m1-2d",
        lambda s: bn_(s, s.x[:1, :, 0], s.rm, s.rv, training=True),
        ValueError,
        "more than 1 value",
    ),
    (
        "m1-nhwc",
        lambda s: bn_(s, np.zeros((1, 1, 3)), s.rm, s.rv, training=True, layout="NHWC"),
        ValueError,
        "more than 1 value",
    ),
    ("m1-train", lambda s: train_(s, s.x[:1, :, :1]), ValueError, "more than 1 value"),
    ("m1-layer", lambda s: s.bn(s.x[:1, :, :1]), ValueError, "more than 1 value"),
    # -- backends
    (
        "backend-unknown",
        lambda s: bn_(s, s.x, s.rm, s.rv, training=True, backend="tpu"),
        ValueError,
        "backend",
    ),
    (
        "backend-unknown-eval",
        lambda s: bn_(s, s.x, s.rm, s.rv, backend="numpy"),
        ValueError,
        "backend",
    ),
    (
        "backend-unknown-backward",
        lambda s: bwd_(s, s.dy, s.x, zeros3, ones3, backend="Numba"),
        ValueError,
        "backend",
    ),
    ("backend-unknown-moments", lambda s: moments_(s, s.x, backend=""), ValueError, "backend"),
    # -- other arguments
    ("eval-without-running", lambda s: bn_(s, s.x), ValueError, "running_mean"),
    ("eval-half-running", lambda s: bn_(s, s.x, s.rm), ValueError, "running"),
    (
        "training-half-running",
        lambda s: bn_(s, s.x, s.rm, None, training=True),
        ValueError,
        "running",
    ),
    (
        "readonly-running",
        lambda s: bn_(s, s.x, s.rm, np.broadcast_to(1.0, (3,)), training=True),
        ValueError,
        "writable",
    ),
    (
        "eps-negative",
        lambda s: bn_(s, s.x, s.rm, s.rv, training=True, eps=-1.0),
        ValueError,
        "eps",
    ),
    ("eps-nan", lambda s: train_(s, s.x, eps=float("nan")), ValueError, "eps"),
    ("eps-str", lambda s: bn_(s, s.x, s.rm, s.rv, eps="1e-5"), TypeError, "eps"),
    (
        "momentum-nan",
        lambda s: bn_(s, s.x, s.rm, s.rv, training=True, momentum=float("nan")),
        ValueError,
        "momentum",
    ),
    (
        "momentum-str",
        lambda s: bn_(s, s.x, s.rm, s.rv, training=True, momentum="0.1"),
        TypeError,
        "momentum",
    ),
    ("layer-int-x", lambda s: s.bn(s.x.astype(np.int32)), TypeError, "float32 or float64"),
    ("layer-list-x", lambda s: s.bn(s.x.tolist()), TypeError, "array"),
    ("layer-1d-x", lambda s: s.bn(s.x[0, 0]), ValueError, "2 dimensions"),
    ("layer-eval-int-x", lambda s: s.bn_eval(s.x.astype(np.int16)), TypeError, "float"),
    ("layer-eval-empty", lambda s: s.bn_eval(s.x[:0]), ValueError, "empty"),
    ("layer-backward-shape", lambda s: s.bn.backward(s.dy[:2]), ValueError, "shape"),
    ("layer-backward-dtype", lambda s: s.bn.backward(s.dy.astype(np.float64)), TypeError, "dtype"),
]


@pytest.mark.parametrize(("label", "call", "exc", "match"), CASES, ids=[c[0] for c in CASES])
def test_error_matrix(backend, label, call, exc, match):
    s = State(backend)
    with pytest.raises(exc, match=match):
        call(s)
    s.assert_unchanged(f"{label} [backend={backend}]")


@pytest.mark.parametrize("name", UNAVAILABLE or ["<none>"])
def test_unavailable_backend(name):
    if name == "<none>":
        pytest.skip("every known backend is available here")
    s = State(fastbn.available_backends()[0])
    calls = [
        lambda: fastbn.batch_norm(s.x, s.rm, s.rv, training=True, backend=name),
        lambda: fastbn.batch_norm_train(s.x, out=s.out, backend=name),
        lambda: fastbn.moments(s.x, backend=name),
        lambda: fastbn.batch_norm_backward(s.dy, s.x, zeros3, ones3, out=s.out, backend=name),
        lambda: fastbn.BatchNorm(3, backend=name),
    ]
    for call in calls:
        with pytest.raises(fastbn.BackendUnavailableError, match=name) as info:
            call()
        assert "not available" in str(info.value) and len(str(info.value)) > 40
        s.assert_unchanged(f"backend={name}")
    assert issubclass(fastbn.BackendUnavailableError, RuntimeError)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"num_features": 0}, ValueError, "num_features"),
        ({"num_features": -2}, ValueError, "num_features"),
        ({"num_features": 3.0}, TypeError, "num_features"),
        ({"num_features": True}, TypeError, "num_features"),
        ({"num_features": 3, "dtype": np.float16}, TypeError, "dtype"),
        ({"num_features": 3, "dtype": np.int32}, TypeError, "dtype"),
        ({"num_features": 3, "layout": "CHWN"}, ValueError, "layout"),
        ({"num_features": 3, "backend": "tpu"}, ValueError, "backend"),
        ({"num_features": 3, "eps": -1.0}, ValueError, "eps"),
        ({"num_features": 3, "momentum": "x"}, TypeError, "momentum"),
    ],
    ids=lambda v: repr(v) if not isinstance(v, dict) else "-".join(map(str, v.values())),
)
def test_layer_constructor_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fastbn.BatchNorm(**kwargs)


def test_backward_without_forward_and_after_failed_forward(backend):
    bn = fastbn.BatchNorm(3, backend=backend)
    with pytest.raises(RuntimeError, match="forward"):
        bn.backward(np.zeros((4, 3), np.float32))
    with pytest.raises(ValueError):
        bn(np.zeros((1, 3), np.float32))
    assert bn.num_batches_tracked == 0
    np.testing.assert_array_equal(bn.running_mean, 0.0)
    with pytest.raises(RuntimeError, match="forward"):  # the failed forward saved nothing
        bn.backward(np.zeros((1, 3), np.float32))


def test_remembered_checks_still_check_out_and_strides(backend):
    """The dispatch layer remembers the checks and plan of an input's shape, strides and
    dtype (``_dispatch.prepare``): ``out`` is still checked on every call, and an input
    of the same shape with other strides gets a plan of its own."""
    s = State(backend)
    x = s.x
    expected = train_(s, x, out=np.empty_like(x))[0].copy()  # the plan is now remembered
    readonly = np.empty_like(x)
    readonly.flags.writeable = False
    buf = np.empty(2 * x.size, x.dtype)
    x_in_buf = buf[: x.size].reshape(x.shape)
    x_in_buf[...] = x
    shifted = buf[1 : x.size + 1].reshape(x.shape)  # overlaps x_in_buf without being it
    bad_outs = [
        (readonly, "writable"),
        (np.empty(x.shape, np.float64), "dtype"),
        (np.empty((4, 3, 6), x.dtype), "shape"),
        (np.empty((4, 5, 3), x.dtype).transpose(0, 2, 1), "C-contiguous"),
    ]
    for _ in range(2):
        for out, match in bad_outs:
            with pytest.raises(ValueError, match=match):
                train_(s, x, out=out)
        train_(s, x_in_buf, out=np.empty_like(x))
        with pytest.raises(ValueError, match="overlaps"):
            train_(s, x_in_buf, out=shifted)
    s.assert_unchanged(f"remembered checks [backend={backend}]")
    x4 = make_data((2, 3, 4, 5), np.float32, "NCHW")
    want = train_(s, x4)[0]
    channels_last = x4.transpose(0, 2, 3, 1).copy().transpose(0, 3, 1, 2)
    for other in (channels_last, np.asfortranarray(x4), np.repeat(x4, 2, axis=3)[..., ::2]):
        y = train_(s, other)[0]
        np.testing.assert_array_equal(y, want, err_msg=f"strides {other.strides} [{backend}]")
        if other is channels_last:  # computed where it lies: the output is channels last too
            assert y.transpose(0, 2, 3, 1).flags.c_contiguous, (backend, y.strides)
    np.testing.assert_array_equal(train_(s, x)[0], expected, err_msg=f"[{backend}]")
