#ifndef HYDRATION_CNBD_SHIM_H
#define HYDRATION_CNBD_SHIM_H
// libnbd (Debian libnbd-dev), plus small helpers that keep libnbd's C callbacks on the C side:
// the Swift code (Storage/RemoteSource.swift) only calls plain functions.
#include <libnbd.h>
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

// Result of hyd_nbd_pread_chunked.
#define HYD_NBD_OK 0
// One command failed with an NBD error reply; *err is its errno, *fail_offset where it starts.
// The connection is still usable.
#define HYD_NBD_COMMAND_ERROR 1
// The connection is dead (nbd_poll or a submission failed with the handle no longer usable).
// Every command of the call has been retired: nothing writes into the buffer any more.
#define HYD_NBD_CONNECTION_LOST 2

static inline int hyd_nbd_is_usable(struct nbd_handle *h) {
    return nbd_aio_is_ready(h) == 1 || nbd_aio_is_processing(h) == 1;
}

// Poll slices: a cancellation (below) is noticed within this long.
#define HYD_SLICE_MS 100
// A call that has waited this long with no reply gives up once it is asked to (`cancel`): a
// healthy server replies within it, so only calls stuck on a server that stopped answering end.
#define HYD_CANCEL_GRACE_MS 1000

static inline void hyd_atomic_store(int *p, int v) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }
static inline int hyd_atomic_load(const int *p) { return p ? __atomic_load_n(p, __ATOMIC_SEQ_CST) : 0; }

// `cancel` (may be NULL) is a generation counter, `snap` its value when the call started: once it
// moves (the job pauses or closes, or another call found the server unresponsive), a call that
// has had no reply for HYD_CANCEL_GRACE_MS gives up. Calls started later are not affected.
static inline int hyd_cancelled(const int *cancel, int snap, int waited_ms) {
    return waited_ms >= HYD_CANCEL_GRACE_MS && cancel && hyd_atomic_load(cancel) != snap;
}

static inline int64_t hyd_now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

// Connects `h` to `uri` and completes the handshake within `timeout_ms` (wall time, monotonic):
// a server that accepts and never greets (a wrong port, a proxy, a frozen process whose kernel
// still accepts) must not hold the caller. Returns 0, or -1 with *err (ETIMEDOUT; ECANCELED when
// `cancel` moves and the attempt has lasted HYD_CANCEL_GRACE_MS; or libnbd's errno). Name
// resolution inside libnbd is synchronous and bounded only by the resolver's own timeouts.
static inline int hyd_nbd_connect_uri(struct nbd_handle *h, const char *uri, int timeout_ms, const int *cancel, int snap,
                                      int *err) {
    int64_t start = hyd_now_ms();
    int64_t deadline = start + (timeout_ms > 0 ? timeout_ms : 10000);
    if (nbd_aio_connect_uri(h, uri) == -1) {
        *err = nbd_get_errno() ? nbd_get_errno() : ECONNREFUSED;
        return -1;
    }
    while (nbd_aio_is_connecting(h) == 1) {
        // A healthy server greets within the grace: only an attempt that hangs is withdrawn.
        if (hyd_cancelled(cancel, snap, (int)(hyd_now_ms() - start))) { *err = ECANCELED; return -1; }
        int64_t left = deadline - hyd_now_ms();
        if (left <= 0) { *err = ETIMEDOUT; return -1; }
        if (nbd_poll(h, (int)(left < HYD_SLICE_MS ? left : HYD_SLICE_MS)) == -1) {
            *err = nbd_get_errno() ? nbd_get_errno() : ECONNREFUSED;
            return -1;
        }
    }
    if (nbd_aio_is_ready(h) != 1) {
        *err = nbd_get_errno() ? nbd_get_errno() : ECONNREFUSED;
        return -1;
    }
    return 0;
}

// Waits for command `cookie` (issued with nbd_aio_*): HYD_NBD_OK, HYD_NBD_COMMAND_ERROR (*err),
// or HYD_NBD_CONNECTION_LOST (the handle died; no reply for `timeout_ms`: ETIMEDOUT; cancelled:
// ECANCELED). After CONNECTION_LOST the command may still be listed: the caller closes the handle.
static inline int hyd_nbd_wait(struct nbd_handle *h, int64_t cookie, int timeout_ms, const int *cancel, int snap, int *err) {
    int waited_ms = 0;
    for (;;) {
        int r = nbd_aio_command_completed(h, (uint64_t)cookie);
        if (r == 1) return HYD_NBD_OK;
        if (r == -1) {
            *err = nbd_get_errno() ? nbd_get_errno() : EIO;
            return hyd_nbd_is_usable(h) ? HYD_NBD_COMMAND_ERROR : HYD_NBD_CONNECTION_LOST;
        }
        if (!hyd_nbd_is_usable(h)) { *err = ENOTCONN; return HYD_NBD_CONNECTION_LOST; }
        if (hyd_cancelled(cancel, snap, waited_ms)) { *err = ECANCELED; return HYD_NBD_CONNECTION_LOST; }
        int slice = timeout_ms > 0 && timeout_ms - waited_ms < HYD_SLICE_MS ? timeout_ms - waited_ms : HYD_SLICE_MS;
        int polled = nbd_poll(h, slice);
        if (polled == -1) { *err = nbd_get_errno() ? nbd_get_errno() : ENOTCONN; return HYD_NBD_CONNECTION_LOST; }
        if (polled == 0) {
            waited_ms += slice;
            if (timeout_ms > 0 && waited_ms >= timeout_ms) { *err = ETIMEDOUT; return HYD_NBD_CONNECTION_LOST; }
        }
    }
}

static inline int hyd_nbd_issue_failed(struct nbd_handle *h, int *err) {
    *err = nbd_get_errno() ? nbd_get_errno() : EIO;
    return hyd_nbd_is_usable(h) ? HYD_NBD_COMMAND_ERROR : HYD_NBD_CONNECTION_LOST;
}

// TRIM and FLUSH with the deadline of hyd_nbd_wait.
static inline int hyd_nbd_trim(struct nbd_handle *h, uint64_t count, uint64_t offset, int timeout_ms,
                               const int *cancel, int snap, int *err) {
    int64_t c = nbd_aio_trim(h, count, offset, NBD_NULL_COMPLETION, 0);
    if (c == -1) return hyd_nbd_issue_failed(h, err);
    return hyd_nbd_wait(h, c, timeout_ms, cancel, snap, err);
}

static inline int hyd_nbd_flush(struct nbd_handle *h, int timeout_ms, const int *cancel, int snap, int *err) {
    int64_t c = nbd_aio_flush(h, NBD_NULL_COMPLETION, 0);
    if (c == -1) return hyd_nbd_issue_failed(h, err);
    return hyd_nbd_wait(h, c, timeout_ms, cancel, snap, err);
}

// Reads count bytes at offset into buf as chunks of at most `chunk` bytes with at most
// `max_in_flight` commands in flight on this handle. Only the calling thread drives the handle
// (the caller holds it exclusively). On HYD_NBD_OK and HYD_NBD_COMMAND_ERROR every command of
// this call has completed; on HYD_NBD_CONNECTION_LOST commands may still be listed, and the
// caller must nbd_close the handle before it reuses the buffer (nothing writes into it unless a
// call drives the handle).
// `timeout_ms` (> 0): when no command completes for that long the server is taken for gone
// (ETIMEDOUT, HYD_NBD_CONNECTION_LOST): a server that stops answering without closing the
// connection must not hold the job, its pause and its removal forever.
static inline int hyd_nbd_pread_chunked(struct nbd_handle *h, void *buf, size_t count, uint64_t offset,
                                        size_t chunk, unsigned max_in_flight, int timeout_ms,
                                        const int *cancel, int snap, int *err, uint64_t *fail_offset) {
    if (chunk == 0) chunk = count ? count : 1;
    if (max_in_flight == 0) max_in_flight = 1;
    size_t n = count ? (count + chunk - 1) / chunk : 0;
    int64_t stack_cookies[64];
    int64_t *cookies = n <= 64 ? stack_cookies : (int64_t *)calloc(n, sizeof(int64_t));
    if (!cookies) { *err = ENOMEM; *fail_offset = offset; return HYD_NBD_COMMAND_ERROR; }
    size_t issued = 0;
    unsigned in_flight = 0;
    int result = HYD_NBD_OK;
    int waited_ms = 0;
    for (;;) {
        while (result == HYD_NBD_OK && issued < n && in_flight < max_in_flight) {
            size_t off = issued * chunk;
            size_t len = count - off < chunk ? count - off : chunk;
            int64_t c = nbd_aio_pread(h, (char *)buf + off, len, offset + off, NBD_NULL_COMPLETION, 0);
            if (c == -1) {
                *err = nbd_get_errno() ? nbd_get_errno() : EIO;
                *fail_offset = offset + off;
                result = hyd_nbd_is_usable(h) ? HYD_NBD_COMMAND_ERROR : HYD_NBD_CONNECTION_LOST;
                break;
            }
            cookies[issued++] = c;
            in_flight++;
        }
        if (in_flight == 0 || result == HYD_NBD_CONNECTION_LOST) break;
        if (hyd_cancelled(cancel, snap, waited_ms)) {
            *err = ECANCELED;
            *fail_offset = offset;
            result = HYD_NBD_CONNECTION_LOST;
            break;
        }
        int slice = timeout_ms > 0 ? (timeout_ms - waited_ms < HYD_SLICE_MS ? timeout_ms - waited_ms : HYD_SLICE_MS) : HYD_SLICE_MS;
        int polled = nbd_poll(h, slice);
        if (polled == -1) {
            *err = nbd_get_errno() ? nbd_get_errno() : ENOTCONN;
            *fail_offset = offset;
            result = HYD_NBD_CONNECTION_LOST;
            break;
        }
        unsigned before = in_flight;
        for (size_t i = 0; i < issued; i++) {
            if (cookies[i] == 0) continue;
            int r = nbd_aio_command_completed(h, (uint64_t)cookies[i]);
            if (r == 0) continue;
            cookies[i] = 0;
            in_flight--;
            if (r == -1 && result == HYD_NBD_OK) {
                *err = nbd_get_errno() ? nbd_get_errno() : EIO;
                *fail_offset = offset + i * chunk;
                result = hyd_nbd_is_usable(h) ? HYD_NBD_COMMAND_ERROR : HYD_NBD_CONNECTION_LOST;
            }
        }
        if (result == HYD_NBD_CONNECTION_LOST) break;
        if (!hyd_nbd_is_usable(h)) { *err = ENOTCONN; *fail_offset = offset; result = HYD_NBD_CONNECTION_LOST; break; }
        // A completed command restarts the clock; a poll with traffic but no completion does not
        // count towards the timeout.
        if (in_flight < before) waited_ms = 0;
        if (polled == 0) {
            waited_ms += slice;
            if (timeout_ms > 0 && waited_ms >= timeout_ms) {
                *err = ETIMEDOUT;
                *fail_offset = offset;
                result = HYD_NBD_CONNECTION_LOST;
                break;
            }
        }
    }
    if (cookies != stack_cookies) free(cookies);
    return result;
}

// base:allocation extents, collected by hyd_nbd_extents. On the heap, with two references (the
// caller's and libnbd's closure, released by its `free` callback): a command given up (timeout)
// may be retired later, by nbd_close, after the caller has returned.
struct hyd_extents {
    uint64_t *lengths;
    uint32_t *flags;
    size_t count;
    size_t capacity;
    int refs;
};

static inline void hyd_extents_unref(void *user_data) {
    struct hyd_extents *e = (struct hyd_extents *)user_data;
    if (__atomic_sub_fetch(&e->refs, 1, __ATOMIC_SEQ_CST) != 0) return;
    free(e->lengths);
    free(e->flags);
    free(e);
}

static inline int hyd_nbd_extent_cb(void *user_data, const char *metacontext, uint64_t offset,
                                    uint32_t *entries, size_t nr_entries, int *error) {
    (void)offset; (void)error;
    struct hyd_extents *e = (struct hyd_extents *)user_data;
    if (strcmp(metacontext, "base:allocation") != 0) return 0;
    for (size_t i = 0; i + 1 < nr_entries && e->count < e->capacity; i += 2) {
        e->lengths[e->count] = entries[i];
        e->flags[e->count] = entries[i + 1];
        e->count++;
    }
    return 0;
}

// BLOCK_STATUS base:allocation for [offset, offset+count) with the deadline of hyd_nbd_wait:
// fills up to `capacity` extents (consecutive from offset) and sets *n. Returns HYD_NBD_*.
static inline int hyd_nbd_extents(struct nbd_handle *h, uint64_t offset, uint64_t count,
                                  uint64_t *lengths, uint32_t *flags, size_t capacity,
                                  int timeout_ms, const int *cancel, int snap, int *err, int64_t *n) {
    *n = 0;
    struct hyd_extents *e = (struct hyd_extents *)calloc(1, sizeof(*e));
    if (!e) { *err = ENOMEM; return HYD_NBD_COMMAND_ERROR; }
    e->lengths = (uint64_t *)calloc(capacity ? capacity : 1, sizeof(uint64_t));
    e->flags = (uint32_t *)calloc(capacity ? capacity : 1, sizeof(uint32_t));
    e->capacity = capacity;
    e->refs = 2;
    if (!e->lengths || !e->flags) { e->refs = 1; hyd_extents_unref(e); *err = ENOMEM; return HYD_NBD_COMMAND_ERROR; }
    nbd_extent_callback cb = { .callback = hyd_nbd_extent_cb, .user_data = e, .free = hyd_extents_unref };
    int64_t c = nbd_aio_block_status(h, count, offset, cb, NBD_NULL_COMPLETION, 0);
    int r;
    if (c == -1) {
        // libnbd has released its reference (it frees the closures of a command it refused).
        r = hyd_nbd_issue_failed(h, err);
    } else {
        r = hyd_nbd_wait(h, c, timeout_ms, cancel, snap, err);
    }
    if (r == HYD_NBD_OK) {
        *n = (int64_t)e->count;
        memcpy(lengths, e->lengths, e->count * sizeof(uint64_t));
        memcpy(flags, e->flags, e->count * sizeof(uint32_t));
    }
    hyd_extents_unref(e);
    return r;
}

static inline int hyd_nbd_errno(void) { return nbd_get_errno(); }
static inline const char *hyd_nbd_error(void) { const char *s = nbd_get_error(); return s ? s : ""; }
#endif
