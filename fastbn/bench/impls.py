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


def statistics_span_the_array(case: Case) -> bool:
    """Whether every value of `case`'s array is needed before any output can be written.

    True for channels-last data (NHWC, and ``(N, C)`` or ``(N, C, 1, ...)`` shapes, whose
    channels interleave in every row): each channel's statistics need values from the
    whole array. Channels-first data holds each channel in one block of memory per sample,
    so the outputs of one channel can be written while the next channel is read.
    """
    spatial = int(np.prod(case.shape[2:], dtype=np.int64))
    return case.layout == "NHWC" or len(case.shape) == 2 or spatial == 1


def floor_unavailable(threads: Sequence[int]) -> str | None:
    """Why the floor cannot be timed at these thread counts (None when it can).

    The floor runs on the Cython extension's C loop (``traffic_floor``): it needs that
    backend, and OpenMP for more than one thread.
    """
    from fastbn.backends import cython_cpu

    if not cython_cpu.is_available():
        return f"floor not timed: it needs the cython backend ({cython_cpu.unavailable_reason()})"
    if max(threads) > 1 and not cython_cpu.openmp_enabled():
        return "floor not timed: the cython backend was built without OpenMP (one thread only)"
    return None


def _bytes(a: np.ndarray | None) -> np.ndarray | None:
    return None if a is None else a.reshape(-1).view(np.uint8)


def floor_callable(case: Case, d: Data, mode: str, threads: int) -> Callable[[], object]:
    """The least memory traffic of `case`'s operation (the floor), by one C loop.

    Every input of the operation is read once and every output written once, and nothing
    is computed (the Cython extension's ``traffic_floor``: bytes moved with the kernels'
    store rule, streaming stores for large outputs; one contiguous slice per thread):
    ``infer`` and ``train`` copy ``x`` into ``y``; ``backward`` writes ``dx = x | dy``
    (bitwise: both inputs read once); ``fwdbwd`` does both.

    When the statistics of a channel span the whole array (see
    :func:`statistics_span_the_array`), no output can be written before every input value
    its statistics need has been read: ``train`` needs all of ``x`` (the batch
    statistics), ``backward`` and ``fwdbwd`` all of ``x`` and ``dy`` (the gradient sums;
    ``fwdbwd`` could gather them in the forward's pass, so one read of each counts). The
    floor then reads those inputs in full first, every thread waiting for the others
    before the first write; the copy may find them in cache, as an implementation may.
    Channels-first inputs hold each channel in one block per sample, where the reads of
    one channel overlap the writes of another: the plain copy, as for ``infer`` (whose
    statistics are given).

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
        Number of slices (and threads).

    Returns
    -------
    callable
        Returns ``y`` (infer, train), ``dx`` (backward) or ``(y, dx)`` (fwdbwd), shaped
        like ``d.x``.
    """
    from fastbn.backends import cython_cpu

    wants_y = case.op != "backward"
    wants_dx = case.op in ("backward", "fwdbwd")
    if wants_dx and (d.dy is None or d.dx_out is None):
        raise ValueError(f"{case.op} needs Data made with with_dy=True")
    if mode not in ("fresh", "out"):
        raise ValueError(f"unknown mode {mode!r}")
    read_first = case.op != "infer" and statistics_span_the_array(case)
    x, dy = _bytes(d.x), _bytes(d.dy) if wants_dx else None
    traffic = cython_cpu.traffic_floor
    shape, dtype = d.x.shape, d.x.dtype

    def floor() -> object:
        if mode == "out":
            y = d.y_out if wants_y else None
            dx = d.dx_out if wants_dx else None
        else:
            y = np.empty(shape, dtype) if wants_y else None
            dx = np.empty(shape, dtype) if wants_dx else None
        traffic(x, dy, _bytes(y), _bytes(dx), read_first, threads)
        if y is not None and dx is not None:
            return y, dx
        return y if y is not None else dx

    return floor


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


@contextlib.contextmanager
def output_cache_scope(nbytes: int | None) -> Iterator[None]:
    """fastbn's output-cache limit set to `nbytes` for a ``with`` block (None: left as it
    is); the buffers the run left in the cache are freed on exit."""
    old = fastbn.get_output_cache_limit()
    if nbytes is not None:
        fastbn.set_output_cache_limit(nbytes)
    try:
        yield
    finally:
        fastbn.set_output_cache_limit(old)
        fastbn.clear_output_cache()
