"""The BatchNorm layer: parameters, running statistics, train/eval modes, backward."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _dispatch as d
from .functional import batch_norm_backward

__all__ = ["BatchNorm"]


@dataclass
class _Saved:
    """What the last forward leaves for backward: its input (stored so that the same
    canonical view is free to take again) and the statistics it normalized with."""

    x: np.ndarray
    mean: np.ndarray
    invstd: np.ndarray
    training: bool


class BatchNorm:
    """Batch normalization over the channel axis, like ``torch.nn.BatchNorm{1,2,3}d``.

    Parameters
    ----------
    num_features : int
        Number of channels C.
    eps : float
        Added to the variance before the square root.
    momentum : float or None
        Weight of each batch in the running statistics; None for a cumulative average
        (factor ``1/num_batches_tracked``).
    affine : bool
        Learnable ``weight`` (ones) and ``bias`` (zeros); when False both are None.
    track_running_stats : bool
        Keep running statistics; when False batch statistics are used in both modes.
    layout : {"NCHW", "NHWC"}
        Where the channel axis of the inputs is.
    dtype : float32 or float64
        dtype of the parameters and running statistics (inputs may be either).
    backend : {None, "numba", "cython", "cuda"}
        Kernels to use; None picks automatically.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        *,
        layout: str = "NCHW",
        dtype: Any = np.float32,
        backend: str | None = None,
    ) -> None:
        if isinstance(num_features, bool) or not isinstance(num_features, int | np.integer):
            raise TypeError(f"num_features must be an int, got {type(num_features).__name__}")
        if num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {num_features}")
        self.dtype = np.dtype(dtype)
        if self.dtype not in d.FLOAT_DTYPES:
            raise TypeError(f"dtype must be float32 or float64, got {self.dtype}")
        self.num_features = int(num_features)
        self.eps = d.check_number(eps, "eps", minimum=0.0)
        self.momentum = None if momentum is None else d.check_number(momentum, "momentum")
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.layout = d.check_layout(layout)
        module = None if backend is None else d.choose_backend(backend)
        self.backend = None if module is None else module.NAME
        # Where the parameters and running statistics live: host memory, or the device of
        # a backend that has its own memory (``backend="cuda"``).
        self._ops = d.HOST if module is None else d.backend_ops(module)
        self.training = True
        self.weight: np.ndarray | None = None
        self.bias: np.ndarray | None = None
        self.running_mean: np.ndarray | None = None
        self.running_var: np.ndarray | None = None
        self.num_batches_tracked = 0
        self.grad_weight: np.ndarray | None = None
        self.grad_bias: np.ndarray | None = None
        self._saved: _Saved | None = None
        self.reset_parameters()

    # ------------------------------------------------------------ state

    def reset_running_stats(self) -> None:
        """Running mean to zeros, running variance to ones, ``num_batches_tracked`` to 0."""
        if self.track_running_stats:
            self.running_mean = self._ops.full(self.num_features, 0.0, self.dtype)
            self.running_var = self._ops.full(self.num_features, 1.0, self.dtype)
        self.num_batches_tracked = 0

    def reset_parameters(self) -> None:
        """Reset the running statistics, weight to ones and bias to zeros."""
        self.reset_running_stats()
        if self.affine:
            self.weight = self._ops.full(self.num_features, 1.0, self.dtype)
            self.bias = self._ops.full(self.num_features, 0.0, self.dtype)

    def train(self, mode: bool = True) -> BatchNorm:
        """Switch to training mode (or eval mode with ``mode=False``); return self."""
        self.training = bool(mode)
        return self

    def eval(self) -> BatchNorm:
        """Switch to eval mode; return self."""
        return self.train(False)

    def _state_keys(self) -> list[str]:
        keys = ["weight", "bias"] if self.affine else []
        if self.track_running_stats:
            keys += ["running_mean", "running_var", "num_batches_tracked"]
        return keys

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of the parameters and buffers under PyTorch's keys."""
        state = {}
        for key in self._state_keys():
            if key == "num_batches_tracked":
                state[key] = np.array(self.num_batches_tracked, dtype=np.int64)
            else:
                state[key] = np.array(self._ops.to_host(getattr(self, key)))
        return state

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Load a state dict (NumPy arrays or anything array-like, e.g. CPU torch tensors).

        Everything is checked before anything is assigned.

        Raises
        ------
        KeyError
            With ``strict``, a key is missing or unexpected.
        ValueError
            An array has the wrong shape.
        """
        keys = self._state_keys()
        if strict:
            missing = [k for k in keys if k not in state]
            unexpected = [k for k in state if k not in keys]
            if missing or unexpected:
                raise KeyError(
                    f"state dict mismatch: missing keys {missing}, unexpected keys {unexpected}"
                )
        staged: dict[str, Any] = {}
        for key in keys:
            if key not in state:
                continue
            value = np.asarray(state[key])
            if key == "num_batches_tracked":
                if value.size != 1:
                    raise ValueError(f"num_batches_tracked must be a scalar, got {value.shape}")
                staged[key] = int(value.reshape(()))
            else:
                if value.shape != (self.num_features,):
                    raise ValueError(
                        f"{key} must have shape ({self.num_features},), got {value.shape}"
                    )
                staged[key] = self._ops.from_host(value.astype(self.dtype, copy=True))
        for key, value in staged.items():
            setattr(self, key, value)

    # ------------------------------------------------------------ compute

    def __call__(self, x: Any) -> np.ndarray:
        """Forward; see `forward`."""
        return self.forward(x)

    def forward(self, x: Any) -> np.ndarray:
        """Normalize `x`; in training mode update the running statistics.

        Returns a new array of x's shape, dtype and memory order (a device array for a
        device input; a NumPy input of a ``backend="cuda"`` layer goes to the device and
        its result comes back).
        """
        ops = self._ops
        to_host = ops.device and not ops.owns(x)
        if to_host:
            x = ops.from_host(d.as_array(x, "x"))
        y = self._forward(x)
        return ops.to_host(y) if to_host else y

    def _forward(self, x: Any) -> np.ndarray:
        call = d.prepare(x, self.layout, self.backend)
        if call.plan.channels != self.num_features:
            raise ValueError(
                f"expected {self.num_features} channels on the {self.layout} channel axis, "
                f"got input of shape {call.plan.user_shape}"
            )
        if self.track_running_stats and not self.training:  # the running statistics
            y, mean, invstd = d.infer(
                call, self.weight, self.bias, self.running_mean, self.running_var, self.eps
            )
            self._saved = _Saved(call.plan.restore(call.xc), mean, invstd, training=False)
            return y
        c = self.num_features
        ops = call.ops
        w = d.vector_or(self.weight, c, "weight", 1.0, ops)
        b = d.vector_or(self.bias, c, "bias", 0.0, ops)
        if call.plan.count < 2:
            raise ValueError(
                "expected more than 1 value per channel when training, got input of shape "
                f"{call.plan.user_shape}"
            )
        y, mean, var, invstd = d.train_forward(call, w, b, self.eps)
        if self.training and self.track_running_stats:
            self.num_batches_tracked += 1
            factor = 1.0 / self.num_batches_tracked if self.momentum is None else self.momentum
            ops.update_running(
                self.running_mean, self.running_var, mean, var, call.plan.count, factor
            )
        self._saved = _Saved(call.plan.restore(call.xc), mean, invstd, training=True)
        return y

    def backward(self, dy: Any) -> np.ndarray:
        """Gradient with respect to the last forward's input.

        Sets ``grad_weight`` and ``grad_bias`` (None when ``affine=False``). After an
        eval-mode forward the running statistics are constants: ``dx = dy*weight*invstd``.
        The layer keeps a reference to the last input (no copy), as PyTorch saves tensors:
        do not modify it in place between forward and backward.
        """
        if self._saved is None:
            raise RuntimeError("backward needs a forward first")
        saved = self._saved
        ops = self._ops
        to_host = ops.device and not ops.owns(dy)
        if to_host:
            dy = ops.from_host(d.as_array(dy, "dy"))
        dx, dweight, dbias = batch_norm_backward(
            dy,
            saved.x,
            saved.mean,
            saved.invstd,
            self.weight,
            layout=self.layout,
            backend=self.backend,
            training=saved.training,
        )
        if self.affine:
            self.grad_weight = ops.astype(dweight, self.dtype)
            self.grad_bias = ops.astype(dbias, self.dtype)
        return ops.to_host(dx) if to_host else dx

    def __repr__(self) -> str:
        return (
            f"BatchNorm({self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}, "
            f"layout={self.layout!r}, dtype={self.dtype.name}, backend={self.backend!r})"
        )
