import NIOCore

/// What an export can do; the server turns it into transmission flags and refuses (EINVAL) the
/// commands and flags an export does not offer, so an export is only called for what it declares.
public struct NBDExportCapabilities: OptionSet, Sendable, Hashable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    /// Writes, trims and zeroes are refused with EPERM.
    public static let readOnly = NBDExportCapabilities(rawValue: 1 << 0)
    /// `flush()` makes completed writes durable (NBD_FLAG_SEND_FLUSH).
    public static let flush = NBDExportCapabilities(rawValue: 1 << 1)
    /// The `fua` argument is honoured (NBD_FLAG_SEND_FUA).
    public static let fua = NBDExportCapabilities(rawValue: 1 << 2)
    /// `trim` (NBD_FLAG_SEND_TRIM).
    public static let trim = NBDExportCapabilities(rawValue: 1 << 3)
    /// `writeZeroes` (NBD_FLAG_SEND_WRITE_ZEROES).
    public static let writeZeroes = NBDExportCapabilities(rawValue: 1 << 4)
    /// `writeZeroes` answers `fastZero` requests (with `.ENOTSUP` when it would be slow).
    public static let fastZero = NBDExportCapabilities(rawValue: 1 << 5)
    /// `cache` (NBD_FLAG_SEND_CACHE).
    public static let cache = NBDExportCapabilities(rawValue: 1 << 6)
    /// Flush and FUA on one connection are visible on every other one (NBD_FLAG_CAN_MULTI_CONN).
    public static let multiConn = NBDExportCapabilities(rawValue: 1 << 7)
    public static let rotational = NBDExportCapabilities(rawValue: 1 << 8)
}

/// One `NBD_REPLY_TYPE_BLOCK_STATUS` descriptor: `length` bytes (non-zero) with context `flags`.
public struct NBDExtent: Sendable, Equatable {
    public var length: UInt32
    public var flags: UInt32
    public init(length: UInt32, flags: UInt32) {
        self.length = length
        self.flags = flags
    }
}

/// Size constraints advertised with NBD_INFO_BLOCK_SIZE (spec, "Size constraints").
public struct NBDBlockSize: Sendable, Equatable {
    /// Power of 2, 1...65536. Requests not aligned to it are refused with EINVAL.
    public var minimum: UInt32
    /// Power of 2, at least max(minimum, 512).
    public var preferred: UInt32
    /// Largest read or write payload; at least `preferred`. The server caps it at its own limit.
    public var maximum: UInt32

    public init(minimum: UInt32 = 1, preferred: UInt32 = 4096, maximum: UInt32 = NBDProtocol.defaultMaxPayload) {
        self.minimum = minimum
        self.preferred = preferred
        self.maximum = maximum
    }
}

/// Something the NBD server serves. The server validates every request before calling (range
/// inside `size`, alignment to `blockSize.minimum`, length within `blockSize.maximum` for reads
/// and writes, the command and its flags offered by `capabilities`), so an implementation only
/// does the I/O. Requests run concurrently, several per connection and across connections.
///
/// Methods must never block a cooperative thread: do blocking system calls on threads of their own
/// (an I/O executor, `NIOThreadPool`).
/// A thrown `NBDError` becomes the request's error reply; the connection goes on.
public protocol NBDExport: Sendable {
    /// The name clients give (`nbd+unix:///NAME?socket=...`); unique in a registry.
    var name: String { get }
    /// Export size in bytes. Fixed for the life of a connection (read at OPT_GO).
    var size: UInt64 { get }
    /// Shown by `nbdinfo --list` and NBD_INFO_DESCRIPTION.
    var description: String? { get }
    var capabilities: NBDExportCapabilities { get }
    var blockSize: NBDBlockSize { get }
    /// Metadata contexts `blockStatus` can answer: `base:allocation` and/or private `x-NAME:LEAF` ones.
    var metaContexts: [String] { get }

    /// Exactly `length` bytes at `offset`.
    func read(offset: UInt64, length: UInt32) async throws(NBDError) -> ByteBuffer
    /// Writes all of `data` at `offset`; with `fua`, durable before returning.
    func write(offset: UInt64, data: ByteBuffer, fua: Bool) async throws(NBDError)
    /// Makes every completed write durable.
    func flush() async throws(NBDError)
    /// May discard the range (a hint; contents afterwards are unspecified).
    func trim(offset: UInt64, length: UInt32, fua: Bool) async throws(NBDError)
    /// Makes the range read as zeros; `noHole`: keep it allocated; `fastZero`: fail quickly with
    /// `.ENOTSUP` rather than be slower than writing zeros.
    func writeZeroes(offset: UInt64, length: UInt32, noHole: Bool, fastZero: Bool, fua: Bool) async throws(NBDError)
    /// A hint that the range will be read soon.
    func cache(offset: UInt64, length: UInt32) async throws(NBDError)
    /// Consecutive extents starting at `offset` for `context` (one of `metaContexts`): at least one,
    /// each non-zero; they may cover less or (last one) more than `length`; the server trims them.
    func blockStatus(context: String, offset: UInt64, length: UInt32) async throws(NBDError) -> [NBDExtent]
}

extension NBDExport {
    public var description: String? { nil }
    public var blockSize: NBDBlockSize { NBDBlockSize() }
    public var metaContexts: [String] { [NBDProtocol.baseAllocation] }

    public func write(offset: UInt64, data: ByteBuffer, fua: Bool) async throws(NBDError) {
        throw NBDError(.EPERM, "\(name) is read-only")
    }
    public func flush() async throws(NBDError) {}
    public func trim(offset: UInt64, length: UInt32, fua: Bool) async throws(NBDError) {}
    public func writeZeroes(offset: UInt64, length: UInt32, noHole: Bool, fastZero: Bool, fua: Bool)
        async throws(NBDError)
    {
        throw NBDError(.ENOTSUP, "write zeroes is not supported")
    }
    public func cache(offset: UInt64, length: UInt32) async throws(NBDError) {}
    /// Everything allocated data: always correct (spec: status 0 is always safe).
    public func blockStatus(context: String, offset: UInt64, length: UInt32) async throws(NBDError) -> [NBDExtent] {
        [NBDExtent(length: length, flags: 0)]
    }
}
