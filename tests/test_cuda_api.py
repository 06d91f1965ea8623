"""The public API with ``backend="cuda"``: NumPy in/out and device arrays in/out.

Runs under numba's CUDA simulator (or a real GPU), in the same invocation as
``tests/test_cuda_kernels.py``::

    NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/test_cuda_kernels.py tests/test_cuda_api.py
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import fastbn
from fastbn import reference as ref
from fastbn.backends import cuda as B

pytestmark = pytest.mark.skipif(
    not B.is_available(), reason=B.unavailable_reason() or "cuda unavailable"
)

# NCHW: M = 2*143 = 286 > 256 (two reduction chunks); NHWC: R = 45 rows, C = 37 channels.
CASES = [("NCHW", (2, 3, 11, 13)), ("NHWC", (5, 3, 3, 37)), ("NCHW", (20, 3))]
RTOL = {np.float32: 1e-5, np.float64: 1e-12}


def _close(a: Any, b: Any, rtol: float, what: str) -> None:
    a = np.asarray(B.to_host(a) if B.is_device_array(a) else a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * float(np.max(np.abs(b))), err_msg=what)


def _data(shape: tuple, dtype: Any, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * 2 + 1).astype(dtype)


def _channels(layout: str, shape: tuple) -> int:
    return shape[ref.channel_axis(len(shape), layout)]


# NumPy inputs take the same kernels through a host<->device staging step: one dtype is
# enough for them (the simulator is slow; this keeps the CUDA part of CI short).
@pytest.mark.parametrize(
    ("on_device", "dtype"),
    [(False, np.float32), (True, np.float32), (True, np.float64)],
    ids=["numpy-float32", "device-float32", "device-float64"],
)
@pytest.mark.parametrize(("layout", "shape"), CASES)
def test_functional(layout: str, shape: tuple, dtype: Any, on_device: bool) -> None:
    rtol = RTOL[dtype]
    c = _channels(layout, shape)
    x, dy = _data(shape, dtype, 1), _data(shape, dtype, 2)
    w, b = np.linspace(0.5, 1.5, c), np.linspace(-1, 1, c)
    put = B.to_device if on_device else (lambda a: a)
    kw = {"layout": layout, "backend": "cuda"}

    def check_type(a: Any) -> None:
        assert B.is_device_array(a) == on_device
        assert isinstance(a, np.ndarray) != on_device

    # training forward with running statistics updated in place
    rm, rv = np.zeros(c, dtype), np.ones(c, dtype)
    rmd, rvd = put(rm.copy()), put(rv.copy())
    y = fastbn.batch_norm(put(x), rmd, rvd, put(w), put(b), training=True, **kw)
    check_type(y)
    check_type(rmd)
    y_ref, mean, _ = ref.train_forward(x, w, b, 1e-5, layout)
    _close(y, y_ref, rtol, "batch_norm training")
    m = x.size // c
    want_rm, want_rv = ref.update_running(rm, rv, mean, ref.moments(x, layout)[1], m, 0.1)
    _close(rmd, want_rm, rtol, "running_mean")
    _close(rvd, want_rv, rtol, "running_var")

    # inference
    y = fastbn.batch_norm(put(x), rmd, rvd, put(w), put(b), training=False, **kw)
    check_type(y)
    _close(y, ref.normalize(x, want_rm, want_rv, w, b, 1e-5, layout), rtol, "inference")

    # moments, batch_norm_train, backward (training and eval)
    mean_, var_ = fastbn.moments(put(x), **kw)
    check_type(mean_)
    _close(var_, ref.moments(x, layout)[1], 1e-12, "moments var")
    y, save_mean, save_invstd = fastbn.batch_norm_train(put(x), put(w), None, **kw)
    check_type(save_invstd)
    _close(y, ref.train_forward(x, w, None, 1e-5, layout)[0], rtol, "batch_norm_train")
    dx, dw, db = fastbn.batch_norm_backward(put(dy), put(x), save_mean, save_invstd, put(w), **kw)
    check_type(dx)
    check_type(dw)
    h = lambda a: B.to_host(a) if on_device else a  # noqa: E731
    rdx, rdw, rdb = ref.backward(dy, x, h(save_mean), h(save_invstd), w, layout)
    _close(dx, rdx, rtol, "dx")
    _close(dw, rdw, 1e-10, "dweight")
    _close(db, rdb, 1e-10, "dbias")
    dx, dw, db = fastbn.batch_norm_backward(
        put(dy),
        put(x),
        put(want_rm),
        put(1 / np.sqrt(want_rv + 1e-5)),
        put(w),
        training=False,
        **kw,
    )
    rdx, rdw, rdb = ref.backward_eval(dy, x, want_rm, want_rv, w, 1e-5, layout)
    _close(dx, rdx, rtol, "dx eval")
    _close(dw, rdw, 1e-10, "dweight eval")

    # in place on the device (or in host memory for NumPy inputs)
    xx = put(x.copy())
    y = fastbn.batch_norm_train(xx, put(w), put(b), out=xx, **kw)[0]
    assert y is xx
    _close(xx, ref.train_forward(x, w, b, 1e-5, layout)[0], rtol, "in place")


@pytest.mark.parametrize("on_device", [False, True], ids=["numpy", "device"])
def test_layer(on_device: bool) -> None:
    shape = (2, 3, 11, 13)
    x, dy = _data(shape, np.float32, 3), _data(shape, np.float32, 4)
    bn = fastbn.BatchNorm(3, momentum=None, backend="cuda")
    cpu = fastbn.BatchNorm(3, momentum=None, backend="numba")
    # The layer created with backend="cuda" keeps its state on the device.
    for a in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
        assert B.is_device_array(a)
    put = B.to_device if on_device else (lambda a: a)
    for step in range(2):
        xs = x + step
        y = bn(put(xs))
        assert B.is_device_array(y) == on_device
        _close(y, cpu(xs), 1e-5, "layer forward")
        dx = bn.backward(put(dy))
        assert B.is_device_array(dx) == on_device
        _close(dx, cpu.backward(dy), 1e-5, "layer backward")
        _close(bn.grad_weight, cpu.grad_weight, 1e-5, "grad_weight")
    assert bn.num_batches_tracked == 2
    _close(bn.running_mean, cpu.running_mean, 1e-6, "running_mean")
    _close(bn.running_var, cpu.running_var, 1e-6, "running_var")
    bn.eval()
    cpu.eval()
    _close(bn(put(x)), cpu(x), 1e-5, "eval forward")
    _close(bn.backward(put(dy)), cpu.backward(dy), 1e-5, "eval backward")
    state = bn.state_dict()
    assert all(isinstance(v, np.ndarray) for v in state.values())
    for key, value in cpu.state_dict().items():
        _close(state[key], value, 1e-6, key)
    other = fastbn.BatchNorm(3, backend="cuda")
    other.load_state_dict(state)
    assert B.is_device_array(other.running_var)
    np.testing.assert_array_equal(B.to_host(other.running_var), state["running_var"])


def test_device_input_needs_a_device_backend() -> None:
    xd = B.to_device(np.ones((4, 3)))
    with pytest.raises(TypeError, match="GPU array"):
        fastbn.moments(xd, backend="numba")
    with pytest.raises(ValueError, match=r"writable|device"):
        fastbn.batch_norm(xd, np.zeros(3), np.ones(3), training=True, backend="cuda")


def test_available_backends_lists_cuda() -> None:
    assert "cuda" in fastbn.available_backends()
