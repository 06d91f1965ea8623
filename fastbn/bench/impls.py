"""The callables being timed: fastbn's backends, plain NumPy, PyTorch, ONNX Runtime, copy,
floor."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

import fastbn

from .cases import EPS, MOMENTUM, Case, Data, channel_axis

BASELINE = "numpy"
PEERS: tuple[str, ...] = ("torch", "onnxruntime")
#: Modules a peer needs besides itself (the ONNX model is built with the onnx package).
PEER_NEEDS: dict[str, tuple[str, ...]] = {"onnxruntime": ("onnx",)}


def fastbn_backends() -> list[str]:
    """fastbn's available CPU backends (``cuda`` excluded)."""
    return [b for b in fastbn.available_backends() if b != "cuda"]


def _fastbn_callable(backend: str, case: Case, d: Data, mode: str) -> Callable[[], object]:
    layout = case.layout
    y_out = d.y_out if mode == "out" else None
    dx_out = d.dx_out if mode == "out" else None
    x, dy, w, b = d.x, d.dy, d.weight, d.bias
    if case.op == "train":
        return lambda: fastbn.batch_norm_train(
            x, w, b, EPS, layout=layout, out=y_out, backend=backend
        )
    if case.op == "infer":
        rm, rv = d.running_mean, d.running_var
        return lambda: fastbn.batch_norm(
            x, rm, rv, w, b, False, MOMENTUM, EPS, layout=layout, out=y_out, backend=backend
        )
    if case.op == "backward":
        sm, si = d.save_mean, d.save_invstd
        return lambda: fastbn.batch_norm_backward(
            dy, x, sm, si, w, layout=layout, out=dx_out, backend=backend
        )

    def fwdbwd() -> object:
        y, sm, si = fastbn.batch_norm_train(
            x, w, b, EPS, layout=layout, out=y_out, backend=backend
        )
        return y, fastbn.batch_norm_backward(
            dy, x, sm, si, w, layout=layout, out=dx_out, backend=backend
        )

    return fwdbwd


def _numpy_callable(case: Case, d: Data) -> Callable[[], object]:
    """Plain vectorized NumPy, as a user would write it (two-pass variance)."""
    x, dy = d.x, d.dy
    ax = channel_axis(x.ndim, case.layout)
    axes = tuple(i for i in range(x.ndim) if i != ax)
    bshape = [1] * x.ndim
    bshape[ax] = -1
    w = d.weight.reshape(bshape)
    b = d.bias.reshape(bshape)
    m = case.per_channel
    eps = x.dtype.type(EPS)

    def train() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        mean = x.mean(axis=axes, keepdims=True)
        var = x.var(axis=axes, keepdims=True)
        invstd = 1 / np.sqrt(var + eps)
        return (x - mean) * (invstd * w) + b, mean, invstd

    def backward(mean: np.ndarray, invstd: np.ndarray) -> tuple[np.ndarray, ...]:
        xhat = (x - mean) * invstd
        dbias = dy.sum(axis=axes, keepdims=True)
        dweight = (dy * xhat).sum(axis=axes, keepdims=True)
        dx = (w * invstd) * (dy - dbias / m - xhat * (dweight / m))
        return dx, dweight.ravel(), dbias.ravel()

    if case.op == "train":
        return train
    if case.op == "infer":
        rm = d.running_mean.reshape(bshape)
        rv = d.running_var.reshape(bshape)

        def infer() -> np.ndarray:
            scale = w / np.sqrt(rv + eps)
            return x * scale + (b - rm * scale)

        return infer
    if case.op == "backward":
        sm = d.save_mean.astype(x.dtype).reshape(bshape)
        si = d.save_invstd.astype(x.dtype).reshape(bshape)
        return lambda: backward(sm, si)

    def fwdbwd() -> object:
        y, mean, invstd = train()
        return y, backward(mean, invstd)

    return fwdbwd


def _torch_tensor(torch: Any, a: np.ndarray, case: Case) -> Any:
    """A tensor viewing `a`; NHWC arrays become channels_last NCHW tensors (no copy)."""
    t = torch.from_numpy(a)
    if case.layout == "NHWC" and a.ndim > 2:
        t = t.permute(0, a.ndim - 1, *range(1, a.ndim - 1))
    return t


def _torch_callable(case: Case, d: Data) -> Callable[[], object]:
    import torch
    import torch.nn.functional as F

    x = _torch_tensor(torch, d.x, case)
    w = torch.from_numpy(d.weight)
    b = torch.from_numpy(d.bias)
    rm = torch.from_numpy(d.running_mean.copy())
    rv = torch.from_numpy(d.running_var.copy())
    if case.op == "train":

        def train() -> object:
            with torch.no_grad():
                return F.batch_norm(x, rm, rv, w, b, True, MOMENTUM, EPS)

        return train
    if case.op == "infer":

        def infer() -> object:
            with torch.inference_mode():
                return F.batch_norm(x, rm, rv, w, b, False, MOMENTUM, EPS)

        return infer
    dy = _torch_tensor(torch, d.dy, case)
    if case.op == "backward":
        sm = torch.from_numpy(d.save_mean.astype(d.x.dtype))
        si = torch.from_numpy(d.save_invstd.astype(d.x.dtype))
        bwd = torch.ops.aten.native_batch_norm_backward

        def backward() -> object:
            with torch.no_grad():
                return bwd(dy, x, w, rm, rv, sm, si, True, EPS, [True, True, True])

        return backward
    xg = x.detach().requires_grad_(True)
    wg = w.detach().clone().requires_grad_(True)
    bg = b.detach().clone().requires_grad_(True)

    def fwdbwd() -> object:
        xg.grad = wg.grad = bg.grad = None
        y = F.batch_norm(xg, rm, rv, wg, bg, True, MOMENTUM, EPS)
        y.backward(dy)
        return y, xg.grad, wg.grad, bg.grad

    return fwdbwd


def _ort_session(case: Case, d: Data, threads: int) -> Any:
    """One-node BatchNormalization session for `case`'s logical shape (cached in `d`)."""
    key = f"ort-{threads}"
    if key in d.cache:
        return d.cache[key]
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    elem = TensorProto.FLOAT if d.x.dtype == np.float32 else TensorProto.DOUBLE
    shape = list(case.shape)
    inits = [
        numpy_helper.from_array(d.weight, "scale"),
        numpy_helper.from_array(d.bias, "B"),
        numpy_helper.from_array(d.running_mean, "mean"),
        numpy_helper.from_array(d.running_var, "var"),
    ]
    node = helper.make_node(
        "BatchNormalization", ["X", "scale", "B", "mean", "var"], ["Y"], epsilon=EPS
    )
    graph = helper.make_graph(
        [node],
        "bn",
        [helper.make_tensor_value_info("X", elem, shape)],
        [helper.make_tensor_value_info("Y", elem, shape)],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = min(model.ir_version, 10)
    onnx.checker.check_model(model)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(
        model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
    )
    d.cache[key] = session
    return session


def _ort_callable(case: Case, d: Data, mode: str, threads: int) -> Callable[[], object]:
    session = _ort_session(case, d, threads)
    if case.layout == "NHWC" and len(case.shape) > 2:
        if d.x_nchw is None:
            d.x_nchw = np.ascontiguousarray(np.moveaxis(d.x, -1, 1))
        x = d.x_nchw
    else:
        x = d.x
    if mode == "fresh":
        return lambda: session.run(None, {"X": x})
    out = d.cache.setdefault("ort-out", np.zeros(case.shape, dtype=d.x.dtype))
    binding = session.io_binding()
    binding.bind_cpu_input("X", x)
    binding.bind_output("Y", "cpu", 0, x.dtype, list(case.shape), out.ctypes.data)
    return lambda: session.run_with_iobinding(binding)


def copy_callable(d: Data, threads: int, pool: ThreadPoolExecutor) -> Callable[[], object]:
    """Parallel copy of the case's input into its preallocated output (the roofline)."""
    src = d.x.reshape(-1)
    dst = d.y_out.reshape(-1)
    n = src.size
    bounds = [(i * n // threads, (i + 1) * n // threads) for i in range(threads)]
    if threads == 1:
        return lambda: np.copyto(dst, src)
    return lambda: list(pool.map(lambda b: np.copyto(dst[b[0] : b[1]], src[b[0] : b[1]]), bounds))


def floor_callable(
    case: Case, d: Data, mode: str, threads: int, pool: ThreadPoolExecutor
) -> Callable[[], object]:
    """The least memory traffic of `case`'s operation, by parallel NumPy (the floor).

    Every input of the operation is read once and every output written once, nothing
    else: ``infer`` and ``train`` copy ``x`` into ``y`` (train's statistics, which need
    another read of ``x``, are ignored, so the floor stays a lower bound); ``backward``
    computes ``dx = x + dy``; ``fwdbwd`` does both, each thread copying its slice of ``x``
    into ``y`` and then adding its slices of ``x`` and ``dy`` into ``dx``. The flat arrays
    are split in `threads` contiguous slices, one per task of `pool` (called directly with
    one thread); NumPy releases the GIL.

    Parameters
    ----------
    case : Case
        The operation, shape, layout and dtype.
    d : Data
        Arrays from :func:`~fastbn.bench.make_data` for that case (with ``dy`` and
        ``dx_out`` for ``backward`` and ``fwdbwd``).
    mode : {"fresh", "out"}
        ``fresh``: the outputs are allocated by ``np.empty`` in every call (their page
        faults are timed, as in the fresh implementations); ``out``: they are ``d``'s
        preallocated, pre-faulted ``y_out`` and ``dx_out``.
    threads : int
        Number of slices (and tasks).
    pool : concurrent.futures.ThreadPoolExecutor
        Runs the slices when `threads` > 1 (the pool of the copy roofline).

    Returns
    -------
    callable
        Returns ``y`` (infer, train), ``dx`` (backward) or ``(y, dx)`` (fwdbwd), shaped
        like ``d.x``.
    """
    wants_y = case.op != "backward"
    wants_dx = case.op in ("backward", "fwdbwd")
    if wants_dx and d.dy is None:
        raise ValueError(f"{case.op} needs Data made with with_dy=True")
    x = d.x.reshape(-1)
    dy = d.dy.reshape(-1) if d.dy is not None else x
    n = x.size
    bounds = [(i * n // threads, (i + 1) * n // threads) for i in range(threads)]

    def part(y: np.ndarray | None, dx: np.ndarray | None, lo: int, hi: int) -> None:
        if y is not None:
            np.copyto(y[lo:hi], x[lo:hi])
        if dx is not None:
            np.add(x[lo:hi], dy[lo:hi], out=dx[lo:hi])

    def fill(y: np.ndarray | None, dx: np.ndarray | None) -> None:
        if threads == 1:
            part(y, dx, 0, n)
        else:
            list(pool.map(lambda b: part(y, dx, b[0], b[1]), bounds))

    def result(y: np.ndarray | None, dx: np.ndarray | None) -> object:
        if y is not None and dx is not None:
            return y, dx
        return y if y is not None else dx

    if mode == "out":
        if wants_dx and d.dx_out is None:
            raise ValueError(f"{case.op} needs Data made with with_dy=True")
        y_out = d.y_out if wants_y else None
        dx_out = d.dx_out if wants_dx else None
        y_flat = y_out.reshape(-1) if y_out is not None else None
        dx_flat = dx_out.reshape(-1) if dx_out is not None else None

        def floor_out() -> object:
            fill(y_flat, dx_flat)
            return result(y_out, dx_out)

        return floor_out
    if mode != "fresh":
        raise ValueError(f"unknown mode {mode!r}")
    shape, dtype = d.x.shape, d.x.dtype

    def floor_fresh() -> object:
        y = np.empty(shape, dtype) if wants_y else None
        dx = np.empty(shape, dtype) if wants_dx else None
        fill(
            y.reshape(-1) if y is not None else None,
            dx.reshape(-1) if dx is not None else None,
        )
        return result(y, dx)

    return floor_fresh


def impl_kind(impl: str) -> str:
    """``"fastbn"``, ``"baseline"`` (numpy) or ``"peer"``."""
    if impl == BASELINE:
        return "baseline"
    return "peer" if impl in PEERS else "fastbn"


def has_out_mode(impl: str) -> bool:
    """Whether `impl` can write into a preallocated output (fastbn's ``out=``, ORT's binding)."""
    return impl_kind(impl) == "fastbn" or impl == "onnxruntime"


def impl_modes(impl: str, case: Case, modes: Sequence[str]) -> list[str]:
    """Modes measured for `impl` on `case` (NumPy and PyTorch allocate: fresh only)."""
    if has_out_mode(impl):
        return list(modes)
    return ["fresh"]


def supports(impl: str, case: Case) -> bool:
    """Whether `impl` can run `case` (ONNX Runtime: inference only)."""
    return impl != "onnxruntime" or case.op == "infer"


def make_callable(
    impl: str, case: Case, data: Data, mode: str = "fresh", threads: int = 1
) -> Callable[[], object]:
    """Return a zero-argument callable that performs `case` once with `impl`.

    Parameters
    ----------
    impl : str
        A fastbn backend name, ``"numpy"``, ``"torch"`` or ``"onnxruntime"``.
    case : Case
        The operation, shape, layout and dtype.
    data : Data
        Arrays from :func:`make_data` for that case.
    mode : {"fresh", "out"}
        Allocate the output per call, or write into ``data``'s preallocated buffers.
    threads : int
        Thread count (ONNX Runtime fixes it when the session is made).

    Returns
    -------
    callable
        The operation; its return value holds every output.
    """
    kind = impl_kind(impl)
    if kind == "fastbn":
        return _fastbn_callable(impl, case, data, mode)
    if impl == BASELINE:
        return _numpy_callable(case, data)
    if impl == "torch":
        return _torch_callable(case, data)
    if impl == "onnxruntime":
        return _ort_callable(case, data, mode, threads)
    raise ValueError(f"unknown implementation {impl!r}")


@contextlib.contextmanager
def thread_scope(impls: Sequence[str], n: int) -> Iterator[None]:
    """Set fastbn's and PyTorch's thread counts to `n` (restored on exit)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(fastbn.num_threads(n))
        if "torch" in impls:
            import torch

            old = torch.get_num_threads()
            torch.set_num_threads(n)
            stack.callback(torch.set_num_threads, old)
        yield


#: ``--stream-threshold off``: no output is large enough for streaming stores.
STREAM_OFF = 2**62


def stream_scope(nbytes: int | None) -> contextlib.AbstractContextManager[None]:
    """fastbn's streaming-store threshold set to `nbytes` for a ``with`` block (None: left
    as it is)."""
    return contextlib.nullcontext() if nbytes is None else fastbn.stream_threshold(nbytes)
