#ifndef HYDRATION_CNBD_SHIM_H
#define HYDRATION_CNBD_SHIM_H
// libnbd (Debian libnbd-dev), plus small helpers that keep libnbd's C callbacks on the C side:
// the Swift code (Storage/RemoteSource.swift) only calls plain functions.
#include <libnbd.h>
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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
                                        int *err, uint64_t *fail_offset) {
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
        int slice = timeout_ms > 0 ? (timeout_ms - waited_ms < 1000 ? timeout_ms - waited_ms : 1000) : -1;
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
        if (polled == 0 && timeout_ms > 0) {
            waited_ms += slice;
            if (waited_ms >= timeout_ms) {
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

// base:allocation extents, collected by hyd_nbd_extents.
struct hyd_extents {
    uint64_t *lengths;
    uint32_t *flags;
    size_t count;
    size_t capacity;
};

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

// BLOCK_STATUS base:allocation for [offset, offset+count): fills up to `capacity` extents
// (consecutive from offset). Returns the number of extents, or -1 (nbd_get_errno says why).
static inline int64_t hyd_nbd_extents(struct nbd_handle *h, uint64_t offset, uint64_t count,
                                      uint64_t *lengths, uint32_t *flags, size_t capacity) {
    struct hyd_extents e = { lengths, flags, 0, capacity };
    nbd_extent_callback cb = { .callback = hyd_nbd_extent_cb, .user_data = &e, .free = NULL };
    if (nbd_block_status(h, count, offset, cb, 0) == -1) return -1;
    return (int64_t)e.count;
}

static inline int hyd_nbd_errno(void) { return nbd_get_errno(); }
static inline const char *hyd_nbd_error(void) { const char *s = nbd_get_error(); return s ? s : ""; }
#endif
