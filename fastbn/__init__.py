"""fastbn: exact, memory-speed batch normalization for NumPy on multicore CPUs.

Statistics in one pass over memory (float64 Welford/Chan partials merged in a fixed order,
bitwise identical for any thread count), PyTorch's semantics, NCHW and NHWC layouts, and
interchangeable backends: parallel Numba kernels, Cython/OpenMP kernels and numba.cuda.
"""

from ._config import show_config
from ._outputs import (
    clear_output_cache,
    get_output_cache_limit,
    output_cache_info,
    set_output_cache_limit,
)
from ._stores import get_stream_threshold, set_stream_threshold, stream_threshold
from ._threads import get_num_threads, num_threads, set_num_threads
from .backends import BackendUnavailableError, available_backends
from .functional import batch_norm, batch_norm_backward, batch_norm_train, moments
from .layer import BatchNorm

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "BatchNorm",
    "__version__",
    "available_backends",
    "batch_norm",
    "batch_norm_backward",
    "batch_norm_train",
    "clear_output_cache",
    "get_num_threads",
    "get_output_cache_limit",
    "get_stream_threshold",
    "moments",
    "num_threads",
    "output_cache_info",
    "set_num_threads",
    "set_output_cache_limit",
    "set_stream_threshold",
    "show_config",
    "stream_threshold",
]
