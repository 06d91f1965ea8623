/* A NumPy memory handler (NEP 49) that keeps released output buffers for reuse.
 *
 * A fresh output larger than glibc's mmap ceiling (32 MiB) comes back from the kernel as
 * new pages on every call, and each page is faulted in and zeroed when the kernel first
 * writes it: on (64, 256, 56, 56) float32 that costs as much as the batch norm itself.
 * fastbn allocates its outputs under this handler (fastbn._output_cache.empty). The arrays
 * own their memory as usual; when NumPy frees one, the handler keeps the buffer (up to a
 * byte limit, oldest evicted first) and the next output of exactly that size takes it. A
 * buffer is only handed out again after NumPy has freed the array that had it, so no live
 * array ever shares memory with a new one.
 *
 * NumPy calls the handler with the GIL held; the mutex is there for builds without one.
 * Allocation, freeing and madvise happen outside the lock.
 */
#ifndef FASTBN_OUTPUT_CACHE_H
#define FASTBN_OUTPUT_CACHE_H

#include <Python.h>
#include <numpy/ndarraytypes.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define FBN_CACHE_SLOTS 16
#define FBN_HUGEPAGE_FROM ((size_t)1 << 22) /* as NumPy's default handler: 4 MiB */

typedef struct {
    void *ptr;
    size_t size;
} fbn_slot;

typedef struct {
    pthread_mutex_t lock;
    fbn_slot slots[FBN_CACHE_SLOTS]; /* slots[0] is the oldest */
    int count;
    size_t held;  /* bytes in the slots */
    size_t limit; /* most bytes kept */
    size_t min_size;
    uint64_t hits, misses;
} fbn_cache;

static fbn_cache fbn_the_cache = {PTHREAD_MUTEX_INITIALIZER, {{0, 0}}, 0, 0, 0, 0, 0, 0};

static void fbn_remove_slot(fbn_cache *c, int i) {
    c->held -= c->slots[i].size;
    memmove(&c->slots[i], &c->slots[i + 1], (size_t)(c->count - i - 1) * sizeof(fbn_slot));
    c->count--;
}

/* A buffer of exactly `size` bytes from the cache (the newest such), or NULL. */
static void *fbn_take(fbn_cache *c, size_t size) {
    void *p = NULL;
    if (size < c->min_size) return NULL;
    pthread_mutex_lock(&c->lock);
    for (int i = c->count - 1; i >= 0; i--) {
        if (c->slots[i].size == size) {
            p = c->slots[i].ptr;
            fbn_remove_slot(c, i);
            break;
        }
    }
    if (p) c->hits++; else c->misses++;
    pthread_mutex_unlock(&c->lock);
    return p;
}

/* Evict the oldest buffers until `room` more bytes (and, with `slot`, one more buffer)
 * fit; the evicted pointers go to `evicted`, freed by the caller outside the lock. */
static int fbn_make_room(fbn_cache *c, size_t room, int slot, void **evicted) {
    int n = 0;
    while (c->count > 0 && (c->held + room > c->limit || (slot && c->count == FBN_CACHE_SLOTS))) {
        evicted[n++] = c->slots[0].ptr;
        fbn_remove_slot(c, 0);
    }
    return n;
}

static void fbn_free_all(void **ptrs, int n) {
    for (int i = 0; i < n; i++) free(ptrs[i]);
}

static void *fbn_malloc(void *ctx, size_t size) {
    void *p = fbn_take((fbn_cache *)ctx, size);
    if (p) return p;
    p = malloc(size);
#ifdef MADV_HUGEPAGE
    if (p && size >= FBN_HUGEPAGE_FROM) {
        uintptr_t offset = 4096u - (uintptr_t)p % 4096u;
        madvise((char *)p + offset, size - offset, MADV_HUGEPAGE);
    }
#endif
    return p;
}

static void *fbn_calloc(void *ctx, size_t nelem, size_t elsize) {
    if (elsize != 0 && nelem > SIZE_MAX / elsize) return NULL;
    void *p = fbn_take((fbn_cache *)ctx, nelem * elsize);
    if (p) return memset(p, 0, nelem * elsize);
    return calloc(nelem, elsize);
}

static void *fbn_realloc(void *ctx, void *ptr, size_t new_size) {
    (void)ctx;
    return realloc(ptr, new_size);
}

static void fbn_free(void *ctx, void *ptr, size_t size) {
    fbn_cache *c = (fbn_cache *)ctx;
    void *evicted[FBN_CACHE_SLOTS];
    int n = 0;
    if (ptr == NULL) return;
    pthread_mutex_lock(&c->lock);
    if (size >= c->min_size && size <= c->limit) {
        n = fbn_make_room(c, size, 1, evicted);
        c->slots[c->count].ptr = ptr;
        c->slots[c->count].size = size;
        c->count++;
        c->held += size;
        ptr = NULL;
    }
    pthread_mutex_unlock(&c->lock);
    fbn_free_all(evicted, n);
    free(ptr);
}

/* Set the byte limit, evicting the oldest buffers down to it. */
static void fbn_set_limit(fbn_cache *c, size_t limit) {
    void *evicted[FBN_CACHE_SLOTS];
    int n;
    pthread_mutex_lock(&c->lock);
    c->limit = limit;
    n = fbn_make_room(c, 0, 0, evicted);
    pthread_mutex_unlock(&c->lock);
    fbn_free_all(evicted, n);
}

static PyDataMem_Handler fbn_handler = {
    "fastbn_output_cache",
    1,
    {&fbn_the_cache, fbn_malloc, fbn_calloc, fbn_realloc, fbn_free},
};

#endif
