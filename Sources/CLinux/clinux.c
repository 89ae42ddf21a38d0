#define _GNU_SOURCE
#include "clinux.h"
#include <fcntl.h>
#include <errno.h>
#include <sys/ioctl.h>
#include <linux/fs.h>
#include <linux/falloc.h>
#include <linux/loop.h>
#include <linux/btrfs.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/sysmacros.h>
#include <string.h>
#include <signal.h>

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
int hyd_open_direct(const char *path, int flags) {
    return open(path, flags | O_DIRECT | O_CLOEXEC);
}
int hyd_dio_align(int fd, uint32_t *mem_align, uint32_t *offset_align) {
    struct statx sx;
    memset(&sx, 0, sizeof sx);
    *mem_align = 0; *offset_align = 0;
    if (statx(fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &sx) != 0) return -1;
    if (sx.stx_mask & STATX_DIOALIGN) { *mem_align = sx.stx_dio_mem_align; *offset_align = sx.stx_dio_offset_align; }
    return 0;
}
int hyd_drop_cache(int fd, uint64_t offset, uint64_t length) {
    int rc = posix_fadvise(fd, (off_t)offset, (off_t)length, POSIX_FADV_DONTNEED);
    if (rc != 0) { errno = rc; return -1; }
    return 0;
}

int hyd_statx_btime(int fd, const char *path, uint64_t *ino, int64_t *sec, uint32_t *nsec, int *has_btime) {
    struct statx stx;
    memset(&stx, 0, sizeof stx);
    int rc = path ? statx(AT_FDCWD, path, 0, STATX_INO | STATX_BTIME, &stx)
                  : statx(fd, "", AT_EMPTY_PATH, STATX_INO | STATX_BTIME, &stx);
    if (rc != 0) return -1;
    *ino = stx.stx_ino;
    *has_btime = (stx.stx_mask & STATX_BTIME) ? 1 : 0;
    *sec = stx.stx_btime.tv_sec;
    *nsec = stx.stx_btime.tv_nsec;
    return 0;
}

struct hyd_fsuuid2 { uint8_t len; uint8_t uuid[16]; };
#define HYD_FS_IOC_GETFSUUID _IOR(0x15, 0, struct hyd_fsuuid2)

int hyd_get_fsuuid(int fd, uint8_t *uuid, int *len) {
    struct hyd_fsuuid2 u;
    memset(&u, 0, sizeof u);
    if (ioctl(fd, HYD_FS_IOC_GETFSUUID, &u) != 0) return -1;
    int n = u.len > 16 ? 16 : u.len;
    memcpy(uuid, u.uuid, (size_t)n);
    *len = n;
    return 0;
}

int hyd_statfs_fsid(int fd, uint64_t *fsid) {
    struct statfs sf;
    if (fstatfs(fd, &sf) != 0) return -1;
    uint32_t a, b;
    memcpy(&a, &sf.f_fsid.__val[0], 4);
    memcpy(&b, &sf.f_fsid.__val[1], 4);
    *fsid = ((uint64_t)b << 32) | a;
    return 0;
}

int hyd_loop_status(int fd, uint64_t *backing_dev, uint64_t *backing_ino, uint64_t *offset, uint64_t *sizelimit) {
    struct loop_info64 li;
    memset(&li, 0, sizeof li);
    if (ioctl(fd, LOOP_GET_STATUS64, &li) != 0) return -1;
    // The kernel encodes lo_device with huge_encode_dev (new_encode_dev): decode it and re-encode
    // as glibc's dev_t so it compares with st_dev.
    uint64_t d = li.lo_device;
    unsigned int maj = (unsigned int)((d & 0xfff00) >> 8);
    unsigned int min = (unsigned int)((d & 0xff) | ((d >> 12) & 0xfff00));
    *backing_dev = makedev(maj, min);
    *backing_ino = li.lo_inode;
    *offset = li.lo_offset;
    *sizelimit = li.lo_sizelimit;
    return 0;
}

int hyd_btrfs_fsid(int fd, uint8_t *fsid) {
    struct btrfs_ioctl_fs_info_args a;
    memset(&a, 0, sizeof a);
    if (ioctl(fd, BTRFS_IOC_FS_INFO, &a) != 0) return -1;
    memcpy(fsid, a.fsid, 16);
    return 0;
}

int hyd_probe_write_lease(int fd) {
    // Should another process open the file during the instant the lease is held, the kernel
    // signals the lease holder: SIGIO by default, whose default action terminates the process.
    // SIGURG is ignored by default.
    if (fcntl(fd, F_SETSIG, SIGURG) != 0) return -1;
    if (fcntl(fd, F_SETLEASE, F_WRLCK) != 0) return -1;
    (void)fcntl(fd, F_SETLEASE, F_UNLCK);
    return 0;
}

int hyd_take_write_lease(int fd) {
    // Not SIGIO (the default), whose default action would end the process at a break.
    if (fcntl(fd, F_SETSIG, SIGURG) != 0) return -1;
    return fcntl(fd, F_SETLEASE, F_WRLCK) == 0 ? 0 : -1;
}

int hyd_get_lease(int fd) { return fcntl(fd, F_GETLEASE); }

int hyd_drop_lease(int fd) { return fcntl(fd, F_SETLEASE, F_UNLCK) == 0 ? 0 : -1; }

int hyd_lease_write(void) { return F_WRLCK; }

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
