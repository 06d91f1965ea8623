"""Compilation, imports and concurrent use."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import fastbn
from fastbn import reference as ref

from .conftest import (
    PATH_SHAPES,
    STATS_RTOL,
    Case,
    assert_close,
    backward_bounds,
    make_data,
    make_vector,
    normalize_bound,
    tol,
)

# ------------------------------------------------------------------ compilation


def numba_dispatchers() -> list:
    """Every live numba dispatcher (one scan of the heap: call it rarely)."""
    from numba.core.dispatcher import Dispatcher

    return [obj for obj in gc.get_objects() if isinstance(obj, Dispatcher)]


def signature_count(dispatchers: list) -> int:
    """Compiled specializations over `dispatchers`."""
    return sum(len(d.overloads) for d in dispatchers)


def exercise(shape, dtype, layout, backend, seed):
    """Every op in every flavour on fresh data (shape, dtype and layout fixed)."""
    x = make_data(shape, dtype, layout, seed=seed)
    dy = make_data(shape, dtype, layout, seed=seed + 1)
    c = shape[1]
    kw = {"layout": layout, "backend": backend}
    w, b, rm, rv = make_vector(c, seed), make_vector(c, seed + 1), np.zeros(c), np.ones(c)
    fastbn.moments(x, **kw)
    _, mean, invstd = fastbn.batch_norm_train(x, w, b, **kw)
    fastbn.batch_norm_train(x, **kw)
    fastbn.batch_norm(x, rm, rv, w, b, True, **kw)
    fastbn.batch_norm(x, rm.astype(np.float32), rv.astype(np.float32), **kw)
    fastbn.batch_norm(x, rm, rv, w, b, out=np.empty_like(x), **kw)
    fastbn.batch_norm(x.copy(), rm, rv, w, b, out=x, **kw)
    fastbn.batch_norm_backward(dy, x, mean, invstd, w, **kw)
    fastbn.batch_norm_backward(dy, x, mean, invstd, training=False, **kw)
    fastbn.batch_norm_backward(dy, x, mean, invstd, w, out=dy, **kw)
    bn = fastbn.BatchNorm(c, layout=layout, backend=backend)
    bn(x)
    bn.backward(x)
    bn.eval()(x)
    bn.backward(x)
    if x.ndim > 2:  # the other memory order, through a transposed view
        moved = np.moveaxis(x, 1, -1) if layout == "NCHW" else np.moveaxis(x, -1, 1)
        other = "NHWC" if layout == "NCHW" else "NCHW"
        fastbn.batch_norm_train(np.ascontiguousarray(moved), layout=other, backend=backend)
    strided = make_data((2 * shape[0], *shape[1:]), dtype, layout, seed=seed)[::2]
    fastbn.batch_norm_train(strided, **kw)


#: One shape per kernel path of the numba backend (see conftest.SHAPES).
COMPILE_SHAPES = [(7, 3), (3, 5, 1), (4, 3, 7), (2, 3, 5003), (3, 17, 4099), (70, 2, 31, 31)]


def test_no_recompilation_after_warm_up(backend):
    if backend != "numba":
        pytest.skip("JIT compilation is a numba matter")
    combos = [(d, lay) for d in (np.float32, np.float64) for lay in ("NCHW", "NHWC")]
    for dtype, layout in combos:
        for shape in COMPILE_SHAPES:
            exercise(shape, dtype, layout, backend, 70)
    dispatchers = numba_dispatchers()
    total = len(dispatchers), signature_count(dispatchers)
    for dtype, layout in combos:
        before = signature_count(dispatchers)
        for shape in COMPILE_SHAPES[::-1]:
            exercise(shape, dtype, layout, backend, 80)
        after = signature_count(dispatchers)
        case = Case(backend, dtype, tuple(COMPILE_SHAPES), layout)
        assert after == before, (
            f"{after - before} new numba specializations compiled on calls after warm-up [{case}]"
        )
    now = numba_dispatchers()
    assert (len(now), signature_count(now)) == total, "new dispatchers compiled after warm-up"


def test_read_only_input_does_not_recompile(backend):
    """A read-only array (np.load(mmap_mode='r'), a frozen buffer) is ordinary input."""
    if backend != "numba":
        pytest.skip("JIT compilation is a numba matter")
    x = make_data((4, 3, 5, 6), np.float32, "NCHW")
    dy = make_data((4, 3, 5, 6), np.float32, "NCHW", seed=1)
    _, mean, invstd = fastbn.batch_norm_train(x, backend=backend)
    fastbn.batch_norm_backward(dy, x, mean, invstd, backend=backend)
    dispatchers = numba_dispatchers()
    before = signature_count(dispatchers)
    x.flags.writeable = False
    dy.flags.writeable = False
    _, mean2, _ = fastbn.batch_norm_train(x, backend=backend)
    fastbn.batch_norm_backward(dy, x, mean, invstd, backend=backend)
    fastbn.moments(x, backend=backend)
    np.testing.assert_array_equal(mean2, mean)
    after = signature_count(dispatchers)
    new = [
        f"{d.py_func.__name__}{sig}"
        for d in dispatchers
        for sig in d.overloads
        if any(getattr(t, "mutable", True) is False for t in sig)
    ]
    assert after == before, f"read-only input compiled {after - before} new specializations: {new}"


# ------------------------------------------------------------------ imports


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=300,  # a fresh numba compile takes 1.5 min on a slow host
    )


def test_import_does_not_import_numba():
    res = run_python(
        """
        import sys
        import fastbn
        assert 'numba' not in sys.modules, 'import fastbn imported numba'
        """
    )
    assert res.returncode == 0, res.stderr


def test_available_backends_compiles_nothing():
    res = run_python(
        """
        import sys
        import fastbn
        names = fastbn.available_backends()
        assert 'numba' in names, names
        from numba.core.dispatcher import Dispatcher
        import gc
        compiled = [(o, len(o.overloads)) for o in gc.get_objects()
                    if isinstance(o, Dispatcher) and o.overloads]
        assert not compiled, compiled
        import fastbn.backends.numba_cpu as nb
        cached = getattr(nb._compiled, 'cache_info', None)
        assert cached is None or cached().currsize == 0, 'kernels were defined'
        print('ok', names)
        """
    )
    assert res.returncode == 0, res.stderr
    assert "ok" in res.stdout


# ------------------------------------------------------------------ concurrency


def check_one(args):
    """One full forward/backward round on its own data; raise on a wrong number."""
    i, backend = args
    shape = PATH_SHAPES[i % len(PATH_SHAPES)]
    dtype = (np.float32, np.float64)[i % 2]
    layout = ("NCHW", "NHWC")[(i // 2) % 2]
    x = make_data(shape, dtype, layout, seed=100 + i)
    dy = make_data(shape, dtype, layout, seed=200 + i)
    c = shape[1]
    w, b = make_vector(c, i), make_vector(c, i + 1, loc=0.0)
    case = Case(backend, dtype, x.shape, layout, f"thread task {i}")
    with fastbn.num_threads(1 + i % 2):
        for _ in range(3):
            y, mean, invstd = fastbn.batch_norm_train(x, w, b, layout=layout, backend=backend)
            dx, dw, db = fastbn.batch_norm_backward(
                dy, x, mean, invstd, w, layout=layout, backend=backend
            )
            ry, rmean, rinv = ref.train_forward(x, w, b, 1e-5, layout)
            assert_close(
                "y", y, ry, tol(dtype), case, normalize_bound(x, rmean, rinv, w, b, layout)
            )
            assert_close("invstd", invstd, rinv, STATS_RTOL, case)
            rdx, rdw, rdb = ref.backward(dy, x, mean, invstd, w, layout)
            bdx, bdw, bdb = backward_bounds(dy, x, mean, invstd, w, layout)
            assert_close("dx", dx, rdx, tol(dtype), case, bdx)
            assert_close("dweight", dw, rdw, STATS_RTOL, case, bdw)
            assert_close("dbias", db, rdb, STATS_RTOL, case, bdb)
    return y, dx


def test_concurrent_calls_from_8_threads(backend):
    tasks = [(i, backend) for i in range(24)]
    serial = [check_one(t) for t in tasks[:8]]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(check_one, tasks))
    # same inputs, same bits, whoever ran them and whatever ran beside them
    for i in range(8):
        np.testing.assert_array_equal(results[i][0], serial[i][0])
        np.testing.assert_array_equal(results[i][1], serial[i][1])


def test_concurrent_layers(backend):
    """Eight layers trained at once, each on its own stream of batches."""

    def train(i):
        bn = fastbn.BatchNorm(3, momentum=None, dtype=np.float64, backend=backend)
        xs = [make_data((8, 3, 7, 5), np.float32, "NCHW", seed=300 + 10 * i + k) for k in range(4)]
        for x in xs:
            bn(x)
            bn.backward(x)
        return bn, xs

    with ThreadPoolExecutor(8) as pool:
        out = list(pool.map(train, range(8)))
    for i, (bn, xs) in enumerate(out):
        m = xs[0].size // 3
        means = np.mean([ref.moments(x)[0] for x in xs], axis=0)
        uvars = np.mean([ref.moments(x)[1] * m / (m - 1) for x in xs], axis=0)
        case = Case(backend, np.float32, xs[0].shape, "NCHW", f"layer {i}")
        assert bn.num_batches_tracked == 4, case
        assert_close("running_mean", bn.running_mean, means, 1e-12, case, np.abs(means) + 1)
        assert_close("running_var", bn.running_var, uvars, 1e-12, case)


def test_compiled_kernels_are_cached_on_disk(tmp_path):
    """A second process loads the kernels from numba's disk cache instead of compiling."""
    if "numba" not in fastbn.available_backends():
        pytest.skip("numba is not available")
    code = """
        import gc, json
        import numpy as np
        import fastbn
        from numba.core.dispatcher import Dispatcher
        fastbn.moments(np.arange(12.0).reshape(6, 2), backend="numba")
        stats = {"hits": 0, "misses": []}
        for d in gc.get_objects():
            if not (isinstance(d, Dispatcher) and d.overloads):
                continue
            if d.py_func.__module__.startswith("fastbn"):
                stats["hits"] += sum(d.stats.cache_hits.values())
                stats["misses"] += [d.py_func.__name__] * sum(d.stats.cache_misses.values())
        print(json.dumps(stats))
    """
    env = {"NUMBA_CACHE_DIR": str(tmp_path), "FASTBN_NUMBA_CACHE": "1"}
    first = run_python(code, **env)
    assert first.returncode == 0, first.stderr
    second = run_python(code, **env)
    assert second.returncode == 0, second.stderr
    stats = json.loads(second.stdout.strip().splitlines()[-1])
    assert stats["hits"] > 0 and not stats["misses"], (
        f"the second process compiled again instead of loading the disk cache: {stats} "
        f"(first process: {first.stdout.strip()})"
    )


def test_same_bits_from_the_disk_cache_and_a_fresh_compile(tmp_path):
    """Kernels loaded from numba's disk cache give the bits of a fresh compile.

    (With fast-math on the per-channel and elementwise code, LLVM's choices differed between
    the two and float64 dx changed by an ulp from one process to the next.) float64 only, one
    shape per NCHW path and NHWC: each fresh process compiles every kernel it calls.
    """
    if "numba" not in fastbn.available_backends():
        pytest.skip("numba is not available")
    code = """
        import hashlib
        import numpy as np
        import fastbn
        digest = hashlib.sha256()
        rng = np.random.default_rng(5)
        for shape in [(4, 3, 7), (2, 3, 5003)]:
            for dtype in (np.float64,):
                for layout in ("NCHW", "NHWC"):
                    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
                    dy = rng.standard_normal(shape).astype(dtype)
                    if layout == "NHWC":
                        x, dy = (np.ascontiguousarray(np.moveaxis(a, 1, -1)) for a in (x, dy))
                    c = shape[1]
                    w, b = rng.random(c) + 0.5, rng.random(c)
                    kw = {"layout": layout, "backend": "numba"}
                    y, mean, invstd = fastbn.batch_norm_train(x, w, b, **kw)
                    outs = [y, mean, invstd, *fastbn.moments(x, **kw)]
                    for training in (True, False):
                        bwd = fastbn.batch_norm_backward(dy, x, mean, invstd, w, **kw,
                                                         training=training)
                        outs += bwd
                    outs.append(fastbn.batch_norm(x, mean, 1 / invstd**2, w, b, **kw))
                    for a in outs:
                        digest.update(np.ascontiguousarray(a).tobytes())
        print(digest.hexdigest())
    """
    cached = {"NUMBA_CACHE_DIR": str(tmp_path), "FASTBN_NUMBA_CACHE": "1"}
    runs = {
        "fresh compile, filling the cache": run_python(code, **cached),
        "loaded from the cache": run_python(code, **cached),
    }
    for what, res in runs.items():
        assert res.returncode == 0, f"{what}: {res.stderr}"
    digests = {what: res.stdout.strip().splitlines()[-1] for what, res in runs.items()}
    assert len(set(digests.values())) == 1, f"numba results differ between processes: {digests}"
