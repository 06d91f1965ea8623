# fastbn._output_cache: fresh outputs in buffers that released outputs left behind.
#
# The handler itself (NEP 49, NumPy's per-context memory handler) is _output_cache.h.
# `empty` makes it NumPy's handler for one np.empty call; the array keeps a reference to
# the handler and gives its memory back to it when freed.

from cpython.pycapsule cimport PyCapsule_New
from libc.stdint cimport uint64_t

import numpy as np

cimport numpy as cnp

cnp.import_array()


cdef extern from "_output_cache.h" nogil:
    ctypedef struct fbn_cache:
        int count
        size_t held
        size_t limit
        size_t min_size
        uint64_t hits
        uint64_t misses
    fbn_cache fbn_the_cache
    void fbn_set_limit(fbn_cache *c, size_t limit)
    cnp.PyDataMem_Handler fbn_handler


MIN_SIZE = 1 << 20
"""Outputs smaller than this (bytes) are plain ``np.empty`` arrays: the allocator keeps
and reuses small blocks well enough on its own."""

fbn_the_cache.min_size = MIN_SIZE
cdef object _handler = PyCapsule_New(&fbn_handler, "mem_handler", NULL)


def empty(shape, dtype):
    """``np.empty(shape, dtype)`` whose memory may come from a released output."""
    previous = cnp.PyDataMem_SetHandler(_handler)
    try:
        return np.empty(shape, dtype)
    finally:
        cnp.PyDataMem_SetHandler(previous)


def set_limit(size_t nbytes):
    """Keep at most `nbytes` of released buffers (evicting the oldest down to it)."""
    fbn_set_limit(&fbn_the_cache, nbytes)


def get_limit():
    """The most bytes of released buffers kept."""
    return fbn_the_cache.limit


def clear():
    """Free every kept buffer (the limit stays)."""
    cdef size_t limit = fbn_the_cache.limit
    fbn_set_limit(&fbn_the_cache, 0)
    fbn_set_limit(&fbn_the_cache, limit)


def stats():
    """``{"held": bytes kept, "buffers": count, "hits": reuses, "misses": fresh allocations}``
    (hits and misses count outputs of at least `MIN_SIZE` bytes since import)."""
    return {
        "held": fbn_the_cache.held,
        "buffers": fbn_the_cache.count,
        "hits": fbn_the_cache.hits,
        "misses": fbn_the_cache.misses,
    }
