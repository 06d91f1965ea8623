"""Time numba's streamed NCHW kernels with the caller's stack shifted 16 bytes at a time.

The position of the stack in its page is random per process, and a kernel whose spilled
vectors sit on an unaligned stack can run several times slower at a few positions (see
``_align_stack`` in ``fastbn/backends/_numba_stream.py``). Run::

    python benchmarks/stack_offsets.py              # normalize and dx, one thread
    python benchmarks/stack_offsets.py --threads 2

Each position is the stack pointer after an ``alloca`` of 16 to 4096 bytes in a jitted
caller; a position is reported when its median time is over ``--slow`` times the median
over all positions. Before the alignment, 2 of the 256 positions ran the normalize of
(32, 64, 56, 56) 7-8x slower and 6 ran ``dx`` so; after it, none.
"""

from __future__ import annotations

import argparse
import time

import numba
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from fastbn.backends import _numba_kernels as kernels


@intrinsic
def _stack_pad(typingctx, n):
    """Move the stack pointer down by ``n`` bytes; return the new position."""

    def codegen(context, builder, signature, args):
        pad = builder.alloca(ir.IntType(8), size=args[0])
        builder.store(ir.Constant(ir.IntType(8), 0), pad)
        return builder.ptrtoint(pad, ir.IntType(64))

    return types.int64(types.intp), codegen


@njit
def _normalize(pad, x, dy, mean, k, shift, proj, y):
    at = _stack_pad(pad)
    kernels.nchw_normalize(x, mean, k, shift, y, True)
    return at


@njit
def _dx(pad, x, dy, mean, k, shift, proj, y):
    at = _stack_pad(pad)
    kernels.nchw_dx(dy, x, mean, k, shift, proj, y, True)
    return at


def scan(kernel, shape: tuple[int, int, int], repeat: int) -> list[tuple[int, float]]:
    """Median time (ms) of `kernel` at each stack position, as (position in page, ms)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=np.float32)
    dy = rng.standard_normal(shape, dtype=np.float32)
    x.flags.writeable = dy.flags.writeable = False  # as the backend passes its inputs
    n_ch = shape[1]
    mean, k, shift, proj = np.zeros(n_ch), np.ones(n_ch), np.full(n_ch, 0.1), np.ones(n_ch)
    y = np.empty_like(x)
    kernel(16, x, dy, mean, k, shift, proj, y)  # compile
    results = []
    for pad in range(16, 4096 + 16, 16):
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            at = kernel(pad, x, dy, mean, k, shift, proj, y)
            times.append(time.perf_counter() - start)
        results.append((at % 4096, float(np.median(times)) * 1e3))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="32,64,3136", help="(N, C, H*W), default 32,64,3136")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3, help="timed calls per position")
    parser.add_argument("--slow", type=float, default=1.5, help="report over this x median")
    args = parser.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split(","))
    numba.set_num_threads(args.threads)
    for name, kernel in (("normalize", _normalize), ("dx", _dx)):
        results = scan(kernel, shape, args.repeat)
        median = float(np.median([ms for _, ms in results]))
        slow = [(at, ms) for at, ms in results if ms > args.slow * median]
        print(f"{name}: median {median:.2f} ms, {len(slow)} of {len(results)} positions slow")
        for at, ms in slow:
            print(f"  stack at {at} in its page: {ms:.2f} ms ({ms / median:.1f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
