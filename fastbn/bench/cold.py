"""Cold start: import and first calls, each implementation in a fresh interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from typing import TYPE_CHECKING, Any

from .impls import impl_kind

if TYPE_CHECKING:
    from .cli import Config

_COLD_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np
    impl, layout, shape = sys.argv[1], sys.argv[2], [int(s) for s in sys.argv[3].split(",")]
    arr_shape = shape if layout == "NCHW" or len(shape) == 2 else [shape[0], *shape[2:], shape[1]]
    x = np.random.default_rng(0).standard_normal(arr_shape, dtype=np.float32)
    t0 = time.perf_counter()
    if impl == "numpy":
        ax = 1 if layout == "NCHW" or x.ndim == 2 else x.ndim - 1
        axes = tuple(i for i in range(x.ndim) if i != ax)
        def call():
            mean = x.mean(axis=axes, keepdims=True)
            return (x - mean) / np.sqrt(x.var(axis=axes, keepdims=True) + 1e-5)
    elif impl == "torch":
        import torch
        t = torch.from_numpy(x)
        if layout == "NHWC" and x.ndim > 2:
            t = t.permute(0, x.ndim - 1, *range(1, x.ndim - 1))
        def call():
            with torch.no_grad():
                return torch.nn.functional.batch_norm(t, None, None, training=True)
    elif impl == "onnxruntime":
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
        c = shape[1]
        if layout == "NHWC" and x.ndim > 2:
            x = np.ascontiguousarray(np.moveaxis(x, -1, 1))
        ones, zeros = np.ones(c, np.float32), np.zeros(c, np.float32)
        inits = [numpy_helper.from_array(a, n) for a, n in
                 ((ones, "s"), (zeros, "b"), (zeros, "m"), (ones, "v"))]
        node = helper.make_node("BatchNormalization", ["X", "s", "b", "m", "v"], ["Y"])
        vi = helper.make_tensor_value_info
        g = helper.make_graph([node], "bn", [vi("X", TensorProto.FLOAT, shape)],
                              [vi("Y", TensorProto.FLOAT, shape)], initializer=inits)
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)])
        model.ir_version = min(model.ir_version, 10)
        sess = ort.InferenceSession(model.SerializeToString(),
                                    providers=["CPUExecutionProvider"])
        def call():
            return sess.run(None, {"X": x})
    else:
        import fastbn
        def call():
            return fastbn.batch_norm_train(x, layout=layout, backend=impl)
    t1 = time.perf_counter()
    call()
    t2 = time.perf_counter()
    call()
    t3 = time.perf_counter()
    print(json.dumps({"import_s": t1 - t0, "first_call_s": t2 - t1, "second_call_s": t3 - t2}))
    """
)


def cold_start(config: Config) -> list[dict[str, Any]]:
    """Time import + first calls in a fresh interpreter per implementation.

    Parameters
    ----------
    config : Config
        Its first shape and layout and its implementations are used.

    Returns
    -------
    list of dict
        ``impl``, ``shape``, ``layout``, ``import_s`` (importing the library, plus building
        the session for ONNX Runtime), ``first_call_s``, ``second_call_s``, ``note``.
        fastbn backends get two rows: with an empty numba cache (a temporary
        ``NUMBA_CACHE_DIR``: the first call compiles) and with the cache as found.
    """
    shape = config.shapes[0]
    layout = "NHWC" if len(shape) == 2 else config.layouts[0]
    rows = []
    for impl in config.impls:
        variants = [("", None)]
        if impl_kind(impl) == "fastbn":
            variants = [("empty JIT cache", "empty"), ("JIT cache as found", None)]
        for note, cache in variants:
            env = dict(os.environ)
            with tempfile.TemporaryDirectory() as tmp:
                if cache == "empty":
                    env["NUMBA_CACHE_DIR"] = tmp
                proc = subprocess.run(
                    [sys.executable, "-c", _COLD_SCRIPT, impl, layout, ",".join(map(str, shape))],
                    capture_output=True,
                    text=True,
                    check=False,
                    env=env,
                )
            row: dict[str, Any] = {"impl": impl, "shape": list(shape), "layout": layout}
            if proc.returncode == 0:
                row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
                row["note"] = note
                if impl == "onnxruntime":
                    row["note"] = "inference; import includes building the session"
            else:
                err = proc.stderr.strip().splitlines()
                row.update(import_s=None, first_call_s=None, second_call_s=None)
                row["note"] = f"failed: {err[-1] if err else proc.returncode}"
            rows.append(row)
    return rows
