#ifndef HYDRATION_CLINUX_H
#define HYDRATION_CLINUX_H
#include <stdint.h>

// Swift cannot call C variadic functions such as ioctl(2); these wrappers give the block-device
// ioctls the storage layer needs a fixed signature. Each returns 0 or -1 with errno set.
int hyd_blk_getsize64(int fd, uint64_t *size);
int hyd_blk_sszget(int fd, int *size);
int hyd_blk_discard(int fd, uint64_t offset, uint64_t length);
int hyd_blk_zeroout(int fd, uint64_t offset, uint64_t length);
// fallocate(PUNCH_HOLE|KEEP_SIZE).
int hyd_punch_hole(int fd, uint64_t offset, uint64_t length);
// sync_file_range(SYNC_FILE_RANGE_WRITE): start writeback; posix_fadvise(DONTNEED): drop clean pages.
int hyd_start_writeback(int fd, uint64_t offset, uint64_t length);
int hyd_drop_cache(int fd, uint64_t offset, uint64_t length);
// sync_file_range(WAIT_BEFORE|WRITE|WAIT_AFTER): the range's writeback, waited for. It consumes
// the writeback error of the open file description it is called on: never call it on the
// descriptor the commit fdatasyncs (see PosixDevice.evict).
int hyd_wait_writeback(int fd, uint64_t offset, uint64_t length);


// CRC-32C (Castagnoli) update with the SSE4.2 crc32 instruction; sets *ok to 0 when the CPU
// lacks it (the caller then uses its table-driven version). `crc` is the running, inverted value.
uint32_t hyd_crc32c_hw(uint32_t crc, const void *data, uint64_t length, int *ok);
#endif
