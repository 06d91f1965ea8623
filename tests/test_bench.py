"""Tests of the ``fastbn-bench`` tool's behaviour (no timing is asserted)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fastbn
from fastbn import bench, reference

TINY = ["--shape", "4,3,5,5", "--repeat", "2", "--warmup", "1", "--copy-mib", "1"]
#: The end of a Markdown table title when the report has a floor.
FLOOR_TITLE = (
    "; floor = least traffic of the same bytes (a C loop moving them, nothing computed; "
    "channels last: inputs read in full first), same run"
)
CPU_BACKENDS = bench.fastbn_backends()


def fast_impls() -> str:
    """fastbn's CPU backends and numpy: no peer import, so the run stays short."""
    return ",".join([*CPU_BACKENDS, "numpy"])


# -- argument parsing -------------------------------------------------------------------


def test_defaults_are_the_readme_main_job() -> None:
    config = bench.parse_args([])
    assert config.shapes == list(bench.DEFAULT_SHAPES)
    assert config.layouts == ["NCHW", "NHWC"]
    assert config.dtypes == ["float32"]
    assert config.ops == list(bench.OPS)
    assert config.threads == [bench.available_cpus()]
    assert config.modes == ["fresh", "out"]
    assert (config.repeat, config.warmup) == (7, 1)
    for name in CPU_BACKENDS:
        assert name in config.impls
    assert "numpy" in config.impls
    assert "cuda" not in config.impls


def test_default_cases_share_one_table() -> None:
    cases = bench.default_cases()
    # 3 four-dimensional shapes in 2 layouts + (4096, 1024) once, times the operations.
    assert len(cases) == (3 * 2 + 1) * len(bench.OPS)
    two_d = [c for c in cases if len(c.shape) == 2]
    assert {c.layout for c in two_d} == {"NHWC"}
    assert {c.shape for c in cases} == set(bench.DEFAULT_SHAPES)


def test_quick_and_explicit_repeat() -> None:
    quick = bench.parse_args(["--quick"])
    assert (quick.repeat, quick.warmup) == (3, 1)
    explicit = bench.parse_args(["--quick", "--repeat", "7", "--warmup", "0"])
    assert (explicit.repeat, explicit.warmup) == (7, 0)


def test_lists_are_parsed_and_normalized() -> None:
    config = bench.parse_args(
        [
            "--shape",
            "64,256,56,56",
            "8x3x4",
            "--shape",
            "4096,1024",
            "--layout",
            "nhwc,NCHW,nhwc",
            "--threads",
            "2,1,2",
            "--dtype",
            "float64",
            "--op",
            "infer,train",
            "--mode",
            "out",
            "--backend",
            "np",
        ]
    )
    assert config.shapes == [(64, 256, 56, 56), (8, 3, 4), (4096, 1024)]
    assert config.layouts == ["NHWC", "NCHW"]
    assert config.threads == [1, 2]
    assert config.dtypes == ["float64"]
    assert config.ops == ["infer", "train"]
    assert config.modes == ["out"]
    assert config.impls == ["numpy"]


@pytest.mark.parametrize(
    "argv",
    [
        ["--shape", "64"],  # no channel axis
        ["--shape", "4,0,5"],  # empty axis
        ["--shape", "a,b"],
        ["--shape", "1,8"],  # one value per channel: training is undefined
        ["--layout", "NCWH"],
        ["--layout", ","],
        ["--dtype", "float16"],
        ["--op", "predict"],
        ["--threads", "0"],
        ["--threads", "two"],
        ["--repeat", "0"],
        ["--mode", "inplace"],
        ["--backend", "tensorflow"],
        ["--plot", "out.svg"],
        ["--pause", "-1"],
    ],
)
def test_bad_arguments_exit_with_usage_error(argv: list[str], capsys: Any) -> None:
    with pytest.raises(SystemExit) as info:
        bench.parse_args(argv)
    assert info.value.code == 2
    assert "fastbn-bench" in capsys.readouterr().err


def test_case_geometry() -> None:
    case = bench.Case((64, 256, 56, 56), "NHWC", "train")
    assert case.array_shape == (64, 56, 56, 256)
    assert case.channels == 256
    assert case.per_channel == 64 * 56 * 56
    assert case.nbytes == 64 * 256 * 56 * 56 * 4
    l2 = 2 * 1024 * 1024
    assert case.passes(l2) == (3, 3)  # NHWC: no cache-resident channel slices
    nchw = bench.Case((64, 256, 56, 56), "NCHW", "backward")
    assert nchw.passes(l2) == (5, 3)
    assert nchw.passes(1024) == (5, 5)  # slice larger than that L2
    assert bench.Case((4096, 1024), "NHWC", "infer", "float64").array_shape == (4096, 1024)


# -- peers ----------------------------------------------------------------------------


@pytest.mark.parametrize("peer", ["torch", "onnxruntime"])
def test_missing_peer_is_skipped_with_a_note(monkeypatch: Any, peer: str) -> None:
    monkeypatch.setitem(sys.modules, peer, None)  # makes `import peer` raise ImportError
    config = bench.parse_args(["--backend", f"numpy,{peer}"])
    assert config.impls == ["numpy"]
    assert any(note.startswith(f"{peer}: not installed") for note in config.notes)


def test_peer_without_a_module_it_needs_is_skipped_with_a_note(monkeypatch: Any) -> None:
    runtime = types.ModuleType("onnxruntime")
    runtime.__version__ = "1.31.1"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "onnxruntime", runtime)  # installed (or not: a stand-in)
    monkeypatch.setitem(sys.modules, "onnx", None)  # onnxruntime alone cannot build the model
    config = bench.parse_args(["--backend", "numpy,onnxruntime"])
    assert config.impls == ["numpy"]
    assert "onnxruntime: needs onnx, not installed; skipped (pip install onnx)" in config.notes


def test_missing_peers_by_default_still_run(monkeypatch: Any) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    config = bench.parse_args([])
    assert "torch" not in config.impls and "onnxruntime" not in config.impls
    assert len([n for n in config.notes if "not installed" in n]) == 2


def test_only_missing_implementations_is_an_error(monkeypatch: Any) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(SystemExit):
        bench.parse_args(["--backend", "torch"])


# -- what is timed computes batch norm ---------------------------------------------------


def _expected(case: bench.Case, data: bench.Data) -> np.ndarray:
    x = data.x
    if case.op == "infer":
        return reference.normalize(
            x,
            data.running_mean,
            data.running_var,
            data.weight,
            data.bias,
            bench.EPS,
            case.layout,
        )
    y, mean, invstd = reference.train_forward(x, data.weight, data.bias, bench.EPS, case.layout)
    if case.op == "train":
        return y
    return reference.backward(data.dy, x, mean, invstd, data.weight, case.layout)[0]


def _first_array(result: Any, case: bench.Case) -> np.ndarray:
    """The y (train/infer) or dx (backward/fwdbwd) in whatever a callable returned."""
    if case.op == "fwdbwd":
        result = result[1]
    while isinstance(result, tuple | list):
        result = result[0]
    if hasattr(result, "detach"):
        result = result.detach().numpy()
    return np.asarray(result)


def _impls_for_check() -> list[str]:
    impls = [*CPU_BACKENDS, "numpy"]
    impls += [p for p in bench.PEERS if bench.peer_missing(p) is None]
    return impls


@pytest.mark.parametrize("impl", _impls_for_check())
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("op", bench.OPS)
def test_every_callable_computes_batch_norm(impl: str, layout: str, op: str) -> None:
    case = bench.Case((4, 3, 5, 5), layout, op, "float32")  # kernels the tiny run compiles
    if not bench.supports(impl, case):
        pytest.skip(f"{impl} does not do {op}")
    data = bench.make_data(case, seed=1)
    expected = _expected(case, data)
    for mode in bench.impl_modes(impl, case, bench.MODES):
        result = bench.make_callable(impl, case, data, mode, threads=1)()
        if impl == "onnxruntime":
            got = data.cache["ort-out"] if mode == "out" else result[0]
            if layout == "NHWC":
                got = np.moveaxis(got, 1, -1)
        else:
            got = _first_array(result, case)
        got = np.asarray(got)
        if impl == "torch" and layout == "NHWC":
            got = np.moveaxis(got, 1, -1)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5, err_msg=f"{mode}")


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view(f"u{a.itemsize}")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("mode", bench.MODES)
@pytest.mark.parametrize("op", bench.OPS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_floor_moves_the_bytes(op: str, mode: str, threads: int, dtype: str) -> None:
    case = bench.Case((5, 3, 7), "NHWC", op, dtype)  # 105 values: unequal slices
    data = bench.make_data(case, seed=2)
    result = bench.impls.floor_callable(case, data, mode, threads)()
    x, dy = _bits(data.x), _bits(data.dy)
    outputs = []  # (returned, expected bits, preallocated buffer)
    if op == "fwdbwd":
        outputs = [(result[0], x, data.y_out), (result[1], x | dy, data.dx_out)]
    elif op == "backward":
        outputs = [(result, x | dy, data.dx_out)]
    else:
        outputs = [(result, x, data.y_out)]
    for got, expected, buffer in outputs:
        assert got.shape == data.x.shape and got.dtype == data.x.dtype
        np.testing.assert_array_equal(_bits(got), expected, err_msg=f"{case.id} {mode}")
        assert (got is buffer) == (mode == "out")  # fresh: a new array every call


@pytest.mark.parametrize(
    ("shape", "layout", "op", "read_first"),
    [
        ((5, 3, 7), "NHWC", "train", True),  # read x, then copy
        ((5, 3, 7), "NHWC", "backward", True),  # read x and dy, then write dx
        ((5, 3, 7), "NHWC", "fwdbwd", True),
        ((5, 3, 7), "NHWC", "infer", False),  # given statistics: nothing to read first
        ((6, 4), "NHWC", "train", True),
        ((5, 3, 1, 1), "NCHW", "train", True),  # one value per sample: channels interleave
        ((5, 3, 7), "NCHW", "train", False),  # channel blocks: reads and writes overlap
        ((5, 3, 7), "NCHW", "fwdbwd", False),
    ],
)
def test_floor_reads_what_the_statistics_need_first(
    shape: tuple[int, ...], layout: str, op: str, read_first: bool, monkeypatch: Any
) -> None:
    case = bench.Case(shape, layout, op, "float32")
    assert bench.impls.statistics_span_the_array(case) == (layout == "NHWC" or read_first)
    calls = []
    monkeypatch.setattr(
        "fastbn.backends.cython_cpu.traffic_floor", lambda *args: calls.append(args)
    )
    bench.impls.floor_callable(case, bench.make_data(case, seed=3), "out", 2)()
    [(_, dy, y, dx, first, threads)] = calls
    assert (first, threads) == (read_first, 2)
    wants_dx = op in ("backward", "fwdbwd")
    assert (dy is not None, dx is not None) == (wants_dx, wants_dx)
    assert (y is not None) == (op != "backward")


def test_floor_unavailable_without_the_extension_or_its_openmp(monkeypatch: Any) -> None:
    from fastbn.backends import cython_cpu

    assert bench.impls.floor_unavailable([1, 2]) is None or not cython_cpu.openmp_enabled()
    monkeypatch.setattr(cython_cpu, "openmp_enabled", lambda: False)
    assert "without OpenMP" in bench.impls.floor_unavailable([1, 2])
    assert bench.impls.floor_unavailable([1]) is None
    monkeypatch.setattr(cython_cpu, "is_available", lambda: False)
    assert "needs the cython backend" in bench.impls.floor_unavailable([1])
    config = bench.parse_args([*TINY, "--op", "infer", "--threads", "1"])
    assert all(not floor_modes for _, _, floor_modes in bench.timing._plan(config))


def test_floor_needs_the_output_gradient() -> None:
    case = bench.Case((4, 3), "NHWC", "backward")
    data = bench.make_data(case, with_dy=False)
    with pytest.raises(ValueError, match="with_dy"):
        bench.impls.floor_callable(case, data, "out", 1)


# -- timing loop ------------------------------------------------------------------------


def test_time_entries_warms_up_and_interleaves() -> None:
    calls: list[str] = []

    def recorder(name: str) -> Any:
        return lambda: calls.append(name)

    entries = [bench.Entry(name, "fresh", recorder(name)) for name in "abc"]
    done: list[int] = []
    bench.time_entries(entries, repeat=3, warmup=2, pause=0.0, advance=done.append)
    assert calls[:6] == ["a", "a", "b", "b", "c", "c"]
    rounds = [calls[6 + 3 * r : 9 + 3 * r] for r in range(3)]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds), rounds
    assert all(len(e.times) == 3 for e in entries)
    assert sum(done) == 3 * (2 + 3)


def test_rounds_are_shuffled_reproducibly_and_never_repeat_an_entry_back_to_back() -> None:
    def orders(seed: int) -> list[str]:
        calls: list[str] = []
        entries = [bench.Entry(n, "fresh", lambda n=n: calls.append(n)) for n in "abcde"]
        bench.time_entries(entries, repeat=40, warmup=1, pause=0.0, seed=seed)
        return calls[5:]

    calls = orders(0)
    rounds = ["".join(calls[5 * r : 5 * r + 5]) for r in range(40)]
    assert all(sorted(r) == list("abcde") for r in rounds)
    # A fixed cyclic order would give every entry one predecessor: here each gets several.
    predecessors = {
        n: {calls[i - 1] for i in range(1, len(calls)) if calls[i] == n} for n in "abcde"
    }
    assert all(len(p) >= 3 for p in predecessors.values()), predecessors
    assert all(calls[i] != calls[i - 1] for i in range(1, len(calls)))
    assert calls[0] != "e"  # the last entry warmed up
    assert orders(0) == calls
    assert orders(1) != calls


def test_warm_calls_each_entry_again_right_before_its_timed_call() -> None:
    calls: list[str] = []
    entries = [bench.Entry(name, "out", lambda name=name: calls.append(name)) for name in "ab"]
    bench.time_entries(entries, repeat=2, warmup=1, pause=0.0, warm=True)
    assert calls[:2] == ["a", "b"]  # warm-up
    pairs = [calls[i : i + 2] for i in range(2, len(calls), 2)]
    assert all(p[0] == p[1] for p in pairs), calls  # the warm call, then the timed one
    assert sorted(p[0] for p in pairs) == ["a", "a", "b", "b"]
    assert all(len(e.times) == 2 for e in entries)


def test_scope_is_entered_around_every_call_but_not_timed() -> None:
    """The run sets each entry's thread count around its calls (microseconds that would
    weigh on small cases); the calls run inside the scope, the timing excludes it."""
    active: list[str] = []
    inside: list[bool] = []

    @contextlib.contextmanager
    def slow_scope(entry: Any) -> Any:
        time.sleep(0.02)
        active.append(entry.impl)
        try:
            yield
        finally:
            active.pop()

    entries = [
        bench.Entry(name, "out", lambda name=name: inside.append(active == [name]))
        for name in "ab"
    ]
    bench.time_entries(entries, repeat=2, warmup=1, pause=0.0, warm=True, scope=slow_scope)
    assert len(inside) == 2 * (1 + 2 * 2) and all(inside)
    assert all(t < 0.01 for e in entries for t in e.times)


def test_ratios_and_thread_scaling() -> None:
    def row(impl: str, threads: int, mode: str, t: float) -> dict[str, Any]:
        return {
            "shape": [4, 3],
            "layout": "NHWC",
            "dtype": "float32",
            "op": "infer",
            "threads": threads,
            "impl": impl,
            "kind": bench.impl_kind(impl),
            "mode": mode,
            "median_s": t,
            "vs": {},
            "thread_scaling": None,
        }

    rows = [
        row("numba", 1, "out", 4.0),
        row("numba", 2, "out", 2.0),
        row("numba", 2, "fresh", 3.0),
        row("onnxruntime", 2, "out", 3.0),
        row("onnxruntime", 2, "fresh", 6.0),
        row("torch", 2, "fresh", 9.0),
    ]
    bench.timing._add_ratios(rows)
    out2 = rows[1]
    assert out2["vs"] == {"onnxruntime": 1.5, "torch": 4.5}  # same mode when the peer has it
    assert rows[2]["vs"]["onnxruntime"] == 2.0
    assert out2["thread_scaling"] == 2.0
    assert rows[3]["vs"] == {}  # peers are not compared with each other


# -- a whole tiny run: JSON, plot, table --------------------------------------------------


def _check_schema(doc: dict[str, Any], n_results: int) -> None:
    assert doc["schema"] == "fastbn-bench"
    assert doc["version"] == bench.SCHEMA_VERSION
    assert isinstance(doc["created"], str)
    machine = doc["machine"]
    for key in ("python", "platform", "cpus", "l2_bytes", "numpy", "fastbn", "backends"):
        assert key in machine
    assert set(machine["peers"]) >= set(bench.PEERS)
    for key in ("shapes", "layouts", "dtypes", "ops", "threads", "implementations", "modes"):
        assert key in doc["config"]
    assert [c["threads"] for c in doc["copy"]] == doc["config"]["threads"]
    for c in doc["copy"]:
        assert c["gbps"] > 0 and c["fresh_gbps"] > 0
        assert c["method"] in c["methods"]
    assert all(isinstance(n, str) for n in doc["notes"])
    assert len(doc["results"]) == n_results
    types = {
        "shape": list,
        "array_shape": list,
        "layout": str,
        "dtype": str,
        "op": str,
        "threads": int,
        "impl": str,
        "kind": str,
        "mode": str,
        "median_s": float,
        "min_s": float,
        "q1_s": float,
        "q3_s": float,
        "times_s": list,
        "nbytes": int,
        "passes": int,
        "passes_min": int,
        "gbps": float,
        "copy_s": float,
        "roofline": float,
        "roofline_run": float,
        "vs": dict,
        "floor_s": float,
        "floor_vs": dict,
        "note": str,
    }
    for r in doc["results"]:
        for key, kind in types.items():
            assert isinstance(r[key], kind), (key, r[key])
        assert r["kind"] in ("fastbn", "baseline", "peer")  # the copy is not a row
        assert r["roofline"] == pytest.approx(r["passes"] * r["copy_s"] / 2 / r["median_s"])
        assert r["mode"] in bench.MODES
        assert r["min_s"] <= r["median_s"]
        assert len(r["times_s"]) == doc["config"]["repeat"]
        assert r["thread_scaling"] is None or isinstance(r["thread_scaling"], float)
        assert r["peak_extra_bytes"] is None or isinstance(r["peak_extra_bytes"], int)
        assert r["floor_s"] > 0
        assert r["floor_vs"] and all(v > 0 for v in r["floor_vs"].values())
    _check_floor(doc)
    assert isinstance(doc["cold_start"], list)


def _check_floor(doc: dict[str, Any]) -> None:
    """One floor item per case, thread count and row mode; the rows' floor_s are its medians."""
    floor = {}
    for f in doc["floor"]:
        key = (tuple(f["shape"]), f["layout"], f["dtype"], f["op"], f["threads"], f["mode"])
        assert key not in floor
        assert len(f["times_s"]) == doc["config"]["repeat"]
        assert 0 < f["min_s"] <= f["median_s"]
        floor[key] = f["median_s"]
    rows = doc["results"]
    modes: dict[tuple[Any, ...], set[str]] = {}  # the config's modes and the rows' modes
    for r in rows:
        key = (tuple(r["shape"]), r["layout"], r["dtype"], r["op"], r["threads"])
        modes.setdefault(key, set(doc["config"]["modes"])).add(r["mode"])
        assert r["floor_s"] == floor[(*key, r["mode"])]
        for peer, ratio in r["floor_vs"].items():
            ref = [p for p in rows if p["impl"] == peer and _same(p, r)]
            ref_row = next((p for p in ref if p["mode"] == r["mode"]), None) or next(
                p for p in ref if p["mode"] == "fresh"
            )
            assert ratio == pytest.approx(ref_row["median_s"] / r["floor_s"])
    assert sorted(floor) == sorted((*key, m) for key, ms in modes.items() for m in ms)


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two rows are of the same case and thread count."""
    keys = ("shape", "layout", "dtype", "op", "threads")
    return all(a[k] == b[k] for k in keys)


def test_tiny_run_writes_json_plot_markdown_and_table(tmp_path: Path, capsys: Any) -> None:
    out_json = tmp_path / "out.json"
    out_png = tmp_path / "out.png"
    out_md = tmp_path / "out.md"
    argv = [*TINY, "--threads", "1,2", "--backend", fast_impls(), "--no-progress"]
    argv += ["--json", str(out_json), "--plot", str(out_png), "--memory"]
    argv += ["--markdown", str(out_md)]
    assert bench.main(argv) == 0
    doc = json.loads(out_json.read_text())
    assert out_md.read_text() == bench.markdown(doc)  # derived from the report alone
    lines = out_md.read_text().splitlines()
    assert (
        "**Thread scaling** (ms, median; speed-up = time with 1 thread / time with 2 threads)"
        in lines
    )
    fastbn_columns = [
        f"{b} {m} {n} thr" for b in CPU_BACKENDS for m in bench.MODES for n in (1, 2)
    ]
    thread_header = next(line for line in lines if line.startswith("| shape | layout | op |"))
    assert [c for c in _cells(thread_header) if c.endswith(" thr")] == fastbn_columns
    assert "NumPy" not in thread_header  # single-threaded at every count
    for op in bench.OPS:
        assert f"**{op}**, 1 thread (ms, median{FLOOR_TITLE})" in lines
        assert f"**{op}**, 2 threads (ms, median{FLOOR_TITLE})" in lines
    # per layout, op and thread count: every fastbn backend in 2 modes, numpy once
    per_group = 2 * len(CPU_BACKENDS) + 1
    _check_schema(doc, n_results=2 * len(bench.OPS) * 2 * per_group)
    scaled = [r for r in doc["results"] if r["threads"] == 2]
    assert all(isinstance(r["thread_scaling"], float) for r in scaled)
    assert all(isinstance(r["peak_extra_bytes"], int) for r in doc["results"])
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = capsys.readouterr().out
    assert "copy bandwidth" in text
    for op in bench.OPS:
        assert f"{op} (" in text


def _cells(line: str) -> list[str]:
    """The cells of one Markdown table line."""
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _tables(text: str) -> list[list[list[str]]]:
    """Every Markdown table of `text` as rows of cells (header and rule included)."""
    tables: list[list[list[str]]] = []
    previous = ""
    for line in text.splitlines():
        if line.startswith("|"):
            if not previous.startswith("|"):
                tables.append([])
            tables[-1].append(_cells(line))
        previous = line
    return tables


def test_tiny_run_writes_markdown(tmp_path: Path) -> None:
    out_md = tmp_path / "out.md"
    argv = [*TINY, "--layout", "NCHW,NHWC", "--op", "train,infer", "--threads", "1"]
    argv += ["--backend", fast_impls(), "--no-progress", "--markdown", str(out_md)]
    assert bench.main(argv) == 0
    text = out_md.read_text()
    first = text.splitlines()[0]
    assert first.startswith("Measured by `fastbn-bench --shape 4,3,5,5 --op train,infer ")
    assert "--threads 1 --backend " + fast_impls() in first
    assert "copy bandwidth" in first and "GB/s with 1 thread" in first
    if hasattr(os, "getloadavg"):
        assert "load average" in first
    assert f"**train** (ms, median{FLOOR_TITLE})" in text
    assert f"**infer** (ms, median{FLOOR_TITLE})" in text
    assert "Thread scaling" not in text  # one thread count
    columns = [f"{b} {m}" for b in CPU_BACKENDS for m in bench.MODES]
    roofline = f"{CPU_BACKENDS[0]} out, % of copy roofline"
    header = ["shape", "layout", *columns, "NumPy", "floor fresh", roofline]
    tables = _tables(text)
    assert len(tables) == 2
    for table in tables:
        assert table[0] == header
        assert set(table[1]) == {"---"}
        assert [row[:2] for row in table[2:]] == [["4x3x5x5", "NCHW"], ["4x3x5x5", "NHWC"]]
        for row in table[2:]:
            assert all(re.fullmatch(r"\d+\.\d\d", cell) for cell in row[2:-1])
            assert re.fullmatch(r"\d+%", row[-1])


def test_command_line_reproduces_the_configuration(tmp_path: Path) -> None:
    config = bench.parse_args([*TINY, "--op", "infer", "--backend", "numpy", "--no-progress"])
    report = bench.run(config)
    command = bench.command_line(report).split()
    assert command[0] == "fastbn-bench"
    assert "--warm" not in command
    again = bench.parse_args(command[1:])
    for name in ("shapes", "layouts", "dtypes", "ops", "threads", "impls", "modes"):
        assert getattr(again, name) == getattr(config, name), name
    for name in ("repeat", "warmup", "pause", "copy_mib", "warm"):
        assert getattr(again, name) == getattr(config, name), name
    warm = bench.run(bench.parse_args([*command[1:], "--warm", "--no-progress"]))
    assert warm["config"]["warm"] is True
    assert bench.parse_args(bench.command_line(warm).split()[1:]).warm


TINY_INFER = [*TINY, "--op", "infer", "--backend", "numpy", "--no-progress"]


def run_watching(monkeypatch: Any, read: Callable[[], int], flag: str, given: str):
    """A tiny run with `flag given`: (its report, what `read()` gave while timing)."""
    seen: list[int] = []
    real = bench.time_entries

    def spy(*args: Any, **kwargs: Any) -> None:
        seen.append(read())
        real(*args, **kwargs)

    monkeypatch.setattr(bench.timing, "time_entries", spy)
    report = bench.run(bench.parse_args([*TINY_INFER, flag, given]))
    assert any(flag in note for note in report["notes"])
    command = bench.command_line(report).split()
    assert command[command.index(flag) + 1] == given
    return report, seen


@pytest.mark.parametrize(("given", "value"), [("off", bench.STREAM_OFF), ("4096", 4096)])
def test_stream_threshold_is_set_for_the_run_and_restored(
    given: str, value: int, monkeypatch: Any
) -> None:
    default = fastbn.get_stream_threshold()
    report, seen = run_watching(
        monkeypatch, fastbn.get_stream_threshold, "--stream-threshold", given
    )
    assert seen and set(seen) == {value}
    assert fastbn.get_stream_threshold() == default
    assert report["config"]["stream_threshold"] == value
    assert bench.parse_args(bench.command_line(report).split()[1:]).stream_threshold == value


def test_output_cache_limit_is_set_for_the_run_then_restored_and_emptied(
    monkeypatch: Any,
) -> None:
    fastbn.set_output_cache_limit(None)
    default = fastbn.get_output_cache_limit()
    report, seen = run_watching(monkeypatch, fastbn.get_output_cache_limit, "--output-cache", "0")
    assert seen and set(seen) == {0}
    assert fastbn.get_output_cache_limit() == default
    assert fastbn.output_cache_info()["held"] == 0
    assert report["config"]["output_cache"] == 0
    assert bench.parse_args(bench.command_line(report).split()[1:]).output_cache == 0
    assert bench.parse_args(TINY_INFER).output_cache is None
    with pytest.raises(SystemExit):
        bench.parse_args([*TINY_INFER, "--output-cache", "-1"])


#: Medians (ms) of the synthetic report at 1 thread, NCHW; NHWC takes twice as long and
#: every implementation but NumPy twice as fast with 2 threads.
SYNTHETIC_MS = {
    ("cython", "fresh"): 4.0,
    ("cython", "out"): 2.0,
    ("numba", "fresh"): 5.0,
    ("numba", "out"): 2.5,
    ("numpy", "fresh"): 20.0,
    ("torch", "fresh"): 6.0,
    ("onnxruntime", "fresh"): 8.0,
    ("onnxruntime", "out"): 5.0,
}


#: Floor medians (ms) of the synthetic report, scaled like the implementations.
SYNTHETIC_FLOOR_MS = {"fresh": 1.0, "out": 0.5}


def _synthetic_report(
    impls: list[str], modes: list[str], threads: list[int], floor: bool = False
) -> dict[str, Any]:
    """A complete hand-made report of ``infer`` on (8, 4, 5, 5) in both layouts.

    Without `floor` it has none (``floor_s``, ``floor_vs``, ``floor``), as in version 1.
    """
    rows = []
    floors = []
    for layout, scale in (("NCHW", 1.0), ("NHWC", 2.0)):
        for n in threads:
            for (impl, mode), ms in SYNTHETIC_MS.items():
                if impl not in impls or (mode not in modes and impl != "numpy"):
                    continue
                kind = bench.impl_kind(impl)
                t = ms * scale / 1e3 / (1 if kind == "baseline" else n)
                rows.append(
                    {
                        "shape": [8, 4, 5, 5],
                        "array_shape": [8, 4, 5, 5] if layout == "NCHW" else [8, 5, 5, 4],
                        "layout": layout,
                        "dtype": "float32",
                        "op": "infer",
                        "threads": n,
                        "impl": impl,
                        "kind": kind,
                        "mode": mode,
                        "median_s": t,
                        "min_s": t,
                        "q1_s": t,
                        "q3_s": t,
                        "times_s": [t],
                        "nbytes": 3200,
                        "passes": 2,
                        "passes_min": 2,
                        "gbps": 6400 / t / 1e9,
                        "copy_s": t / 4,
                        "roofline": 0.5,
                        "roofline_run": 0.5,
                        "vs": {},
                        "thread_scaling": None,
                        "peak_extra_bytes": None,
                        "note": "",
                    }
                )
            for mode, ms in SYNTHETIC_FLOOR_MS.items():
                t = ms * scale / 1e3 / n
                floors.append(
                    {
                        "shape": [8, 4, 5, 5],
                        "layout": layout,
                        "dtype": "float32",
                        "op": "infer",
                        "threads": n,
                        "mode": mode,
                        "median_s": t,
                        "min_s": t,
                        "times_s": [t],
                    }
                )
    bench.timing._add_ratios(rows)
    if floor:
        bench.timing._add_floor(rows, floors)
    copy = [
        {
            "threads": n,
            "nbytes": 256 << 20,
            "gbps": 10.0 * n,
            "method": "numpy-copyto-threads",
            "methods": {"numpy-copyto-threads": 10.0 * n},
            "fresh_gbps": 2.5 * n,
        }
        for n in threads
    ]
    report = {
        "schema": "fastbn-bench",
        "version": bench.SCHEMA_VERSION,
        "created": "2026-01-02T03:04:05+00:00",
        "machine": {"cpus": 2, "loadavg": [1.0, 0.5, 0.25]},
        "config": {
            "shapes": [[8, 4, 5, 5]],
            "layouts": ["NCHW", "NHWC"],
            "dtypes": ["float32"],
            "ops": ["infer"],
            "threads": threads,
            "implementations": impls,
            "modes": modes,
            "repeat": 7,
            "warmup": 1,
            "pause": 0.005,
        },
        "copy": copy,
        "notes": [],
        "results": rows,
        "cold_start": [],
    }
    if floor:
        report["floor"] = floors
    return report


def _from_json(tmp_path: Path, report: dict[str, Any], monkeypatch: Any) -> str:
    """Render `report` through ``--from-json ... --markdown`` (measuring is an error)."""

    def no_run(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("--from-json must not measure")

    monkeypatch.setattr(bench, "run", no_run)
    src = tmp_path / "in.json"
    out_md = tmp_path / "out.md"
    bench.write_json(report, str(src))
    assert bench.main(["--from-json", str(src), "--markdown", str(out_md)]) == 0
    return out_md.read_text()


def test_from_json_renders_the_readme_tables(
    tmp_path: Path, monkeypatch: Any, capsys: Any
) -> None:
    impls = ["cython", "numba", "numpy", "torch", "onnxruntime"]
    report = _synthetic_report(impls, ["fresh", "out"], [2])
    text = _from_json(tmp_path, report, monkeypatch)
    assert text == (
        "Measured by `fastbn-bench --shape 8,4,5,5 --op infer --threads 2 "
        "--backend cython,numba,numpy,torch,onnxruntime` on 2026-01-02T03:04:05+00:00; "
        "copy bandwidth 20.0 GB/s with 2 threads (read+write, 256 MiB; 5.0 GB/s into a "
        "fresh array); load average 1.00, 0.50, 0.25 (1, 5, 15 min) at the end of the run "
        "on 2 CPUs.\n"
        "\n"
        "**infer** (ms, median; ratio = peer time / fastbn time, same run)\n"
        "\n"
        "| shape | layout | cython fresh | cython out | numba fresh | numba out | torch "
        "| ORT fresh | ORT out | NumPy | best fastbn vs torch (fresh) "
        "| best fastbn out vs ORT out | cython out, % of copy roofline |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
        "| 8x4x5x5 | NCHW | 2.00 | 1.00 | 2.50 | 1.25 | 3.00 | 4.00 | 2.50 | 20.00 "
        "| 1.50x | 2.50x | 50% |\n"
        "| 8x4x5x5 | NHWC | 4.00 | 2.00 | 5.00 | 2.50 | 6.00 | 8.00 | 5.00 | 40.00 "
        "| 1.50x | 2.50x | 50% |\n"
    )
    assert "copy bandwidth" in capsys.readouterr().out  # the console tables too


def test_targets_check_each_backend_against_its_goal(
    tmp_path: Path, monkeypatch: Any, capsys: Any
) -> None:
    """--targets: each fastbn backend's value per case, met or not, and the floor's bound
    (the peer's time over the ``out`` floor), for the rows with the most threads."""
    impls = ["cython", "numba", "numpy", "torch", "onnxruntime"]
    report = _synthetic_report(impls, ["fresh", "out"], [1, 2], floor=True)
    slow = next(
        r
        for r in report["results"]
        if (r["impl"], r["mode"], r["layout"], r["threads"]) == ("numba", "out", "NHWC", 2)
    )
    slow["median_s"] = 10e-3  # ORT out= takes 5 ms there: 0.5x
    monkeypatch.setattr(bench, "run", lambda *a, **k: pytest.fail("--from-json measured"))
    src, out_md = tmp_path / "in.json", tmp_path / "out.md"
    bench.write_json(report, str(src))
    argv = ["--from-json", str(src), "--targets", "--markdown", str(out_md)]
    assert bench.main(argv) == 0
    text = out_md.read_text()
    assert text.startswith(bench.markdown(report))  # the targets follow the tables
    section = text.split("**infer out= vs ONNX Runtime out=**: met on cython 2 of 2, numba 1 of 2")
    assert len(section) == 2, text
    assert _tables(section[1]) == [
        [
            ["shape", "layout", "goal", "cython", "numba", "bound (peer / floor)"],
            ["---"] * 6,
            ["8x4x5x5", "NCHW", "1.00x", "2.50x met", "2.00x met", "10.00x"],
            ["8x4x5x5", "NHWC", "1.00x", "2.50x met", "0.50x", "10.00x"],
        ]
    ]
    assert "train" not in section[1]  # targets without rows in the report are left out
    assert "met on cython 2 of 2, numba 1 of 2" in capsys.readouterr().out
    # fastbn's fresh outputs come from its output cache: the bound of a fresh target is the
    # out floor, unless the run turned the cache off.
    for row in report["results"] + report["floor"]:
        row["op"] = "fwdbwd"
    (fwdbwd,) = bench.targets.evaluate(report)
    assert fwdbwd["rows"][0]["values"]["cython"] == pytest.approx(3.0 / 2.0)  # torch fresh
    assert fwdbwd["rows"][0]["bound"] == pytest.approx(3.0 / 0.25)
    report["config"]["output_cache"] = 0
    (fwdbwd,) = bench.targets.evaluate(report)
    assert fwdbwd["rows"][0]["bound"] == pytest.approx(3.0 / 0.5)


def test_target_goals_follow_issue_4() -> None:
    goals = {t.title.split(" vs ")[0].split(",")[0]: t.goal for t in bench.targets.TARGETS}
    big, small, flat = (64, 256, 56, 56), (128, 512, 7, 7), (4096, 1024)
    assert goals["train NCHW"](big, "NCHW") == 5.0
    assert goals["train NCHW"](small, "NCHW") == 4.0
    assert goals["train NCHW"](small, "NHWC") is None
    assert goals["train NHWC"](big, "NHWC") == 1.5
    assert goals["train NHWC"](flat, "NCHW") == 1.2  # BatchNorm1d counts as NHWC
    assert goals["train NHWC"](small, "NCHW") is None
    assert goals["train out="](small, "NCHW") == 1.2
    assert goals["train out="](flat, "NCHW") == 0.9
    assert goals["infer out="](big, "NHWC") == 1.1
    assert goals["infer out="]((1, 64, 56, 56), "NCHW") == 1.0
    assert goals["forward + backward"](small, "NHWC") == 3.0


def test_floor_ratios_and_columns(tmp_path: Path, monkeypatch: Any, capsys: Any) -> None:
    impls = ["cython", "numpy", "torch", "onnxruntime"]
    report = _synthetic_report(impls, ["fresh", "out"], [2], floor=True)
    rows = {(r["layout"], r["impl"], r["mode"]): r for r in report["results"]}
    out = rows["NCHW", "cython", "out"]
    assert out["floor_s"] == pytest.approx(0.25e-3)  # the out floor
    # torch has no out row: its fresh row, as for vs; numpy is single-threaded
    assert out["floor_vs"] == pytest.approx({"torch": 12.0, "onnxruntime": 10.0, "numpy": 80.0})
    torch = rows["NCHW", "torch", "fresh"]
    assert torch["floor_s"] == pytest.approx(0.5e-3)  # the fresh floor
    assert torch["floor_vs"]["torch"] == pytest.approx(6.0)
    text = _from_json(tmp_path, report, monkeypatch)
    assert (
        f"**infer** (ms, median; ratio = peer time / fastbn time, same run{FLOOR_TITLE})" in text
    )
    table = _tables(text)[0]
    assert table[0][-4:] == [
        "floor fresh",
        "torch / floor (fresh)",
        "ORT out / floor out",
        "cython out, % of copy roofline",
    ]
    assert table[2][:2] == ["8x4x5x5", "NCHW"] and table[2][-4:] == [
        "0.50",
        "6.00x",
        "10.00x",
        "50%",
    ]
    assert table[3][:2] == ["8x4x5x5", "NHWC"] and table[3][-4:] == [
        "1.00",
        "6.00x",
        "10.00x",
        "50%",
    ]
    console = capsys.readouterr().out
    for name in ("floor fresh", "torch / floor (fresh)", "ORT out / floor out"):
        assert name in console


def test_from_json_reads_version_1_without_floor(
    tmp_path: Path, monkeypatch: Any, capsys: Any
) -> None:
    report = _synthetic_report(["cython", "numpy", "torch"], ["fresh", "out"], [2])
    report["version"] = 1
    assert "floor" not in report and all("floor_s" not in r for r in report["results"])
    text = _from_json(tmp_path, report, monkeypatch)
    assert "**infer** (ms, median; ratio = peer time / fastbn time, same run)" in text
    assert "floor" not in text  # no floor columns
    assert "infer (2 passes" in capsys.readouterr().out


@pytest.mark.parametrize("version", [0, bench.SCHEMA_VERSION + 1, "2", True, None])
def test_from_json_rejects_unknown_versions(tmp_path: Path, version: Any) -> None:
    report = _synthetic_report(["cython"], ["out"], [1])
    report["version"] = version
    path = tmp_path / "in.json"
    bench.write_json(report, str(path))
    with pytest.raises(ValueError, match="report version"):
        bench.read_json(str(path))


def test_floor_modes_follow_the_rows(tmp_path: Path) -> None:
    peers = [p for p in bench.PEERS if bench.peer_missing(p) is None]
    impls = ",".join([CPU_BACKENDS[0], "numpy", *peers])
    out_md = tmp_path / "out.md"
    argv = [*TINY, "--layout", "NCHW", "--op", "infer,backward", "--mode", "out"]
    argv += ["--threads", "2", "--backend", impls, "--no-progress", "--markdown", str(out_md)]
    config = bench.parse_args(argv)
    doc = bench.run(config)
    _check_floor(doc)
    by_op = {
        op: {f["mode"] for f in doc["floor"] if f["op"] == op} for op in ("infer", "backward")
    }
    assert by_op == {"infer": {"fresh", "out"}, "backward": {"fresh", "out"}}  # numpy is fresh
    for r in doc["results"]:
        assert r["floor_s"] > 0
        found = {"numpy", *(p for p in peers if bench.supports(p, _case(r)))}
        if r["mode"] == "fresh":
            found.discard("onnxruntime")  # it has no fresh row in this run: as for vs
        assert set(r["floor_vs"]) == found
    tables = _tables(bench.markdown(doc))
    expected = ["floor fresh"] + (["torch / floor (fresh)"] if "torch" in peers else [])
    assert tables[1][0][-len(expected) - 1 : -1] == expected  # backward
    if "onnxruntime" in peers:
        expected.append("ORT out / floor out")
    assert tables[0][0][-len(expected) - 1 : -1] == expected  # infer
    for table in tables:
        for row in table[2:]:
            assert all(cell != "-" for cell in row)
    # without a fresh-only implementation, only the modes asked for
    config = bench.parse_args([*argv[: argv.index("--backend")], "--backend", CPU_BACKENDS[0]])
    doc = bench.run(config)
    assert {f["mode"] for f in doc["floor"]} == {"out"}
    assert "floor" not in bench.markdown(doc).split("\n", 1)[1]  # no fresh floor column


def _case(row: dict[str, Any]) -> bench.Case:
    return bench.Case(tuple(row["shape"]), row["layout"], row["op"], row["dtype"])


def test_from_json_thread_scaling_table(tmp_path: Path, monkeypatch: Any) -> None:
    report = _synthetic_report(["cython", "numba", "numpy"], ["out"], [1, 2])
    text = _from_json(tmp_path, report, monkeypatch)
    assert text.splitlines()[0].startswith(
        "Measured by `fastbn-bench --shape 8,4,5,5 --op infer --threads 1,2 "
        "--backend cython,numba,numpy --mode out` on 2026-01-02T03:04:05+00:00; "
        "copy bandwidth 10.0 GB/s with 1 thread, 20.0 GB/s with 2 threads "
    )
    assert "**infer**, 1 thread (ms, median)" in text
    assert "**infer**, 2 threads (ms, median)" in text
    assert (
        "\n**Thread scaling** (ms, median; speed-up = time with 1 thread / time with "
        "2 threads)\n"
        "\n"
        "| shape | layout | op | cython 1 thr | cython 2 thr | speed-up "
        "| numba 1 thr | numba 2 thr | speed-up |\n"
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n"
        "| 8x4x5x5 | NCHW | infer | 2.00 | 1.00 | 2.00x | 2.50 | 1.25 | 2.00x |\n"
        "| 8x4x5x5 | NHWC | infer | 4.00 | 2.00 | 2.00x | 5.00 | 2.50 | 2.00x |\n"
    ) in text
    per_thread = _tables(text)[0]
    roofline = "cython out, % of copy roofline"
    assert per_thread[0] == ["shape", "layout", "cython out", "numba out", "NumPy", roofline]


def test_from_json_rejects_other_files(tmp_path: Path) -> None:
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"schema": "something-else"}))
    with pytest.raises(SystemExit, match="not a fastbn-bench report"):
        bench.main(["--from-json", str(other), "--markdown", str(tmp_path / "o.md")])
    assert not (tmp_path / "o.md").exists()


@pytest.mark.skipif(bench.peer_missing("onnxruntime") is not None, reason="needs onnxruntime")
def test_peer_rows_and_ratios(tmp_path: Path) -> None:
    config = bench.parse_args(
        [*TINY, "--shape", "6,3", "--op", "infer", "--backend", "numpy,ort", "--no-progress"]
    )
    config.shapes = [(6, 3)]
    report = bench.run(config)
    impls = {(r["impl"], r["mode"]) for r in report["results"]}
    assert impls == {("numpy", "fresh"), ("onnxruntime", "fresh"), ("onnxruntime", "out")}
    numpy_row = next(r for r in report["results"] if r["impl"] == "numpy")
    assert set(numpy_row["vs"]) == {"onnxruntime"}
    assert any("onnxruntime" in note for note in report["notes"])


def test_cold_start_rows(tmp_path: Path) -> None:
    config = bench.parse_args([*TINY, "--backend", "numpy", "--cold-start"])
    rows = bench.cold_start(config)
    assert [r["impl"] for r in rows] == ["numpy"]
    assert rows[0]["first_call_s"] > 0 and rows[0]["import_s"] >= 0


def test_module_is_runnable(tmp_path: Path) -> None:
    import subprocess

    out_json = tmp_path / "o.json"
    argv = [*TINY, "--op", "infer", "--layout", "NHWC", "--backend", "numpy"]
    proc = subprocess.run(
        [sys.executable, "-m", "fastbn.bench", *argv, "--json", str(out_json)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out_json.read_text())["results"][0]["impl"] == "numpy"


def test_copy_bandwidth_reports_methods() -> None:
    result = bench.measure_copy_bandwidth(threads=2, nbytes=1 << 20, repeat=2)
    assert result["threads"] == 2
    assert result["gbps"] == max(result["methods"].values())


def test_uses_the_public_api_only() -> None:
    for name in ("batch_norm", "batch_norm_train", "batch_norm_backward", "num_threads"):
        assert hasattr(fastbn, name)


def test_thread_counts_are_timed_in_the_same_rounds(monkeypatch: Any) -> None:
    """Each case's entries at every thread count are timed by one interleaved call, each
    implementation running at its own count."""
    from fastbn.bench import timing

    calls: list[set[int]] = []
    seen: list[tuple[int, int]] = []
    real_time, real_make = timing.time_entries, timing.make_callable

    def spy(entries: list[Any], *args: Any, **kwargs: Any) -> None:
        calls.append({e.threads for e in entries})
        real_time(entries, *args, **kwargs)

    def make(impl: str, case: Any, data: Any, mode: str = "fresh", threads: int = 1) -> Any:
        func = real_make(impl, case, data, mode, threads)

        def probe() -> object:
            seen.append((threads, fastbn.get_num_threads()))
            return func()

        return probe

    monkeypatch.setattr(timing, "time_entries", spy)
    monkeypatch.setattr(timing, "make_callable", make)
    argv = [*TINY, "--threads", "1,2", "--backend", fast_impls(), "--no-progress"]
    assert bench.main(argv) == 0
    assert calls and all(c == {1, 2} for c in calls)
    assert {want for want, _ in seen} == {1, 2}
    assert all(got == want for want, got in seen)
