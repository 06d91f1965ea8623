"""Timing and the run: interleaved rounds, peak memory, the rows of the report."""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import random
import statistics
import time
import tracemalloc
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .cases import MODES, Case, Data, make_data
from .cold import cold_start
from .impls import (
    BASELINE,
    PEERS,
    STREAM_OFF,
    copy_callable,
    floor_callable,
    floor_unavailable,
    impl_kind,
    impl_modes,
    make_callable,
    output_cache_scope,
    stream_scope,
    supports,
    thread_scope,
)
from .machine import available_cpus, l2_cache_bytes, machine_info, measure_copy_bandwidth

if TYPE_CHECKING:
    from .cli import Config

SCHEMA_VERSION = 3
#: The same-size parallel copy timed with every case (the roofline), never a result row.
COPY = "copy"
#: The least-traffic C loop of each case's operation (traffic_floor), timed per mode with every
#: case (``floor_s``, ``floor_vs`` and the report's ``floor`` list), never a result row.
FLOOR = "floor"
#: A note of every report: the definition of the floor.
FLOOR_NOTE = (
    "floor: the least memory traffic of the op, each input read once and each output "
    "written once and nothing computed, by one C loop with fastbn's store rule (Cython "
    "extension's traffic_floor; infer/train: y = x; backward: dx = x | dy; fwdbwd: both; "
    "channels last, where every output waits for statistics over the whole array, "
    "train/backward/fwdbwd first read x (and dy) in full on every thread), per mode "
    "(fresh: np.empty outputs; out: preallocated), timed with the implementations; "
    "time(peer) / floor is about the largest ratio against that peer any implementation "
    "could reach here (fresh: what the first writes into new pages cost depends on their "
    "order, so an implementation can beat the fresh floor by a little)"
)


@dataclass
class Entry:
    """One implementation/mode of one case at one thread count, and its measurements."""

    impl: str
    mode: str
    func: Callable[[], object]
    threads: int = 1
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
    warm: bool = False,
    scope: Callable[[Entry], contextlib.AbstractContextManager[object]] | None = None,
    seed: int = 0,
) -> None:
    """Warm every entry up, then time `repeat` interleaved rounds, each in a new order.

    The order of a round is a random permutation (from `seed`) whose first entry is not the
    last of the round before: a fixed cyclic order, even rotated, gives every entry the same
    predecessor in every round, whose traces (dirty lines, busy threads) it then pays for.

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
    warm : bool
        Call the entry once, untimed, right before each timed call (after the pause), so
        that its data is in cache when it fits.
    scope : callable, optional
        ``scope(entry)`` is a context entered around each call of the entry, outside its
        timing (the run sets the entry's thread count with it: that takes microseconds).
    seed : int
        Seed of the rounds' orders.
    """
    scope = scope or (lambda entry: contextlib.nullcontext())
    last = {}
    for entry in entries:
        last[id(entry)] = 0.0
        for _ in range(warmup):
            with scope(entry):
                t0 = time.perf_counter()
                result = entry.func()
                last[id(entry)] = time.perf_counter() - t0
            del result
        advance(warmup)
    rng = random.Random(seed)
    order = list(entries)
    for _ in range(repeat):
        previous = order[-1]
        rng.shuffle(order)
        if order[0] is previous and len(order) > 1:
            order[0], order[1] = order[1], order[0]
        for entry in order:
            nap = min(pause, last[id(entry)])
            if nap > 0:
                time.sleep(nap)
            with scope(entry):
                if warm:
                    entry.func()  # its result is freed before the timed call
                t0 = time.perf_counter()
                result = entry.func()
                t1 = time.perf_counter()
            del result
            entry.times.append(t1 - t0)
            last[id(entry)] = t1 - t0
            advance(1)


def _plan(config: Config) -> list[tuple[Case, list[tuple[str, str]], list[str]]]:
    """Every case with the (impl, mode) pairs and the floor modes it times (at every count
    of ``config.threads``).

    The floor is timed in every mode of ``config.modes`` and in ``fresh`` when a timed
    implementation has only that mode (NumPy, PyTorch), so every row has its floor; in no
    mode when it cannot run (:func:`~fastbn.bench.impls.floor_unavailable`).
    """
    plan = []
    with_floor = floor_unavailable(config.threads) is None
    for case in config.cases():
        pairs = [
            (impl, mode)
            for impl in config.impls
            if supports(impl, case)
            for mode in impl_modes(impl, case, config.modes)
        ]
        used = {mode for _, mode in pairs} | set(config.modes)
        floor_modes = [mode for mode in MODES if mode in used and with_floor]
        plan.append((case, pairs, floor_modes))
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
    notes.append(floor_unavailable(config.threads) or FLOOR_NOTE)
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
    per_round = len(config.threads) * (config.warmup + config.repeat)
    total = sum((len(pairs) + 1 + len(floor_modes)) * per_round for _, pairs, floor_modes in plan)
    results: list[dict[str, Any]] = []
    floors: list[dict[str, Any]] = []
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
    if config.stream_threshold is not None:
        what = (
            "off"
            if config.stream_threshold >= STREAM_OFF
            else f"for outputs of at least {config.stream_threshold} bytes"
        )
        notes.append(f"fastbn: streaming stores {what} in this run (--stream-threshold)")
    if config.output_cache is not None:
        notes.append(
            f"fastbn: output cache limit {config.output_cache} bytes in this run (--output-cache)"
        )
    with progress, stream_scope(config.stream_threshold), output_cache_scope(config.output_cache):
        task = progress.add_task("copy bandwidth", total=total + len(config.threads))
        for n in config.threads:
            copy[n] = measure_copy_bandwidth(n, config.copy_mib * 1024 * 1024)
            progress.advance(task)
        data: Data | None = None
        data_key: tuple[Any, ...] | None = None
        for case, pairs, floor_modes in plan:
            key = (case.shape, case.layout, case.dtype)
            if key != data_key:
                data = None  # free the previous arrays first
                with_dy = any(op in ("backward", "fwdbwd") for op in config.ops)
                data = make_data(case, config.seed, with_dy=with_dy)
                data_key = key
            assert data is not None
            progress.update(task, description=case.id)
            with contextlib.ExitStack() as stack:
                # Every thread count of a case is timed in the same rounds, so that the
                # thread scaling, too, compares calls taken side by side.
                entries: list[Entry] = []
                for n in config.threads:
                    pool = stack.enter_context(ThreadPoolExecutor(n))
                    with thread_scope(config.impls, n):
                        entries += [
                            Entry(impl, mode, make_callable(impl, case, data, mode, n), n)
                            for impl, mode in pairs
                        ]
                    entries.append(Entry(COPY, "out", copy_callable(data, n, pool), n))
                    entries += [
                        Entry(FLOOR, mode, floor_callable(case, data, mode, n), n)
                        for mode in floor_modes
                    ]
                time_entries(
                    entries,
                    config.repeat,
                    config.warmup,
                    config.pause,
                    lambda k: progress.advance(task, k),
                    config.warm,
                    scope=lambda entry: thread_scope(config.impls, entry.threads),
                    seed=config.seed,
                )
                if config.memory:
                    for entry in entries:
                        if entry.impl in (COPY, FLOOR):
                            continue
                        if impl_kind(entry.impl) in ("fastbn", "baseline"):
                            with thread_scope(config.impls, entry.threads):
                                entry.peak_extra = peak_extra_bytes(entry.func, case, entry.mode)
            for n in config.threads:
                at_n = [entry for entry in entries if entry.threads == n]
                results.extend(_rows(case, n, at_n, copy[n], l2))
                floors.extend(_floor_rows(case, n, at_n))
            del entries  # their closures hold the arrays: free them before the next shape
        data = None
    _add_ratios(results)
    _add_floor(results, floors)
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
            "warm": config.warm,
            "stream_threshold": config.stream_threshold,
            "output_cache": config.output_cache,
        },
        "copy": [copy[n] for n in config.threads],
        "notes": notes,
        "results": results,
        "floor": floors,
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
        if entry.impl in (COPY, FLOOR):
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
                "floor_s": None,
                "floor_vs": {},
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


def _floor_rows(case: Case, threads: int, entries: list[Entry]) -> list[dict[str, Any]]:
    """The report's ``floor`` items of one (case, threads) group: one per timed mode."""
    return [
        {
            "shape": list(case.shape),
            "layout": case.layout,
            "dtype": case.dtype,
            "op": case.op,
            "threads": threads,
            "mode": entry.mode,
            "median_s": statistics.median(entry.times),
            "min_s": min(entry.times),
            "times_s": entry.times,
        }
        for entry in entries
        if entry.impl == FLOOR
    ]


def _floor_key(item: dict[str, Any]) -> tuple[Any, ...]:
    return (
        tuple(item["shape"]),
        item["layout"],
        item["dtype"],
        item["op"],
        item["threads"],
        item["mode"],
    )


def _add_floor(rows: list[dict[str, Any]], floors: list[dict[str, Any]]) -> None:
    """Fill ``floor_s`` and ``floor_vs`` of every row in place.

    ``floor_s`` is the floor median of the row's case, thread count and mode (None when
    it was not timed). ``floor_vs[peer]`` is ``time(peer) / floor_s`` for torch,
    onnxruntime and numpy, with the peer row chosen as for ``vs`` (the row's mode when the
    peer has it, else the peer's fresh row); every row gets it, peer rows included.
    """
    floor = {_floor_key(f): f["median_s"] for f in floors}
    index = {(*_floor_key(r), r["impl"]): r for r in rows}
    for r in rows:
        key = (tuple(r["shape"]), r["layout"], r["dtype"], r["op"], r["threads"])
        floor_s = floor.get((*key, r["mode"]))
        r["floor_s"] = floor_s
        r["floor_vs"] = {}
        if floor_s is None:
            continue
        for other in (*PEERS, BASELINE):
            ref = index.get((*key, r["mode"], other)) or index.get((*key, "fresh", other))
            if ref is not None:
                r["floor_vs"][other] = ref["median_s"] / floor_s
