"""``fastbn-bench``: compare fastbn's backends with plain NumPy, PyTorch and ONNX Runtime.

Run ``fastbn-bench`` (or ``python -m fastbn.bench``) with no arguments to benchmark the
default cases: shapes (32, 64, 56, 56), (64, 256, 56, 56), (128, 512, 7, 7) in both layouts
and (4096, 1024) (an ``(N, C)`` input, listed as NHWC), float32, the operations ``train``
(training forward), ``infer`` (inference forward), ``backward`` (backward pass alone) and
``fwdbwd`` (training forward followed by backward), on every available fastbn CPU backend,
plain NumPy and the installed peers, with as many threads as this process may use.

The results are printed as tables; ``--json``, ``--plot`` and ``--markdown`` also write
them as a JSON report (schema below), a bar chart and Markdown tables in the format of the
README's "Measured results". ``--from-json FILE`` prints and writes (``--markdown``,
``--plot``) a stored report again without measuring anything.

Measurement
-----------
* Shapes are always given channels-first, as PyTorch writes them: ``N,C[,spatial...]``.
  With ``--layout NHWC`` the benchmarked array is the channels-last ``(N, *spatial, C)``
  array of that logical shape (PyTorch gets it as a ``channels_last`` tensor without a copy).
* For every case the implementations, at every thread count of ``--threads``, are timed
  *interleaved* (so the thread scaling also compares calls taken side by side): each one is
  first called ``--warmup`` times (JIT compilation, page faults and caches are excluded),
  then ``--repeat`` rounds call every implementation once, each round in a new random
  order (``--seed``; never the same implementation twice in a row), with a short
  ``--pause`` before each call (at most that implementation's previous call time) so that
  a runtime's spinning worker threads do not steal cores from the next call. The reported
  time is the median over the rounds.
* ``--warm`` calls each implementation once more, untimed, right before each of its timed
  calls (after the pause): its input and output are then in cache when they fit, as for a
  layer whose input the previous layer just wrote. Without it, the other implementations
  and the roofline run between two calls of one implementation, so its data has left the
  caches. The thread-scaling target of issue 4 ("in-cache shapes") is measured with it,
  and with ``--stream-threshold off``: fastbn streams outputs of more than twice a core's
  L2 to memory (``fastbn.set_stream_threshold``), which a layer whose output is read at
  once from the last-level cache turns off.
* Outputs allocated fresh by each call (``mode = "fresh"``) and outputs written into a
  preallocated, pre-faulted array (``mode = "out"``: fastbn's ``out=``, ONNX Runtime's
  I/O binding) are reported separately. fastbn's fresh outputs come from its output cache
  (the buffers of the outputs released before, ``fastbn.set_output_cache_limit``), as in a
  loop over batches of one shape; ``--output-cache 0`` gives every fresh output new pages,
  as the peers' are. The cache is emptied at the end of a run.
* The copy roofline is timed *with every case*, interleaved like an implementation: a
  parallel copy of the case's input into a preallocated array of the same size (NumPy
  ``copyto``, one contiguous slice per thread from a thread pool; NumPy releases the GIL and
  glibc ``memcpy`` runs). ``roofline`` is ``passes * t_copy / 2 / t``: the fraction of the
  time a copy-speed kernel making the nominal passes would take. Interleaving makes it
  robust on a shared, noisy machine. The run also measures the machine's copy bandwidth
  once per thread count on a large array (``copy`` in the JSON; ``roofline_run`` uses it):
  the best of
  (a) NumPy ``copyto`` of a large float32 array split in one contiguous slice per thread
  and run from a thread pool (NumPy releases the GIL; glibc ``memcpy``), and (b) a Numba
  ``prange`` copy loop. Bandwidth counts read + write bytes. The run also reports the
  bandwidth of copying into a freshly allocated array (page faults included).
* The *floor* is timed *with every case*, interleaved like an implementation: the least
  memory traffic any implementation of the operation must make. One C loop of the Cython
  extension (``traffic_floor``, OpenMP, one contiguous slice per thread) reads each input
  of the operation once and writes each output once, computing nothing, with the
  kernels' store rule (streaming stores for large outputs): ``infer`` and ``train`` copy
  ``x`` into ``y``; ``backward`` writes ``dx = x | dy`` (bitwise); ``fwdbwd`` does both.
  Channels-last data (NHWC, and 2-D shapes) interleaves the channels in every row, so no
  output value can be written before the statistics have read the whole array: there
  ``train`` first reads all of ``x``, ``backward`` and ``fwdbwd`` all of ``x`` and ``dy``
  (every thread, and all wait before the first write; the copy may then find them in
  cache, as an implementation may). Channels-first data holds a channel in one block per
  sample, where the writes of one channel can overlap the reads of the next: the plain
  copy (for ``train`` it leaves out the statistics' read of ``x``, so it stays a lower
  bound). Without the Cython backend (or, above one thread, without its OpenMP) the
  floor is not timed and a note says why. It is timed per mode: ``fresh`` allocates the
  outputs with ``np.empty`` in every call (page faults included, as in the fresh
  implementations), ``out`` writes into the preallocated, pre-faulted output buffers; the
  modes are those of ``--mode``, plus ``fresh`` when NumPy or PyTorch (fresh only) are
  timed. ``floor_s`` of a row is the floor of its mode; ``floor_vs`` is
  ``time(peer) / floor_s`` with the peer row chosen as for ``vs``: the largest ratio
  against that peer that any implementation making the minimal traffic could reach in
  this run (a target above it is out of reach on this machine). The tables show
  ``floor fresh`` (its median), ``torch / floor (fresh)`` and, for ``infer``,
  ``ORT out / floor out``.
* Effective bandwidth is ``passes * nbytes / median`` with the *nominal* pass count of the
  operation (read or write of one whole tensor each): train 3, infer 2, backward 5,
  fwdbwd 8; the roofline fractions use the same count. An NCHW kernel that keeps each
  channel's slice (N x S values) in L2 needs fewer passes from memory (train 2,
  backward 3, fwdbwd 5: ``passes_min`` in the JSON), so it may exceed 100 %; the nominal
  count keeps the numbers comparable across layouts and matches the targets of issue 4
  (">= 120 % of the 3-pass roofline").
* ``vs <peer>`` is ``time(peer) / time(row)``: above 1 the row is faster. A fastbn row is
  compared with the peer's row of the same mode when the peer has one, else with its fresh
  row. Every implementation runs with the same thread count: ``fastbn.num_threads(n)``,
  ``torch.set_num_threads(n)`` and ONNX Runtime's ``intra_op_num_threads = n``. Plain NumPy
  is single-threaded whatever the count.

Implementations
---------------
``<fastbn backend>``
    ``fastbn.batch_norm_train``, ``fastbn.batch_norm(..., training=False)`` with running
    statistics, ``fastbn.batch_norm_backward``; for every CPU backend in
    ``fastbn.available_backends()``.
``numpy``
    What a user would write: ``x.mean``/``x.var`` (two-pass), broadcasting arithmetic.
``torch``
    ``torch.nn.functional.batch_norm`` (what ``BatchNorm2d`` calls) with running
    statistics, under ``no_grad``/``inference_mode``; ``backward`` calls
    ``aten.native_batch_norm_backward`` (the kernel autograd runs); ``fwdbwd`` is the
    forward with autograd and ``y.backward(dy)``.
``onnxruntime``
    A one-node ``BatchNormalization`` model (inference only). ONNX is channels-first and a
    NHWC model would need Transpose nodes, so NHWC cases time ORT on the NCHW array of the
    same logical shape (noted in the output).

JSON schema (``--json FILE``, ``"version": 3``)
-----------------------------------------------
``{"schema": "fastbn-bench", "version": 1, "created": ISO-8601 str,
"machine": {"python", "platform", "processor", "cpus", "l2_bytes", "numpy", "fastbn",
"backends": [str], "peers": {name: version or null}},
"config": {"shapes": [[int]], "layouts": [str], "dtypes": [str], "ops": [str],
"threads": [int], "implementations": [str], "modes": [str], "repeat", "warmup", "pause",
"warm": bool, "stream_threshold": int or null, "output_cache": int or null},
"copy": [{"threads", "nbytes", "gbps", "method", "methods": {name: gbps},
"fresh_gbps"}], "notes": [str],
"results": [{"shape": [int], "array_shape": [int], "layout", "dtype", "op", "threads",
"impl", "kind": "fastbn"|"baseline"|"peer", "mode": "fresh"|"out", "median_s", "min_s",
"q1_s", "q3_s", "times_s": [float], "nbytes", "passes", "passes_min", "gbps",
"copy_s", "roofline", "roofline_run", "vs": {impl: ratio}, "floor_s": float or null,
"floor_vs": {impl: ratio}, "thread_scaling": float or null,
"peak_extra_bytes": int or null, "note": str}],
"floor": [{"shape": [int], "layout", "dtype", "op", "threads", "mode": "fresh"|"out",
"median_s", "min_s", "times_s": [float]}],
"cold_start": [{"impl", "shape", "layout", "import_s", "first_call_s", "second_call_s",
"note"}]}``.
Times are in seconds, bandwidths in GB/s (1e9 bytes/s), ``roofline`` is a fraction.
``floor`` holds the floor medians, one item per case, thread count and floor mode.
``floor_vs`` has a key for each of torch, onnxruntime and numpy timed on the case, in every
row (peer rows included). Version 1 (no ``floor``, ``floor_s``, ``floor_vs``) is still read
by ``--from-json``; its tables have no floor columns. Version 2 has the same fields; its
floor was parallel NumPy (``copyto``, ``add``: ordinary stores), never reading first.

Modules
-------
``cli`` (arguments and :class:`Config`), ``cases`` (cases, constants, data), ``impls`` (the
timed callables), ``machine`` (CPUs, versions, copy bandwidth), ``timing`` (interleaved
timing and :func:`run`), ``cold`` (cold start), ``report`` (console tables, JSON, plot, Markdown).
Their public names are re-exported here.
"""

from __future__ import annotations

from collections.abc import Sequence

from .cases import (
    DEFAULT_SHAPES,
    DTYPES,
    EPS,
    LAYOUTS,
    MODES,
    MOMENTUM,
    OPS,
    PASSES,
    Case,
    Data,
    channel_axis,
    default_cases,
    make_data,
)
from .cli import Config, build_parser, parse_args, parse_shape, resolve_impls
from .cold import cold_start
from .impls import (
    BASELINE,
    PEERS,
    STREAM_OFF,
    fastbn_backends,
    impl_kind,
    impl_modes,
    make_callable,
    supports,
    thread_scope,
)
from .machine import (
    available_cpus,
    l2_cache_bytes,
    machine_info,
    measure_copy_bandwidth,
    peer_missing,
    peer_version,
)
from .report import (
    command_line,
    markdown,
    read_json,
    render,
    write_json,
    write_markdown,
    write_plot,
)
from .targets import markdown as targets_markdown
from .timing import (
    COPY,
    FLOOR,
    SCHEMA_VERSION,
    Entry,
    peak_extra_bytes,
    run,
    time_entries,
)

__all__ = [
    "BASELINE",
    "COPY",
    "DEFAULT_SHAPES",
    "DTYPES",
    "EPS",
    "FLOOR",
    "LAYOUTS",
    "MODES",
    "MOMENTUM",
    "OPS",
    "PASSES",
    "PEERS",
    "SCHEMA_VERSION",
    "STREAM_OFF",
    "Case",
    "Config",
    "Data",
    "Entry",
    "available_cpus",
    "build_parser",
    "channel_axis",
    "cold_start",
    "command_line",
    "default_cases",
    "fastbn_backends",
    "impl_kind",
    "impl_modes",
    "l2_cache_bytes",
    "machine_info",
    "main",
    "make_callable",
    "make_data",
    "markdown",
    "measure_copy_bandwidth",
    "parse_args",
    "parse_shape",
    "peak_extra_bytes",
    "peer_missing",
    "peer_version",
    "read_json",
    "render",
    "resolve_impls",
    "run",
    "supports",
    "thread_scope",
    "time_entries",
    "write_json",
    "write_markdown",
    "write_plot",
]


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point of ``fastbn-bench``.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name; ``sys.argv[1:]`` when None.

    Returns
    -------
    int
        Exit status (0).

    Raises
    ------
    SystemExit
        When the file of ``--from-json`` cannot be read as a report.
    """
    from rich.console import Console

    config = parse_args(argv)
    if config.from_json:
        try:
            report = read_json(config.from_json)
        except (OSError, ValueError) as exc:  # ValueError includes JSONDecodeError
            raise SystemExit(f"fastbn-bench: error: {exc}") from None
    else:
        report = run(config, Console(stderr=True))
    out = Console()
    if not out.is_terminal:
        out = Console(width=200)  # files and pipes: do not wrap the tables at 80 columns
    render(report, out)
    checked = targets_markdown(report) if config.targets else ""
    if checked:
        from rich.markdown import Markdown

        out.print(Markdown(checked))
    if config.json_path:
        write_json(report, config.json_path)
    if config.plot_path:
        write_plot(report, config.plot_path)
    if config.markdown_path:
        write_markdown(report, config.markdown_path, extra=checked)
    return 0
