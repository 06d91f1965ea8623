"""What the numba backend's intrinsics make LLVM generate (properties, not timings)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest

numba = pytest.importorskip("numba")

from fastbn.backends import _numba_kernels  # noqa: E402


def _attributes(llvm: str, name: str) -> str:
    """The attributes of the function whose name contains `name` (not its Python or C
    wrappers), written on its ``define`` line or in the attribute groups it refers to."""
    lines = llvm.splitlines()
    wrappers = ("cpython.", "cfunc.", "_ZN7cpython")
    define = next(
        line
        for line in lines
        if line.startswith("define") and name in line and not any(w in line for w in wrappers)
    )
    head = define[define.rindex(")") :]
    groups = {f"attributes {group} " for group in re.findall(r"#\d+", head)}
    return " ".join([head, *(line for line in lines if line.startswith(tuple(groups)))])


def test_functions_with_vector_intrinsics_align_their_stack() -> None:
    """A streamed block of 64 float32 values holds 16 vectors, all the registers AVX2 has,
    so LLVM spills some to the stack; on numba's 16-byte aligned stack a 32-byte slot
    crossed a page boundary for some stack positions, and the loop ran 7x slower in those
    processes. The intrinsics align the stack of the function they go into."""
    # A fresh compile of a kernel function (not the disk cache), checked on its output too.
    stream_normalize = numba.njit(_numba_kernels.stream_normalize.py_func)
    x = np.linspace(-3, 3, 301, dtype=np.float32)
    y = np.empty_like(x)
    stream_normalize(x, y, None, 1.5, 0.25, 1)
    expected = (x.astype(np.float64) * 1.5 + 0.25).astype(np.float32)
    np.testing.assert_array_equal(y, expected, err_msg="numba stream_normalize float32")
    llvm = stream_normalize.inspect_llvm(stream_normalize.signatures[0])
    attributes = _attributes(llvm, "stream_normalize")
    assert re.search(r"alignstack[(=]64", attributes), attributes


def test_kernel_file_changes_with_the_code_it_compiles() -> None:
    """numba's disk cache is keyed on the text of _numba_kernels.py alone: its
    SOURCES_DIGEST must follow _numba_stream.py and numba_cpu.py, or processes load kernels
    compiled from their old text (the stack alignment did not reach a cache made before
    it)."""
    backends = Path(_numba_kernels.__file__).parent
    text = b"".join(
        (backends / name).read_bytes() for name in ("_numba_stream.py", "numba_cpu.py")
    )
    digest = hashlib.sha256(text).hexdigest()[:16]
    assert _numba_kernels.SOURCES_DIGEST == digest, (
        f"set SOURCES_DIGEST = {digest!r} in fastbn/backends/_numba_kernels.py"
    )
