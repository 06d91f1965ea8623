# fastbn._channel_terms: the per-channel float64 terms of an inference in one C call.
#
# The NumPy version of the same arithmetic (fastbn._dispatch.inference_terms) takes a call
# per conversion and per operation: on a single image after a pause each NumPy call costs
# 1-2 us, and they added up to about a fifth of the whole inference. Same IEEE operations,
# same bits.

cimport numpy as cnp
from libc.math cimport sqrt

cnp.import_array()


cdef int _load(object v, double *dst, Py_ssize_t n, double fill) except -1:
    """Copy the 1-D array `v` of `n` values into `dst` as float64 (`fill` when None)."""
    cdef Py_ssize_t i, step
    cdef char *p
    cdef cnp.ndarray a
    if v is None:
        for i in range(n):
            dst[i] = fill
        return 0
    a = <cnp.ndarray?>v
    if cnp.PyArray_NDIM(a) != 1 or cnp.PyArray_DIM(a, 0) != n:
        raise ValueError(f"expected a vector of {n} values, got shape {v.shape}")
    kind = cnp.PyArray_TYPE(a)
    if (kind != cnp.NPY_FLOAT and kind != cnp.NPY_DOUBLE) or not cnp.PyArray_ISBEHAVED_RO(a):
        a = cnp.PyArray_FROMANY(
            a, cnp.NPY_DOUBLE, 1, 1, cnp.NPY_ARRAY_ALIGNED | cnp.NPY_ARRAY_FORCECAST
        )
        kind = cnp.NPY_DOUBLE
    p = <char *>cnp.PyArray_DATA(a)
    step = cnp.PyArray_STRIDE(a, 0)
    if kind == cnp.NPY_FLOAT:
        for i in range(n):
            dst[i] = (<float *>(p + i * step))[0]
    else:
        for i in range(n):
            dst[i] = (<double *>(p + i * step))[0]
    return 0


def inference_terms(weight, bias, running_mean, running_var, double eps):
    """float64 ``(mean, invstd, scale, bias)`` of an inference: ``invstd = 1 / sqrt(var +
    eps)`` and ``scale = weight / sqrt(var + eps)``.

    `running_mean` and `running_var` are 1-D floating arrays of one length C, as are
    `weight` and `bias` (None: ones and zeros). The caller has validated them; the four
    results are new C-contiguous float64 arrays of shape (C,).
    """
    cdef cnp.npy_intp n = cnp.PyArray_DIM(<cnp.ndarray?>running_mean, 0)
    cdef cnp.ndarray mean = cnp.PyArray_EMPTY(1, &n, cnp.NPY_DOUBLE, 0)
    cdef cnp.ndarray invstd = cnp.PyArray_EMPTY(1, &n, cnp.NPY_DOUBLE, 0)
    cdef cnp.ndarray scale = cnp.PyArray_EMPTY(1, &n, cnp.NPY_DOUBLE, 0)
    cdef cnp.ndarray shift = cnp.PyArray_EMPTY(1, &n, cnp.NPY_DOUBLE, 0)
    cdef double *m = <double *>cnp.PyArray_DATA(mean)
    cdef double *r = <double *>cnp.PyArray_DATA(invstd)
    cdef double *s = <double *>cnp.PyArray_DATA(scale)
    cdef double *b = <double *>cnp.PyArray_DATA(shift)
    cdef Py_ssize_t i
    cdef double t
    _load(running_mean, m, n, 0.0)
    _load(running_var, r, n, 0.0)
    _load(weight, s, n, 1.0)
    for i in range(n):
        t = sqrt(r[i] + eps)
        r[i] = 1.0 / t
        s[i] = s[i] / t
    _load(bias, b, n, 0.0)
    return mean, invstd, scale, shift
