"""The output cache: fresh outputs reuse the memory of released ones, never of live ones."""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest

import fastbn
from fastbn import _outputs

from .conftest import Case, assert_same_bits, make_data, make_vector

try:
    from numpy._core.multiarray import get_handler_name
except ImportError:  # NumPy 1.x
    from numpy.core.multiarray import get_handler_name

pytestmark = pytest.mark.skipif(
    _outputs._cache is None, reason="fastbn._output_cache is not built"
)

#: 2.4 MB in float64, 1.2 MB in float32: above the cache's 1 MiB minimum.
SHAPE = (2, 16, 96, 96)


@pytest.fixture(autouse=True)
def fresh_cache():
    """Every test starts with an empty cache at the default limit, and leaves it so."""
    fastbn.set_output_cache_limit(None)
    fastbn.clear_output_cache()
    gc.collect()
    yield
    fastbn.set_output_cache_limit(None)
    fastbn.clear_output_cache()


def owner(a: np.ndarray) -> np.ndarray:
    """The array that owns `a`'s memory."""
    while a.base is not None:
        a = a.base
    return a


def train(backend, layout, x):
    c = x.shape[1] if layout == "NCHW" else x.shape[-1]
    w, b = make_vector(c, 1), make_vector(c, 2, loc=0.0)
    return fastbn.batch_norm_train(x, w, b, layout=layout, backend=backend)


def test_released_output_memory_is_reused_with_the_same_results(backend, dtype, layout):
    case = Case(backend, dtype, SHAPE, layout)
    x = make_data(SHAPE, dtype, layout)
    dy = make_data(SHAPE, dtype, layout, seed=1)
    y, mean, invstd = train(backend, layout, x)
    assert get_handler_name(owner(y)) == "fastbn_output_cache", case
    want, address = y.copy(), y.ctypes.data
    del y
    before = fastbn.output_cache_info()
    assert before["held"] >= want.nbytes, (before, case)
    y = train(backend, layout, x)[0]
    assert y.ctypes.data == address, f"the released buffer was not reused [{case}]"
    assert fastbn.output_cache_info()["hits"] == before["hits"] + 1, case
    assert_same_bits("training forward from the cache", y, want, case)
    dx_want = fastbn.batch_norm_backward(dy, x, mean, invstd, layout=layout, backend=backend)[0]
    dx_want = dx_want.copy()  # the first dx's buffer goes back to the cache here
    dx = fastbn.batch_norm_backward(dy, x, mean, invstd, layout=layout, backend=backend)[0]
    assert_same_bits("backward dx from the cache", dx, dx_want, case)


def test_live_outputs_and_their_views_never_share_memory(backend):
    """A buffer comes back only when no array (a view included) uses it any more."""
    xs = [make_data(SHAPE, np.float32, "NCHW", seed=s) for s in range(3)]
    y0 = train(backend, "NCHW", xs[0])[0]
    want0 = y0.copy()
    view = y0[1]
    del y0  # the view keeps the memory
    y1 = train(backend, "NCHW", xs[1])[0]
    y2 = train(backend, "NCHW", xs[2])[0]
    case = Case(backend, np.float32, SHAPE, "NCHW")
    for y in (y1, y2):
        assert not np.shares_memory(view, y), case
    assert not np.shares_memory(y1, y2), case
    assert_same_bits("a view of a released output", view, want0[1], case)
    del view
    y3 = train(backend, "NCHW", xs[0])[0]
    assert not np.shares_memory(y3, y1) and not np.shares_memory(y3, y2), case
    assert_same_bits("a buffer handed out again", y3, want0, case)


def test_small_outputs_are_ordinary_numpy_arrays():
    x = make_data((1, 8, 8, 8), np.float32)
    y = train(None, "NCHW", x)[0]
    assert get_handler_name(owner(y)) == "default_allocator"
    assert fastbn.output_cache_info()["held"] == 0


def test_limit_evicts_oldest_and_zero_keeps_nothing():
    """Released buffers are kept up to the limit, oldest evicted first; 0 keeps none."""
    arrays = [_outputs.empty((n << 20,), np.dtype(np.uint8)) for n in (3, 2, 4)]
    fastbn.set_output_cache_limit(8 << 20)
    while arrays:
        del arrays[0]  # released in this order: 3, 2, then 4 MiB
    info = fastbn.output_cache_info()
    assert (info["held"], info["buffers"]) == (6 << 20, 2), info  # the 3 MiB one evicted
    fastbn.set_output_cache_limit(5 << 20)
    assert fastbn.output_cache_info()["held"] == 4 << 20  # the 2 MiB one evicted
    assert fastbn.get_output_cache_limit() == 5 << 20
    fastbn.set_output_cache_limit(0)
    assert fastbn.output_cache_info()["held"] == 0
    a = _outputs.empty((2 << 20,), np.dtype(np.uint8))
    del a
    assert fastbn.output_cache_info()["held"] == 0
    y = train(None, "NCHW", make_data(SHAPE, np.float32))[0]
    assert get_handler_name(owner(y)) == "fastbn_output_cache"  # still allocates, keeps none


def test_buffer_larger_than_the_limit_is_freed():
    fastbn.set_output_cache_limit(1 << 20)
    a = _outputs.empty((2 << 20,), np.dtype(np.uint8))
    del a
    assert fastbn.output_cache_info()["held"] == 0


def test_clear_frees_everything_and_keeps_the_limit():
    a = _outputs.empty((2 << 20,), np.dtype(np.uint8))
    del a
    assert fastbn.output_cache_info()["held"] == 2 << 20
    fastbn.clear_output_cache()
    info = fastbn.output_cache_info()
    assert (info["held"], info["buffers"]) == (0, 0)
    default = _outputs.default_output_cache_limit()
    assert info["limit"] == fastbn.get_output_cache_limit() == default


def test_limit_bad_values_raise_and_change_nothing():
    fastbn.set_output_cache_limit(12345 << 10)
    for bad, exc in [(-1, ValueError), (1.5, TypeError), ("4", TypeError), (True, TypeError)]:
        with pytest.raises(exc, match="nbytes"):
            fastbn.set_output_cache_limit(bad)
        assert fastbn.get_output_cache_limit() == 12345 << 10
    fastbn.set_output_cache_limit(2**80)  # no limit
    assert fastbn.get_output_cache_limit() == 2**63
    fastbn.set_output_cache_limit(None)
    assert fastbn.get_output_cache_limit() == _outputs.default_output_cache_limit() > 0


def test_resized_output_keeps_its_values_and_returns_under_its_new_size():
    """``ndarray.resize`` reallocates through the handler; the freed size is the new one."""
    a = _outputs.empty((1 << 18,), np.dtype(np.float32))
    a[:] = np.arange(a.size, dtype=np.float32)
    a.resize((1 << 19,), refcheck=False)
    assert np.array_equal(a[: 1 << 18], np.arange(1 << 18, dtype=np.float32))
    del a
    assert fastbn.output_cache_info()["held"] == 2 << 20
    b = _outputs.empty((1 << 19,), np.dtype(np.float32))
    assert fastbn.output_cache_info()["held"] == 0
    del b


def test_handler_is_restored_after_a_failed_allocation():
    with pytest.raises((MemoryError, ValueError)):
        _outputs.empty((1 << 62,), np.dtype(np.float64))
    assert get_handler_name() == "default_allocator"
    y = train(None, "NCHW", make_data(SHAPE, np.float32))[0]
    assert get_handler_name(owner(y)) == "fastbn_output_cache"
    assert get_handler_name() == "default_allocator"  # only fastbn's outputs use it


def test_concurrent_calls_get_their_own_outputs(backend):
    """Threads allocating and releasing outputs at once: each result is its own, exact."""
    xs = [make_data(SHAPE, np.float32, "NCHW", seed=s) for s in range(4)]
    wants = [train(backend, "NCHW", x)[0].copy() for x in xs]
    errors: list[str] = []

    def work(i: int) -> None:
        for _ in range(20):
            y = train(backend, "NCHW", xs[i])[0]
            if not np.array_equal(y.view(np.uint32), wants[i].view(np.uint32)):
                errors.append(f"thread {i}: wrong result [{backend}]")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert fastbn.output_cache_info()["hits"] > 0
