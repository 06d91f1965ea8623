"""Streaming (non-temporal) stores for the ``"numba"`` backend's large outputs.

numba has no streaming store, so the block of ``BLOCK`` values that the row loops of
``_numba_kernels`` write is one LLVM intrinsic here: the inputs are loaded a cache line of
the output at a time, widened to float64, combined with the same IEEE operations in the
same order as the plain loops (no fast-math flags, hence no FMA), rounded once, and stored
line by line with ``!nontemporal`` stores that LLVM splits into the CPU's vector width
(``vmovntps``/``vmovntpd``), lines in ascending order (``_by_lines``). All loads of a block
come before its stores, so the output's stores never stall the next loads (see
``kernels/_elementwise.h``). Same bits as the plain loops (tested). ``plain_apply``
is ``stream_apply`` with ordinary stores, for the outputs that stay in cache: float32
blocks are stored as the halves one vector of doubles rounds to (``_float32_lanes``);
``plain_dx`` is ``stream_dx`` so (the NHWC ``dx`` not streamed); ``plain_apply_vector``
writes ``VECTOR`` values of a row's tail after its blocks.

``stream_apply_line`` and ``stream_dx_line`` do the same for one cache line of the output
(16 float32 or 8 float64 values), for the whole lines after the last block.

Two more intrinsics serve the statistics of groups of short rows: ``tile_deviations_line``
sums the deviations of a tile of ``GROUP_TILE`` samples over one cache line of positions,
so that the loop over the lines can ``request`` (prefetch) the next tile's lines between
them (a vectorized loop with the requests inside is not vectorized; split into short spans
it ran 1.2x-1.4x slower); it, ``tile_add_line`` and ``tile_grad_sums_line`` (the backward
sums) also sum the periods of narrow NHWC rows (``nhwc_period`` of _numba_kernels). Their
``_quad`` and ``_one`` forms take 4 and 1 positions: a group's last positions after its
whole lines.
``unowned`` and ``keep`` let the kernels pass arrays to the functions they call per row
without numba's reference counting, whose locked instructions wait for the streaming
stores; ``positions`` makes a group's per-position tables.

The caller guarantees the preconditions: unit stride, ``BLOCK`` values from ``i`` on, and
``&y[i]`` on a cache line (the rows start with a head of ordinary stores), and it calls
``fence`` after its last block. Per-channel constants are either scalars (broadcast) or
float64 arrays read from ``c`` on (NHWC: wrapped tables, ``t[j] = t[j % C]``); the mean is
None for float32 outputs, which are ``x * scale + shift``. The jitted helpers that pick that
formula for the plain loops too (``apply``, ``at``, ``span``, ``output_constants``) live here
beside ``stream_apply`` so that the two cannot drift apart.

numba's disk cache is keyed on the text of ``_numba_kernels.py`` alone (a hash of it, not
its modification time: touching the file changes nothing): ``SOURCES_DIGEST`` there is a
digest of this module and ``numba_cpu.py``, which a test checks, so that editing either
changes that file too. To compare code generation, use a fresh ``NUMBA_CACHE_DIR``.
"""

import platform

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from .numba_cpu import GROUP_TILE as TILE
from .numba_cpu import STREAM_BLOCK as BLOCK

#: Bytes of the alignment the body starts on (a cache line).
LINE = 64
#: Values of the pieces a row's tail is written in after its blocks (``plain_apply_vector``):
#: one AVX-512 vector of float64.
VECTOR = 8

_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")
_F64 = ir.DoubleType()
_I32 = ir.IntType(32)


def _check_arrays(*arrays) -> None:
    for a in arrays:
        if not isinstance(a, types.Array) or a.dtype not in (types.float32, types.float64):
            raise TypeError(f"expected a float32 or float64 array, got {a}")


def _block_pointer(context, builder, arrty, arr, index, elem: ir.Type, n: int) -> ir.Value:
    """``&arr[index]`` as a pointer to a vector of n elements."""
    data = context.make_array(arrty)(context, builder, arr).data
    return builder.bitcast(builder.gep(data, [index]), ir.VectorType(elem, n).as_pointer())


def _align_stack(builder) -> None:
    """Align the stack of the function being built to a cache line.

    The functions these intrinsics go into hold many vectors, and LLVM spills some of them
    to the stack in the hot loops (a streamed block of 64 float32 values needs 16 vector
    registers for its loads, all that AVX2 has). numba aligns its stack to 16 bytes only,
    so a 32-byte spill slot crosses a page boundary at some stack positions. Calling the
    kernels with the stack shifted 16 bytes at a time, the streamed normalize ran 7-8x
    slower at 2 of the 256 positions (32 bytes apart, as its two spill slots) and ``dx``
    at 6. The stack's position in its page is random per process: 7 of about 360 processes
    ran numba's NCHW inference of (32, 64, 56, 56) at 13-17 ms instead of 2 through the
    public API, fast when called one frame deeper. Aligned, no position is slow.
    """
    attributes = builder.function.attributes
    attributes.alignstack = LINE
    # llvmlite writes a function's attributes only when its set of named ones is not
    # empty (alignstack is not one of them): nounwind, which numba's functions are.
    attributes.add("nounwind")


def _load_f64(context, builder, arrty, arr, index, n: int) -> ir.Value:
    """n values of arr from index, widened to float64 (exact for float32)."""
    _align_stack(builder)
    elem = context.get_data_type(arrty.dtype)
    item = elem.get_abi_size(context.target_data)
    v = builder.load(_block_pointer(context, builder, arrty, arr, index, elem, n), align=item)
    return v if elem == _F64 else builder.fpext(v, ir.VectorType(_F64, n))


def _constant(context, builder, ty, value, offset, n: int) -> ir.Value:
    """A per-channel constant as a vector of n: a scalar broadcast, or n values of a table."""
    if isinstance(ty, types.Array):
        return _load_f64(context, builder, ty, value, offset, n)
    if ty != types.float64:
        value = context.cast(builder, value, ty, types.float64)
    vec = ir.VectorType(_F64, n)
    one = builder.insert_element(ir.Constant(vec, ir.Undefined), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(
        one, ir.Constant(vec, ir.Undefined), ir.Constant(ir.VectorType(_I32, n), [0] * n)
    )


def _line(arr) -> int:
    """Values of the array type ``arr`` in one cache line."""
    return LINE // (arr.dtype.bitwidth // 8)


def _float32_lanes() -> int:
    """Float32 values per store of a rounded block: what one vector of doubles rounds to
    (8 with AVX-512, else 4). Stored whole, LLVM joins two such halves with a lane shuffle
    (``vinsertf64x4``) per vector; numba's plain float32 loops do the same. A C-like loop
    over rows in L2, one core: 6.3 -> 7.0 G values/s for ``x * sc + b``."""
    from llvmlite import binding

    return 8 if binding.get_host_cpu_features().get("avx512f") else 4


_LANES32 = _float32_lanes()


def _store(context, builder, arrty, arr, index, value: ir.Value, nontemporal: bool, n: int):
    """Round the n values of value to the array's dtype and store them at arr[index:]: with
    streaming stores (``&arr[index]`` on a cache line) or ordinary ones (any alignment)."""
    elem = context.get_data_type(arrty.dtype)
    item = elem.get_abi_size(context.target_data)
    lanes = n
    if elem != _F64:
        value = builder.fptrunc(value, ir.VectorType(elem, n))
        # Streaming stores stay whole vectors: stored in halves, they left half lines to the
        # write-combining buffers (numba's (32, 64, 3136) normalize 1.0-1.4x slower).
        lanes = n if nontemporal else min(n, _LANES32)
    base = builder.bitcast(
        _block_pointer(context, builder, arrty, arr, index, elem, n),
        ir.VectorType(elem, lanes).as_pointer(),
    )
    undef = ir.Constant(ir.VectorType(elem, n), ir.Undefined)
    for k in range(n // lanes):
        part = value
        if lanes < n:
            pick = ir.Constant(ir.VectorType(_I32, lanes), list(range(k * lanes, (k + 1) * lanes)))
            part = builder.shuffle_vector(value, undef, pick)
        at = builder.gep(base, [ir.Constant(_I32, k)])
        store = builder.store(part, at, align=LINE if nontemporal else item)
        if nontemporal:
            store.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(_I32, 1)]))


def _check_constants(*constants) -> None:
    for c in constants:
        if isinstance(c, types.NoneType):
            continue
        if isinstance(c, types.Array):
            if c.dtype != types.float64:
                raise TypeError(f"a table of constants must be float64, got {c}")
        elif not isinstance(c, types.Float):
            raise TypeError(f"a constant must be a float or a float64 array, got {c}")


def _by_lines(context, builder, outty, out, idx, off, n: int, nontemporal: bool, value):
    """Compute a block of n values line by line of the output (``value(i, o, width)``: the
    ``width`` values from index ``i``, constants from ``o``), then store the lines, both in
    ascending order. As one vector of n, LLVM split the block into pieces it loaded and
    stored from the last to the first (AVX2): in a loop over the runs of 7x7 groups with the
    input coming from memory (one thread, streamed), that took 1.27x the time of this order."""
    width = min(n, _line(outty))
    lines = []
    for p in range(0, n, width):
        at = builder.add(idx, ir.Constant(idx.type, p))
        lines.append((at, value(at, builder.add(off, ir.Constant(off.type, p)), width)))
    for at, v in lines:
        _store(context, builder, outty, out, at, v, nontemporal, width)


def _apply_codegen(nontemporal: bool, n: int):
    def codegen(context, builder, signature, args):
        tx, ty, _, tm, ts, tb, _ = signature.args
        ax, ay, idx, vm, vs, vb, off = args

        def value(i, o, width):
            v = _load_f64(context, builder, tx, ax, i, width)
            if not isinstance(tm, types.NoneType):
                v = builder.fsub(v, _constant(context, builder, tm, vm, o, width))
            v = builder.fmul(v, _constant(context, builder, ts, vs, o, width))
            return builder.fadd(v, _constant(context, builder, tb, vb, o, width))

        _by_lines(context, builder, ty, ay, idx, off, n, nontemporal, value)
        return context.get_dummy_value()

    return codegen


@intrinsic
def stream_apply(typingctx, x, y, i, m, sc, b, c):
    """``y[i:i+BLOCK] = (x[i:i+BLOCK] - m) * sc + b`` (constants from ``c`` if tables);
    ``x * sc + b`` when ``m`` is None (float32: ``b`` holds the shifts, see ``apply``)."""
    _check_arrays(x, y)
    _check_constants(m, sc, b)
    return types.void(x, y, i, m, sc, b, c), _apply_codegen(True, BLOCK)


@intrinsic
def stream_apply_line(typingctx, x, y, i, m, sc, b, c):
    """``stream_apply`` over one cache line of ``y`` (16 float32 or 8 float64 values)."""
    _check_arrays(x, y)
    _check_constants(m, sc, b)
    return types.void(x, y, i, m, sc, b, c), _apply_codegen(True, _line(y))


@intrinsic
def plain_apply(typingctx, x, y, i, m, sc, b, c):
    """``stream_apply`` with ordinary stores, at any index."""
    _check_arrays(x, y)
    _check_constants(m, sc, b)
    return types.void(x, y, i, m, sc, b, c), _apply_codegen(False, BLOCK)


@intrinsic
def plain_apply_vector(typingctx, x, y, i, m, sc, b, c):
    """``plain_apply`` over ``VECTOR`` values (a row's tail after its blocks)."""
    _check_arrays(x, y)
    _check_constants(m, sc, b)
    return types.void(x, y, i, m, sc, b, c), _apply_codegen(False, VECTOR)


def _dx_codegen(nontemporal: bool, n: int):
    def codegen(context, builder, signature, args):
        tg, tx, td, _, tm, tk, ta, tq, _ = signature.args
        ag, ax, ad, idx, vm, vk, va, vq, off = args

        def value(i, o, width):
            gv = _load_f64(context, builder, tg, ag, i, width)
            xv = _load_f64(context, builder, tx, ax, i, width)
            left = builder.fsub(gv, _constant(context, builder, ta, va, o, width))
            right = builder.fmul(
                builder.fsub(xv, _constant(context, builder, tm, vm, o, width)),
                _constant(context, builder, tq, vq, o, width),
            )
            scale = _constant(context, builder, tk, vk, o, width)
            return builder.fmul(scale, builder.fsub(left, right))

        _by_lines(context, builder, td, ad, idx, off, n, nontemporal, value)
        return context.get_dummy_value()

    return codegen


@intrinsic
def stream_dx(typingctx, g, x, d, i, m, k, a, q, c):
    """``d[i:i+BLOCK] = k * ((g - a) - (x - m) * q)`` over the block (constants as above)."""
    _check_arrays(g, x, d)
    _check_constants(m, k, a, q)
    return types.void(g, x, d, i, m, k, a, q, c), _dx_codegen(True, BLOCK)


@intrinsic
def stream_dx_line(typingctx, g, x, d, i, m, k, a, q, c):
    """``stream_dx`` over one cache line of ``d``."""
    _check_arrays(g, x, d)
    _check_constants(m, k, a, q)
    return types.void(g, x, d, i, m, k, a, q, c), _dx_codegen(True, _line(d))


@intrinsic
def plain_dx(typingctx, g, x, d, i, m, k, a, q, c):
    """``stream_dx`` with ordinary stores, at any index."""
    _check_arrays(g, x, d)
    _check_constants(m, k, a, q)
    return types.void(g, x, d, i, m, k, a, q, c), _dx_codegen(False, BLOCK)


def _tile_width(n, tx) -> int:
    """Positions a tile intrinsic takes: ``n``, or one cache line of ``tx`` when None."""
    return _line(tx) if n is None else n


def _float64_arrays(*arrays) -> None:
    for a in arrays:
        if not isinstance(a, types.Array) or a.dtype != types.float64:
            raise TypeError(f"expected a float64 array, got {a}")


def _tile_deviations(n, doc: str):
    """The ``tile_deviations_*`` intrinsic over ``n`` positions (None: a cache line)."""

    def codegen(context, builder, signature, args):
        tx, _, _, _, tk, tsd, tsq = signature.args
        ax, ab, aw, aj, vk, vsd, vsq = args
        width = _tile_width(n, tx)
        kv = _load_f64(context, builder, tk, vk, aj, width)
        sdv = _load_f64(context, builder, tsd, vsd, aj, width)
        sqv = _load_f64(context, builder, tsq, vsq, aj, width)
        for i in range(TILE):
            row = builder.add(ab, builder.mul(aw, ir.Constant(ab.type, i)))
            xv = _load_f64(context, builder, tx, ax, builder.add(row, aj), width)
            d = builder.fsub(xv, kv)
            sdv = builder.fadd(sdv, d)
            sqv = builder.fadd(sqv, builder.fmul(d, d))
        _store(context, builder, tsd, vsd, aj, sdv, False, width)
        _store(context, builder, tsq, vsq, aj, sqv, False, width)
        return context.get_dummy_value()

    def tile_deviations(typingctx, x, b, w, j, k, sd, sq):
        _check_arrays(x)
        _float64_arrays(k, sd, sq)
        return types.void(x, b, w, j, k, sd, sq), codegen

    tile_deviations.__doc__ = doc
    return intrinsic(tile_deviations)


tile_deviations_line = _tile_deviations(
    None,
    """For the ``TILE`` rows ``x[b + i*w:]`` (``i < TILE``) and one cache line of positions
    from ``j`` (16 float32 or 8 float64): ``sd[j] += d_0 + ... + d_7`` and
    ``sq[j] += d_0**2 + ... + d_7**2`` with ``d_i = x[b + i*w + j] - k[j]``, in that order
    (a position's operations do not depend on how many positions are taken at once: the
    same bits as ``tile_deviations_quad`` and ``_one``, which take a run's last positions
    4 and 1 at a time). One vector per row: a loop over the lines can request the next
    tile's lines between them (``request``).""",
)
tile_deviations_quad = _tile_deviations(4, "``tile_deviations_line`` over 4 positions from ``j``.")
tile_deviations_one = _tile_deviations(1, "``tile_deviations_line`` over the one position ``j``.")


def _tile_add(n, doc: str):
    """The ``tile_add_*`` intrinsic over ``n`` positions (None: a cache line)."""

    def codegen(context, builder, signature, args):
        tx, _, _, _, ta = signature.args
        ax, ab, aw, aj, va = args
        width = _tile_width(n, tx)
        av = _load_f64(context, builder, ta, va, aj, width)
        for i in range(TILE):
            at = builder.add(builder.add(ab, builder.mul(aw, ir.Constant(ab.type, i))), aj)
            av = builder.fadd(av, _load_f64(context, builder, tx, ax, at, width))
        _store(context, builder, ta, va, aj, av, False, width)
        return context.get_dummy_value()

    def tile_add(typingctx, x, b, w, j, acc):
        _check_arrays(x)
        _float64_arrays(acc)
        return types.void(x, b, w, j, acc), codegen

    tile_add.__doc__ = doc
    return intrinsic(tile_add)


tile_add_line = _tile_add(
    None,
    """``tile_deviations_line`` for a plain sum: ``acc[j] += x_0 + ... + x_7`` with
    ``x_i = x[b + i*w + j]``, in that order (``tile_add_quad``, ``_one``: 4 and 1 positions).""",
)
tile_add_quad = _tile_add(4, "``tile_add_line`` over 4 positions from ``j``.")
tile_add_one = _tile_add(1, "``tile_add_line`` over the one position ``j``.")


def _tile_grad_sums(n, doc: str):
    """The ``tile_grad_sums_*`` intrinsic over ``n`` positions (None: a cache line)."""

    def codegen(context, builder, signature, args):
        tg, tx, _, _, _, tm, ta, tb = signature.args
        ag, ax, ab, aw, aj, vm, va, vb = args
        width = _tile_width(n, tx)
        mv = _load_f64(context, builder, tm, vm, aj, width)
        av = _load_f64(context, builder, ta, va, aj, width)
        bv = _load_f64(context, builder, tb, vb, aj, width)
        for i in range(TILE):
            at = builder.add(builder.add(ab, builder.mul(aw, ir.Constant(ab.type, i))), aj)
            e = _load_f64(context, builder, tg, ag, at, width)
            av = builder.fadd(av, e)
            xm = builder.fsub(_load_f64(context, builder, tx, ax, at, width), mv)
            bv = builder.fadd(bv, builder.fmul(e, xm))
        _store(context, builder, ta, va, aj, av, False, width)
        _store(context, builder, tb, vb, aj, bv, False, width)
        return context.get_dummy_value()

    def tile_grad_sums(typingctx, g, x, b, w, j, m, sa, sb):
        _check_arrays(g, x)
        if g.dtype != x.dtype:
            raise TypeError(f"g and x must have one dtype, got {g} and {x}")
        _float64_arrays(m, sa, sb)
        return types.void(g, x, b, w, j, m, sa, sb), codegen

    tile_grad_sums.__doc__ = doc
    return intrinsic(tile_grad_sums)


tile_grad_sums_line = _tile_grad_sums(
    None,
    """``tile_deviations_line`` for the backward sums: ``sa[j] += e_0 + ... + e_7`` and
    ``sb[j] += e_0 * (x_0 - m[j]) + ... + e_7 * (x_7 - m[j])`` with ``e_i = g[b + i*w + j]``
    and ``x_i = x[b + i*w + j]``, in that order (``tile_grad_sums_quad``, ``_one``: 4 and 1
    positions).""",
)
tile_grad_sums_quad = _tile_grad_sums(4, "``tile_grad_sums_line`` over 4 positions from ``j``.")
tile_grad_sums_one = _tile_grad_sums(1, "``tile_grad_sums_line`` over the one position ``j``.")


@intrinsic
def request(typingctx, x, i):
    """Ask for the cache line of ``x[i]`` to be brought into L2 (a prefetch, ``T1``); no
    effect on any value, and no fault for an index past the array."""
    _check_arrays(x)

    def codegen(context, builder, signature, args):
        tx, _ = signature.args
        ax, ai = args
        data = context.make_array(tx)(context, builder, ax).data
        ptr = builder.bitcast(builder.gep(data, [ai]), ir.IntType(8).as_pointer())
        fn = cgutils.get_or_insert_function(
            builder.module,
            ir.FunctionType(ir.VoidType(), [ptr.type, _I32, _I32, _I32]),
            "llvm.prefetch.p0i8",
        )
        builder.call(fn, [ptr, ir.Constant(_I32, 0), ir.Constant(_I32, 2), ir.Constant(_I32, 1)])
        return context.get_dummy_value()

    return types.void(x, i), codegen


@intrinsic
def _unowned(typingctx, a):
    if not isinstance(a, types.Array):
        raise TypeError(f"expected an array, got {a}")

    def codegen(context, builder, signature, args):
        ary = context.make_array(a)(context, builder, value=args[0])
        ary.meminfo = cgutils.get_null_value(ary.meminfo.type)
        ary.parent = cgutils.get_null_value(ary.parent.type)
        return ary._getvalue()

    return a(a), codegen


def unowned(a):
    """``a`` without its owner (NULL meminfo): the same data, shape and strides, but views
    of it and calls that take it count no references (None stays None). Jitted code only.

    numba counts an array's references with locked instructions on its meminfo at every
    call of a jitted function that takes the array or a view of it, and a locked
    instruction waits for the thread's streaming stores to reach memory, as a fence does:
    called per row, the streamed rows were written one at a time (the 7x7 group forward
    written through a call per sample took 1.23x-1.30x as long as with the call inlined;
    16-21% of the samples of a profile on the locked instructions). The kernels take their arrays
    unowned before the loops that write streamed rows. The owner must outlive the unowned
    array: a kernel's arguments do (the caller holds them); a local array is passed to
    ``keep`` after the last use of its unowned copy.
    """
    raise NotImplementedError("unowned() is only for jitted code")


@overload(unowned, inline="always")
def _unowned_overload(a):
    if isinstance(a, types.NoneType):
        return lambda a: a
    return lambda a: _unowned(a)


@intrinsic
def keep(typingctx, a):
    """Nothing, but a use of ``a``: numba releases a local array after its last use, and an
    unowned copy (``unowned``) does not count as one."""

    def codegen(context, builder, signature, args):
        return context.get_dummy_value()

    return types.void(a), codegen


@intrinsic
def fence(typingctx):
    """Order this thread's streaming stores before its later stores (``sfence`` on x86)."""
    sig = types.void()

    def codegen(context, builder, signature, args):
        if _X86:
            fn = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), []), "llvm.x86.sse.sfence"
            )
            builder.call(fn, [])
        else:
            builder.fence("seq_cst")
        return context.get_dummy_value()

    return sig, codegen


def at(t, c):
    """``t[c]`` for a table of constants, ``t`` itself for a scalar or None (jitted code
    only)."""
    raise NotImplementedError("at() is only for jitted code")


@overload(at, inline="always")
def _at(t, c):
    if isinstance(t, types.Array):
        return lambda t, c: t[c]
    return lambda t, c: t


def apply(v, m, sc, b):
    """One output value: ``(v - m) * sc + b``, or ``v * sc + b`` when ``m`` is None (the
    float32 outputs, whose ``b`` is then the shift ``bias - mean * scale``, as the Cython
    kernels compute them: kernels/_elementwise.h). Jitted code only."""
    raise NotImplementedError("apply() is only for jitted code")


@overload(apply, inline="always")
def _apply(v, m, sc, b):
    if isinstance(m, types.NoneType):
        return lambda v, m, sc, b: v * sc + b
    return lambda v, m, sc, b: (v - m) * sc + b


def output_constants(x, m, sc, b):
    """The mean and bias that ``apply`` takes for the outputs of ``x``: ``(None, shift)`` for
    float32, with ``shift = b - m * sc`` in float64 (as the Cython kernels compute it), else
    ``(m, b)``. Jitted code only: this is the one place of the numba backend's float32 rule."""
    raise NotImplementedError("output_constants() is only for jitted code")


@overload(output_constants, inline="always")
def _output_constants(x, m, sc, b):
    if x.dtype == types.float32:

        def shifted(x, m, sc, b):
            shift = np.empty(m.shape[0])
            for j in range(m.shape[0]):
                shift[j] = b[j] - m[j] * sc[j]
            return None, shift

        return shifted
    return lambda x, m, sc, b: (m, b)


def wrap(t, extra):
    """A new table ``w[j] = t[j % n]`` for ``j < n + extra`` (``n = len(t)``); None for None.
    A streamed NHWC run reads its constants from any channel on, ``BLOCK`` values at a time
    (jitted code only)."""
    raise NotImplementedError("wrap() is only for jitted code")


@overload(wrap, inline="always")
def _wrap(t, extra):
    if isinstance(t, types.NoneType):
        return lambda t, extra: None

    def wrapped(t, extra):
        n = t.shape[0]
        w = np.empty(n + extra)
        for j in range(n + extra):
            w[j] = t[j % n]
        return w

    return wrapped


def positions(t, s, gl):
    """A new table of a group of ``gl`` channels at each of its ``gl * s`` positions (that of
    channel j at positions ``j*s`` to ``(j+1)*s - 1``); None for None (jitted code only)."""
    raise NotImplementedError("positions() is only for jitted code")


@overload(positions, inline="always")
def _positions(t, s, gl):
    if isinstance(t, types.NoneType):
        return lambda t, s, gl: None

    def expanded(t, s, gl):
        w = np.empty(gl * s)
        for j in range(gl):
            w[j * s : (j + 1) * s] = t[j]
        return w

    return expanded


def apart(out, a):
    """Whether ``out`` and ``a`` start at different addresses: an output written in place
    (``out`` is the input) is never streamed (jitted code only)."""
    raise NotImplementedError("apart() is only for jitted code")


@overload(apart, inline="always")
def _apart(out, a):
    return lambda out, a: out.ctypes.data != a.ctypes.data


def span(t, a, b):
    """``t[a:b]``, None for None (jitted code only)."""
    raise NotImplementedError("span() is only for jitted code")


@overload(span, inline="always")
def _span(t, a, b):
    if isinstance(t, types.NoneType):
        return lambda t, a, b: None
    return lambda t, a, b: t[a:b]
