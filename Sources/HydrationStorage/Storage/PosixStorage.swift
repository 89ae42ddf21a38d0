import CLinux
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// The real storage layer: POSIX and Linux calls on files and block devices.
public struct PosixStorage: StorageProvider {
    /// Where device topology and identities are read from (sysfs, /proc).
    public var topology: DeviceTopology
    /// Direct I/O for sources and destinations, when set, whatever the job chose (`IOMode`):
    /// from the constructor (tests) or `HYDRATION_DIRECT_IO` (experiments, the benchmark's
    /// variants). Nil: each job's choice (`open(_:mode:directIO:why:)`), buffered for callers
    /// that do not choose.
    public var directOverride: (source: Bool, destination: Bool, why: String)?
    /// How `RemoteSource` URIs are opened; nil: they are refused (EPROTONOSUPPORT). The engine's
    /// `PosixStorage()` (HydrationService) plugs in libnbd's client.
    public var remote: (any RemoteDevices)?

    public init(topology: DeviceTopology = DeviceTopology(), directIO: Bool? = nil, remote: (any RemoteDevices)?) {
        self.topology = topology
        self.remote = remote
        if let directIO {
            self.directOverride = (directIO, directIO, "set by the storage provider")
        } else {
            self.directOverride = PosixStorage.directIOFromEnvironment
        }
    }

    /// From `HYDRATION_DIRECT_IO`: `1` (or on, yes, true, both) both sides, `source` or `dest`
    /// only that side, `0` (or anything else) neither; unset: nil, each job decides.
    public static var directIOFromEnvironment: (source: Bool, destination: Bool, why: String)? {
        guard let raw = getenv("HYDRATION_DIRECT_IO").map({ String(cString: $0) }) else { return nil }
        let v = raw.lowercased()
        let why = "HYDRATION_DIRECT_IO=\(raw)"
        if ["1", "on", "yes", "true", "both"].contains(v) { return (true, true, why) }
        if v == "source" { return (true, false, why) }
        if v == "dest" || v == "destination" { return (false, true, why) }
        return (false, false, why)
    }

    public func stack(of path: String) throws(StorageError) -> StorageStack? {
        // A remote export lives on another machine: it shares no local storage with anything.
        if RemoteSource.isURI(path) { return nil }
        return try topology.stack(of: path)
    }

    public func usage(of path: String) throws(StorageError) -> DeviceUsage? {
        // Who else uses a remote export is the server's business (its own clients).
        if RemoteSource.isURI(path) { return nil }
        return try topology.usage(of: path)
    }

    public func open(_ path: String, mode: OpenMode) throws(StorageError) -> any StorageDevice {
        try open(path, mode: mode, directIO: false, why: "not chosen by the caller")
    }

    public func open(_ path: String, mode: OpenMode, directIO: Bool, why: String) throws(StorageError)
        -> any StorageDevice
    {
        if RemoteSource.isURI(path) { return try remoteDevices(for: path).open(path, mode: mode) }
        var direct = false
        var reason = why
        switch mode {
        case .source, .destination:
            direct = directIO
            if let o = directOverride {
                if case .source = mode { direct = o.source } else { direct = o.destination }
                reason = o.why
            }
        default: break
        }
        return try PosixDevice.open(path, mode: mode, topology: topology, directIO: direct, why: reason)
    }

    /// Bytes a regular file has allocated (st_blocks), nil for anything else.
    public func allocatedBytes(of path: String) -> UInt64? {
        if RemoteSource.isURI(path) { return nil }
        var st = stat()
        guard stat(path, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG else { return nil }
        return UInt64(st.st_blocks) * 512
    }

    public func identify(_ path: String) throws(StorageError) -> DeviceInfo? {
        if RemoteSource.isURI(path) { return try remoteDevices(for: path).identify(path) }
        var st = stat()
        if stat(path, &st) != 0 {
            if errno == ENOENT { return nil }
            throw StorageError(.stat, path: path, errno: errno)
        }
        switch st.st_mode & S_IFMT {
        case S_IFREG:
            return DeviceInfo(
                path: path,
                identity: DeviceIdentity(
                    kind: .regularFile, device: UInt64(st.st_dev), inode: UInt64(st.st_ino), rdev: 0),
                size: UInt64(st.st_size), logicalBlockSize: 512, stableID: try topology.checkedStableID(ofFileAt: path))
        case S_IFBLK:
            // The size of a block device needs an open descriptor.
            let fd = Glibc.open(path, O_RDONLY | O_CLOEXEC)
            if fd < 0 { throw StorageError(.open, path: path, errno: errno) }
            defer { Glibc.close(fd) }
            var size: UInt64 = 0
            var lbs: Int32 = 512
            if hyd_blk_getsize64(fd, &size) != 0 { throw StorageError(.stat, path: path, errno: errno) }
            _ = hyd_blk_sszget(fd, &lbs)
            return DeviceInfo(
                path: path,
                identity: DeviceIdentity(kind: .blockDevice, device: 0, inode: 0, rdev: UInt64(st.st_rdev)),
                size: size, logicalBlockSize: Int(lbs),
                stableID: try topology.checkedStableID(ofBlock: UInt64(st.st_rdev), path: path))
        default:
            throw StorageError(.stat, path: path, errno: EINVAL)
        }
    }

    private func remoteDevices(for uri: String) throws(StorageError) -> any RemoteDevices {
        guard let remote else {
            throw StorageError(
                .open, path: uri, errno: EPROTONOSUPPORT,
                detail: "this program has no NBD client; only the daemon opens NBD sources")
        }
        return remote
    }

    public func removeCreatedFile(_ path: String) {
        _ = unlink(path)
    }

    public func syncDirectory(containing path: String) throws(StorageError) {
        let dir = parentDirectory(of: path)
        let fd = Glibc.open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if fd < 0 { throw StorageError(.syncDirectory, path: dir, errno: errno) }
        defer { Glibc.close(fd) }
        if fsync(fd) != 0 { throw StorageError(.syncDirectory, path: dir, errno: errno) }
    }
}

func parentDirectory(of path: String) -> String {
    guard let slash = path.lastIndex(of: "/") else { return "." }
    let dir = String(path[..<slash])
    return dir.isEmpty ? "/" : dir
}

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
    private let fd: Int32
    /// The O_DIRECT descriptor, or -1.
    private let directFD: Int32
    /// Calls (or parts of calls) done directly / through the page cache, and direct calls the
    /// kernel refused with EINVAL (redone buffered; direct I/O is then given up for good).
    let directCalls = Atomic<Int>(0)
    let bufferedCalls = Atomic<Int>(0)
    let directRefused = Atomic<Int>(0)
    private let directBroken = Atomic<Bool>(false)
    /// A destination's second, read-only open file description, on which `evict` waits for
    /// writeback: a writeback error is reported once per open file description, so a wait here
    /// consumes it for this descriptor only and the commit's fdatasync on `fd` still sees it.
    /// -1 for other devices.
    private let waitFD: Int32
    /// A source or destination: its size at open is the job's, and an end of file before it means
    /// the file or device shrank under the job (`truncate`, `losetup -c`), never zeros to copy or
    /// serve. Metadata files keep reading past their end as zeros.
    private let sizeIsFixed: Bool

    private init(info: DeviceInfo, fd: Int32, waitFD: Int32, directFD: Int32, directIO: DirectIO, sizeIsFixed: Bool) {
        self.info = info
        self.fd = fd
        self.waitFD = waitFD
        self.directFD = directFD
        self.directIO = directIO
        self.sizeIsFixed = sizeIsFixed
    }

    /// The file's or device's size now (nil when it cannot be read).
    private func currentSize() -> UInt64? {
        var st = stat()
        guard fstat(fd, &st) == 0 else { return nil }
        if (st.st_mode & S_IFMT) == S_IFBLK {
            var size: UInt64 = 0
            return hyd_blk_getsize64(fd, &size) == 0 ? size : nil
        }
        return UInt64(st.st_size)
    }

    /// The error for a source or destination found shorter than when it was opened.
    private func shrank(at offset: UInt64, length: UInt64, operation: StorageError.Operation) -> StorageError {
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
    private let gate = Atomic<Int>(0)
    private let descriptorsClosed = Atomic<Bool>(false)

    deinit {
        closeDescriptors()
    }

    private func closeDescriptors() {
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
    private func using<T>(
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

    private func enter() -> Bool {
        var v = gate.load(ordering: .acquiring)
        while v & 1 == 0 {
            let (exchanged, original) = gate.compareExchange(
                expected: v, desired: v + 2, ordering: .acquiringAndReleasing)
            if exchanged { return true }
            v = original
        }
        return false
    }

    private func leave() {
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
            // reported that stale error and failed the job again although the space was back
            // (Tests/attacks/l8-enospc-loop-dest.sh). Such an error concerns only data written
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
    private static func openDirect(
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
    private func directLength(_ address: UnsafeRawPointer, _ offset: UInt64, _ count: Int) -> Int {
        guard directFD >= 0 else { return 0 }
        let a = directIO.alignment
        guard Int(bitPattern: address) & (a - 1) == 0, Int(offset & UInt64(a - 1)) == 0 else { return 0 }
        guard !directBroken.load(ordering: .relaxed) else { return 0 }
        return count & ~(a - 1)
    }

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(StorageError) {
        try using(.read, offset: offset, length: UInt64(buffer.count)) { () throws(StorageError) in
            guard let base = buffer.baseAddress else { return }
            var done = 0
            while done < buffer.count {
                let direct = directLength(base + done, offset + UInt64(done), buffer.count - done)
                let n =
                    direct > 0
                    ? pread(directFD, base + done, direct, off_t(offset) + off_t(done))
                    : pread(fd, base + done, buffer.count - done, off_t(offset) + off_t(done))
                if n < 0 {
                    if errno == EINTR { continue }
                    if direct > 0 && errno == EINVAL { refuseDirect(); continue }
                    throw StorageError(
                        .read, path: info.path, errno: errno, offset: offset + UInt64(done),
                        length: UInt64(buffer.count - done))
                }
                if n == 0 {
                    let at = offset + UInt64(done)
                    // An end of file before the size the job opened: the source or destination shrank
                    // under the job. Zeros here would be copied (or served) as its data and the job
                    // completed without it (Tests/attacks, attack 6a of round 3).
                    if sizeIsFixed && at < info.size {
                        throw shrank(at: at, length: UInt64(buffer.count - done), operation: .read)
                    }
                    // End of file: the rest reads as zeros (past the end of a metadata file).
                    (base + done).initializeMemory(as: UInt8.self, repeating: 0, count: buffer.count - done)
                    return
                }
                if direct > 0 {
                    directCalls.add(1, ordering: .relaxed)
                } else {
                    bufferedCalls.add(1, ordering: .relaxed)
                }
                done += n
            }
        }
    }

    /// The kernel refused an aligned direct call (EINVAL: a filesystem that advertises an
    /// alignment it does not honour, or refuses direct I/O on this file after all). The call is
    /// redone buffered, and so is every later one: nothing was transferred by the refused call.
    private func refuseDirect() {
        directRefused.add(1, ordering: .relaxed)
        directBroken.store(true, ordering: .relaxed)
    }

    func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(StorageError) {
        try using(.write, offset: offset, length: UInt64(buffer.count)) { () throws(StorageError) in
            guard let base = buffer.baseAddress else { return }
            var done = 0
            while done < buffer.count {
                // A direct write returns only once the data is on the device (in its write cache
                // until the commit's fdatasync); its failure is returned here, and only its own range
                // is affected (the caller retries it or fails; nothing records it as written).
                let direct = directLength(base + done, offset + UInt64(done), buffer.count - done)
                let n =
                    direct > 0
                    ? pwrite(directFD, base + done, direct, off_t(offset) + off_t(done))
                    : pwrite(fd, base + done, buffer.count - done, off_t(offset) + off_t(done))
                if n < 0 {
                    if errno == EINTR { continue }
                    if direct > 0 && errno == EINVAL { refuseDirect(); continue }
                    throw StorageError(
                        .write, path: info.path, errno: errno, offset: offset + UInt64(done),
                        length: UInt64(buffer.count - done))
                }
                if n == 0 {
                    throw StorageError(
                        .write, path: info.path, errno: ENOSPC, offset: offset + UInt64(done),
                        length: UInt64(buffer.count - done))
                }
                if direct > 0 {
                    directCalls.add(1, ordering: .relaxed)
                } else {
                    bufferedCalls.add(1, ordering: .relaxed)
                }
                done += n
            }
        }
    }

    func sync() throws(StorageError) {
        try using(.sync) { () throws(StorageError) in
            if fdatasync(fd) != 0 { throw StorageError(.sync, path: info.path, errno: errno) }
        }
    }

    func release(offset: UInt64, length: UInt64) throws(StorageError) {
        try using(.release, offset: offset, length: length) { () throws(StorageError) in
            guard length > 0 else { return }
            // The lease is checked, and the punch made, under one lock that `giveUpLease` takes
            // too: a release never runs after the lease was given up. An opener arriving between
            // the check and the punch is blocked in open() until the lease is given up, so it
            // sees the punch as if it had come just after it (unless the punch outlasts the
            // kernel's lease-break-time, 45 s by default, when the kernel revokes the lease).
            try lease.withLock { (state: inout LeaseState) throws(StorageError) in
                if state == .held && hyd_get_lease(fd) != hyd_lease_write() { state = .broken }
                if state == .broken {
                    throw StorageError(
                        .release, path: info.path, errno: EWOULDBLOCK, offset: offset, length: length,
                        detail:
                            "another process opened the source (its write lease was broken): nothing more is released")
                }
                let rc =
                    info.identity.kind == .blockDevice
                    ? hyd_blk_discard(fd, offset, length)
                    : hyd_punch_hole(fd, offset, length)
                if rc != 0 {
                    throw StorageError(.release, path: info.path, errno: errno, offset: offset, length: length)
                }
            }
        }
    }

    enum LeaseState { case none, held, broken }
    private let lease = Mutex<LeaseState>(.none)

    func holdWriteLease() throws(StorageError) {
        guard info.identity.kind == .regularFile else { return }
        // Its own O_DIRECT descriptor would break (refuse) the lease: a device opened for direct
        // I/O has none (the job then runs as before leases were used).
        guard directFD < 0 else {
            throw StorageError(
                .lock, path: info.path, errno: EBUSY, detail: "opened twice for direct I/O: no write lease")
        }
        try using(.lock) { () throws(StorageError) in
            try lease.withLock { (state: inout LeaseState) throws(StorageError) in
                if state == .held { return }
                if hyd_take_write_lease(fd) != 0 {
                    throw StorageError(
                        .lock, path: info.path, errno: errno,
                        detail: errno == EAGAIN
                            ? "a write lease is refused: another process has the file open"
                            : "cannot take a write lease")
                }
                state = .held
            }
        }
    }

    var leaseBroken: Bool {
        guard enter() else { return false }
        defer { leave() }
        return lease.withLock { state in
            if state == .held && hyd_get_lease(fd) != hyd_lease_write() { state = .broken }
            return state == .broken
        }
    }

    func giveUpLease() {
        guard enter() else { return }
        defer { leave() }
        lease.withLock { state in
            if state != .none { _ = hyd_drop_lease(fd) }
            if state == .held { state = .none }
        }
    }

    func zeroOut(offset: UInt64, length: UInt64) throws(StorageError) {
        try using(.zeroOut, offset: offset, length: length) { () throws(StorageError) in
            guard length > 0 else { return }
            let rc =
                info.identity.kind == .blockDevice
                ? hyd_blk_zeroout(fd, offset, length)
                : hyd_punch_hole(fd, offset, length)
            if rc != 0 { throw StorageError(.zeroOut, path: info.path, errno: errno, offset: offset, length: length) }
        }
    }

    func nextData(from offset: UInt64) throws(StorageError) -> Range<UInt64>? {
        try using(.seek, offset: offset) { () throws(StorageError) in
            guard offset < info.size else { return nil }
            guard info.identity.kind == .regularFile else { return offset..<info.size }
            let data = lseek(fd, off_t(offset), seekData)
            if data < 0 {
                if errno == ENXIO {
                    // No data after `offset` up to the end of the file, wherever that is now: the rest
                    // counts as a hole only if the file still has the size the job opened.
                    if sizeIsFixed, let now = currentSize(), now < info.size {
                        throw shrank(at: offset, length: info.size - offset, operation: .seek)
                    }
                    return nil
                }
                // A filesystem without SEEK_DATA: everything may be data.
                if errno == EINVAL || errno == EOPNOTSUPP { return offset..<info.size }
                throw StorageError(.seek, path: info.path, errno: errno, offset: offset)
            }
            let hole = lseek(fd, data, seekHole)
            if hole < 0 { throw StorageError(.seek, path: info.path, errno: errno, offset: UInt64(data)) }
            let end = min(UInt64(hole), info.size)
            guard UInt64(data) < end else { return nil }
            return UInt64(data)..<end
        }
    }

    func dropCache(offset: UInt64, length: UInt64) {
        guard enter() else { return }
        defer { leave() }
        _ = hyd_drop_cache(fd, offset, length)
    }

    func startWriteback(offset: UInt64, length: UInt64) throws(StorageError) {
        try using(.writeback, offset: offset, length: length) { () throws(StorageError) in
            // An aligned range was written directly: nothing of it is in the page cache.
            if directFD >= 0 && !directBroken.load(ordering: .relaxed)
                && (offset | length) & UInt64(directIO.alignment - 1) == 0
            {
                return
            }
            if hyd_start_writeback(fd, offset, length) != 0 {
                throw StorageError(.writeback, path: info.path, errno: errno, offset: offset, length: length)
            }
        }
    }

    // Why eviction cannot hide a writeback error (docs/reliability.md, "Writeback errors"):
    // since Linux 4.13 a writeback error is recorded in the mapping's errseq and reported once
    // per open file description, to the first call on it that *waits* and checks it:
    // fsync/fdatasync (file_write_and_wait_range), sync_file_range with WAIT_BEFORE or
    // WAIT_AFTER (file_fdatawait_range -> file_check_and_advance_wb_err), and syncfs. Neither
    // sync_file_range(SYNC_FILE_RANGE_WRITE) alone (__filemap_fdatawrite_range: no wait, no
    // errseq check) nor posix_fadvise(DONTNEED) (starts writeback, then drops only clean,
    // unlocked pages not under writeback) looks at the errseq. So on `fd`, the descriptor the
    // commit fdatasyncs, this path makes no waiting call: fdatasync is the first to see the error.
    // The wait that keeps the page cache bounded runs on `waitFD`, a separate open file
    // description: it consumes the error only for that descriptor, and it is reported (thrown)
    // here too, so the job fails without waiting for its next commit.
    // Verified on this kernel by Scripts/errseq-experiment.sh. The old evict waited on `fd`
    // itself and ignored the result: the error was consumed and the next fdatasync returned 0.
    func evict(offset: UInt64, length: UInt64) throws(StorageError) {
        try using(.writeback, offset: offset, length: length) { () throws(StorageError) in
            if hyd_start_writeback(fd, offset, length) != 0 {
                throw StorageError(.writeback, path: info.path, errno: errno, offset: offset, length: length)
            }
            if waitFD >= 0 && hyd_wait_writeback(waitFD, offset, length) != 0 {
                throw StorageError(.writeback, path: info.path, errno: errno, offset: offset, length: length)
            }
            if hyd_drop_cache(fd, offset, length) != 0 {
                throw StorageError(.writeback, path: info.path, errno: errno, offset: offset, length: length)
            }
        }
    }

    func close() {
        // Mark closed; the descriptors go now if no call is in flight, else when the last leaves.
        if gate.bitwiseOr(1, ordering: .acquiringAndReleasing).oldValue == 0 { closeDescriptors() }
    }

    func allocatedBytes() -> UInt64? {
        guard info.identity.kind == .regularFile else { return nil }
        guard enter() else { return nil }
        defer { leave() }
        var st = stat()
        guard fstat(fd, &st) == 0 else { return nil }
        return UInt64(st.st_blocks) * 512
    }
}

// <unistd.h> defines these only under _GNU_SOURCE, which Swift's Glibc module does not set.
private let seekData: Int32 = 3
private let seekHole: Int32 = 4
