"""The functional API: batch_norm, batch_norm_train, batch_norm_backward, moments."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _dispatch as d
from ._threads import get_num_threads

__all__ = ["batch_norm", "batch_norm_backward", "batch_norm_train", "moments"]


def _check_eps(eps: Any) -> float:
    return d.check_number(eps, "eps", minimum=0.0)


def _check_training_count(call: d.Call) -> None:
    if call.plan.count < 2:
        raise ValueError(
            "expected more than 1 value per channel when training, got input of shape "
            f"{call.plan.user_shape}"
        )


def batch_norm(
    x: Any,
    running_mean: np.ndarray | None = None,
    running_var: np.ndarray | None = None,
    weight: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    layout: str = "NCHW",
    out: np.ndarray | None = None,
    backend: str | None = None,
) -> np.ndarray:
    """Batch normalization, as ``torch.nn.functional.batch_norm``.

    Parameters
    ----------
    x : ndarray
        float32 or float64 data, ``(N, C, *spatial)`` for NCHW or ``(N, *spatial, C)`` for NHWC.
    running_mean, running_var : ndarray of shape (C,), optional
        Running statistics. Required when ``training=False``; with ``training=True`` they are
        updated in place (the variance with the unbiased ``M/(M-1)`` correction).
    weight, bias : ndarray of shape (C,), optional
        Affine parameters; None means ones and zeros.
    training : bool
        Use batch statistics (and update the running ones) instead of the running ones.
    momentum : float
        Weight of the batch statistics in the running update.
    eps : float
        Added to the variance before the square root.
    layout : {"NCHW", "NHWC"}
        Where the channel axis is.
    out : ndarray, optional
        C-contiguous array of x's shape and dtype that receives the result; may be ``x``.
    backend : {None, "numba", "cython", "cuda"}
        Kernels to use; None picks automatically.

    Returns
    -------
    ndarray
        The normalized array (``out`` when given).
    """
    call = d.prepare(x, layout, backend, out)
    channels, ops = call.plan.channels, call.ops
    eps = _check_eps(eps)
    if not training:
        if running_mean is None or running_var is None:
            raise ValueError("running_mean and running_var are required when training=False")
        return d.infer(call, weight, bias, running_mean, running_var, eps)[0]
    w = d.vector_or(weight, channels, "weight", 1.0, ops)
    b = d.vector_or(bias, channels, "bias", 0.0, ops)
    _check_training_count(call)
    if (running_mean is None) != (running_var is None):
        raise ValueError("give both running_mean and running_var, or neither")
    if running_mean is not None:
        momentum = d.check_number(momentum, "momentum")
        rm = d.check_writable_vector(running_mean, channels, "running_mean", ops)
        rv = d.check_writable_vector(running_var, channels, "running_var", ops)
    y, mean, var, _ = d.train_forward(call, w, b, eps)
    if running_mean is not None:
        ops.update_running(rm, rv, mean, var, call.plan.count, momentum)
    return y


def batch_norm_train(
    x: Any,
    weight: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    eps: float = 1e-5,
    *,
    layout: str = "NCHW",
    out: np.ndarray | None = None,
    backend: str | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training forward with batch statistics.

    Returns
    -------
    y : ndarray
        Normalized data (``out`` when given).
    save_mean, save_invstd : ndarray of shape (C,), float64
        Batch mean and ``1/sqrt(var + eps)``, as needed by `batch_norm_backward`.
    """
    call = d.prepare(x, layout, backend, out)
    eps = _check_eps(eps)
    w = d.vector_or(weight, call.plan.channels, "weight", 1.0, call.ops)
    b = d.vector_or(bias, call.plan.channels, "bias", 0.0, call.ops)
    _check_training_count(call)
    y, mean, _, invstd = d.train_forward(call, w, b, eps)
    return y, mean, invstd


def batch_norm_backward(
    dy: Any,
    x: Any,
    save_mean: np.ndarray,
    save_invstd: np.ndarray,
    weight: np.ndarray | None = None,
    *,
    layout: str = "NCHW",
    out: np.ndarray | None = None,
    backend: str | None = None,
    training: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of batch normalization with respect to x, weight and bias.

    Parameters
    ----------
    dy : ndarray
        Gradient of the loss with respect to the output; x's shape and dtype.
    x : ndarray
        The forward input.
    save_mean, save_invstd : ndarray of shape (C,)
        From `batch_norm_train` (training) or the running statistics as
        ``running_mean`` and ``1/sqrt(running_var + eps)`` (``training=False``).
    weight : ndarray of shape (C,), optional
        None means ones.
    training : bool
        True (default): the statistics were the batch's, ``dx`` includes their gradient
        (as PyTorch). False: the statistics were constants (eval mode), ``dx = dy*weight*invstd``.
    out : ndarray, optional
        Receives ``dx``; may be ``dy`` or ``x``.

    Returns
    -------
    dx : ndarray
        x's shape, dtype and memory order (``out`` when given).
    dweight, dbias : ndarray of shape (C,), float64
    """
    layout = d.check_layout(layout)
    ops = d.ops_for(x, backend)
    x = d.check_input(x, layout, "x", ops)
    dy = d.check_input(dy, layout, "dy", ops)
    if tuple(dy.shape) != tuple(x.shape):
        raise ValueError(f"dy must have x's shape {x.shape}, got {dy.shape}")
    if dy.dtype != x.dtype:
        raise TypeError(f"dy must have x's dtype {x.dtype}, got {dy.dtype}")
    call = d.prepare(x, layout, backend, out, aliases=(dy,))
    channels = call.plan.channels
    ops = call.ops
    mean = d.f64_vector(save_mean, channels, "save_mean", ops)
    invstd = d.f64_vector(save_invstd, channels, "save_invstd", ops)
    w = d.vector_or(weight, channels, "weight", 1.0, ops)
    if ops.device and not ops.c_contiguous(dy):
        raise ValueError("dy on the device must be C-contiguous")
    dyc = call.plan.view(dy)
    dxc, dx = call.output(call.xc.dtype)
    sum_dy, sum_dy_xmu = ops.vectors(2, channels)
    kernels, threads = call.kernels, get_num_threads()
    if training:
        kernels["backward_train"](dyc, call.xc, mean, invstd, w, dxc, sum_dy, sum_dy_xmu, threads)
    else:
        kernels["backward_reduce"](dyc, call.xc, mean, sum_dy, sum_dy_xmu, threads)
        zeros = ops.full(channels, 0.0)
        kernels["normalize"](dyc, zeros, ops.mul(w, invstd), zeros, dxc, threads)
    return dx, ops.mul(sum_dy_xmu, invstd), sum_dy


def moments(
    x: Any, *, layout: str = "NCHW", backend: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and population variance, float64, in one pass over memory."""
    call = d.prepare(x, layout, backend)
    mean, var = call.ops.vectors(2, call.plan.channels)
    call.kernels["stats"](call.xc, mean, var, get_num_threads())
    return mean, var
