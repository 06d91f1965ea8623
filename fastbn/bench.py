"""``fastbn-bench``: compare fastbn's backends with plain NumPy, PyTorch and ONNX Runtime.

Run ``fastbn-bench`` (or ``python -m fastbn.bench``) with no arguments to benchmark the
default cases: shapes (32, 64, 56, 56), (64, 256, 56, 56), (128, 512, 7, 7) in both layouts
and (4096, 1024) (an ``(N, C)`` input, listed as NHWC), float32, the operations ``train``
(training forward), ``infer`` (inference forward), ``backward`` (backward pass alone) and
``fwdbwd`` (training forward followed by backward), on every available fastbn CPU backend,
plain NumPy and the installed peers, with as many threads as this process may use.

Measurement
-----------
* Shapes are always given channels-first, as PyTorch writes them: ``N,C[,spatial...]``.
  With ``--layout NHWC`` the benchmarked array is the channels-last ``(N, *spatial, C)``
  array of that logical shape (PyTorch gets it as a ``channels_last`` tensor without a copy).
* For every case and thread count the implementations are timed *interleaved*: each one is
  first called ``--warmup`` times (JIT compilation, page faults and caches are excluded),
  then ``--repeat`` rounds call every implementation once, in an order rotated each round,
  with a short ``--pause`` before each call (at most that implementation's previous call
  time) so that a runtime's spinning worker threads do not steal cores from the next
  call. The reported time is the median over the rounds.
* Outputs allocated fresh by each call (``mode = "fresh"``) and outputs written into a
  preallocated, pre-faulted array (``mode = "out"``: fastbn's ``out=``, ONNX Runtime's
  I/O binding) are reported separately.
* The copy roofline is timed *with every case*, interleaved like an implementation: a
  parallel copy of the case's input into a preallocated array of the same size (NumPy
  ``copyto``, one contiguous slice per thread from a thread pool; NumPy releases the GIL and
  glibc ``memcpy`` runs). ``roofline`` is ``passes * t_copy / 2 / t``: the fraction of the
  time a copy-speed kernel making the nominal passes would take. Interleaving makes it
  robust on a shared, noisy machine. The run also measures the machine's copy bandwidth
  once per thread count on a large array (``copy`` in the JSON; ``roofline_run`` uses it):
  the best of
  (a) NumPy ``copyto`` of a large float32 array split in one contiguous slice per thread
  and run from a thread pool (NumPy releases the GIL; glibc ``memcpy``), and (b) a Numba
  ``prange`` copy loop. Bandwidth counts read + write bytes. The run also reports the
  bandwidth of copying into a freshly allocated array (page faults included).
* Effective bandwidth is ``passes * nbytes / median`` with the *nominal* pass count of the
  operation (read or write of one whole tensor each): train 3, infer 2, backward 5,
  fwdbwd 8; the roofline fractions use the same count. An NCHW kernel that keeps each
  channel's slice (N x S values) in L2 needs fewer passes from memory (train 2,
  backward 3, fwdbwd 5: ``passes_min`` in the JSON), so it may exceed 100 %; the nominal
  count keeps the numbers comparable across layouts and matches the targets of issue 4
  (">= 120 % of the 3-pass roofline").
* ``vs <peer>`` is ``time(peer) / time(row)``: above 1 the row is faster. A fastbn row is
  compared with the peer's row of the same mode when the peer has one, else with its fresh
  row. Every implementation runs with the same thread count: ``fastbn.num_threads(n)``,
  ``torch.set_num_threads(n)`` and ONNX Runtime's ``intra_op_num_threads = n``. Plain NumPy
  is single-threaded whatever the count.

Implementations
---------------
``<fastbn backend>``
    ``fastbn.batch_norm_train``, ``fastbn.batch_norm(..., training=False)`` with running
    statistics, ``fastbn.batch_norm_backward``; for every CPU backend in
    ``fastbn.available_backends()``.
``numpy``
    What a user would write: ``x.mean``/``x.var`` (two-pass), broadcasting arithmetic.
``torch``
    ``torch.nn.functional.batch_norm`` (what ``BatchNorm2d`` calls) with running
    statistics, under ``no_grad``/``inference_mode``; ``backward`` calls
    ``aten.native_batch_norm_backward`` (the kernel autograd runs); ``fwdbwd`` is the
    forward with autograd and ``y.backward(dy)``.
``onnxruntime``
    A one-node ``BatchNormalization`` model (inference only). ONNX is channels-first and a
    NHWC model would need Transpose nodes, so NHWC cases time ORT on the NCHW array of the
    same logical shape (noted in the output).

JSON schema (``--json FILE``, ``"version": 1``)
-----------------------------------------------
``{"schema": "fastbn-bench", "version": 1, "created": ISO-8601 str,
"machine": {"python", "platform", "processor", "cpus", "l2_bytes", "numpy", "fastbn",
"backends": [str], "peers": {name: version or null}},
"config": {"shapes": [[int]], "layouts": [str], "dtypes": [str], "ops": [str],
"threads": [int], "implementations": [str], "modes": [str], "repeat", "warmup", "pause"},
"copy": [{"threads", "nbytes", "gbps", "method", "methods": {name: gbps},
"fresh_gbps"}], "notes": [str],
"results": [{"shape": [int], "array_shape": [int], "layout", "dtype", "op", "threads",
"impl", "kind": "fastbn"|"baseline"|"peer", "mode": "fresh"|"out", "median_s", "min_s",
"q1_s", "q3_s", "times_s": [float], "nbytes", "passes", "passes_min", "gbps",
"copy_s", "roofline", "roofline_run", "vs": {impl: ratio}, "thread_scaling": float or null,
"peak_extra_bytes": int or null, "note": str}],
"cold_start": [{"impl", "shape", "layout", "import_s", "first_call_s", "second_call_s",
"note"}]}``.
Times are in seconds, bandwidths in GB/s (1e9 bytes/s), ``roofline`` is a fraction.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import tracemalloc
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import fastbn

__all__ = [
    "DEFAULT_SHAPES",
    "LAYOUTS",
    "OPS",
    "SCHEMA_VERSION",
    "Case",
    "Config",
    "build_parser",
    "default_cases",
    "fastbn_backends",
    "main",
    "make_callable",
    "make_data",
    "measure_copy_bandwidth",
    "parse_args",
    "peak_extra_bytes",
    "run",
]

SCHEMA_VERSION = 1
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
BASELINE = "numpy"
#: The same-size parallel copy timed with every case (the roofline), never a result row.
COPY = "copy"
PEERS: tuple[str, ...] = ("torch", "onnxruntime")
#: Nominal passes over the tensor, and the passes from memory when NCHW channel slices fit
#: in L2 (statistics and normalization of a slice while it is cached).
PASSES: dict[str, tuple[int, int]] = {
    "train": (3, 2),
    "infer": (2, 2),
    "backward": (5, 3),
    "fwdbwd": (8, 5),
}
_ALIASES = {"ort": "onnxruntime", "np": "numpy", "pytorch": "torch"}
_SHORT = {"torch": "torch", "onnxruntime": "ort", "numpy": "numpy"}


# --------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------


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


def parse_shape(text: str) -> tuple[int, ...]:
    """Parse ``"N,C[,spatial...]"`` (``x`` also accepted as separator).

    Parameters
    ----------
    text : str
        The shape as typed on the command line.

    Returns
    -------
    tuple of int
        The shape.

    Raises
    ------
    argparse.ArgumentTypeError
        If it is not at least two positive integers.
    """
    parts = [p for p in text.replace("x", ",").replace(" ", "").split(",") if p]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"shape must be comma-separated integers N,C[,spatial...], got {text!r}"
        ) from None
    if len(shape) < 2 or any(s < 1 for s in shape):
        raise argparse.ArgumentTypeError(
            f"shape needs at least N and C, all >= 1 (channels-first), got {text!r}"
        )
    if int(np.prod(shape, dtype=np.int64)) // shape[1] < 2:
        raise argparse.ArgumentTypeError(
            f"shape {text!r} has one value per channel; training needs at least 2"
        )
    return shape


def _choice_list(choices: Sequence[str], *, upper: bool = False) -> Callable[[str], list[str]]:
    """Return an argparse type that parses a comma-separated subset of `choices`."""

    def parse(text: str) -> list[str]:
        items = []
        for raw in text.split(","):
            item = raw.strip()
            if not item:
                continue
            item = item.upper() if upper else _ALIASES.get(item.lower(), item.lower())
            if item not in choices:
                raise argparse.ArgumentTypeError(
                    f"{raw.strip()!r} is not one of {', '.join(choices)}"
                )
            if item not in items:
                items.append(item)
        if not items:
            raise argparse.ArgumentTypeError("empty list")
        return items

    return parse


def _int_list(text: str) -> list[int]:
    """Parse a comma-separated list of positive integers (thread counts)."""
    try:
        values = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 1,2, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"thread counts must be >= 1, got {text!r}")
    return sorted(set(values))


def _name_list(text: str) -> list[str]:
    """Parse a comma-separated list of implementation names (validated later)."""
    names = []
    for raw in text.split(","):
        name = _ALIASES.get(raw.strip().lower(), raw.strip().lower())
        if name and name not in names:
            names.append(name)
    if not names:
        raise argparse.ArgumentTypeError("empty backend list")
    return names


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


# --------------------------------------------------------------------------------------
# Configuration and command line
# --------------------------------------------------------------------------------------


def available_cpus() -> int:
    """Number of CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def fastbn_backends() -> list[str]:
    """fastbn's available CPU backends (``cuda`` excluded)."""
    return [b for b in fastbn.available_backends() if b != "cuda"]


@dataclass
class Config:
    """Everything a run needs; built by :func:`parse_args`.

    Attributes
    ----------
    shapes, layouts, dtypes, ops, threads, impls, modes
        What to benchmark (see ``fastbn-bench --help``).
    repeat, warmup : int
        Timed rounds and untimed calls before them.
    pause : float
        Seconds slept before every timed call.
    json_path, plot_path : str or None
        Output files.
    memory, cold_start, progress : bool
        Extra measurements and the progress bar.
    copy_mib : int
        Size of the array copied for the bandwidth measurement.
    seed : int
        Seed of the random data.
    notes : list of str
        Notes collected while resolving the configuration (skipped implementations).
    """

    shapes: list[tuple[int, ...]] = field(default_factory=lambda: list(DEFAULT_SHAPES))
    layouts: list[str] = field(default_factory=lambda: list(LAYOUTS))
    dtypes: list[str] = field(default_factory=lambda: ["float32"])
    ops: list[str] = field(default_factory=lambda: list(OPS))
    threads: list[int] = field(default_factory=lambda: [available_cpus()])
    impls: list[str] = field(default_factory=list)
    modes: list[str] = field(default_factory=lambda: list(MODES))
    repeat: int = 7
    warmup: int = 1
    pause: float = 0.005
    json_path: str | None = None
    plot_path: str | None = None
    memory: bool = False
    cold_start: bool = False
    progress: bool = True
    copy_mib: int = 256
    seed: int = 0
    notes: list[str] = field(default_factory=list)

    def cases(self) -> list[Case]:
        """The cases of this run."""
        return default_cases(self.shapes, self.layouts, self.ops, self.dtypes)


def build_parser() -> argparse.ArgumentParser:
    """Return the ``fastbn-bench`` argument parser."""
    known = [*fastbn_backends(), BASELINE, *PEERS]
    parser = argparse.ArgumentParser(
        prog="fastbn-bench",
        description=(
            "Benchmark fastbn's batch normalization (training forward, inference, backward) "
            "against plain NumPy, PyTorch and ONNX Runtime, with the machine's copy "
            "bandwidth as roofline. Without arguments: the default shapes, both layouts, "
            "float32, every operation and available implementation."
        ),
        epilog=(
            "Example: fastbn-bench --shape 64,256,56,56 --layout NCHW,NHWC --threads 1,2 "
            "--op train,infer,backward --backend numba,cython,numpy,torch,onnxruntime "
            "--repeat 20 --json out.json --plot out.png"
        ),
    )
    parser.add_argument(
        "--shape",
        type=parse_shape,
        nargs="+",
        action="extend",
        metavar="N,C[,S...]",
        help="channels-first shapes (repeatable); default: "
        + " ".join(",".join(map(str, s)) for s in DEFAULT_SHAPES),
    )
    parser.add_argument(
        "--layout",
        type=_choice_list(LAYOUTS, upper=True),
        default=list(LAYOUTS),
        help="comma-separated layouts (default: NCHW,NHWC); (N, C) shapes run once",
    )
    parser.add_argument(
        "--dtype",
        type=_choice_list(DTYPES),
        default=["float32"],
        help="comma-separated dtypes (default: float32)",
    )
    parser.add_argument(
        "--op",
        type=_choice_list(OPS),
        default=list(OPS),
        help="comma-separated operations: train (training forward), infer, backward "
        "(backward alone), fwdbwd (forward + backward) (default: all)",
    )
    parser.add_argument(
        "--threads",
        type=_int_list,
        default=None,
        help=f"comma-separated thread counts (default: {available_cpus()}, the usable CPUs)",
    )
    parser.add_argument(
        "--backend",
        type=_name_list,
        default=None,
        help="comma-separated implementations among "
        + ", ".join(dict.fromkeys([*known, "cython"]))
        + " (ort = onnxruntime); default: all available; missing ones are skipped "
        "with a note",
    )
    parser.add_argument(
        "--mode",
        type=_choice_list(MODES),
        default=list(MODES),
        help="fresh (each call allocates its output) and/or out (preallocated output) "
        "(default: both)",
    )
    parser.add_argument(
        "--repeat", type=_positive_int, default=None, help="timed rounds (default: 7)"
    )
    parser.add_argument(
        "--warmup",
        type=_nonnegative_int,
        default=None,
        help="untimed calls per implementation first (default: 1)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="3 timed rounds instead of 7 (unless --repeat)"
    )
    parser.add_argument(
        "--pause",
        type=float,
        default=0.005,
        help="seconds slept before each timed call (default: 0.005)",
    )
    parser.add_argument("--json", dest="json_path", metavar="FILE", help="write results as JSON")
    parser.add_argument(
        "--plot", dest="plot_path", metavar="FILE.png", help="write a bar chart (matplotlib)"
    )
    parser.add_argument(
        "--memory",
        action="store_true",
        help="also report peak extra memory per call (tracemalloc; NumPy allocations "
        "are traced, PyTorch and ORT allocations are not)",
    )
    parser.add_argument(
        "--cold-start",
        action="store_true",
        help="also time, in a fresh process per implementation, the import and the "
        "first two training-forward calls on the first shape",
    )
    parser.add_argument(
        "--copy-mib",
        type=_positive_int,
        default=256,
        help="MiB copied for the copy-bandwidth roofline (default: 256)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--no-progress", dest="progress", action="store_false", help="no progress bar"
    )
    return parser


def resolve_impls(requested: Sequence[str] | None, notes: list[str]) -> list[str]:
    """Turn the requested implementation names into the available ones.

    Parameters
    ----------
    requested : sequence of str or None
        Names from ``--backend``; None means every available one.
    notes : list of str
        Receives one note per skipped implementation.

    Returns
    -------
    list of str
        Available implementations, fastbn backends first, then numpy, then peers.

    Raises
    ------
    ValueError
        For a name that is neither a fastbn backend, ``numpy`` nor a peer.
    """
    backends = fastbn_backends()
    explicit = requested is not None
    if requested is None:
        requested = [*backends, "cython", BASELINE, *PEERS]
    known_fastbn = set(backends) | {"numba", "cython", "cuda"}
    impls: list[str] = []
    for name in requested:
        if name in backends or name == BASELINE:
            impls.append(name)
        elif name == "cuda":
            notes.append("cuda: not a CPU backend; skipped")
        elif name in known_fastbn:
            if explicit or name not in impls:
                reason = _backend_unavailable_reason(name)
                notes.append(f"{name}: fastbn backend not available ({reason}); skipped")
        elif name in PEERS:
            version = peer_version(name)
            if version is None:
                notes.append(f"{name}: not installed; skipped (pip install {name})")
            else:
                impls.append(name)
        else:
            raise ValueError(
                f"unknown implementation {name!r}; expected one of "
                f"{', '.join([*backends, BASELINE, *PEERS])}"
            )
    if not impls:
        raise ValueError("no implementation left to benchmark")
    return list(dict.fromkeys(impls))


def _backend_unavailable_reason(name: str) -> str:
    """Ask fastbn why a backend is missing (its ``BackendUnavailableError`` message)."""
    try:
        from fastbn.backends import get_backend

        get_backend(name)
    except Exception as exc:  # BackendUnavailableError, or anything a broken build raises
        return str(exc)
    return "available"


def parse_args(argv: Sequence[str] | None = None) -> Config:
    """Parse the command line into a :class:`Config`.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name; ``sys.argv[1:]`` when None.

    Returns
    -------
    Config
        The resolved configuration; unavailable implementations are dropped and noted.
    """
    parser = build_parser()
    ns = parser.parse_args(argv)
    notes: list[str] = []
    try:
        impls = resolve_impls(ns.backend, notes)
    except ValueError as exc:
        parser.error(str(exc))
    repeat = ns.repeat if ns.repeat is not None else (3 if ns.quick else 7)
    warmup = ns.warmup if ns.warmup is not None else 1
    if ns.pause < 0:
        parser.error("--pause must be >= 0")
    if ns.plot_path is not None and not ns.plot_path.lower().endswith(".png"):
        parser.error(f"--plot writes a PNG file; give a name ending in .png, not {ns.plot_path}")
    return Config(
        shapes=list(ns.shape) if ns.shape else list(DEFAULT_SHAPES),
        layouts=ns.layout,
        dtypes=ns.dtype,
        ops=ns.op,
        threads=ns.threads if ns.threads else [available_cpus()],
        impls=impls,
        modes=ns.mode,
        repeat=repeat,
        warmup=warmup,
        pause=ns.pause,
        json_path=ns.json_path,
        plot_path=ns.plot_path,
        memory=ns.memory,
        cold_start=ns.cold_start,
        progress=ns.progress,
        copy_mib=ns.copy_mib,
        seed=ns.seed,
        notes=notes,
    )


# --------------------------------------------------------------------------------------
# Machine
# --------------------------------------------------------------------------------------


def l2_cache_bytes(default: int = 2 * 1024 * 1024) -> int:
    """Per-core L2 size from sysfs, or `default` when it cannot be read."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in sorted(os.listdir(base)):
            path = os.path.join(base, entry)
            with open(os.path.join(path, "level")) as f:
                level = f.read().strip()
            with open(os.path.join(path, "type")) as f:
                kind = f.read().strip()
            if level == "2" and kind in ("Unified", "Data"):
                with open(os.path.join(path, "size")) as f:
                    text = f.read().strip()
                mult = {"K": 1024, "M": 1024**2}.get(text[-1], 1)
                return int(text.rstrip("KM")) * mult
    except (OSError, ValueError):
        pass
    return default


def peer_version(name: str) -> str | None:
    """Version of an installed peer (or numba), None when it cannot be imported."""
    try:
        module = importlib.import_module(name)
    except Exception:  # ImportError, or a broken install
        return None
    return str(getattr(module, "__version__", "unknown"))


def _median_time(func: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        func()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


_NUMBA_COPY: Callable[..., None] | None = None


def _numba_copy() -> Callable[..., None] | None:
    """A compiled parallel copy loop, or None without numba."""
    global _NUMBA_COPY
    if _NUMBA_COPY is None:
        try:
            import numba
        except ImportError:
            return None

        @numba.njit(parallel=True, nogil=True, cache=True)
        def copy(src: np.ndarray, dst: np.ndarray) -> None:  # pragma: no cover - jitted
            n = src.size
            nchunks = 256
            for k in numba.prange(nchunks):
                for i in range(k * n // nchunks, (k + 1) * n // nchunks):
                    dst[i] = src[i]

        _NUMBA_COPY = copy
    return _NUMBA_COPY


@contextlib.contextmanager
def _numba_threads(n: int) -> Iterator[None]:
    import numba

    old = numba.get_num_threads()
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    try:
        yield
    finally:
        numba.set_num_threads(old)


def measure_copy_bandwidth(threads: int, nbytes: int, repeat: int = 7) -> dict[str, Any]:
    """Measure the parallel copy bandwidth (read + write bytes per second).

    Parameters
    ----------
    threads : int
        Number of threads that copy.
    nbytes : int
        Size of the copied array.
    repeat : int
        Median over this many copies.

    Returns
    -------
    dict
        ``threads``, ``nbytes``, ``gbps`` (best method), ``method``, ``methods``
        (GB/s per method) and ``fresh_gbps`` (copy into a new array, page faults included).
    """
    n = max(nbytes // 4, 1024)
    src = np.ones(n, dtype=np.float32)
    dst = np.zeros_like(src)
    bounds = [(i * n // threads, (i + 1) * n // threads) for i in range(threads)]
    methods: dict[str, float] = {}
    with ThreadPoolExecutor(threads) as pool:

        def copy_into(target: np.ndarray) -> None:
            list(pool.map(lambda b: np.copyto(target[b[0] : b[1]], src[b[0] : b[1]]), bounds))

        copy_into(dst)
        t = _median_time(lambda: copy_into(dst), repeat)
        methods["numpy-copyto-threads"] = 2 * src.nbytes / t / 1e9
        t = _median_time(lambda: copy_into(np.empty_like(src)), max(3, repeat // 2))
        fresh = 2 * src.nbytes / t / 1e9
    kernel = _numba_copy()
    if kernel is not None:
        with _numba_threads(threads):
            kernel(src, dst)
            t = _median_time(lambda: kernel(src, dst), repeat)
        methods["numba-prange-loop"] = 2 * src.nbytes / t / 1e9
    best = max(methods, key=methods.__getitem__)
    return {
        "threads": threads,
        "nbytes": int(src.nbytes),
        "gbps": methods[best],
        "method": best,
        "methods": methods,
        "fresh_gbps": fresh,
    }


# --------------------------------------------------------------------------------------
# Data and the callables being timed
# --------------------------------------------------------------------------------------


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


def _copy_callable(d: Data, threads: int, pool: ThreadPoolExecutor) -> Callable[[], object]:
    """Parallel copy of the case's input into its preallocated output (the roofline)."""
    src = d.x.reshape(-1)
    dst = d.y_out.reshape(-1)
    n = src.size
    bounds = [(i * n // threads, (i + 1) * n // threads) for i in range(threads)]
    if threads == 1:
        return lambda: np.copyto(dst, src)
    return lambda: list(pool.map(lambda b: np.copyto(dst[b[0] : b[1]], src[b[0] : b[1]]), bounds))


def impl_kind(impl: str) -> str:
    """``"fastbn"``, ``"baseline"`` (numpy) or ``"peer"``."""
    if impl == BASELINE:
        return "baseline"
    return "peer" if impl in PEERS else "fastbn"


def impl_modes(impl: str, case: Case, modes: Sequence[str]) -> list[str]:
    """Modes measured for `impl` on `case` (NumPy and PyTorch allocate: fresh only)."""
    if impl_kind(impl) == "fastbn" or impl == "onnxruntime":
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


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------


@dataclass
class Entry:
    """One implementation/mode of one case at one thread count, and its measurements."""

    impl: str
    mode: str
    func: Callable[[], object]
    times: list[float] = field(default_factory=list)
    peak_extra: int | None = None


def _output_bytes(case: Case) -> int:
    """Bytes a fresh-output call must allocate (y, dx, or both for fwdbwd)."""
    return case.nbytes * (2 if case.op == "fwdbwd" else 1)


def peak_extra_bytes(func: Callable[[], object], case: Case, mode: str) -> int:
    """Peak memory one call allocates beyond the outputs it must return (tracemalloc).

    Parameters
    ----------
    func : callable
        The operation, e.g. from :func:`make_callable`.
    case : Case
        Its case; a fresh-mode call is allowed its outputs (``y``; ``dx``; both for
        ``fwdbwd``).
    mode : {"fresh", "out"}
        How `func` gets its outputs.

    Returns
    -------
    int
        Peak traced bytes minus the allowed outputs (0 at least). tracemalloc sees
        Python's and NumPy's allocations, not a compiled runtime's own (numba NRT, OpenMP,
        PyTorch, ONNX Runtime).
    """
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        result = func()
        _, peak = tracemalloc.get_traced_memory()
        del result
    finally:
        tracemalloc.stop()
    outputs = _output_bytes(case) if mode == "fresh" else 0
    return max(int(peak - base - outputs), 0)


def time_entries(
    entries: list[Entry],
    repeat: int,
    warmup: int,
    pause: float,
    advance: Callable[[int], None] = lambda n: None,
) -> None:
    """Warm every entry up, then time `repeat` interleaved rounds (rotated order).

    Parameters
    ----------
    entries : list of Entry
        Their ``times`` receive one value per round.
    repeat, warmup : int
        Timed rounds; untimed calls per entry before them.
    pause : float
        Seconds slept before each timed call, at most the entry's previous call time
        (so that microsecond calls are not timed after a long idle period).
    advance : callable
        Called with the number of calls done (progress bar).
    """
    last = {}
    for entry in entries:
        last[id(entry)] = 0.0
        for _ in range(warmup):
            t0 = time.perf_counter()
            result = entry.func()
            last[id(entry)] = time.perf_counter() - t0
            del result
        advance(warmup)
    k = len(entries)
    for r in range(repeat):
        for j in range(k):
            entry = entries[(r + j) % k]
            nap = min(pause, last[id(entry)])
            if nap > 0:
                time.sleep(nap)
            t0 = time.perf_counter()
            result = entry.func()
            t1 = time.perf_counter()
            del result
            entry.times.append(t1 - t0)
            last[id(entry)] = t1 - t0
            advance(1)


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


def _plan(config: Config) -> list[tuple[Case, int, list[tuple[str, str]]]]:
    """Every (case, threads) group with the (impl, mode) pairs it times."""
    plan = []
    for case in config.cases():
        pairs = [
            (impl, mode)
            for impl in config.impls
            if supports(impl, case)
            for mode in impl_modes(impl, case, config.modes)
        ]
        plan.extend((case, n, pairs) for n in config.threads)
    return plan


def run(config: Config, console: Any = None) -> dict[str, Any]:
    """Run the benchmark described by `config` and return the report (the JSON document).

    Parameters
    ----------
    config : Config
        What to measure.
    console : rich.console.Console, optional
        Where the progress bar goes; a new console on stderr when None.

    Returns
    -------
    dict
        The report; see the module docstring for its schema.
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = console or Console(stderr=True)
    l2 = l2_cache_bytes()
    notes = list(config.notes)
    if "onnxruntime" in config.impls:
        if any(op != "infer" for op in config.ops):
            notes.append("onnxruntime: inference only (BatchNormalization is an inference op)")
        if "NHWC" in config.layouts and any(len(s) > 2 for s in config.shapes):
            notes.append(
                "onnxruntime on NHWC cases: timed on the NCHW array of the same logical "
                "shape (ONNX BatchNormalization is channels-first; an NHWC model needs "
                "Transpose nodes)"
            )
        notes.append("onnxruntime 'out' mode: I/O binding to a preallocated output")
    if "numpy" in config.impls:
        notes.append("numpy: plain vectorized NumPy, single-threaded at every thread count")
    if "torch" in config.impls:
        notes.append(
            "torch: F.batch_norm with running stats (BatchNorm2d's call); backward = "
            "aten.native_batch_norm_backward; fwdbwd = autograd"
        )
    notes.append(
        "passes (nominal, used for GB/s and roofline): train 3, infer 2, backward 5, "
        "fwdbwd 8; NCHW channel slices within L2 "
        f"({l2 // 1024} KiB) need only 2/2/3/5 from memory (passes_min)"
    )

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    if load is not None:
        notes.append(
            f"load average at start {load[0]:.2f} on {available_cpus()} CPUs (other processes "
            "slow multi-threaded timings; see machine.loadavg for the end of the run)"
        )
    plan = _plan(config)
    total = sum((len(pairs) + 1) * (config.warmup + config.repeat) for _, _, pairs in plan)
    results: list[dict[str, Any]] = []
    copy: dict[int, dict[str, Any]] = {}
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not config.progress,
        transient=True,
    )
    with progress:
        task = progress.add_task("copy bandwidth", total=total + len(config.threads))
        for n in config.threads:
            copy[n] = measure_copy_bandwidth(n, config.copy_mib * 1024 * 1024)
            progress.advance(task)
        data: Data | None = None
        data_key: tuple[Any, ...] | None = None
        for case, n, pairs in plan:
            key = (case.shape, case.layout, case.dtype)
            if key != data_key:
                data = None  # free the previous arrays first
                with_dy = any(op in ("backward", "fwdbwd") for op in config.ops)
                data = make_data(case, config.seed, with_dy=with_dy)
                data_key = key
            assert data is not None
            progress.update(task, description=f"{case.id} {n}t")
            with thread_scope(config.impls, n), ThreadPoolExecutor(n) as pool:
                entries = [
                    Entry(impl, mode, make_callable(impl, case, data, mode, n))
                    for impl, mode in pairs
                ]
                entries.append(Entry(COPY, "out", _copy_callable(data, n, pool)))
                time_entries(
                    entries,
                    config.repeat,
                    config.warmup,
                    config.pause,
                    lambda k: progress.advance(task, k),
                )
                if config.memory:
                    for entry in entries:
                        if impl_kind(entry.impl) in ("fastbn", "baseline"):
                            entry.peak_extra = peak_extra_bytes(entry.func, case, entry.mode)
            results.extend(_rows(case, n, entries, copy[n], l2))
            del entries  # their closures hold the arrays: free them before the next shape
        data = None
    _add_ratios(results)
    report: dict[str, Any] = {
        "schema": "fastbn-bench",
        "version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(l2),
        "config": {
            "shapes": [list(s) for s in config.shapes],
            "layouts": config.layouts,
            "dtypes": config.dtypes,
            "ops": config.ops,
            "threads": config.threads,
            "implementations": config.impls,
            "modes": config.modes,
            "repeat": config.repeat,
            "warmup": config.warmup,
            "pause": config.pause,
        },
        "copy": [copy[n] for n in config.threads],
        "notes": notes,
        "results": results,
        "cold_start": [],
    }
    if config.cold_start:
        report["cold_start"] = cold_start(config)
    return report


def _rows(
    case: Case, threads: int, entries: list[Entry], copy: dict[str, Any], l2: int
) -> list[dict[str, Any]]:
    rows = []
    nominal, minimum = case.passes(l2)
    copy_entry = next(e for e in entries if e.impl == COPY)
    copy_s = statistics.median(copy_entry.times)
    for entry in entries:
        if entry is copy_entry:
            continue
        ts = sorted(entry.times)
        median = statistics.median(ts)
        q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
        gbps = nominal * case.nbytes / median / 1e9
        note = ""
        if entry.impl == "onnxruntime" and case.layout == "NHWC" and len(case.shape) > 2:
            note = "NCHW array (ONNX is channels-first)"
        if entry.impl == BASELINE and threads > 1:
            note = "single-threaded"
        rows.append(
            {
                "shape": list(case.shape),
                "array_shape": list(case.array_shape),
                "layout": case.layout,
                "dtype": case.dtype,
                "op": case.op,
                "threads": threads,
                "impl": entry.impl,
                "kind": impl_kind(entry.impl),
                "mode": entry.mode,
                "median_s": median,
                "min_s": ts[0],
                "q1_s": q[0],
                "q3_s": q[2],
                "times_s": entry.times,
                "nbytes": case.nbytes,
                "passes": nominal,
                "passes_min": minimum,
                "gbps": gbps,
                "copy_s": copy_s,
                "roofline": nominal * copy_s / 2 / median,
                "roofline_run": gbps / copy["gbps"],
                "vs": {},
                "thread_scaling": None,
                "peak_extra_bytes": entry.peak_extra,
                "note": note,
            }
        )
    return rows


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """Fill ``vs`` (peer and numpy ratios) and ``thread_scaling`` in place."""
    index = {
        (
            tuple(r["shape"]),
            r["layout"],
            r["dtype"],
            r["op"],
            r["threads"],
            r["impl"],
            r["mode"],
        ): r
        for r in rows
    }
    for r in rows:
        key = (tuple(r["shape"]), r["layout"], r["dtype"], r["op"])
        if r["kind"] != "peer":
            for other in (*PEERS, BASELINE):
                if other == r["impl"]:
                    continue
                ref = index.get((*key, r["threads"], other, r["mode"])) or index.get(
                    (*key, r["threads"], other, "fresh")
                )
                if ref is not None:
                    r["vs"][other] = ref["median_s"] / r["median_s"]
        one = index.get((*key, 1, r["impl"], r["mode"]))
        if one is not None and r["threads"] != 1:
            r["thread_scaling"] = one["median_s"] / r["median_s"]


def machine_info(l2: int) -> dict[str, Any]:
    """Versions and hardware facts recorded in the report."""
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cpus": available_cpus(),
        "l2_bytes": l2,
        "numpy": np.__version__,
        "fastbn": str(getattr(fastbn, "__version__", "unknown")),
        "backends": fastbn_backends(),
        "peers": {name: peer_version(name) for name in (*PEERS, "numba")},
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


# --------------------------------------------------------------------------------------
# Cold start
# --------------------------------------------------------------------------------------

_COLD_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np
    impl, layout, shape = sys.argv[1], sys.argv[2], [int(s) for s in sys.argv[3].split(",")]
    arr_shape = shape if layout == "NCHW" or len(shape) == 2 else [shape[0], *shape[2:], shape[1]]
    x = np.random.default_rng(0).standard_normal(arr_shape, dtype=np.float32)
    t0 = time.perf_counter()
    if impl == "numpy":
        ax = 1 if layout == "NCHW" or x.ndim == 2 else x.ndim - 1
        axes = tuple(i for i in range(x.ndim) if i != ax)
        def call():
            mean = x.mean(axis=axes, keepdims=True)
            return (x - mean) / np.sqrt(x.var(axis=axes, keepdims=True) + 1e-5)
    elif impl == "torch":
        import torch
        t = torch.from_numpy(x)
        if layout == "NHWC" and x.ndim > 2:
            t = t.permute(0, x.ndim - 1, *range(1, x.ndim - 1))
        def call():
            with torch.no_grad():
                return torch.nn.functional.batch_norm(t, None, None, training=True)
    elif impl == "onnxruntime":
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
        c = shape[1]
        if layout == "NHWC" and x.ndim > 2:
            x = np.ascontiguousarray(np.moveaxis(x, -1, 1))
        ones, zeros = np.ones(c, np.float32), np.zeros(c, np.float32)
        inits = [numpy_helper.from_array(a, n) for a, n in
                 ((ones, "s"), (zeros, "b"), (zeros, "m"), (ones, "v"))]
        node = helper.make_node("BatchNormalization", ["X", "s", "b", "m", "v"], ["Y"])
        vi = helper.make_tensor_value_info
        g = helper.make_graph([node], "bn", [vi("X", TensorProto.FLOAT, shape)],
                              [vi("Y", TensorProto.FLOAT, shape)], initializer=inits)
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)])
        model.ir_version = min(model.ir_version, 10)
        sess = ort.InferenceSession(model.SerializeToString(),
                                    providers=["CPUExecutionProvider"])
        def call():
            return sess.run(None, {"X": x})
    else:
        import fastbn
        def call():
            return fastbn.batch_norm_train(x, layout=layout, backend=impl)
    t1 = time.perf_counter()
    call()
    t2 = time.perf_counter()
    call()
    t3 = time.perf_counter()
    print(json.dumps({"import_s": t1 - t0, "first_call_s": t2 - t1, "second_call_s": t3 - t2}))
    """
)


def cold_start(config: Config) -> list[dict[str, Any]]:
    """Time import + first calls in a fresh interpreter per implementation.

    Parameters
    ----------
    config : Config
        Its first shape and layout and its implementations are used.

    Returns
    -------
    list of dict
        ``impl``, ``shape``, ``layout``, ``import_s`` (importing the library, plus building
        the session for ONNX Runtime), ``first_call_s``, ``second_call_s``, ``note``.
        fastbn backends get two rows: with an empty numba cache (a temporary
        ``NUMBA_CACHE_DIR``: the first call compiles) and with the cache as found.
    """
    shape = config.shapes[0]
    layout = "NHWC" if len(shape) == 2 else config.layouts[0]
    rows = []
    for impl in config.impls:
        variants = [("", None)]
        if impl_kind(impl) == "fastbn":
            variants = [("empty JIT cache", "empty"), ("JIT cache as found", None)]
        for note, cache in variants:
            env = dict(os.environ)
            with tempfile.TemporaryDirectory() as tmp:
                if cache == "empty":
                    env["NUMBA_CACHE_DIR"] = tmp
                proc = subprocess.run(
                    [sys.executable, "-c", _COLD_SCRIPT, impl, layout, ",".join(map(str, shape))],
                    capture_output=True,
                    text=True,
                    check=False,
                    env=env,
                )
            row: dict[str, Any] = {"impl": impl, "shape": list(shape), "layout": layout}
            if proc.returncode == 0:
                row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
                row["note"] = note
                if impl == "onnxruntime":
                    row["note"] = "inference; import includes building the session"
            else:
                err = proc.stderr.strip().splitlines()
                row.update(import_s=None, first_call_s=None, second_call_s=None)
                row["note"] = f"failed: {err[-1] if err else proc.returncode}"
            rows.append(row)
    return rows


# --------------------------------------------------------------------------------------
# Output: table, JSON, plot
# --------------------------------------------------------------------------------------


def _fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.0f} us"


def _fmt_ratio(value: float | None) -> str:
    if value is None:
        return ""
    text = f"{value:.2f}x"
    return f"[green]{text}[/]" if value >= 1 else f"[red]{text}[/]"


def render(report: dict[str, Any], console: Any = None) -> None:
    """Print the copy bandwidth, one rich table per operation, notes and cold start.

    Parameters
    ----------
    report : dict
        The report from :func:`run`.
    console : rich.console.Console, optional
        Where to print; stdout when None.
    """
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    for c in report["copy"]:
        methods = ", ".join(f"{k} {v:.1f}" for k, v in c["methods"].items())
        console.print(
            f"[bold]copy bandwidth[/] {c['threads']} thread(s): {c['gbps']:.1f} GB/s "
            f"(read+write, {c['nbytes'] >> 20} MiB; {methods}; "
            f"into a fresh array {c['fresh_gbps']:.1f})"
        )
    rows = report["results"]
    peers = [p for p in (*PEERS, BASELINE) if any(r["impl"] == p for r in rows)]
    scaling = any(r["thread_scaling"] is not None for r in rows)
    memory = any(r["peak_extra_bytes"] is not None for r in rows)
    multi_dtype = len(report["config"]["dtypes"]) > 1
    for op in report["config"]["ops"]:
        op_rows = [r for r in rows if r["op"] == op]
        if not op_rows:
            continue
        table = Table(
            title=f"{op} ({PASSES[op][0]} passes; vs X = time of X / time of row)",
            title_justify="left",
        )
        for name in ("case", "thr", "impl", "mode"):
            table.add_column(name, no_wrap=True)
        for name in ("median", "GB/s", "roof"):
            table.add_column(name, justify="right", no_wrap=True)
        for p in peers:
            table.add_column(f"vs {_SHORT[p]}", justify="right", no_wrap=True)
        if scaling:
            table.add_column("vs 1 thr", justify="right", no_wrap=True)
        if memory:
            table.add_column("extra mem", justify="right", no_wrap=True)
        table.add_column("note")
        previous = None
        for r in op_rows:
            group = (tuple(r["shape"]), r["layout"], r["dtype"], r["threads"])
            if previous is not None and group != previous:
                table.add_section()
            previous = group
            case = "x".join(map(str, r["shape"])) + " " + r["layout"]
            if multi_dtype:
                case += " " + r["dtype"]
            cells = [
                case,
                str(r["threads"]),
                r["impl"],
                r["mode"],
                _fmt_time(r["median_s"]),
                f"{r['gbps']:.1f}",
                f"{100 * r['roofline']:.0f}%",
            ]
            cells += [_fmt_ratio(r["vs"].get(p)) for p in peers]
            if scaling:
                ts = r["thread_scaling"]
                cells.append(f"{ts:.2f}x" if ts is not None else "")
            if memory:
                pe = r["peak_extra_bytes"]
                cells.append(f"{pe / 1024:.0f} KiB" if pe is not None else "")
            cells.append(r["note"])
            table.add_row(*cells)
        console.print(table)
    if report["cold_start"]:
        table = Table(
            title="cold start: fresh process, import then two calls (training forward; "
            "ONNX Runtime: inference)",
            title_justify="left",
        )
        for name in ("impl", "shape", "layout", "import", "1st call", "2nd call", "note"):
            table.add_column(name, no_wrap=name != "note")
        for r in report["cold_start"]:
            table.add_row(
                r["impl"],
                "x".join(map(str, r["shape"])),
                r["layout"],
                *(
                    _fmt_time(r[k]) if r[k] is not None else "-"
                    for k in ("import_s", "first_call_s", "second_call_s")
                ),
                r["note"],
            )
        console.print(table)
    for note in report["notes"]:
        console.print(f"[dim]note:[/] {note}")


def write_json(report: dict[str, Any], path: str) -> None:
    """Write the report as indented JSON."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
        f.write("\n")


def write_plot(report: dict[str, Any], path: str) -> None:
    """Bar chart of the roofline fraction per case, one panel per operation.

    Uses the largest thread count of the run and matplotlib's Agg canvas (no display).

    Parameters
    ----------
    report : dict
        The report from :func:`run`.
    path : str
        PNG file to write.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    threads = max(report["config"]["threads"])
    rows = [r for r in report["results"] if r["threads"] == threads]
    ops = [op for op in report["config"]["ops"] if any(r["op"] == op for r in rows)]
    fig = Figure(figsize=(13, 3.2 * max(len(ops), 1)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(max(len(ops), 1), 1, squeeze=False)[:, 0]
    for ax, op in zip(axes, ops, strict=False):
        op_rows = [r for r in rows if r["op"] == op]
        cases = list(
            dict.fromkeys(
                ("x".join(map(str, r["shape"])), r["layout"], r["dtype"]) for r in op_rows
            )
        )
        series = list(dict.fromkeys((r["impl"], r["mode"]) for r in op_rows))
        width = 0.8 / max(len(series), 1)
        for k, (impl, mode) in enumerate(series):
            values = []
            for case in cases:
                match = [
                    r["roofline"]
                    for r in op_rows
                    if ("x".join(map(str, r["shape"])), r["layout"], r["dtype"]) == case
                    and (r["impl"], r["mode"]) == (impl, mode)
                ]
                values.append(100 * match[0] if match else np.nan)
            xs = np.arange(len(cases)) + (k - (len(series) - 1) / 2) * width
            ax.bar(xs, values, width, label=f"{impl} ({mode})")
        ax.axhline(100, color="black", linewidth=0.8, linestyle="--")
        ax.set_xticks(np.arange(len(cases)))
        ax.set_xticklabels([f"{s}\n{layout}" for s, layout, _ in cases], fontsize=8)
        ax.set_ylabel("% of copy roofline")
        ax.set_title(f"{op} ({PASSES[op][0]} passes), {threads} thread(s)")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.savefig(path, dpi=100)


# --------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point of ``fastbn-bench``.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name; ``sys.argv[1:]`` when None.

    Returns
    -------
    int
        Exit status (0).
    """
    from rich.console import Console

    config = parse_args(argv)
    report = run(config, Console(stderr=True))
    out = Console()
    if not out.is_terminal:
        out = Console(width=200)  # files and pipes: do not wrap the tables at 80 columns
    render(report, out)
    if config.json_path:
        write_json(report, config.json_path)
    if config.plot_path:
        write_plot(report, config.plot_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
