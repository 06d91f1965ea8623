"""The per-channel terms of an inference: the compiled call gives NumPy's bits."""

from __future__ import annotations

import numpy as np
import pytest

from fastbn import _dispatch as d

C = 37


def _vectors(dtype: str, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    w, b, m = (rng.standard_normal(2 * C) for _ in range(3))
    v = rng.random(2 * C) * 3 + 1e-7
    if dtype == "strided":
        return [a.astype(np.float32)[::2] for a in (w, b, m, v)]
    return [a[:C].astype(dtype) for a in (w, b, m, v)]


DTYPES = ["float32", "float64", "float16", "longdouble", ">f4", "strided"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [True, False])
def test_compiled_terms_match_numpy(monkeypatch, dtype, affine):
    if d._channel_terms is None:
        pytest.skip("fastbn._channel_terms is not built")
    w, b, m, v = _vectors(dtype, seed=len(dtype))
    if not affine:
        w = b = None
    eps = 1e-3
    got = d.inference_terms(d.HOST, w, b, m, v, eps)
    monkeypatch.setattr(d, "_channel_terms", None)
    want = d.inference_terms(d.HOST, w, b, m, v, eps)
    f64 = [np.asarray(a, np.float64) for a in (m, v)]
    root = np.sqrt(f64[1] + eps)
    scale = (1.0 if w is None else np.asarray(w, np.float64)) / root
    exact = (f64[0], 1.0 / root, scale, 0.0 if b is None else b)
    names = ("mean", "invstd", "scale", "bias")
    for name, g, n, r in zip(names, got, want, exact, strict=True):
        what = f"{name} [{dtype}, affine={affine}]"
        assert g.dtype == np.float64 and g.shape == (C,) and g.flags.c_contiguous, what
        assert g.tobytes() == n.tobytes(), f"compiled and NumPy differ: {what}"
        np.testing.assert_array_equal(g, np.broadcast_to(np.asarray(r, np.float64), (C,)), what)


def test_compiled_terms_refuse_a_wrong_length():
    if d._channel_terms is None:
        pytest.skip("fastbn._channel_terms is not built")
    w, b, m, v = _vectors("float32", seed=1)
    with pytest.raises(ValueError, match="37 values"):
        d._channel_terms.inference_terms(w[:5], b, m, v, 1e-5)
    with pytest.raises(TypeError):
        d._channel_terms.inference_terms(list(w), b, m, v, 1e-5)
