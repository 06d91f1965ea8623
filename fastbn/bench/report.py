"""Output of a report: rich tables on the console, JSON and a bar chart."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from .cases import PASSES
from .impls import BASELINE, PEERS

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
