"""The speed targets of the project (issue 4), checked against a report.

``fastbn-bench --targets`` (with a measurement, or ``--from-json``) prints, and ``--markdown``
appends, one table per target: for each case the target, each fastbn backend's value with a
mark (met or not) and the bound the run's floor puts on any implementation. Every number
comes from the one report, so the ratios compare runs taken side by side.

The thread-scaling and memory targets are not here: they need runs of their own (``--threads
1,2 --warm``, ``--memory``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .report import _case_cells, _md_table

#: The shape with the larger targets of issue 4.
BIG = (64, 256, 56, 56)


@dataclass(frozen=True)
class Target:
    """One line of issue 4's target table.

    `value` is fastbn's time against `against` (a peer's time over fastbn's, both in the
    given modes) or, with ``against="roofline"``, the copy-roofline fraction of fastbn's
    time; `goal` gives the least value asked for a case ``(shape, layout)``, None when the
    case is not part of the target.
    """

    title: str
    op: str
    mode: str
    against: str
    against_mode: str
    goal: Callable[[tuple[int, ...], str], float | None]

    @property
    def is_ratio(self) -> bool:
        """Whether the value is a peer's time over fastbn's (else a roofline fraction)."""
        return self.against != "roofline"


def _nchw_train(shape: tuple[int, ...], layout: str) -> float | None:
    if layout != "NCHW" or len(shape) != 4:
        return None
    return 5.0 if shape == BIG else 4.0


def _nhwc_train(shape: tuple[int, ...], layout: str) -> float | None:
    if layout != "NHWC" and len(shape) > 2:
        return None
    return 1.5 if shape == BIG else 1.2


def _roofline(shape: tuple[int, ...], layout: str) -> float | None:
    return 1.2 if layout == "NCHW" and len(shape) > 2 else 0.9


def _infer(shape: tuple[int, ...], layout: str) -> float | None:
    return 1.1 if shape == BIG else 1.0


def _fwdbwd(shape: tuple[int, ...], layout: str) -> float | None:
    return 3.0


TARGETS: tuple[Target, ...] = (
    Target("train NCHW vs PyTorch (fresh)", "train", "fresh", "torch", "fresh", _nchw_train),
    Target("train NHWC vs PyTorch (fresh)", "train", "fresh", "torch", "fresh", _nhwc_train),
    Target("train out=, % of the copy roofline", "train", "out", "roofline", "", _roofline),
    Target("infer out= vs ONNX Runtime out=", "infer", "out", "onnxruntime", "out", _infer),
    Target("forward + backward vs PyTorch (fresh)", "fwdbwd", "fresh", "torch", "fresh", _fwdbwd),
)


def _case(row: dict[str, Any]) -> tuple[tuple[int, ...], str]:
    return tuple(row["shape"]), row["layout"]


def evaluate(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Check every target against `report` (float32 rows with the most threads).

    Parameters
    ----------
    report : dict
        A report from ``fastbn.bench.run`` or ``read_json``.

    Returns
    -------
    list of dict
        One entry per target that has cases in the report: ``target`` (the Target),
        ``backends`` (the fastbn backends measured) and ``rows``, one per case in run
        order with ``shape``, ``layout``, ``goal``, ``values`` (backend to value, None when
        not measured) and ``bound``: the peer's time over the floor, about the most any
        implementation could reach in that run (None without a floor). The floor is the
        ``out`` one: fastbn's fresh outputs come from its output cache, so they cost what
        its ``out=`` calls cost; in a run with ``--output-cache 0``, the floor of fastbn's
        mode.
    """
    results = [r for r in report["results"] if r["dtype"] == "float32"]
    if not results:
        return []
    threads = max(r["threads"] for r in results)
    rows = [r for r in results if r["threads"] == threads]
    index = {(_case(r), r["op"], r["impl"], r["mode"]): r for r in rows}
    floors = {
        (_case(f), f["op"], f["mode"]): f["median_s"]
        for f in report.get("floor") or []
        if f["dtype"] == "float32" and f["threads"] == threads
    }
    backends = list(dict.fromkeys(r["impl"] for r in rows if r["kind"] == "fastbn"))
    cache_off = report["config"].get("output_cache") == 0
    checked = []
    for target in TARGETS:
        cases = dict.fromkeys(_case(r) for r in rows if r["op"] == target.op)
        lines = []
        for case in cases:
            goal = target.goal(*case)
            peer = index.get((case, target.op, target.against, target.against_mode))
            if goal is None or (target.is_ratio and peer is None):
                continue
            values: dict[str, float | None] = {}
            for impl in backends:
                ours = index.get((case, target.op, impl, target.mode))
                if ours is None:
                    values[impl] = None
                elif target.is_ratio:
                    values[impl] = peer["median_s"] / ours["median_s"]
                else:
                    values[impl] = ours["roofline"]
            floor = floors.get((case, target.op, target.mode if cache_off else "out"))
            bound = None
            if peer is not None and floor is not None:
                bound = peer["median_s"] / floor
            lines.append(
                {
                    "shape": case[0],
                    "layout": case[1],
                    "goal": goal,
                    "values": values,
                    "bound": bound,
                }
            )
        if lines:
            checked.append({"target": target, "backends": backends, "rows": lines})
    return checked


def _fmt(target: Target, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}x" if target.is_ratio else f"{100 * value:.0f}%"


def markdown(report: dict[str, Any]) -> str:
    """The targets of :func:`evaluate` as Markdown: a table per target, then the count of
    the cases met per backend ("met" marks a value at or above the goal)."""
    out = []
    for entry in evaluate(report):
        target, backends = entry["target"], entry["backends"]
        header = ["shape", "layout", "goal", *backends]
        if target.is_ratio:
            header.append("bound (peer / floor)")
        body = []
        met = dict.fromkeys(backends, 0)
        for row in entry["rows"]:
            key = (row["shape"], row["layout"], "float32")
            cells = [*_case_cells(key, multi_dtype=False), _fmt(target, row["goal"])]
            for impl in backends:
                value = row["values"][impl]
                ok = value is not None and value >= row["goal"]
                met[impl] += ok
                cells.append(_fmt(target, value) + (" met" if ok else ""))
            if target.is_ratio:
                cells.append(_fmt(target, row["bound"]))
            body.append(cells)
        counts = ", ".join(f"{impl} {met[impl]} of {len(body)}" for impl in backends)
        out += ["", f"**{target.title}**: met on {counts}", "", *_md_table(header, body)]
    return "\n".join(out) + "\n" if out else ""
