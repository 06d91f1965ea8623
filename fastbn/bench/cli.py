"""The command line: argument types, :class:`Config`, the parser and its resolution."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .cases import DEFAULT_SHAPES, DTYPES, LAYOUTS, MODES, OPS, Case, default_cases
from .impls import BASELINE, PEERS, STREAM_OFF, fastbn_backends
from .machine import available_cpus, peer_missing

_ALIASES = {"ort": "onnxruntime", "np": "numpy", "pytorch": "torch"}


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


def _stream_threshold(text: str) -> int:
    return STREAM_OFF if text.strip().lower() == "off" else _nonnegative_int(text)


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
    warm : bool
        Call each implementation once, untimed, right before each of its timed calls.
    stream_threshold : int or None
        fastbn's streaming-store threshold in bytes for the run (None: its default).
    output_cache : int or None
        fastbn's output-cache limit in bytes for the run (None: its default).
    json_path, plot_path, markdown_path : str or None
        Output files.
    from_json : str or None
        A report written by ``--json`` to output again instead of measuring.
    targets : bool
        Also check the report against the project's speed targets (``targets.py``).
    memory, cold_start, progress : bool
        Extra measurements and the progress bar.
    copy_mib : int
        Size of the array copied for the bandwidth measurement.
    seed : int
        Seed of the random data and of the order of the timed rounds.
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
    warm: bool = False
    stream_threshold: int | None = None
    output_cache: int | None = None
    json_path: str | None = None
    plot_path: str | None = None
    markdown_path: str | None = None
    from_json: str | None = None
    targets: bool = False
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
    parser.add_argument(
        "--warm",
        action="store_true",
        help="call each implementation once, untimed, right before each of its timed calls "
        "(after the pause): its input and output are then in cache when they fit, as for a "
        "layer whose input was just written (the in-cache thread scaling)",
    )
    parser.add_argument(
        "--stream-threshold",
        type=_stream_threshold,
        default=None,
        metavar="BYTES",
        help="fastbn's output size from which streaming stores are used, for this run "
        "(fastbn.set_stream_threshold; 'off': never; default: fastbn's, twice a core's L2)",
    )
    parser.add_argument(
        "--output-cache",
        type=_nonnegative_int,
        default=None,
        metavar="BYTES",
        help="the most bytes of released outputs fastbn keeps to allocate fresh outputs in, "
        "for this run (fastbn.set_output_cache_limit; 0: off, every fresh output gets new "
        "pages; default: fastbn's)",
    )
    parser.add_argument("--json", dest="json_path", metavar="FILE", help="write results as JSON")
    parser.add_argument(
        "--plot", dest="plot_path", metavar="FILE.png", help="write a bar chart (matplotlib)"
    )
    parser.add_argument(
        "--markdown",
        dest="markdown_path",
        metavar="FILE.md",
        help="write the results as Markdown tables (the README's format)",
    )
    parser.add_argument(
        "--from-json",
        metavar="FILE",
        help="measure nothing: read a report written by --json and print it (and write "
        "--markdown, --plot, --json from it); the options of the measurement are ignored",
    )
    parser.add_argument(
        "--targets",
        action="store_true",
        help="also check the report against the project's speed targets (issue 4): a "
        "table per target, each fastbn backend's value, met or not, and the bound the "
        "run's floor puts on any implementation (printed, and added to --markdown)",
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
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the data and of the rounds' order (default: 0)",
    )
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
            missing = peer_missing(name)
            if missing == name:
                notes.append(f"{name}: not installed; skipped (pip install {name})")
            elif missing is not None:
                notes.append(
                    f"{name}: needs {missing}, not installed; skipped (pip install {missing})"
                )
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
    impls: list[str] = []
    if ns.from_json is None:  # a stored report measures nothing: no implementation to find
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
        warm=ns.warm,
        stream_threshold=ns.stream_threshold,
        output_cache=ns.output_cache,
        json_path=ns.json_path,
        plot_path=ns.plot_path,
        markdown_path=ns.markdown_path,
        from_json=ns.from_json,
        targets=ns.targets,
        memory=ns.memory,
        cold_start=ns.cold_start,
        progress=ns.progress,
        copy_mib=ns.copy_mib,
        seed=ns.seed,
        notes=notes,
    )
