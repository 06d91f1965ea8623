"""What is benchmarked: cases, their shared constants and their data."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

EPS = 1e-5
MOMENTUM = 0.1

#: The default shapes (channels-first, as PyTorch writes them); shared with ``benchmarks/``.
DEFAULT_SHAPES: tuple[tuple[int, ...], ...] = (
    (32, 64, 56, 56),
    (64, 256, 56, 56),
    (128, 512, 7, 7),
    (4096, 1024),
)
LAYOUTS: tuple[str, ...] = ("NCHW", "NHWC")
#: ``train``: training forward; ``infer``: inference forward; ``backward``: backward alone;
#: ``fwdbwd``: training forward then backward.
OPS: tuple[str, ...] = ("train", "infer", "backward", "fwdbwd")
MODES: tuple[str, ...] = ("fresh", "out")
DTYPES: tuple[str, ...] = ("float32", "float64")
#: Nominal passes over the tensor, and the passes from memory when NCHW channel slices fit
#: in L2 (statistics and normalization of a slice while it is cached).
PASSES: dict[str, tuple[int, int]] = {
    "train": (3, 2),
    "infer": (2, 2),
    "backward": (5, 3),
    "fwdbwd": (8, 5),
}


@dataclass(frozen=True)
class Case:
    """One benchmark case: a logical shape, a layout, an operation and a dtype.

    Parameters
    ----------
    shape : tuple of int
        Channels-first logical shape ``(N, C, *spatial)``.
    layout : {"NCHW", "NHWC"}
        Memory layout of the benchmarked array.
    op : {"train", "infer", "backward", "fwdbwd"}
        The operation.
    dtype : {"float32", "float64"}
        Element type.
    """

    shape: tuple[int, ...]
    layout: str
    op: str
    dtype: str = "float32"

    @property
    def channels(self) -> int:
        """Number of channels ``C``."""
        return self.shape[1]

    @property
    def array_shape(self) -> tuple[int, ...]:
        """Shape of the array in memory (channels last for NHWC)."""
        if self.layout == "NHWC" and len(self.shape) > 2:
            return (self.shape[0], *self.shape[2:], self.shape[1])
        return self.shape

    @property
    def per_channel(self) -> int:
        """Values per channel ``M = size / C``."""
        return int(np.prod(self.shape, dtype=np.int64)) // self.channels

    @property
    def nbytes(self) -> int:
        """Bytes of one tensor of this case."""
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    @property
    def id(self) -> str:
        """A short identifier, e.g. ``train-64x256x56x56-NCHW-float32``."""
        dims = "x".join(map(str, self.shape))
        return f"{self.op}-{dims}-{self.layout}-{self.dtype}"

    def passes(self, l2_bytes: int) -> tuple[int, int]:
        """Nominal passes and passes from memory with cache-resident channel slices.

        Parameters
        ----------
        l2_bytes : int
            Size of one core's L2 cache.

        Returns
        -------
        tuple of int
            ``(nominal, minimum)``; the minimum is lower only for NCHW 3-D+ inputs whose
            channel slice (``N * S`` values) fits in L2.
        """
        nominal, blocked = PASSES[self.op]
        slice_bytes = self.per_channel * np.dtype(self.dtype).itemsize
        if self.layout == "NCHW" and len(self.shape) > 2 and slice_bytes <= l2_bytes:
            return nominal, blocked
        return nominal, nominal


def default_cases(
    shapes: Iterable[Sequence[int]] = DEFAULT_SHAPES,
    layouts: Iterable[str] = LAYOUTS,
    ops: Iterable[str] = OPS,
    dtypes: Iterable[str] = ("float32",),
) -> list[Case]:
    """Expand shapes x layouts x ops x dtypes into cases (the table shared with benchmarks).

    A 2-D shape ``(N, C)`` is the same array in both layouts, so it yields one case, listed
    as NHWC when NHWC is among `layouts`.

    Parameters
    ----------
    shapes : iterable of sequence of int
        Channels-first logical shapes.
    layouts : iterable of str
        Layout names, ``"NCHW"`` and/or ``"NHWC"``.
    ops : iterable of str
        Operation names from `OPS`.
    dtypes : iterable of str
        dtype names.

    Returns
    -------
    list of Case
        Ordered by shape, layout, dtype, op.
    """
    layouts = list(layouts)
    ops = list(ops)
    dtypes = list(dtypes)
    cases: list[Case] = []
    for shape in shapes:
        shape = tuple(int(s) for s in shape)
        if len(shape) == 2:
            use = ["NHWC" if "NHWC" in layouts else layouts[0]]
        else:
            use = layouts
        for layout in use:
            for dtype in dtypes:
                cases.extend(Case(shape, layout, op, dtype) for op in ops)
    return cases


@dataclass
class Data:
    """Arrays shared by every implementation of one (shape, layout, dtype)."""

    x: np.ndarray
    dy: np.ndarray | None
    weight: np.ndarray
    bias: np.ndarray
    running_mean: np.ndarray
    running_var: np.ndarray
    save_mean: np.ndarray
    save_invstd: np.ndarray
    y_out: np.ndarray
    dx_out: np.ndarray | None
    x_nchw: np.ndarray | None = None
    cache: dict[str, Any] = field(default_factory=dict)


def channel_axis(ndim: int, layout: str) -> int:
    """Channel axis of an array of `ndim` dimensions in `layout`."""
    return 1 if layout == "NCHW" or ndim == 2 else ndim - 1


def make_data(case: Case, seed: int = 0, with_dy: bool = True) -> Data:
    """Random input, parameters, statistics and pre-faulted output buffers for `case`.

    Parameters
    ----------
    case : Case
        Its shape, layout and dtype are used (not its op).
    seed : int
        Random seed.
    with_dy : bool
        Also make the output gradient and the ``dx`` buffer.

    Returns
    -------
    Data
        The arrays; ``save_mean``/``save_invstd`` are the float64 batch statistics of ``x``.
    """
    rng = np.random.default_rng(seed)
    dtype = np.dtype(case.dtype)
    shape = case.array_shape
    c = case.channels
    x = rng.standard_normal(shape, dtype=dtype)
    x *= dtype.type(2.0)
    x += dtype.type(0.5)
    dy = rng.standard_normal(shape, dtype=dtype) if with_dy else None
    axes = tuple(i for i in range(x.ndim) if i != channel_axis(x.ndim, case.layout))
    mean = x.mean(axis=axes, dtype=np.float64)
    var = x.var(axis=axes, dtype=np.float64)
    y_out = np.zeros_like(x)  # zeros: the pages are touched, like a reused buffer
    return Data(
        x=x,
        dy=dy,
        weight=(1.0 + 0.1 * rng.standard_normal(c)).astype(dtype),
        bias=(0.1 * rng.standard_normal(c)).astype(dtype),
        running_mean=mean.astype(dtype),
        running_var=(var * 1.01).astype(dtype),
        save_mean=mean,
        save_invstd=1.0 / np.sqrt(var + EPS),
        y_out=y_out,
        dx_out=np.zeros_like(x) if with_dy else None,
    )
