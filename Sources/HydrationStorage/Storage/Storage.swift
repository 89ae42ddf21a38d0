#if canImport(Glibc)
    import Glibc
#endif

/// Every failure of the storage layer: which operation, on which path, where, and the errno.
public struct StorageError: Error, Sendable, Equatable, CustomStringConvertible {
    public enum Operation: String, Sendable {
        case open, stat, read, write, sync, release, zeroOut, seek, lock, truncate, create, syncDirectory, writeback
    }
    public var operation: Operation
    public var path: String
    public var errno: Int32
    public var offset: UInt64?
    public var length: UInt64?
    /// What the library behind the call said (libnbd's error string for a remote source).
    public var detail: String?

    public init(
        _ operation: Operation, path: String, errno: Int32, offset: UInt64? = nil, length: UInt64? = nil,
        detail: String? = nil
    ) {
        self.operation = operation; self.path = path; self.errno = errno; self.offset = offset; self.length = length
        self.detail = detail
    }

    public var errnoName: String { errnoSymbol(errno) }

    public var description: String {
        var s = "\(operation.rawValue) \(path)"
        if let offset { s += " at offset \(offset)" }
        if let length { s += " length \(length)" }
        s += ": \(errnoName) (\(String(cString: strerror(errno))))"
        if let detail, !detail.isEmpty { s += ": \(detail)" }
        return s
    }

    public var isNoSpace: Bool { errno == ENOSPC || errno == EDQUOT }
    /// A remote source's connection is down (the server is unreachable, or it went away): not an
    /// error of the data. Local devices never report ENOTCONN.
    public var isConnectionLost: Bool { errno == ENOTCONN }
    public var isUnsupported: Bool { errno == EOPNOTSUPP || errno == ENOTTY || errno == ENOSYS || errno == EINVAL }
}

package func errnoSymbol(_ e: Int32) -> String {
    switch e {
    case EIO: return "EIO"
    case ENOSPC: return "ENOSPC"
    case EDQUOT: return "EDQUOT"
    case EOPNOTSUPP: return "EOPNOTSUPP"
    case ENOTTY: return "ENOTTY"
    case ENOSYS: return "ENOSYS"
    case EINVAL: return "EINVAL"
    case ENOENT: return "ENOENT"
    case EACCES: return "EACCES"
    case EPERM: return "EPERM"
    case EBUSY: return "EBUSY"
    case EAGAIN: return "EAGAIN"
    case EEXIST: return "EEXIST"
    case EISDIR: return "EISDIR"
    case EROFS: return "EROFS"
    case ENXIO: return "ENXIO"
    case EBADF: return "EBADF"
    case EFBIG: return "EFBIG"
    case ENOTCONN: return "ENOTCONN"
    case ECONNREFUSED: return "ECONNREFUSED"
    case ECANCELED: return "ECANCELED"
    default: return "errno \(e)"
    }
}

/// Whether an open device does its data I/O with O_DIRECT (no page cache), and if not, why.
public struct DirectIO: Sendable, Equatable, CustomStringConvertible {
    /// True when aligned reads and writes bypass the page cache.
    public var enabled: Bool
    /// What a call must be aligned to (offset, length and buffer address) to go direct: the
    /// device's direct-I/O alignment, at least a page, so a page is never written both ways.
    public var alignment: Int
    /// Why direct I/O is on or off: what chose it, or why the device could not do it.
    public var reason: String

    public init(enabled: Bool, alignment: Int, reason: String) {
        self.enabled = enabled; self.alignment = alignment; self.reason = reason
    }

    public static func off(_ reason: String) -> DirectIO { DirectIO(enabled: false, alignment: 0, reason: reason) }

    public var description: String {
        enabled
            ? "direct I/O (O_DIRECT, \(alignment)-byte aligned; unaligned calls buffered; \(reason))"
            : "buffered I/O (\(reason))"
    }
}

/// How `StorageDevice.readBack` got past the page cache, weakest last.
public enum ReadBackPath: String, Sendable, Equatable, Comparable {
    /// O_DIRECT: the kernel writes the range's dirty pages back first, then reads the device.
    case direct
    /// A device without a page cache (simulated disks): what it returns is what it holds.
    case device
    /// No O_DIRECT: the range was written back, waited for (on a descriptor of its own, so the
    /// commit's fdatasync still sees a writeback error) and dropped from the page cache
    /// (POSIX_FADV_DONTNEED), then read. A page the kernel kept (mapped, locked) would be read
    /// from the cache.
    case evicted

    private var rank: Int {
        switch self {
        case .direct: return 0
        case .device: return 1
        case .evicted: return 2
        }
    }
    public static func < (a: ReadBackPath, b: ReadBackPath) -> Bool { a.rank < b.rank }
}

/// One open file or block device. This is the only place the engine's data path touches the
/// operating system, so that tests can put a simulated disk (with a volatile write cache and
/// injectable faults) in its place.
///
/// Every method blocks; the engine calls them only from its I/O threads (`IOExecutor`), never
/// from Swift's cooperative thread pool.
public protocol StorageDevice: AnyObject, Sendable {
    var info: DeviceInfo { get }
    /// Whether `read` and `write` bypass the page cache (O_DIRECT) for calls aligned to
    /// `directIO.alignment`; other calls are buffered. Either way a completed `write` is durable
    /// only after `sync` (the device has a volatile write cache), and a failed one is thrown by
    /// the call. Simulated disks: off.
    var directIO: DirectIO { get }

    /// Reads exactly `buffer.count` bytes at `offset` (pread). Bytes past the end read as zeros.
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(StorageError)
    /// Writes all of `buffer` at `offset` (pwrite).
    func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(StorageError)
    /// Reads `buffer.count` bytes at `offset` from the device itself, not from the page cache
    /// (verified release): O_DIRECT for the aligned part when the device can, else the range is
    /// written back, waited for and evicted before a buffered read. Says which way it went.
    func readBack(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(StorageError)
        -> ReadBackPath
    /// Makes every completed write durable (fdatasync).
    func sync() throws(StorageError)
    /// Gives the range's space back: PUNCH_HOLE|KEEP_SIZE on a file, BLKDISCARD on a block device.
    /// What a later read returns is unspecified on a block device.
    func release(offset: UInt64, length: UInt64) throws(StorageError)
    /// Makes the range read back as zeros: PUNCH_HOLE on a file, BLKZEROOUT on a block device.
    func zeroOut(offset: UInt64, length: UInt64) throws(StorageError)
    /// The next range at or after `offset` that may hold data (SEEK_DATA/SEEK_HOLE), or nil when
    /// the rest is a hole. Devices that cannot tell return `offset..<size`.
    func nextData(from offset: UInt64) throws(StorageError) -> Range<UInt64>?
    /// Hint that the range will not be read again soon: drop its clean pages from the page cache
    /// (POSIX_FADV_DONTNEED). Best effort, never fails, never waits: it cannot consume a
    /// writeback error (see `evict`).
    func dropCache(offset: UInt64, length: UInt64)
    /// Starts writeback of the range's dirty pages without waiting (sync_file_range WRITE).
    /// Not a durability barrier: commits still fdatasync. Throws what the kernel reports (a
    /// failure to start writeback, e.g. EIO or ENOSPC); the caller treats it as a failed
    /// destination sync. Never waits, so it never consumes the file's writeback error.
    func startWriteback(offset: UInt64, length: UInt64) throws(StorageError)
    /// Bounds how much of the destination sits in the page cache: starts writeback of the range,
    /// waits for it, and drops the range's pages (FADV_DONTNEED). It must not consume a
    /// writeback error that the commit's fdatasync has to see: on Linux >= 4.13 the first call
    /// that waits (sync_file_range WAIT_*, fsync, fdatasync) reports a writeback error once per
    /// open file description, so the wait runs on a second descriptor of the same file, never on
    /// the one that is fdatasynced. Not a durability barrier. Throws what the kernel reports,
    /// including a writeback error seen by the wait; the caller treats it as a failed
    /// destination sync.
    func evict(offset: UInt64, length: UInt64) throws(StorageError)
    /// Bytes actually allocated (st_blocks * 512) for a regular file; nil for a block device.
    func allocatedBytes() -> UInt64?
    /// Releases the device now (its lock, or O_EXCL on a block device) rather than when the last
    /// reference goes. Every later call fails. Call only once no I/O is in flight.
    func close()

    /// Whether the device reports holes itself (`nextData` finds them): regular files
    /// (SEEK_DATA) and remote exports (NBD BLOCK_STATUS). Default: not a block device.
    var reportsHoles: Bool { get }
    /// Remote sources only: nil while the connection is up (or for a local device); otherwise
    /// since when it is down and why (status shows it as `SourceUnavailable`).
    var availability: SourceAvailability? { get }
    /// Remote sources only: while `true` (the job is hydrating) a release or sync that finds the
    /// connection down waits and reconnects with backoff, then carries on; while `false` (idle,
    /// paused, closing) it fails with ENOTCONN after one reconnection attempt, and calls waiting
    /// now give up. Reads never wait (the job pauses itself instead). Not blocking.
    func waitForConnection(_ wait: Bool)

    /// A regular file released as it is copied: takes a write lease (F_SETLEASE F_WRLCK) and
    /// holds it until `giveUpLease` or `close`. Any other open of the file, by anyone (this
    /// process's other descriptors too), breaks it: the opener blocks in open() until the lease
    /// is given up (or the kernel's lease-break-time, /proc/sys/fs/lease-break-time, passes).
    /// Throws EAGAIN when someone else has the file open. Default: nothing to hold.
    func holdWriteLease() throws(StorageError)
    /// Whether a held lease was broken (someone opened the file). From then on `release`
    /// refuses (EWOULDBLOCK) until the lease is taken again. Default: false.
    var leaseBroken: Bool { get }
    /// Gives a held lease up once no release is in flight; a broken one stays refused for
    /// releases. Default: nothing.
    func giveUpLease()
    /// Remote sources only: one attempt at a working connection (blocking, short); throws while
    /// the source is still unreachable. Local devices: nothing to do.
    func probeConnection() throws(StorageError)
}

/// A remote source's connection is down: since when, what the last attempt said.
public struct SourceAvailability: Sendable, Equatable {
    public var sinceUnixMs: Int64
    public var lastError: String
    /// Reconnection attempts so far.
    public var attempts: Int
    public init(sinceUnixMs: Int64, lastError: String, attempts: Int) {
        self.sinceUnixMs = sinceUnixMs; self.lastError = lastError; self.attempts = attempts
    }
}

/// How a device is opened.
public enum OpenMode: Sendable, Equatable {
    /// Read only, or read-write when the source's space will be released. Opened exclusively:
    /// O_EXCL on a block device, an exclusive flock on a file, so nothing else changes it.
    case source(discard: Bool)
    /// Read-write. `createSize` creates a missing regular file of that size, and extends an
    /// existing empty one.
    case destination(createSize: UInt64?)
    /// Read-write, created (exclusively) when `create` is true.
    case metadata(create: Bool)
    /// Read only (offline checks).
    case readOnly
}

/// Opens devices and answers questions about paths. The POSIX implementation is
/// `PosixStorage`; tests use `SimulatedStorage`.
public protocol StorageProvider: Sendable {
    func open(_ path: String, mode: OpenMode) throws(StorageError) -> any StorageDevice
    /// Opens a source or destination with the job's choice of direct I/O (`IOMode`); `why` says
    /// what chose it (for status). Providers without a page cache ignore both.
    func open(_ path: String, mode: OpenMode, directIO: Bool, why: String) throws(StorageError) -> any StorageDevice
    /// Bytes `path` has allocated when it is a regular file (for `IOMode.auto`), nil when unknown.
    func allocatedBytes(of path: String) -> UInt64?
    /// The identity of whatever `path` names, or nil when nothing is there.
    func identify(_ path: String) throws(StorageError) -> DeviceInfo?
    /// fsync of the directory that holds `path`, so a newly created file survives a crash.
    func syncDirectory(containing path: String) throws(StorageError)
    /// Removes a file this process created (a destination of a job that could not be created).
    func removeCreatedFile(_ path: String)
    /// Everything `path`'s bytes live on (loop backing files, a partition's disk, dm/md slaves, a
    /// file's filesystem device, recursively; see `DeviceTopology`), or nil when this provider
    /// cannot tell.
    func stack(of path: String) throws(StorageError) -> StorageStack?
    /// Who else has `path` open (a loop device, a process, a device stacked on it, a mount), or
    /// nil when nobody does or this provider cannot tell.
    func usage(of path: String) throws(StorageError) -> DeviceUsage?
}

extension StorageProvider {
    public func open(_ path: String, mode: OpenMode, directIO: Bool, why: String) throws(StorageError)
        -> any StorageDevice
    {
        try open(path, mode: mode)
    }
    public func allocatedBytes(of path: String) -> UInt64? { nil }
    /// Simulated disks forget nothing they did not create; the default does nothing.
    public func removeCreatedFile(_ path: String) {}
    /// Simulated disks have no topology: nothing overlaps.
    public func stack(of path: String) throws(StorageError) -> StorageStack? { nil }
    /// Simulated disks have no other users.
    public func usage(of path: String) throws(StorageError) -> DeviceUsage? { nil }
}

extension StorageDevice {
    public var reportsHoles: Bool { info.identity.kind != .blockDevice }
    public var availability: SourceAvailability? { nil }
    public func waitForConnection(_ wait: Bool) {}
    public func probeConnection() throws(StorageError) {}
    public func holdWriteLease() throws(StorageError) {}
    public var leaseBroken: Bool { false }
    public func giveUpLease() {}
    /// Simulated disks have no page cache to bypass.
    public var directIO: DirectIO { .off("no page cache") }

    /// A simulated disk has no page cache: its read is what it holds.
    public func readBack(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(StorageError)
        -> ReadBackPath
    {
        try read(into: buffer, at: offset)
        return .device
    }

    /// Page-cache hints mean nothing to a simulated disk.
    public func startWriteback(offset: UInt64, length: UInt64) throws(StorageError) {}
    public func evict(offset: UInt64, length: UInt64) throws(StorageError) {}

    /// Writes a byte array (metadata blocks).
    public func write(bytes: [UInt8], at offset: UInt64) throws(StorageError) {
        do {
            try bytes.withUnsafeBytes { raw in try self.write(raw, at: offset) }
        } catch let e as StorageError { throw e } catch { preconditionFailure("only StorageError is thrown: \(error)") }
    }

    /// Reads `count` bytes into a new array.
    public func read(count: Int, at offset: UInt64) throws(StorageError) -> [UInt8] {
        var b = [UInt8](repeating: 0, count: count)
        do {
            try b.withUnsafeMutableBytes { raw in try self.read(into: raw, at: offset) }
        } catch let e as StorageError { throw e } catch { preconditionFailure("only StorageError is thrown: \(error)") }
        return b
    }
}
