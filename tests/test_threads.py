"""Thread count: bitwise-identical results for 1 and 2 threads, and the thread controls."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import fastbn

from .conftest import PATH_SHAPES, Case, assert_same_bits, make_data, make_vector, shape_id

#: PATH_SHAPES plus shapes with more chunks than stripes (every numba kernel path).
THREAD_SHAPES = [*PATH_SHAPES, (70001, 1), (1, 2, 8193), (2, 2, 9, 23, 21)]


def run_everything(x, dy, layout, backend):
    """Every output of every op (and of the layer) on x, as a dict of arrays."""
    c = x.shape[1] if layout == "NCHW" else x.shape[-1]
    w, b = make_vector(c, 1), make_vector(c, 2, loc=0.0)
    kw = {"layout": layout, "backend": backend}
    res = {}
    res["mean"], res["var"] = fastbn.moments(x, **kw)
    res["y"], res["save_mean"], res["save_invstd"] = fastbn.batch_norm_train(x, w, b, **kw)
    rm, rv = np.zeros(c), np.ones(c)
    res["y_training"] = fastbn.batch_norm(x, rm, rv, w, b, True, **kw)
    res["running_mean"], res["running_var"] = rm, rv
    res["y_eval"] = fastbn.batch_norm(x, res["mean"], res["var"], w, b, **kw)
    dx, dw, db = fastbn.batch_norm_backward(dy, x, res["save_mean"], res["save_invstd"], w, **kw)
    res["dx"], res["dweight"], res["dbias"] = dx, dw, db
    dx, dw, db = fastbn.batch_norm_backward(
        dy, x, res["mean"], res["save_invstd"], w, training=False, **kw
    )
    res["dx_eval"], res["dweight_eval"], res["dbias_eval"] = dx, dw, db
    return res


@pytest.mark.parametrize("shape", THREAD_SHAPES, ids=shape_id)
def test_bitwise_identical_for_1_and_2_threads(backend, dtype, layout, shape):
    x = make_data(shape, dtype, layout, seed=51)
    dy = make_data(shape, dtype, layout, seed=52, loc=0.5)
    with fastbn.num_threads(1):
        one = run_everything(x, dy, layout, backend)
    with fastbn.num_threads(2):
        two = run_everything(x, dy, layout, backend)
    for key in one:
        assert_same_bits(key, two[key], one[key], Case(backend, dtype, x.shape, layout, "1 vs 2"))


def test_more_threads_than_cores_same_bits(backend):
    x = make_data((70, 2, 31, 31), np.float32, "NCHW", seed=53)
    dy = make_data((70, 2, 31, 31), np.float32, "NCHW", seed=54)
    with fastbn.num_threads(1):
        one = run_everything(x, dy, "NCHW", backend)
    with fastbn.num_threads(7):
        many = run_everything(x, dy, "NCHW", backend)
    for key in one:
        assert_same_bits(key, many[key], one[key], Case(backend, np.float32, x.shape, "NCHW"))


@pytest.fixture
def restore_threads():
    before = fastbn.get_num_threads()
    yield before
    fastbn.set_num_threads(before)


def test_set_and_get(restore_threads):
    assert isinstance(restore_threads, int) and restore_threads >= 1
    fastbn.set_num_threads(1)
    assert fastbn.get_num_threads() == 1
    fastbn.set_num_threads(np.int64(2))
    assert fastbn.get_num_threads() == 2
    assert type(fastbn.get_num_threads()) is int


def test_context_manager_restores(restore_threads):
    fastbn.set_num_threads(2)
    with fastbn.num_threads(1):
        assert fastbn.get_num_threads() == 1
        with fastbn.num_threads(3):
            assert fastbn.get_num_threads() == 3
        assert fastbn.get_num_threads() == 1
    assert fastbn.get_num_threads() == 2


def test_context_manager_restores_after_exception(restore_threads):
    fastbn.set_num_threads(2)
    with pytest.raises(KeyError, match="boom"), fastbn.num_threads(1):
        assert fastbn.get_num_threads() == 1
        raise KeyError("boom")
    assert fastbn.get_num_threads() == 2
    # also when the exception comes from fastbn itself
    with pytest.raises(ValueError), fastbn.num_threads(1):
        fastbn.batch_norm(np.zeros((1, 3)), training=True)
    assert fastbn.get_num_threads() == 2


def test_context_manager_is_per_python_thread(restore_threads):
    fastbn.set_num_threads(2)
    inside = threading.Event()
    release = threading.Event()
    seen = {}

    def scoped():
        with fastbn.num_threads(1):
            seen["scoped"] = fastbn.get_num_threads()
            inside.set()
            release.wait(10)

    t = threading.Thread(target=scoped)
    t.start()
    assert inside.wait(10)
    seen["main"] = fastbn.get_num_threads()  # while the other thread is inside its block
    with ThreadPoolExecutor(1) as pool:
        seen["other"] = pool.submit(fastbn.get_num_threads).result()
    release.set()
    t.join()
    assert seen == {"scoped": 1, "main": 2, "other": 2}
    assert fastbn.get_num_threads() == 2


@pytest.mark.parametrize(
    ("value", "exc"),
    [
        (0, ValueError),
        (-1, ValueError),
        (1.5, TypeError),
        ("2", TypeError),
        (None, TypeError),
        (True, TypeError),
    ],
    ids=repr,
)
def test_bad_thread_counts_raise(restore_threads, value, exc):
    fastbn.set_num_threads(2)
    with pytest.raises(exc, match="threads"):
        fastbn.set_num_threads(value)
    with pytest.raises(exc, match="threads"), fastbn.num_threads(value):
        pass
    assert fastbn.get_num_threads() == 2


@pytest.mark.parametrize("calls", ["fast", "public"])
def test_numba_kernels_run_on_the_asked_threads_and_leave_numbas_count(calls, monkeypatch):
    """numba_cpu._run sets numba's thread count for the kernel only, through the ctypes
    functions behind numba's API or, when a numba release moves them, the API itself."""
    if "numba" not in fastbn.available_backends():
        pytest.skip("numba is not available")
    import numba

    from fastbn.backends import numba_cpu

    if numba_cpu.max_threads() < 2:
        pytest.skip("numba runs one thread here (NUMBA_NUM_THREADS=1)")
    if calls == "public":
        monkeypatch.setattr(
            numba_cpu,
            "_thread_count",
            lambda: (numba.get_num_threads, numba.set_num_threads, numba_cpu.max_threads()),
        )

    @numba.njit
    def seen(x, out):
        out[0] = numba.get_num_threads()

    big, small = np.zeros(numba_cpu.SERIAL_BELOW), np.zeros(numba_cpu.SERIAL_BELOW - 1)
    out = np.zeros(1, dtype=np.int64)
    numba.set_num_threads(2)
    try:
        for x, asked, expected in [(big, 1, 1), (big, 2, 2), (big, 99, 2), (small, 2, 1)]:
            numba_cpu._run(seen, asked, x, out)
            assert out[0] == expected, f"{calls}: {asked} threads asked, size {x.size}"
            assert numba.get_num_threads() == 2, f"{calls}: numba's count not restored"
        numba.set_num_threads(1)
        numba_cpu._run(seen, 2, big, out)
        assert out[0] == 2 and numba.get_num_threads() == 1, calls
    finally:
        numba.set_num_threads(numba_cpu.max_threads())
