# OpenMP indirection for fastbn's Cython kernels.
#
# When the extension is compiled without OpenMP (the `openmp` build option is disabled or
# the compiler has none), `_OPENMP` is undefined: Cython's prange/parallel blocks compile to
# plain serial loops and these helpers report a single thread, so every kernel stays correct.

cdef extern from *:
    """
    #ifdef _OPENMP
        #include <omp.h>
        #define FASTBN_OPENMP_ENABLED 1
        static int fastbn_omp_get_max_threads(void) { return omp_get_max_threads(); }
        static int fastbn_omp_get_thread_num(void) { return omp_get_thread_num(); }
        static int fastbn_openmp_version(void) { return _OPENMP; }
    #else
        #define FASTBN_OPENMP_ENABLED 0
        static int fastbn_omp_get_max_threads(void) { return 1; }
        static int fastbn_omp_get_thread_num(void) { return 0; }
        static int fastbn_openmp_version(void) { return 0; }
    #endif
    """
    bint FASTBN_OPENMP_ENABLED
    int fastbn_omp_get_max_threads() noexcept nogil
    int fastbn_omp_get_thread_num() noexcept nogil
    int fastbn_openmp_version() noexcept nogil
