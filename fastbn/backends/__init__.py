"""Backend registry: which kernel modules exist, which are usable, which one to pick.

A backend is one module of this package that fills the kernel table described in
``CONTRACT.md``. Modules are imported only when first asked for, so importing fastbn
neither imports numba nor touches a GPU; what was found is remembered for the life of
the process (a failed import is slow, and the answer does not change).
"""

from __future__ import annotations

import importlib
from functools import cache
from types import ModuleType

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "available_backends",
    "choose_backend",
    "get_backend",
    "usable_backend",
]

#: Backend name -> module (relative to this package), in order of preference.
BACKENDS: dict[str, str] = {
    "cython": ".cython_cpu",
    "numba": ".numba_cpu",
    "cuda": ".cuda",
}


class BackendUnavailableError(RuntimeError):
    """A backend that fastbn knows cannot be used in this process."""


@cache
def _module(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(BACKENDS[name], __name__)
    except ImportError:
        return None


@cache
def usable_backend(name: str) -> ModuleType | None:
    """The module of backend `name` when it is usable in this process, else None."""
    module = _module(name)
    return module if module is not None and module.is_available() else None


def available_backends() -> list[str]:
    """Names of the backends usable in this process, e.g. ``["cython", "numba"]``."""
    return [name for name in BACKENDS if usable_backend(name) is not None]


def get_backend(name: str) -> ModuleType:
    """Return the backend module called `name`.

    Raises
    ------
    ValueError
        `name` is not a backend fastbn knows.
    BackendUnavailableError
        The backend exists but cannot run here; the message says what to install.
    """
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {[None, *BACKENDS]}, got {name!r}")
    module = usable_backend(name)
    if module is None:
        loaded = _module(name)
        reason = (
            loaded.unavailable_reason()
            if loaded is not None
            else f"the {name} backend is not part of this build of fastbn"
        )
        raise BackendUnavailableError(f"backend {name!r} is not available: {reason}")
    return module


def choose_backend(name: str | None) -> ModuleType:
    """Resolve the user's `backend` argument: a name, or None for the automatic choice.

    The automatic choice is the compiled Cython backend when it was built, otherwise numba.
    Measured with fastbn-bench on the benchmark shapes (README, "Measured results"), numba
    took 0.86x-1.25x the Cython backend's time channels-first and 0.71x-1.32x channels-last,
    and its first call in a fresh process costs about 0.3 s from the disk cache (4-8 s
    without) against 5-7 ms. It never picks ``"cuda"`` for NumPy inputs.
    """
    if name is not None:
        return get_backend(name)
    for candidate in ("cython", "numba"):
        module = usable_backend(candidate)
        if module is not None:
            return module
    raise BackendUnavailableError("no CPU backend is available: install numba")
