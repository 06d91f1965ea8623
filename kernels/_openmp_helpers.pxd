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


# Runtime CPU checks for the x86-64-v3 (AVX2 + FMA) and v4 (AVX-512) builds of the kernels.
cdef extern from *:
    """
    #if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
        static int fastbn_cpu_has_x86_64_v3(void) {
            __builtin_cpu_init();
            return __builtin_cpu_supports("avx") && __builtin_cpu_supports("avx2")
                && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi")
                && __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("popcnt");
        }
        static int fastbn_cpu_has_x86_64_v4(void) {
            return fastbn_cpu_has_x86_64_v3() && __builtin_cpu_supports("avx512f")
                && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512cd")
                && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
        }
    #else
        static int fastbn_cpu_has_x86_64_v3(void) { return 0; }
        static int fastbn_cpu_has_x86_64_v4(void) { return 0; }
    #endif
    #if defined(__AVX512F__)
        #define FASTBN_BUILD_SIMD "avx512f"
    #elif defined(__AVX2__)
        #define FASTBN_BUILD_SIMD "avx2"
    #elif defined(__AVX__)
        #define FASTBN_BUILD_SIMD "avx"
    #elif defined(__SSE2__)
        #define FASTBN_BUILD_SIMD "sse2"
    #else
        #define FASTBN_BUILD_SIMD "generic"
    #endif
    """
    int fastbn_cpu_has_x86_64_v3() noexcept nogil
    int fastbn_cpu_has_x86_64_v4() noexcept nogil
    const char* FASTBN_BUILD_SIMD


# Software prefetch into L2 (a no-op for compilers without __builtin_prefetch).
cdef extern from *:
    """
    #if defined(__GNUC__) || defined(__clang__)
        #define fastbn_prefetch(p) __builtin_prefetch((const void*)(p), 0, 2)
        #define fastbn_prefetch_w(p) __builtin_prefetch((const void*)(p), 1, 2)
    #else
        #define fastbn_prefetch(p) ((void)0)
        #define fastbn_prefetch_w(p) ((void)0)
    #endif
    """
    void fastbn_prefetch(const void* p) noexcept nogil
    void fastbn_prefetch_w(const void* p) noexcept nogil  # for a line about to be written


# Streaming (non-temporal) stores for large outputs: the elementwise loops of the kernels
# with streaming stores (see _stream_stores.h; same bits as the plain loops).
cdef extern from "_stream_stores.h":
    bint FASTBN_STREAM_STORES
    void fastbn_sfence() noexcept nogil
    long fastbn_l2_bytes() noexcept nogil
    void fastbn_apply_rows_nt_f32(const float* x, float* y, Py_ssize_t nr, Py_ssize_t S,
                                  Py_ssize_t C, Py_ssize_t c0,
                                  const double* m, const double* sc,
                                  const double* b) noexcept nogil
    void fastbn_apply_rows_nt_f64(const double* x, double* y, Py_ssize_t nr, Py_ssize_t S,
                                  Py_ssize_t C, Py_ssize_t c0,
                                  const double* m, const double* sc,
                                  const double* b) noexcept nogil
    void fastbn_apply_nt_f32(const float* x, float* y, Py_ssize_t n, double m, double sc,
                             double b) noexcept nogil
    void fastbn_apply_nt_f64(const double* x, double* y, Py_ssize_t n, double m, double sc,
                             double b) noexcept nogil
    void fastbn_dx_nt_f32(const float* g, const float* x, float* d, Py_ssize_t n, double m,
                          double k, double a, double q) noexcept nogil
    void fastbn_dx_nt_f64(const double* g, const double* x, double* d, Py_ssize_t n,
                          double m, double k, double a, double q) noexcept nogil
    # NHWC runs of whole rows; the constants are wrapped tables (fastbn_wrap).
    enum: FBN_SBLOCK
    enum: FBN_STREAMS
    void fastbn_wrap(double* t, const double* v, Py_ssize_t C, Py_ssize_t n) noexcept nogil
    void fastbn_apply_cols_nt_f32(const float* x, float* y, Py_ssize_t n, Py_ssize_t C,
                                  const double* sc, const double* shift) noexcept nogil
    void fastbn_apply_cols_nt_f64(const double* x, double* y, Py_ssize_t n, Py_ssize_t C,
                                  const double* m, const double* sc,
                                  const double* b) noexcept nogil
    void fastbn_dx_cols_nt_f32(const float* g, const float* x, float* d, Py_ssize_t n,
                               Py_ssize_t C, const double* m, const double* k,
                               const double* a, const double* q) noexcept nogil
    void fastbn_dx_cols_nt_f64(const double* g, const double* x, double* d, Py_ssize_t n,
                               Py_ssize_t C, const double* m, const double* k,
                               const double* a, const double* q) noexcept nogil


# The least-traffic passes of fastbn-bench's floor (see _traffic.h): bytes moved, nothing
# computed.
cdef extern from "_traffic.h":
    unsigned long long fastbn_traffic_read(const unsigned char* p, Py_ssize_t n) noexcept nogil
    void fastbn_traffic_write(unsigned char* dst, const unsigned char* a,
                              const unsigned char* b, Py_ssize_t n, bint stream) noexcept nogil


# Sums over a contiguous run into 16 float64 lanes, SIMD registers for the lanes (see
# _lanes.h; same bits as the plain loops in every build).
cdef extern from "_lanes.h":
    void fastbn_cols_sum_f32(const float* x, Py_ssize_t rows, Py_ssize_t C,
                             double* k) noexcept nogil
    void fastbn_cols_sum_f64(const double* x, Py_ssize_t rows, Py_ssize_t C,
                             double* k) noexcept nogil
    void fastbn_rows_add_f32(const float* x, int nr, Py_ssize_t d, Py_ssize_t C,
                             double* k, Py_ssize_t ahead, int nnr) noexcept nogil
    void fastbn_rows_add_f64(const double* x, int nr, Py_ssize_t d, Py_ssize_t C,
                             double* k, Py_ssize_t ahead, int nnr) noexcept nogil
    void fastbn_rows_dev_sq_f32(const float* x, int nr, Py_ssize_t d, Py_ssize_t C,
                                const double* k, double* sd, double* sdd, Py_ssize_t ahead,
                                int nnr) noexcept nogil
    void fastbn_rows_dev_sq_f64(const double* x, int nr, Py_ssize_t d, Py_ssize_t C,
                                const double* k, double* sd, double* sdd, Py_ssize_t ahead,
                                int nnr) noexcept nogil
    void fastbn_rows_sum_dot_f32(const float* g, const float* x, int nr, Py_ssize_t d,
                                 Py_ssize_t C, const double* m, double* sdy,
                                 double* sxm, Py_ssize_t ahead, int nnr) noexcept nogil
    void fastbn_rows_sum_dot_f64(const double* g, const double* x, int nr, Py_ssize_t d,
                                 Py_ssize_t C, const double* m, double* sdy,
                                 double* sxm, Py_ssize_t ahead, int nnr) noexcept nogil
    void fastbn_cols_dev_sq_f32(const float* x, Py_ssize_t rows, Py_ssize_t C, const double* k,
                                double* sd, double* sdd) noexcept nogil
    void fastbn_cols_dev_sq_f64(const double* x, Py_ssize_t rows, Py_ssize_t C,
                                const double* k, double* sd, double* sdd) noexcept nogil
    void fastbn_acc_sum_f32(const float* p, Py_ssize_t n, double* a) noexcept nogil
    void fastbn_acc_sum_f64(const double* p, Py_ssize_t n, double* a) noexcept nogil
    void fastbn_acc_dev_sq_f32(const float* p, Py_ssize_t n, double m, double* a,
                               double* b) noexcept nogil
    void fastbn_acc_dev_sq_f64(const double* p, Py_ssize_t n, double m, double* a,
                               double* b) noexcept nogil
    void fastbn_acc_sum_dot_f32(const float* g, const float* p, Py_ssize_t n, double m,
                                double* a, double* b) noexcept nogil
    void fastbn_acc_sum_dot_f64(const double* g, const double* p, Py_ssize_t n, double m,
                                double* a, double* b) noexcept nogil


# The elementwise loops, block by block (see _elementwise.h; same bits as plain loops).
cdef extern from "_elementwise.h":
    double fastbn_shift(double m, double sc, double b) noexcept nogil
    void fastbn_apply_f32(const float* x, float* y, Py_ssize_t n, double m, double sc,
                          double b) noexcept nogil
    void fastbn_apply_f64(const double* x, double* y, Py_ssize_t n, double m, double sc,
                          double b) noexcept nogil
    void fastbn_apply_cols_f32(const float* x, float* y, Py_ssize_t n, const double* sc,
                               const double* shift) noexcept nogil
    void fastbn_apply_cols_f64(const double* x, double* y, Py_ssize_t n, const double* m,
                               const double* sc, const double* b) noexcept nogil
    void fastbn_dx_f32(const float* g, const float* x, float* d, Py_ssize_t n, double m,
                       double k, double a, double q) noexcept nogil
    void fastbn_dx_f64(const double* g, const double* x, double* d, Py_ssize_t n,
                       double m, double k, double a, double q) noexcept nogil
    void fastbn_dx_cols_f32(const float* g, const float* x, float* d, Py_ssize_t n,
                            const double* m, const double* k, const double* a,
                            const double* q) noexcept nogil
    void fastbn_dx_cols_f64(const double* g, const double* x, double* d, Py_ssize_t n,
                            const double* m, const double* k, const double* a,
                            const double* q) noexcept nogil
