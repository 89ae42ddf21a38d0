#if canImport(Glibc)
import Glibc
#endif
import CNBD
import Dispatch
import Synchronization

/// The storage layer's way to NBD exports (`RemoteSource` URIs): libnbd's client, plugged into
/// `PosixStorage` by the engine. It lives here, not in HydrationStorage, so that only what
/// links the engine links libnbd.
public struct NBDRemoteDevices: RemoteDevices {
    public init() {}
    public func open(_ uri: String, mode: OpenMode) throws(StorageError) -> any StorageDevice {
        try RemoteNBDDevice.open(uri, mode: mode)
    }
    public func identify(_ uri: String) throws(StorageError) -> DeviceInfo? {
        try RemoteNBDDevice.identify(uri)
    }
}

extension PosixStorage {
    /// The engine's storage: local files and block devices, and NBD exports through libnbd.
    public init(topology: DeviceTopology = DeviceTopology(), directIO: Bool? = nil) {
        self.init(topology: topology, directIO: directIO, remote: NBDRemoteDevices())
    }
}

/// What the server offered at the handshake.
struct NBDOffer: Sendable, Equatable {
    var size: UInt64
    var exportName: String
    var description: String?
    var canTrim: Bool
    var canFlush: Bool
    var canMultiConn: Bool
    var blockStatus: Bool
    var minimumBlock: Int
    var maximumRequest: Int
}

/// One libnbd handle (one connection).
///
/// `@unchecked Sendable`: the handle pointer is not Sendable to the compiler, but libnbd handles
/// are thread-safe (every libnbd call takes the handle's own lock), and `RemoteNBDDevice` hands a
/// connection to one borrowing thread at a time (its pool), so only that thread drives the handle
/// (issues, polls, retires commands) while it holds it. `handle` is set once at init and cleared
/// only by `close`, which the pool calls while holding the connection exclusively (or in deinit).
final class NBDConnection: @unchecked Sendable {
    private(set) var handle: OpaquePointer?
    let offer: NBDOffer

    private init(handle: OpaquePointer, offer: NBDOffer) {
        self.handle = handle
        self.offer = offer
    }

    deinit { close() }

    func close() {
        if let h = handle {
            nbd_close(h)
            handle = nil
        }
    }

    /// The last libnbd error of this thread, as an errno and a message.
    static func lastError(default e: Int32) -> (Int32, String) {
        let n = hyd_nbd_errno()
        return (n != 0 ? n : e, String(cString: hyd_nbd_error()))
    }

    /// Connects to `uri` and completes the handshake (blocking).
    static func connect(_ uri: String) throws(StorageError) -> NBDConnection {
        guard let h = nbd_create() else {
            let (e, m) = lastError(default: ENOMEM)
            throw StorageError(.open, path: uri, errno: e, detail: m)
        }
        var ok = false
        defer { if !ok { nbd_close(h) } }
        // The URI comes from the operator (the privileged control socket): a PSK file it names
        // may be read.
        _ = nbd_set_uri_allow_local_file(h, true)
        _ = nbd_add_meta_context(h, "base:allocation")
        // Ask for the export's description and block sizes (NBD_OPT_GO with NBD_INFO_*).
        _ = nbd_set_full_info(h, true)
        if nbd_connect_uri(h, uri) == -1 {
            let (e, m) = lastError(default: ECONNREFUSED)
            throw StorageError(.open, path: uri, errno: e, detail: m)
        }
        let size = nbd_get_size(h)
        if size < 0 {
            let (e, m) = lastError(default: EIO)
            throw StorageError(.stat, path: uri, errno: e, detail: m)
        }
        var name = ""
        if let p = nbd_get_export_name(h) { name = String(cString: p); free(p) }
        var description: String? = nil
        if let p = nbd_get_export_description(h) { description = String(cString: p); free(p) }
        let minimum = nbd_get_block_size(h, Int32(LIBNBD_SIZE_MINIMUM))
        let maximum = nbd_get_block_size(h, Int32(LIBNBD_SIZE_MAXIMUM))
        let offer = NBDOffer(
            size: UInt64(size), exportName: name, description: description,
            canTrim: nbd_can_trim(h) == 1, canFlush: nbd_can_flush(h) == 1, canMultiConn: nbd_can_multi_conn(h) == 1,
            blockStatus: nbd_can_meta_context(h, "base:allocation") == 1,
            minimumBlock: minimum > 0 ? Int(minimum) : 1,
            // libnbd refuses requests over 64 MiB; a server may want less.
            maximumRequest: maximum > 0 ? Int(min(maximum, 64 << 20)) : 32 << 20)
        ok = true
        return NBDConnection(handle: h, offer: offer)
    }
}

/// A remote NBD export used as a source, through libnbd.
///
/// - Reads split a batch into requests of at most `requestSize` with up to `requestsPerRead` in
///   flight on one connection; concurrent reads (the copier's batches) use separate connections
///   when the server offers multi-conn (up to `maxConnections`), else they take turns on one.
/// - `nextData` asks BLOCK_STATUS `base:allocation` (zero extents are holes) when offered;
///   otherwise the whole rest is data and the copier finds zeros by reading.
/// - `release` is NBD TRIM (refused at open with `discard` when the server cannot trim);
///   `sync` is NBD FLUSH when offered (with multi-conn it covers every connection; without it
///   there is only one connection).
/// - A lost connection: every call reconnects once at once (a blip costs nothing). If that fails,
///   reads and BLOCK_STATUS fail with ENOTCONN (`StorageError.isConnectionLost`: the job pauses
///   itself with `SourceUnavailable` and probes the source until it is back, see
///   `HydrationJob.watchSource`), while TRIM and FLUSH, while `waitForConnection(true)` (the job
///   hydrates), wait and reconnect with backoff (100 ms doubling to 2 s): a release must not be
///   given up because the network hiccupped, and the discarder is one caller, so at most one
///   I/O thread waits. `availability` says since when the source is down and why. A
///   reconnection must find the same export (size and description); anything else is not this
///   job's source and counts as still down. An NBD error reply (EIO from the server) is an
///   ordinary I/O error of that call.
final class RemoteNBDDevice: StorageDevice {
    /// A read with no reply for this long counts as a lost connection (the job pauses with
    /// `SourceUnavailable` and reconnects): a server that stops answering without closing its
    /// socket must not hold the job, its pause and its removal for ever (Tests/attacks/l13).
    /// `HYDRATION_NBD_TIMEOUT_MS` overrides the default of 30 s (tests).
    static let requestTimeoutMs: Int32 = {
        if let p = getenv("HYDRATION_NBD_TIMEOUT_MS"), let n = Int32(String(cString: p)), n > 0 { return n }
        return 30_000
    }()

    let info: DeviceInfo
    let uri: String
    let offer: NBDOffer
    let requestSize: Int
    let requestsPerRead: UInt32

    static let maxConnections = 8
    static let backoffStartMs: UInt64 = 100
    static let backoffMaxMs: UInt64 = 2000

    private struct State {
        var idle: [NBDConnection] = []
        var closed = false
        var waiting = false
        /// Bumped when waiting is switched off: waits in progress give up.
        var waitEpoch = 0
        var outage: SourceAvailability?
        /// BLOCK_STATUS answers: extents (length, data?) consecutive from `extentStart`.
        var extentStart: UInt64 = 0
        var extents: [(UInt64, Bool)] = []
    }
    private let state: Mutex<State>
    /// One permit per connection slot.
    private let slots: DispatchSemaphore

    private init(uri: String, first: NBDConnection) {
        self.uri = uri
        self.offer = first.offer
        let conns = first.offer.canMultiConn ? Self.maxConnections : 1
        self.requestSize = max(first.offer.minimumBlock, min(256 << 10, first.offer.maximumRequest))
        self.requestsPerRead = 16
        self.info = DeviceInfo(path: uri, identity: DeviceIdentity(kind: .remote, device: 0, inode: 0, rdev: 0),
                               size: first.offer.size, logicalBlockSize: max(1, first.offer.minimumBlock),
                               stableID: RemoteIdentity.baseID(first.offer))
        var s = State()
        s.idle = [first]
        self.state = Mutex(s)
        self.slots = DispatchSemaphore(value: conns)
    }

    /// The export at `uri`: what `identify` reports (one connection, closed again).
    static func identify(_ uri: String) throws(StorageError) -> DeviceInfo {
        let c = try NBDConnection.connect(uri)
        defer { c.close() }
        return DeviceInfo(path: uri, identity: DeviceIdentity(kind: .remote, device: 0, inode: 0, rdev: 0),
                          size: c.offer.size, logicalBlockSize: max(1, c.offer.minimumBlock),
                          stableID: RemoteIdentity.baseID(c.offer))
    }

    static func open(_ uri: String, mode: OpenMode) throws(StorageError) -> RemoteNBDDevice {
        let discard: Bool
        switch mode {
        case .source(let d): discard = d
        case .readOnly: discard = false
        case .destination, .metadata:
            throw StorageError(.open, path: uri, errno: EINVAL, detail: "an NBD export can only be a job's source")
        }
        let c = try NBDConnection.connect(uri)
        if discard && !c.offer.canTrim {
            c.close()
            throw StorageError(.open, path: uri, errno: EOPNOTSUPP,
                               detail: "the server does not offer TRIM (can_trim is false), so the source's space cannot be released")
        }
        return RemoteNBDDevice(uri: uri, first: c)
    }

    var availability: SourceAvailability? { state.withLock { $0.outage } }

    func waitForConnection(_ wait: Bool) {
        state.withLock { s in
            if s.waiting && !wait { s.waitEpoch += 1 }
            s.waiting = wait
        }
    }

    // MARK: the connection pool

    private enum Failure: Error {
        /// An NBD error reply: the connection is fine.
        case command(Int32, UInt64?, String)
        /// The connection is gone.
        case lost(Int32, String)
    }

    /// Runs `body` on a connection of its own, reconnecting when the connection is lost: once,
    /// or (`patient`, while waiting is on) with backoff until the source is back.
    private func withConnection<T>(_ op: StorageError.Operation, offset: UInt64?, length: UInt64?, patient: Bool = false,
                                   _ body: (OpaquePointer) throws(Failure) -> T) throws(StorageError) -> T {
        if state.withLock({ $0.closed }) { throw StorageError(op, path: uri, errno: EBADF, offset: offset, length: length) }
        // While the source is down, a read does not queue behind a release that waits for the
        // connection (one connection without multi-conn): it fails at once, holding no thread.
        while slots.wait(timeout: .now() + .milliseconds(50)) == .timedOut {
            let (closed, down) = state.withLock { ($0.closed, $0.outage) }
            if closed { throw StorageError(op, path: uri, errno: EBADF, offset: offset, length: length) }
            if !patient, let down {
                throw StorageError(op, path: uri, errno: ENOTCONN, offset: offset, length: length,
                                   detail: "the NBD server is unreachable: \(down.lastError)")
            }
        }
        defer { slots.signal() }
        var conn = state.withLock { s -> NBDConnection? in s.idle.popLast() }
        let epoch = state.withLock { $0.waitEpoch }
        var delayMs = Self.backoffStartMs
        var reconnects = 0
        while true {
            if conn == nil || conn?.handle == nil {
                reconnects += 1
                conn = try reconnect(op, offset: offset, length: length, epoch: patient ? epoch : nil, delayMs: &delayMs)
            }
            guard let c = conn, let h = c.handle else { continue }
            do {
                let r = try body(h)
                let back = c
                state.withLock { s in
                    s.outage = nil
                    if !s.closed { s.idle.append(back) }
                }
                return r
            } catch {
                switch error {
                case .command(let e, let at, let m):
                    let back = c
                    state.withLock { s in if !s.closed { s.idle.append(back) } }
                    throw StorageError(op, path: uri, errno: e, offset: at ?? offset, length: length, detail: m)
                case .lost(let e, let m):
                    // Nothing of this call is in flight once the handle is closed.
                    c.close()
                    conn = nil
                    noteOutage("\(op.rawValue): connection lost: \(m.isEmpty ? errnoSymbol(e) : m)")
                    let wait = patient && state.withLock { $0.waiting && $0.waitEpoch == epoch && !$0.closed }
                    if !wait && reconnects > 0 {
                        throw StorageError(op, path: uri, errno: ENOTCONN, offset: offset, length: length,
                                           detail: "connection to the NBD server lost: \(m)")
                    }
                }
            }
        }
    }

    private func noteOutage(_ why: String) {
        state.withLock { s in
            if s.outage == nil {
                s.outage = SourceAvailability(sinceUnixMs: wallClockMillis(), lastError: why, attempts: 0)
            } else {
                s.outage!.lastError = why
            }
        }
    }

    /// A new connection to the same export. With `epoch` (a patient call), while waiting is on
    /// and not withdrawn since, retries with backoff; otherwise one attempt.
    private func reconnect(_ op: StorageError.Operation, offset: UInt64?, length: UInt64?, epoch: Int?,
                           delayMs: inout UInt64) throws(StorageError) -> NBDConnection {
        while true {
            let why: String
            do {
                let c = try NBDConnection.connect(uri)
                if c.offer.size == offer.size && c.offer.description == offer.description {
                    return c
                }
                c.close()
                why = "the server at \(uri) now offers a different export (\(c.offer.size) bytes, was \(offer.size)); waiting for the job's own"
            } catch {
                why = "reconnecting: \(error)"
            }
            noteOutage(why)
            state.withLock { s in s.outage?.attempts += 1 }
            // Sleep in slices so that a pause or close is noticed at once.
            var slept: UInt64 = 0
            while slept < delayMs {
                let waitOn = epoch != nil && state.withLock { $0.waiting && $0.waitEpoch == epoch && !$0.closed }
                if !waitOn {
                    throw StorageError(op, path: uri, errno: ENOTCONN, offset: offset, length: length, detail: why)
                }
                usleep(20_000)
                slept += 20
            }
            delayMs = min(delayMs * 2, Self.backoffMaxMs)
        }
    }

    private static func failure(_ at: UInt64?, default e: Int32, handle h: OpaquePointer) -> Failure {
        let (n, m) = NBDConnection.lastError(default: e)
        // ESHUTDOWN is the server saying it is going away (nbdkit replies it to every request
        // after SIGTERM and keeps the socket open until the client leaves): the connection is as
        // good as lost, reconnect (to the restarted server) rather than keep the handle.
        if hyd_nbd_is_usable(h) != 0 && n != ESHUTDOWN { return .command(n, at, m) }
        return .lost(n, m)
    }

    // MARK: StorageDevice

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(StorageError) {
        guard let base = buffer.baseAddress, buffer.count > 0 else { return }
        let end = min(offset + UInt64(buffer.count), info.size)
        let n = offset < end ? Int(end - offset) : 0
        if n < buffer.count {
            // Past the end of the export: zeros, like a short file.
            (base + n).initializeMemory(as: UInt8.self, repeating: 0, count: buffer.count - n)
        }
        guard n > 0 else { return }
        let chunk = requestSize
        let depth = requestsPerRead
        try withConnection(.read, offset: offset, length: UInt64(n)) { (h) throws(Failure) in
            var err: Int32 = 0
            var failAt: UInt64 = 0
            let r = hyd_nbd_pread_chunked(h, base, n, offset, chunk, depth, Self.requestTimeoutMs, &err, &failAt)
            switch r {
            case HYD_NBD_OK: return
            case HYD_NBD_COMMAND_ERROR where err == ESHUTDOWN:
                // The server is shutting down (see `failure`): every command of the call has
                // completed, so the handle may be closed; the pool reconnects.
                throw .lost(err, String(cString: hyd_nbd_error()))
            case HYD_NBD_COMMAND_ERROR:
                throw .command(err, failAt, String(cString: hyd_nbd_error()))
            default:
                throw .lost(err, String(cString: hyd_nbd_error()))
            }
        }
    }

    func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(StorageError) {
        throw StorageError(.write, path: uri, errno: EBADF, offset: offset, length: UInt64(buffer.count), detail: "a remote source is never written")
    }

    func sync() throws(StorageError) {
        guard offer.canFlush else { return }
        try withConnection(.sync, offset: nil, length: nil, patient: true) { (h) throws(Failure) in
            if nbd_flush(h, 0) == -1 { throw Self.failure(nil, default: EIO, handle: h) }
        }
    }

    func release(offset: UInt64, length: UInt64) throws(StorageError) {
        guard length > 0 else { return }
        guard offer.canTrim else {
            throw StorageError(.release, path: uri, errno: EOPNOTSUPP, offset: offset, length: length, detail: "the server does not offer TRIM")
        }
        let end = min(offset + length, info.size)
        guard offset < end else { return }
        // NBD requests carry a 32-bit length.
        let step: UInt64 = 1 << 30
        var at = offset
        while at < end {
            let len = min(step, end - at)
            let start = at
            try withConnection(.release, offset: start, length: len, patient: true) { (h) throws(Failure) in
                if nbd_trim(h, len, start, 0) == -1 { throw Self.failure(start, default: EIO, handle: h) }
            }
            at += len
        }
    }

    func zeroOut(offset: UInt64, length: UInt64) throws(StorageError) {
        throw StorageError(.zeroOut, path: uri, errno: EBADF, offset: offset, length: length, detail: "a remote source is never written")
    }

    /// Extents (length, data?) consecutive from `at`, from the cache or one BLOCK_STATUS.
    private func extents(at: UInt64) throws(StorageError) -> [(UInt64, Bool)] {
        let cached: [(UInt64, Bool)]? = state.withLock { s in
            var pos = s.extentStart
            for (i, e) in s.extents.enumerated() {
                if at >= pos && at < pos + e.0 {
                    var out = Array(s.extents[i...])
                    out[0].0 = pos + e.0 - at
                    return out
                }
                pos += e.0
            }
            return nil
        }
        if let cached { return cached }
        let want = min(info.size - at, 1 << 30)
        let capacity = 4096
        let found = try withConnection(.seek, offset: at, length: want) { (h) throws(Failure) -> [(UInt64, Bool)] in
            var lengths = [UInt64](repeating: 0, count: capacity)
            var flags = [UInt32](repeating: 0, count: capacity)
            let n = lengths.withUnsafeMutableBufferPointer { l in
                flags.withUnsafeMutableBufferPointer { f in hyd_nbd_extents(h, at, want, l.baseAddress, f.baseAddress, capacity) }
            }
            if n < 0 { throw Self.failure(at, default: EIO, handle: h) }
            var out: [(UInt64, Bool)] = []
            for i in 0..<Int(n) where lengths[i] > 0 {
                // Zero extents (holes that read as zeros, and allocated zeros) need no copy.
                out.append((lengths[i], flags[i] & UInt32(LIBNBD_STATE_ZERO) == 0))
            }
            return out
        }
        if found.isEmpty {
            throw StorageError(.seek, path: uri, errno: EIO, offset: at, detail: "BLOCK_STATUS returned no extent")
        }
        state.withLock { s in s.extentStart = at; s.extents = found }
        return found
    }

    func nextData(from offset: UInt64) throws(StorageError) -> Range<UInt64>? {
        guard offset < info.size else { return nil }
        guard offer.blockStatus else { return offset..<info.size }
        var at = offset
        var dataStart: UInt64? = nil
        while at < info.size {
            for (length, isData) in try extents(at: at) {
                if isData {
                    if dataStart == nil { dataStart = at }
                } else if let s = dataStart {
                    return s..<at
                }
                at = min(info.size, at + length)
                // A long data extent is returned in pieces; the next call goes on from its end.
                if let s = dataStart, at - s >= 1 << 30 { return s..<at }
                if at >= info.size { break }
            }
        }
        return dataStart.map { $0..<info.size }
    }

    func dropCache(offset: UInt64, length: UInt64) {}

    /// One attempt at a working connection (the job's watcher, while the source is down).
    func probeConnection() throws(StorageError) {
        try withConnection(.open, offset: nil, length: nil) { (h) throws(Failure) in
            if hyd_nbd_is_usable(h) == 0 { throw .lost(ENOTCONN, "connection not usable") }
        }
    }

    func allocatedBytes() -> UInt64? { nil }

    func close() {
        let conns = state.withLock { s -> [NBDConnection] in
            s.closed = true
            s.waitEpoch += 1
            let c = s.idle
            s.idle = []
            return c
        }
        for c in conns { c.close() }
    }
}

/// The stable identity of a remote source: what the server says about the export, plus (recorded
/// at creation) a fingerprint of sampled 4 KiB blocks. The export name, size and description
/// alone do not tell two disks served under the same name apart; the samples do, and only samples
/// in regions that may not have been released are compared later.
enum RemoteIdentity {
    static let sampleCount = 8
    static let sampleSize = 4096

    /// `nbd:export=…;size=…;desc=…` (the name and description hashed when long).
    static func baseID(_ offer: NBDOffer) -> String {
        let name = offer.exportName.utf8.count <= 64 && !offer.exportName.contains(";")
            ? offer.exportName : "crc32c:" + hex32(CRC32C.checksum(Array(offer.exportName.utf8)))
        let desc = offer.description.map { hex32(CRC32C.checksum(Array($0.utf8))) } ?? "none"
        return "nbd:export=\(name);size=\(offer.size);desc=\(desc)"
    }

    static func hex32(_ v: UInt32) -> String {
        let s = String(v, radix: 16)
        return String(repeating: "0", count: 8 - s.count) + s
    }

    struct Sample: Equatable, Sendable {
        var offset: UInt64
        var crc: UInt32
    }

    /// Splits a recorded stable ID into its base and its samples.
    static func parse(_ id: String) -> (base: String, samples: [Sample]) {
        guard let r = id.range(of: ";fp=") else { return (id, []) }
        let base = String(id[..<r.lowerBound])
        var samples: [Sample] = []
        for item in id[r.upperBound...].split(separator: ",") {
            let parts = item.split(separator: ":")
            guard parts.count == 2, let block = UInt64(parts[0], radix: 16), let crc = UInt32(parts[1], radix: 16) else { continue }
            samples.append(Sample(offset: block * UInt64(sampleSize), crc: crc))
        }
        return (base, samples)
    }

    static func format(base: String, samples: [Sample]) -> String {
        guard !samples.isEmpty else { return base }
        return base + ";fp=" + samples.map { "\(String($0.offset / UInt64(sampleSize), radix: 16)):\(hex32($0.crc))" }.joined(separator: ",")
    }

    /// Where to sample: one block per eighth of the export, at the first data (BLOCK_STATUS) in
    /// that eighth when there is some, so that a sparse disk is not fingerprinted by its zeros.
    /// Only blocks `mayRead` allows are chosen. Blocking (reads the device).
    static func chooseSamples(_ device: any StorageDevice, mayRead: (Range<UInt64>) -> Bool) throws(StorageError) -> [Sample] {
        let size = device.info.size
        let block = UInt64(sampleSize)
        guard size >= block else { return [] }
        var out: [Sample] = []
        for k in 0..<sampleCount {
            let lo = (size * UInt64(k) / UInt64(sampleCount)) / block * block
            let hi = size * UInt64(k + 1) / UInt64(sampleCount)
            var at = lo
            if let d = try device.nextData(from: lo), d.lowerBound < hi {
                at = d.lowerBound / block * block
            }
            if at + block > size { at = (size - block) / block * block }
            let range = at..<at + block
            guard mayRead(range), !out.contains(where: { $0.offset == at }) else { continue }
            out.append(Sample(offset: at, crc: try crc(device, at)))
        }
        return out
    }

    static func crc(_ device: any StorageDevice, _ offset: UInt64) throws(StorageError) -> UInt32 {
        CRC32C.checksum(try device.read(count: sampleSize, at: offset))
    }
}
