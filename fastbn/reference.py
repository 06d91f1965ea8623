"""Plain float64 NumPy reference for batch normalization: the oracle of the test suite.

Every function here is written for clarity, not speed: it converts the input to float64,
moves the channel axis to the front and uses NumPy's pairwise sums with the two-pass
variance. Results are float64 whatever the input dtype; callers cast as they need.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "backward",
    "backward_eval",
    "channel_axis",
    "moments",
    "normalize",
    "train_forward",
    "update_running",
]


def channel_axis(ndim: int, layout: str) -> int:
    """Return the channel axis of an array of `ndim` dimensions in `layout`."""
    return 1 if layout == "NCHW" or ndim == 2 else ndim - 1


def _per_channel(x: np.ndarray, layout: str) -> tuple[np.ndarray, int]:
    """Return `x` as float64 with the channel axis first and flattened to (C, M)."""
    axis = channel_axis(x.ndim, layout)
    xc = np.moveaxis(np.asarray(x, dtype=np.float64), axis, 0)
    return xc.reshape(xc.shape[0], -1), axis


def _broadcast(v: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    """Shape a (C,) vector so that it broadcasts along `axis` of an `ndim` array."""
    shape = [1] * ndim
    shape[axis] = -1
    return np.asarray(v, dtype=np.float64).reshape(shape)


def moments(x: np.ndarray, layout: str = "NCHW") -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and population variance (two-pass, float64)."""
    flat, _ = _per_channel(x, layout)
    mean = flat.mean(axis=1)
    var = ((flat - mean[:, None]) ** 2).mean(axis=1)
    return mean, var


def normalize(
    x: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    weight: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    eps: float = 1e-5,
    layout: str = "NCHW",
) -> np.ndarray:
    """`(x - mean) / sqrt(var + eps) * weight + bias` in float64."""
    axis = channel_axis(x.ndim, layout)
    c = x.shape[axis]
    weight = np.ones(c) if weight is None else weight
    bias = np.zeros(c) if bias is None else bias
    invstd = 1.0 / np.sqrt(np.asarray(var, dtype=np.float64) + eps)
    xb = np.asarray(x, dtype=np.float64)
    return (xb - _broadcast(mean, x.ndim, axis)) * _broadcast(
        invstd * weight, x.ndim, axis
    ) + _broadcast(bias, x.ndim, axis)


def train_forward(
    x: np.ndarray,
    weight: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    eps: float = 1e-5,
    layout: str = "NCHW",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training forward: `(y, save_mean, save_invstd)` from the batch statistics."""
    mean, var = moments(x, layout)
    y = normalize(x, mean, var, weight, bias, eps, layout)
    return y, mean, 1.0 / np.sqrt(var + eps)


def backward(
    dy: np.ndarray,
    x: np.ndarray,
    mean: np.ndarray,
    invstd: np.ndarray,
    weight: np.ndarray | None = None,
    layout: str = "NCHW",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training-mode backward: `(dx, dweight, dbias)` as PyTorch computes them.

    `dx = weight*invstd*(dy - mean(dy) - xhat*mean(dy*xhat))` with `xhat = (x-mean)*invstd`.
    """
    axis = channel_axis(x.ndim, layout)
    c = x.shape[axis]
    weight = np.ones(c) if weight is None else np.asarray(weight, dtype=np.float64)
    dyf, _ = _per_channel(dy, layout)
    xf, _ = _per_channel(x, layout)
    xhat = (xf - np.asarray(mean)[:, None]) * np.asarray(invstd)[:, None]
    dbias = dyf.sum(axis=1)
    dweight = (dyf * xhat).sum(axis=1)
    m = xf.shape[1]
    dxf = (weight * invstd)[:, None] * (dyf - dbias[:, None] / m - xhat * dweight[:, None] / m)
    dx = np.moveaxis(dxf.reshape(np.moveaxis(x, axis, 0).shape), 0, axis)
    return dx, dweight, dbias


def backward_eval(
    dy: np.ndarray,
    x: np.ndarray,
    running_mean: np.ndarray,
    running_var: np.ndarray,
    weight: np.ndarray | None = None,
    eps: float = 1e-5,
    layout: str = "NCHW",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Backward of an eval-mode forward (running statistics are constants)."""
    axis = channel_axis(x.ndim, layout)
    c = x.shape[axis]
    weight = np.ones(c) if weight is None else np.asarray(weight, dtype=np.float64)
    invstd = 1.0 / np.sqrt(np.asarray(running_var, dtype=np.float64) + eps)
    dyf, _ = _per_channel(dy, layout)
    xf, _ = _per_channel(x, layout)
    xhat = (xf - np.asarray(running_mean, dtype=np.float64)[:, None]) * invstd[:, None]
    dx = np.asarray(dy, dtype=np.float64) * _broadcast(weight * invstd, x.ndim, axis)
    return dx, (dyf * xhat).sum(axis=1), dyf.sum(axis=1)


def update_running(
    running_mean: np.ndarray,
    running_var: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    m: int,
    momentum: float,
) -> tuple[np.ndarray, np.ndarray]:
    """New running statistics after one batch: `(1-momentum)*old + momentum*new`.

    `var` is the population variance of the batch; the running variance takes the unbiased
    one (`var * m / (m - 1)`).
    """
    unbiased = np.asarray(var, dtype=np.float64) * m / (m - 1)
    new_mean = (1 - momentum) * np.asarray(running_mean, dtype=np.float64) + momentum * mean
    new_var = (1 - momentum) * np.asarray(running_var, dtype=np.float64) + momentum * unbiased
    return new_mean, new_var
