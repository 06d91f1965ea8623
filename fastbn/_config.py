"""`show_config`: how this fastbn was built and what it will use."""

from __future__ import annotations

import sys
from importlib import metadata

from ._outputs import output_cache_info
from ._stores import get_stream_threshold
from ._threads import default_num_threads, get_num_threads
from .backends import BACKENDS, available_backends, get_backend


def config() -> dict[str, object]:
    """Build and runtime facts as a dict (what `show_config` prints)."""
    try:
        version = metadata.version("fastbn")
    except metadata.PackageNotFoundError:
        version = "unknown (not installed)"
    available = available_backends()
    info: dict[str, object] = {
        "version": version,
        "python": sys.version.split()[0],
        "backends known": list(BACKENDS),
        "backends available": available,
        "threads (current / default)": f"{get_num_threads()} / {default_num_threads()}",
        "streaming stores from (bytes)": get_stream_threshold(),
        "output cache (bytes held / limit)": _cache_summary(),
    }
    for name in available:
        describe = getattr(get_backend(name), "describe", None)
        if describe is not None:
            for key, value in describe().items():
                info[f"{name}: {key}"] = value
    return info


def _cache_summary() -> str:
    info = output_cache_info()
    if "unavailable" in info:
        return f"off: {info['unavailable']}"
    return f"{info['held']} / {info['limit']}"


def show_config() -> None:
    """Print the version, available backends, OpenMP and numba threading facts, threads."""
    info = config()
    width = max(map(len, info))
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
