"""Output of a report: rich tables on the console, JSON, a bar chart and Markdown tables."""

from __future__ import annotations

import json
from collections.abc import Container
from typing import Any

import numpy as np

from .cases import DEFAULT_SHAPES, LAYOUTS, MODES, OPS, PASSES
from .cli import Config
from .impls import BASELINE, PEERS, STREAM_OFF, has_out_mode
from .timing import SCHEMA_VERSION

_SHORT = {"torch": "torch", "onnxruntime": "ort", "numpy": "numpy"}


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


#: The floor columns of the tables: (header, peer, peer mode, floor mode); without a peer the
#: column is the floor's median, else ``time(peer) / floor``, the best ratio reachable.
_FLOOR_COLUMNS: tuple[tuple[str, str | None, str, str], ...] = (
    ("floor fresh", None, "fresh", "fresh"),
    ("torch / floor (fresh)", "torch", "fresh", "fresh"),
    ("ORT out / floor out", "onnxruntime", "out", "out"),
)


def _group(row: dict[str, Any]) -> tuple[Any, ...]:
    """A row's case and thread count: ``(shape, layout, dtype, op, threads)``."""
    return tuple(row["shape"]), row["layout"], row["dtype"], row["op"], row["threads"]


def _floor_values(
    report: dict[str, Any], rows: list[dict[str, Any]]
) -> tuple[list[str], dict[tuple[Any, ...], list[float | None]]]:
    """The floor columns that have a value for `rows`, and their values per group.

    Parameters
    ----------
    report : dict
        The report; its ``floor`` list is absent before schema version 2 (no columns).
    rows : list of dict
        Result rows of one operation.

    Returns
    -------
    names : list of str
        Headers of the columns with a value in at least one group.
    values : dict
        For each :func:`_group` of `rows`, the values of those columns (None: missing);
        times in seconds, ratios as fractions.
    """
    floor: dict[tuple[Any, ...], float] = {}
    for f in report.get("floor") or []:  # absent before schema version 2
        group = (tuple(f["shape"]), f["layout"], f["dtype"], f["op"], f["threads"])
        floor[(*group, f["mode"])] = f["median_s"]
    index = {(_group(r), r["impl"], r["mode"]): r for r in rows}
    values: dict[tuple[Any, ...], list[float | None]] = {}
    for group in dict.fromkeys(_group(r) for r in rows):
        cells: list[float | None] = []
        for _, peer, peer_mode, floor_mode in _FLOOR_COLUMNS:
            floor_s = floor.get((*group, floor_mode))
            if peer is None:
                cells.append(floor_s)
                continue
            ref = index.get((group, peer, peer_mode))
            ok = ref is not None and floor_s is not None
            cells.append(ref["median_s"] / floor_s if ok else None)
        values[group] = cells
    keep = [
        k for k in range(len(_FLOOR_COLUMNS)) if any(v[k] is not None for v in values.values())
    ]
    names = [_FLOOR_COLUMNS[k][0] for k in keep]
    return names, {g: [v[k] for k in keep] for g, v in values.items()}


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
        floor_names, floor_values = _floor_values(report, op_rows)
        for name in floor_names:
            table.add_column(name, justify="right", no_wrap=True)
        if scaling:
            table.add_column("vs 1 thr", justify="right", no_wrap=True)
        if memory:
            table.add_column("extra mem", justify="right", no_wrap=True)
        table.add_column("note")
        previous = None
        for r in op_rows:
            group = _group(r)
            first = group != previous
            if previous is not None and first:
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
            for name, value in zip(floor_names, floor_values[group], strict=True):
                if not first or value is None:  # one value per case: on its first row
                    cells.append("")
                else:
                    cells.append(_fmt_time(value) if name == "floor fresh" else f"{value:.2f}x")
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


def read_json(path: str) -> dict[str, Any]:
    """Read a report written by :func:`write_json`.

    Parameters
    ----------
    path : str
        The JSON file.

    Returns
    -------
    dict
        The report.

    Raises
    ------
    ValueError
        If the file is not a ``fastbn-bench`` report of this or an older schema version
        (version 1 has no floor: its tables have no floor columns).
    """
    with open(path, encoding="utf-8") as f:
        report = json.load(f)
    if not isinstance(report, dict) or report.get("schema") != "fastbn-bench":
        raise ValueError(f"{path} is not a fastbn-bench report")
    version = report.get("version")
    known = isinstance(version, int) and not isinstance(version, bool)
    if not known or not 1 <= version <= SCHEMA_VERSION:
        raise ValueError(f"{path} has report version {version!r}, expected 1 to {SCHEMA_VERSION}")
    return report


# --------------------------------------------------------------------------------------
# Markdown (the README's "Measured results" tables)
# --------------------------------------------------------------------------------------

#: Column names of the peers and the baseline in the Markdown tables.
_MD_NAMES = {"torch": "torch", "onnxruntime": "ORT", "numpy": "NumPy"}
_KIND_ORDER = {"fastbn": 0, "peer": 1, "baseline": 2}
#: (fastbn mode, peer mode) a ratio column compares, in order of preference.
_RATIO_MODES = (("out", "out"), ("fresh", "fresh"), ("out", "fresh"))


def command_line(report: dict[str, Any]) -> str:
    """A ``fastbn-bench`` command that measures what `report` holds.

    The report does not store the command that made it; this rebuilds one from its
    configuration, leaving out the options at their defaults (``--threads`` and
    ``--backend`` are always given: their defaults depend on the machine). ``--seed`` and
    the output options are not recorded.

    Parameters
    ----------
    report : dict
        The report from :func:`run`.

    Returns
    -------
    str
        The command.
    """
    cfg = report["config"]
    args = ["fastbn-bench"]
    if [tuple(s) for s in cfg["shapes"]] != list(DEFAULT_SHAPES):
        args += ["--shape", *(",".join(map(str, s)) for s in cfg["shapes"])]
    for flag, key, default in (
        ("--layout", "layouts", LAYOUTS),
        ("--dtype", "dtypes", ("float32",)),
        ("--op", "ops", OPS),
    ):
        if tuple(cfg[key]) != tuple(default):
            args += [flag, ",".join(cfg[key])]
    args += ["--threads", ",".join(map(str, cfg["threads"]))]
    args += ["--backend", ",".join(cfg["implementations"])]
    if tuple(cfg["modes"]) != MODES:
        args += ["--mode", ",".join(cfg["modes"])]
    for flag, value, default in (
        ("--repeat", cfg["repeat"], Config.repeat),
        ("--warmup", cfg["warmup"], Config.warmup),
        ("--pause", cfg["pause"], Config.pause),
    ):
        if value != default:
            args += [flag, str(value)]
    if cfg.get("warm"):
        args.append("--warm")
    threshold = cfg.get("stream_threshold")
    if threshold is not None:
        args += ["--stream-threshold", "off" if threshold >= STREAM_OFF else str(threshold)]
    if cfg.get("output_cache") is not None:
        args += ["--output-cache", str(cfg["output_cache"])]
    if any(r.get("peak_extra_bytes") is not None for r in report["results"]):
        args.append("--memory")
    if report.get("cold_start"):
        args.append("--cold-start")
    if report["copy"] and report["copy"][0]["nbytes"] >> 20 != Config.copy_mib:
        args += ["--copy-mib", str(report["copy"][0]["nbytes"] >> 20)]
    return " ".join(args)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _md_provenance(report: dict[str, Any]) -> str:
    """One line: the command, the date, the copy bandwidth and the load average."""
    text = f"Measured by `{command_line(report)}` on {report['created']}"
    copies = report["copy"]
    if copies:
        each = ", ".join(
            f"{c['gbps']:.1f} GB/s with {_plural(c['threads'], 'thread')}" for c in copies
        )
        fresh = ", ".join(f"{c['fresh_gbps']:.1f}" for c in copies)
        text += (
            f"; copy bandwidth {each} (read+write, {copies[0]['nbytes'] >> 20} MiB; "
            f"{fresh} GB/s into a fresh array)"
        )
    machine = report["machine"]
    load = machine.get("loadavg")
    if load:
        text += (
            f"; load average {', '.join(f'{v:.2f}' for v in load)} (1, 5, 15 min) at the "
            f"end of the run on {_plural(machine['cpus'], 'CPU')}"
        )
    return text + "."


def _md_table(header: list[str], rows: list[list[str]], right: Container[int] = ()) -> list[str]:
    """GitHub Markdown table lines; the columns whose index is in `right` are right-aligned."""
    rule = ["---:" if k in right else "---" for k in range(len(header))]
    return ["| " + " | ".join(cells) + " |" for cells in (header, rule, *rows)]


def _case_key(row: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(row["shape"]), row["layout"], row["dtype"]


def _case_cells(key: tuple[Any, ...], multi_dtype: bool) -> list[str]:
    shape, layout, dtype = key
    return ["x".join(map(str, shape)), layout, *([dtype] if multi_dtype else [])]


def _series(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """The (impl, mode) pairs of `rows`: fastbn's in run order, then the peers, then NumPy."""
    kinds = {r["impl"]: r["kind"] for r in rows}
    pairs = dict.fromkeys((r["impl"], r["mode"]) for r in rows)
    return sorted(pairs, key=lambda s: _KIND_ORDER.get(kinds[s[0]], 1))


def _md_name(impl: str) -> str:
    return _MD_NAMES.get(impl, impl)


def _fmt_ms(row: dict[str, Any] | None) -> str:
    return "-" if row is None else f"{row['median_s'] * 1e3:.2f}"


#: What the floor of a report is, by schema version (None: the current one).
_FLOOR_TITLES: dict[Any, str] = {
    2: "least-traffic parallel NumPy copy/add of the same bytes, same run",
    None: "least traffic of the same bytes (a C loop moving them, nothing computed; "
    "channels last: inputs read in full first), same run",
}


def _md_op_section(
    title: str, rows: list[dict[str, Any]], multi_dtype: bool, report: dict[str, Any]
) -> list[str]:
    """The README table of one operation at one thread count, after its title.

    Columns: the median of every implementation and mode, then for every peer the ratio of
    its time to the best fastbn time (same mode when the peer has it), then the fresh
    floor's median (``floor fresh``) and the best ratios reachable against the peers
    (``torch / floor (fresh)``, ``ORT out / floor out``), then the roofline fraction of the
    first fastbn backend (its ``out`` mode when measured). A floor column is left out when
    no case of the table has its value (a report of schema version 1 has no floor).
    """
    series = _series(rows)
    kinds = {r["impl"]: r["kind"] for r in rows}
    index = {(_case_key(r), r["impl"], r["mode"]): r for r in rows}
    ours = [s for s in series if kinds[s[0]] == "fastbn"]
    peers = list(dict.fromkeys(impl for impl, _ in series if kinds[impl] == "peer"))
    ratios = []  # (peer, fastbn mode, peer mode)
    for peer in peers:
        for ours_mode, peer_mode in _RATIO_MODES:
            if (peer, peer_mode) in series and any(m == ours_mode for _, m in ours):
                ratios.append((peer, ours_mode, peer_mode))
                break
    roof_impl = ours[0][0] if ours else series[0][0]
    roof = (roof_impl, "out" if (roof_impl, "out") in series else "fresh")

    header = ["shape", "layout", *(["dtype"] if multi_dtype else [])]
    header += [
        f"{_md_name(impl)} {mode}" if has_out_mode(impl) else _md_name(impl)
        for impl, mode in series
    ]
    for peer, ours_mode, peer_mode in ratios:
        name = _md_name(peer)
        if ours_mode == peer_mode == "fresh":
            header.append(f"best fastbn vs {name} (fresh)")
        elif ours_mode == peer_mode:
            header.append(f"best fastbn {ours_mode} vs {name} {peer_mode}")
        else:
            header.append(f"best fastbn {ours_mode} vs {name} ({peer_mode})")
    floor_names, floor_values = _floor_values(report, rows)
    header += floor_names
    header.append(f"{roof[0]} {roof[1]}, % of copy roofline")

    lines = []
    groups = {_case_key(r): _group(r) for r in rows}
    for key in groups:
        cells = _case_cells(key, multi_dtype)
        cells += [_fmt_ms(index.get((key, impl, mode))) for impl, mode in series]
        for peer, ours_mode, peer_mode in ratios:
            times = [index.get((key, impl, mode)) for impl, mode in ours if mode == ours_mode]
            best = min((r["median_s"] for r in times if r is not None), default=None)
            ref = index.get((key, peer, peer_mode))
            ok = ref is not None and best is not None
            cells.append(f"{ref['median_s'] / best:.2f}x" if ok else "-")
        for name, value in zip(floor_names, floor_values[groups[key]], strict=True):
            if value is None:
                cells.append("-")
            else:
                cells.append(f"{value * 1e3:.2f}" if name == "floor fresh" else f"{value:.2f}x")
        r = index.get((key, *roof))
        cells.append("-" if r is None else f"{100 * r['roofline']:.0f}%")
        lines.append(cells)
    what = "ms, median" + ("; ratio = peer time / fastbn time, same run" if ratios else "")
    if floor_names:
        what += f"; floor = {_FLOOR_TITLES.get(report.get('version'), _FLOOR_TITLES[None])}"
    return ["", f"{title} ({what})", "", *_md_table(header, lines)]


def _md_thread_section(report: dict[str, Any], multi_dtype: bool) -> list[str]:
    """The README's thread-scaling table: medians per thread count, then the speed-ups.

    NumPy is left out: it is single-threaded at every thread count.
    """
    threads = sorted(report["config"]["threads"])
    rows = [r for r in report["results"] if r["kind"] != "baseline"]
    series = _series(rows)
    index = {(_case_key(r), r["op"], r["threads"], r["impl"], r["mode"]): r for r in rows}
    modes = {impl: sum(i == impl for i, _ in series) for impl, _ in series}
    header = ["shape", "layout", *(["dtype"] if multi_dtype else []), "op"]
    first = len(header)
    for impl, mode in series:
        name = _md_name(impl) if modes[impl] == 1 else f"{_md_name(impl)} {mode}"
        header += [f"{name} {n} thr" for n in threads]
        header += ["speed-up"] if len(threads) == 2 else [f"speed-up {n} thr" for n in threads[1:]]
    lines = []
    for op in report["config"]["ops"]:
        for key in dict.fromkeys(_case_key(r) for r in rows if r["op"] == op):
            cells = [*_case_cells(key, multi_dtype), op]
            for impl, mode in series:
                found = [index.get((key, op, n, impl, mode)) for n in threads]
                cells += [_fmt_ms(r) for r in found]
                for r in found[1:]:
                    ok = r is not None and found[0] is not None
                    cells.append(f"{found[0]['median_s'] / r['median_s']:.2f}x" if ok else "-")
            lines.append(cells)
    one = _plural(threads[0], "thread")
    if len(threads) == 2:
        what = f"speed-up = time with {one} / time with {_plural(threads[1], 'thread')}"
    else:
        what = f"speed-up N thr = time with {one} / time with N threads"
    return [
        "",
        f"**Thread scaling** (ms, median; {what})",
        "",
        *_md_table(header, lines, right=range(first, len(header))),
    ]


def _md_cold_section(rows: list[dict[str, Any]]) -> list[str]:
    """The cold-start rows (import, first and second call in a fresh process)."""
    times = ("import_s", "first_call_s", "second_call_s")
    lines = [
        [r["impl"], *(_fmt_time(r[k]) if r[k] is not None else "-" for k in times), r["note"]]
        for r in rows
    ]
    header = ["backend", "import", "first call", "second call", "note"]
    case = "x".join(map(str, rows[0]["shape"])) + " " + rows[0]["layout"]
    return [
        "",
        f"**Cold start** (fresh process: import, then the first and second training forward "
        f"on {case}; ONNX Runtime: inference)",
        "",
        *_md_table(header, lines, right=range(1, 4)),
    ]


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown, in the format of the README's "Measured results" tables.

    A provenance line (command, date, copy bandwidth, load average), then per operation and
    thread count a table of medians in ms with the ratios against the peers and a roofline
    column, then the thread-scaling table when the run has several thread counts, and the
    cold-start table when it was measured.

    Parameters
    ----------
    report : dict
        The report from :func:`run` (or :func:`read_json`).

    Returns
    -------
    str
        The Markdown text.
    """
    cfg = report["config"]
    multi_dtype = len(cfg["dtypes"]) > 1
    threads = sorted(cfg["threads"])
    out = [_md_provenance(report)]
    for op in cfg["ops"]:
        for n in threads:
            rows = [r for r in report["results"] if r["op"] == op and r["threads"] == n]
            if rows:
                title = f"**{op}**" + (f", {_plural(n, 'thread')}" if len(threads) > 1 else "")
                out += _md_op_section(title, rows, multi_dtype, report)
    if len(threads) > 1 and report["results"]:
        out += _md_thread_section(report, multi_dtype)
    if report.get("cold_start"):
        out += _md_cold_section(report["cold_start"])
    return "\n".join(out) + "\n"


def write_markdown(report: dict[str, Any], path: str, extra: str = "") -> None:
    """Write :func:`markdown` of the report to `path`.

    Parameters
    ----------
    report : dict
        The report from :func:`run` (or :func:`read_json`).
    path : str
        The Markdown file to write.
    extra : str
        Markdown appended after the tables (the targets of ``--targets``).
    """
    with open(path, "w", encoding="utf-8") as f:
        f.write(markdown(report) + extra)
