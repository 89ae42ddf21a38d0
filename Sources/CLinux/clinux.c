#define _GNU_SOURCE
#include "clinux.h"
#include <fcntl.h>
#include <errno.h>
#include <sys/ioctl.h>
#include <linux/fs.h>
#include <linux/falloc.h>

int hyd_blk_getsize64(int fd, uint64_t *size) { return ioctl(fd, BLKGETSIZE64, size); }
int hyd_blk_sszget(int fd, int *size) { return ioctl(fd, BLKSSZGET, size); }
int hyd_blk_discard(int fd, uint64_t offset, uint64_t length) {
    uint64_t range[2] = { offset, length };
    return ioctl(fd, BLKDISCARD, range);
}
int hyd_blk_zeroout(int fd, uint64_t offset, uint64_t length) {
    uint64_t range[2] = { offset, length };
    return ioctl(fd, BLKZEROOUT, range);
}
int hyd_punch_hole(int fd, uint64_t offset, uint64_t length) {
    return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)offset, (off_t)length);
}
int hyd_start_writeback(int fd, uint64_t offset, uint64_t length) {
    return sync_file_range(fd, (off_t)offset, (off_t)length, SYNC_FILE_RANGE_WRITE);
}
int hyd_wait_writeback(int fd, uint64_t offset, uint64_t length) {
    return sync_file_range(fd, (off_t)offset, (off_t)length,
                           SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER);
}
int hyd_drop_cache(int fd, uint64_t offset, uint64_t length) {
    int rc = posix_fadvise(fd, (off_t)offset, (off_t)length, POSIX_FADV_DONTNEED);
    if (rc != 0) { errno = rc; return -1; }
    return 0;
}

#if defined(__x86_64__)
#include <stddef.h>
__attribute__((target("sse4.2")))
static uint32_t crc32c_sse42(uint32_t crc, const unsigned char *p, uint64_t n) {
    uint64_t c = crc;
    while (n >= 8) {
        uint64_t v;
        __builtin_memcpy(&v, p, 8);
        c = __builtin_ia32_crc32di(c, v);
        p += 8; n -= 8;
    }
    uint32_t c32 = (uint32_t)c;
    while (n--) c32 = __builtin_ia32_crc32qi(c32, *p++);
    return c32;
}
#endif

uint32_t hyd_crc32c_hw(uint32_t crc, const void *data, uint64_t length, int *ok) {
#if defined(__x86_64__)
    static int have = -1;
    if (have < 0) { __builtin_cpu_init(); have = __builtin_cpu_supports("sse4.2") ? 1 : 0; }
    if (have) { *ok = 1; return crc32c_sse42(crc, (const unsigned char *)data, length); }
#endif
    (void)crc; (void)data; (void)length;
    *ok = 0;
    return 0;
}
