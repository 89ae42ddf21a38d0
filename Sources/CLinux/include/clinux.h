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

// Direct I/O (PosixDevice). open(2) with O_DIRECT added to `flags` (Swift's Glibc does not
// define O_DIRECT: it is a _GNU_SOURCE name); -1/errno like open.
int hyd_open_direct(const char *path, int flags);
// statx(STATX_DIOALIGN) of an open file: the memory and file-offset alignment direct I/O needs.
// Returns 0 and sets both to 0 when the file or kernel gives none (direct I/O unsupported, e.g.
// tmpfs, which accepts O_DIRECT at open but does not do it); -1/errno when statx fails.
int hyd_dio_align(int fd, uint32_t *mem_align, uint32_t *offset_align);

// Device identity and topology (DeviceTopology.swift).
// statx(STATX_BTIME|STATX_INO) on an open file (path NULL) or a path: the birth time, when the
// filesystem records one. Returns 0 and sets *has_btime (0 when the filesystem gives none).
int hyd_statx_btime(int fd, const char *path, uint64_t *ino, int64_t *sec, uint32_t *nsec, int *has_btime);
// FS_IOC_GETFSUUID (Linux 6.5+): the filesystem's UUID; *len is 0..16. -1/errno when unsupported.
int hyd_get_fsuuid(int fd, uint8_t *uuid, int *len);
// statfs f_fsid as one 64-bit value (f_fsid.__val[0] in the low half).
int hyd_statfs_fsid(int fd, uint64_t *fsid);
// LOOP_GET_STATUS64: the backing file's st_dev (encoded as userspace dev_t) and inode, offset, sizelimit.
int hyd_loop_status(int fd, uint64_t *backing_dev, uint64_t *backing_ino, uint64_t *offset, uint64_t *sizelimit);
// BTRFS_IOC_FS_INFO: the btrfs filesystem id (the name of its /sys/fs/btrfs directory).
int hyd_btrfs_fsid(int fd, uint8_t *fsid);
// Takes a write lease (F_SETLEASE F_WRLCK) and drops it at once: 0 when nobody else has the file
// open, -1 with errno EAGAIN when someone does (other errors: cannot tell).
int hyd_probe_write_lease(int fd);
// Takes a write lease and keeps it: 0, or -1 with errno (EAGAIN: someone else has the file open).
// A break is signalled with SIGURG (ignored by default); the holder polls `hyd_get_lease`.
int hyd_take_write_lease(int fd);
// F_GETLEASE: F_WRLCK while the lease is held and unbroken; F_RDLCK or F_UNLCK while it is being
// broken (the kernel's target); F_UNLCK once gone; -1 on error.
int hyd_get_lease(int fd);
// F_SETLEASE F_UNLCK: gives the lease up (a blocked opener proceeds).
int hyd_drop_lease(int fd);
// The values of F_WRLCK and F_UNLCK, for Swift.
int hyd_lease_write(void);

// CRC-32C (Castagnoli) update with the SSE4.2 crc32 instruction; sets *ok to 0 when the CPU
// lacks it (the caller then uses its table-driven version). `crc` is the running, inverted value.
uint32_t hyd_crc32c_hw(uint32_t crc, const void *data, uint64_t length, int *ok);
#endif
