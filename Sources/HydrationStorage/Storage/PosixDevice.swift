import CLinux
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// An open file or block device. The descriptor is immutable after open and every method is a
/// thread-safe system call on it (pread/pwrite take explicit offsets), which is why this class
/// can be `Sendable` with only `let` properties (the counters are atomics).
///
/// Direct I/O: a source or destination also gets an O_DIRECT open file description (`directFD`)
/// when the file or device supports it (statx STATX_DIOALIGN; tmpfs accepts O_DIRECT at open but
/// reports no alignment, and is left buffered). A `read` or `write` whose offset, length and
/// buffer address are aligned to `directIO.alignment` (the device's, at least a page) goes
/// through it; an unaligned call, or the unaligned tail of a call, uses `fd` (buffered). Because
/// the alignment is at least a page and regions are whole pages, a page is written either
/// directly or through the cache by one caller, never both at once (a concurrent buffered
/// partial-page write and direct write to one page could leave a stale dirty page behind).
/// `fd` stays the descriptor the commit fdatasyncs: fdatasync flushes the inode's dirty pages
/// (whichever descriptor wrote them) and the device's write cache, which direct writes sit in
/// until then; a direct write's own failure is returned by pwrite (no writeback error involved).
final class PosixDevice: StorageDevice {
    let info: DeviceInfo
    let directIO: DirectIO
    let fd: Int32
    /// The O_DIRECT descriptor, or -1.
    let directFD: Int32
    /// Calls (or parts of calls) done directly / through the page cache, and direct calls the
    /// kernel refused with EINVAL (redone buffered; direct I/O is then given up for good).
    let directCalls = Atomic<Int>(0)
    let bufferedCalls = Atomic<Int>(0)
    let directRefused = Atomic<Int>(0)
    let directBroken = Atomic<Bool>(false)
    /// A destination's second, read-only open file description, on which `evict` waits for
    /// writeback: a writeback error is reported once per open file description, so a wait here
    /// consumes it for this descriptor only and the commit's fdatasync on `fd` still sees it.
    /// -1 for other devices.
    let waitFD: Int32
    /// A source or destination: its size at open is the job's, and an end of file before it means
    /// the file or device shrank under the job (`truncate`, `losetup -c`), never zeros to copy or
    /// serve. Metadata files keep reading past their end as zeros.
    let sizeIsFixed: Bool

    init(info: DeviceInfo, fd: Int32, waitFD: Int32, directFD: Int32, directIO: DirectIO, sizeIsFixed: Bool) {
        self.info = info
        self.fd = fd
        self.waitFD = waitFD
        self.directFD = directFD
        self.directIO = directIO
        self.sizeIsFixed = sizeIsFixed
    }

    /// The file's or device's size now (nil when it cannot be read).
    func currentSize() -> UInt64? {
        var st = stat()
        guard fstat(fd, &st) == 0 else { return nil }
        if (st.st_mode & S_IFMT) == S_IFBLK {
            var size: UInt64 = 0
            return hyd_blk_getsize64(fd, &size) == 0 ? size : nil
        }
        return UInt64(st.st_size)
    }

    /// The error for a source or destination found shorter than when it was opened.
    func shrank(at offset: UInt64, length: UInt64, operation: StorageError.Operation) -> StorageError {
        StorageError(
            operation, path: info.path, errno: EIO, offset: offset, length: length,
            detail:
                "it ends at \(currentSize().map { "\($0)" } ?? "an unknown size") bytes, before the \(info.size) it had when the job opened it: it was truncated or resized under the job"
        )
    }

    /// Calls in flight (in steps of 2) and, in bit 0, whether `close()` was called. The descriptors
    /// are closed exactly once: by `close()` when nothing is in flight, else by the last call to
    /// leave. A call entering after `close()` fails with EBADF before touching any descriptor, so
    /// a number the kernel reuses after the close is never reached (a stray fdatasync cannot
    /// "succeed" on someone else's file). A closed device thus holds no descriptor: a complete job
    /// keeps none (`HydrationJob.releaseDevices`).
    let gate = Atomic<Int>(0)
    let descriptorsClosed = Atomic<Bool>(false)

    deinit {
        closeDescriptors()
    }

    func closeDescriptors() {
        guard
            descriptorsClosed.compareExchange(expected: false, desired: true, ordering: .acquiringAndReleasing)
                .exchanged
        else { return }
        Glibc.close(fd)
        if waitFD >= 0 { Glibc.close(waitFD) }
        if directFD >= 0 { Glibc.close(directFD) }
    }

    /// Runs `body` with the descriptors open, or fails with EBADF if the device was closed.
    @inline(__always)
    func using<T>(
        _ operation: StorageError.Operation, offset: UInt64? = nil, length: UInt64? = nil,
        _ body: () throws(StorageError) -> T
    ) throws(StorageError) -> T {
        guard enter() else {
            throw StorageError(
                operation, path: info.path, errno: EBADF, offset: offset, length: length,
                detail: "the job closed this device")
        }
        defer { leave() }
        return try body()
    }

    func enter() -> Bool {
        var v = gate.load(ordering: .acquiring)
        while v & 1 == 0 {
            let (exchanged, original) = gate.compareExchange(
                expected: v, desired: v + 2, ordering: .acquiringAndReleasing)
            if exchanged { return true }
            v = original
        }
        return false
    }

    func leave() {
        // Closed (bit 0) and this was the last call in flight: close now.
        if gate.subtract(2, ordering: .acquiringAndReleasing).newValue == 1 { closeDescriptors() }
    }

    static func open(
        _ path: String, mode: OpenMode, topology: DeviceTopology = DeviceTopology(),
        directIO wantDirect: Bool = true, why: String = "not chosen"
    ) throws(StorageError) -> PosixDevice {
        guard path.hasPrefix("/") else { throw StorageError(.open, path: path, errno: EINVAL) }
        var flags = O_CLOEXEC
        switch mode {
        case .source(let discard): flags |= discard ? O_RDWR : O_RDONLY
        case .destination: flags |= O_RDWR
        case .metadata(let create): flags |= O_RDWR | (create ? O_CREAT | O_EXCL : 0)
        case .readOnly: flags |= O_RDONLY
        }
        var st = stat()
        let exists = stat(path, &st) == 0
        if !exists && errno != ENOENT { throw StorageError(.stat, path: path, errno: errno) }
        if case .destination(let size?) = mode, !exists {
            flags |= O_CREAT | O_EXCL
            _ = size
        }
        let isBlock = exists && (st.st_mode & S_IFMT) == S_IFBLK
        if exists && !isBlock && (st.st_mode & S_IFMT) != S_IFREG {
            throw StorageError(.open, path: path, errno: EINVAL)
        }
        let exclusive: Bool
        switch mode {
        case .source, .destination: exclusive = true
        default: exclusive = false
        }
        if isBlock && exclusive {
            // O_EXCL on a block device fails with EBUSY while it is mounted or opened exclusively
            // elsewhere: nothing may change the source during hydration, and a mounted
            // filesystem must never become a destination.
            flags |= O_EXCL
        }
        let fd = Glibc.open(path, flags, 0o600)
        if fd < 0 {
            throw StorageError(flags & O_CREAT != 0 ? .create : .open, path: path, errno: errno)
        }
        var ok = false
        defer {
            if !ok {
                Glibc.close(fd)
                // O_CREAT comes with O_EXCL: the file is this call's, and no one's if it fails
                // (out of descriptors for the second one a destination needs, say).
                if flags & O_CREAT != 0 { _ = unlink(path) }
            }
        }
        if fstat(fd, &st) != 0 { throw StorageError(.stat, path: path, errno: errno) }

        let info: DeviceInfo
        if (st.st_mode & S_IFMT) == S_IFBLK {
            var size: UInt64 = 0
            var lbs: Int32 = 512
            if hyd_blk_getsize64(fd, &size) != 0 { throw StorageError(.stat, path: path, errno: errno) }
            _ = hyd_blk_sszget(fd, &lbs)
            info = DeviceInfo(
                path: path,
                identity: DeviceIdentity(kind: .blockDevice, device: 0, inode: 0, rdev: UInt64(st.st_rdev)),
                size: size, logicalBlockSize: Int(lbs),
                stableID: try topology.checkedStableID(ofBlock: UInt64(st.st_rdev), path: path))
        } else {
            if exclusive {
                // Files have no O_EXCL semantics; an advisory lock keeps two jobs (or two daemons)
                // off the same source or destination.
                if flock(fd, LOCK_EX | LOCK_NB) != 0 {
                    throw StorageError(.lock, path: path, errno: errno == EWOULDBLOCK ? EBUSY : errno)
                }
            }
            var size = UInt64(st.st_size)
            if case .destination(let want?) = mode, size == 0, want > 0 {
                if ftruncate(fd, off_t(want)) != 0 { throw StorageError(.truncate, path: path, errno: errno) }
                size = want
            }
            info = DeviceInfo(
                path: path,
                identity: DeviceIdentity(
                    kind: .regularFile, device: UInt64(st.st_dev), inode: UInt64(st.st_ino), rdev: 0),
                size: size, logicalBlockSize: 512, stableID: topology.stableID(ofFileDescriptor: fd))
        }
        var waitFD: Int32 = -1
        if case .destination = mode {
            // Not exclusive: a second exclusive open of a block device would be refused (EBUSY).
            waitFD = Glibc.open(path, O_RDONLY | O_CLOEXEC)
            if waitFD < 0 { throw StorageError(.open, path: path, errno: errno) }
            // A writeback error nobody has seen yet is reported to every descriptor opened since
            // (errseq_sample samples 0 while the error is unseen). After a job failed on a
            // writeback error (e.g. ENOSPC under a loop device), the rest of its dirty pages fail
            // writeback after its last fdatasync, unseen; the restarted daemon's first wait then
            // reported that stale error and failed the job again although the space was back.
            // Such an error concerns only data written
            // after the last successful commit, which the job does not count on (it resumes from
            // the durable metadata), so consume it here on both descriptors before any I/O.
            _ = fdatasync(fd)
            _ = hyd_wait_writeback(waitFD, 0, 0)
        }
        var ready = false
        defer { if !ready && waitFD >= 0 { Glibc.close(waitFD) } }
        var directFD: Int32 = -1
        var direct = DirectIO.off("not a source or destination")
        switch mode {
        case .source, .destination:
            if wantDirect {
                (directFD, direct) = openDirect(
                    path,
                    writable: {
                        if case .destination = mode { return true }; return false
                    }(),
                    logicalBlockSize: info.logicalBlockSize, sameAs: st, why: why)
            } else {
                direct = .off(why)
            }
        default: break
        }
        ok = true
        ready = true
        let sizeIsFixed: Bool
        switch mode {
        case .source, .destination: sizeIsFixed = true
        default: sizeIsFixed = false
        }
        return PosixDevice(
            info: info, fd: fd, waitFD: waitFD, directFD: directFD, directIO: direct, sizeIsFixed: sizeIsFixed)
    }

    /// A second, O_DIRECT open file description of `path` (not exclusive: `fd` holds the
    /// device's O_EXCL claim or the file's flock), and the alignment its calls need; or -1 and
    /// why direct I/O is not used.
    static func openDirect(
        _ path: String, writable: Bool, logicalBlockSize: Int, sameAs first: stat, why: String
    ) -> (Int32, DirectIO) {
        let dfd = hyd_open_direct(path, writable ? O_RDWR : O_RDONLY)
        if dfd < 0 {
            return (-1, .off("\(why), but O_DIRECT refused at open: \(errnoSymbol(errno))"))
        }
        // The path is opened again: it must still name the object `fd` has open (and locked).
        var st = stat()
        guard fstat(dfd, &st) == 0, st.st_dev == first.st_dev, st.st_ino == first.st_ino, st.st_rdev == first.st_rdev
        else {
            Glibc.close(dfd)
            return (-1, .off("\(why), but the path no longer names the opened file"))
        }
        var mem: UInt32 = 0, off: UInt32 = 0
        if hyd_dio_align(dfd, &mem, &off) != 0 || off == 0 || mem == 0 {
            // No STATX_DIOALIGN: a block device on a kernel before 6.11 does direct I/O at its
            // logical block size; a file that gives no alignment does not do direct I/O (tmpfs).
            if (st.st_mode & S_IFMT) == S_IFBLK && logicalBlockSize > 0 {
                mem = UInt32(logicalBlockSize); off = UInt32(logicalBlockSize)
            } else {
                Glibc.close(dfd)
                return (-1, .off("\(why), but the filesystem reports no direct-I/O alignment (STATX_DIOALIGN)"))
            }
        }
        let page = max(4096, Int(sysconf(Int32(_SC_PAGESIZE))))
        let alignment = max(page, Int(mem), Int(off))
        guard alignment & (alignment - 1) == 0 else {
            Glibc.close(dfd)
            return (-1, .off("\(why), but direct-I/O alignment \(alignment) is not a power of two"))
        }
        return (dfd, DirectIO(enabled: true, alignment: alignment, reason: why))
    }

    /// How many bytes of a call at `offset` of `count` bytes from `address` may go direct: all
    /// whole aligned blocks from the start, 0 when the start is not aligned.
    @inline(__always)
    func directLength(_ address: UnsafeRawPointer, _ offset: UInt64, _ count: Int) -> Int {
        guard directFD >= 0 else { return 0 }
        let a = directIO.alignment
        guard Int(bitPattern: address) & (a - 1) == 0, Int(offset & UInt64(a - 1)) == 0 else { return 0 }
        guard !directBroken.load(ordering: .relaxed) else { return 0 }
        return count & ~(a - 1)
    }

    enum LeaseState { case none, held, broken }
    let lease = Mutex<LeaseState>(.none)
}
