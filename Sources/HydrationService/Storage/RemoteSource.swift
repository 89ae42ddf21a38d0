import CNBD
import Dispatch
import HydrationEngine
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

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

    /// Connects to `uri` and completes the handshake (blocking, at most
    /// `RemoteNBDDevice.connectTimeoutMs`; `cancel`: a generation counter whose move from `snap`
    /// ends the attempt, see `RemoteNBDDevice`).
    static func connect(_ uri: String, cancel: UnsafePointer<Int32>? = nil, snap: Int32 = 0) throws(StorageError)
        -> NBDConnection
    {
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
        var err: Int32 = 0
        let timeout = RemoteNBDDevice.connectTimeoutMs
        if hyd_nbd_connect_uri(h, uri, timeout, cancel, snap, &err) == -1 {
            let m: String
            switch err {
            case ETIMEDOUT:
                m =
                    "no NBD handshake within \(timeout) ms (the server accepted the connection, or the network dropped it, but it did not complete the NBD negotiation)"
            case ECANCELED:
                m = "connection attempt withdrawn"
            default:
                m = String(cString: hyd_nbd_error())
            }
            throw StorageError(.open, path: uri, errno: err, detail: m)
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

/// A counter the shim's poll loops read while they wait (`hyd_cancelled`).
///
/// `@unchecked Sendable`: the pointee is only ever read and written with the shim's atomic
/// `hyd_atomic_load`/`hyd_atomic_store` (C11 `__atomic` builtins), never through Swift; the
/// pointer itself is set once at init and freed in deinit, when no call can use it any more.
final class CancelGeneration: @unchecked Sendable {
    let pointer: UnsafeMutablePointer<Int32>
    init() {
        pointer = .allocate(capacity: 1)
        pointer.initialize(to: 0)
    }
    deinit { pointer.deallocate() }
}

/// A remote NBD export used as a source, through libnbd.
///
/// - Reads split a batch into requests of at most `requestSize` with up to `requestsPerRead` in
///   flight on one connection; concurrent reads (the copier's batches) use separate connections
///   when the server offers multi-conn (up to `maxConnections`), else they take turns on one.
///   A read that does not start and end on the server's minimum block size is widened to it
///   (a server that needs 4 KiB alignment refuses a guest's 512-byte read with EINVAL).
/// - `nextData` asks BLOCK_STATUS `base:allocation` (zero extents are holes) when offered;
///   otherwise the whole rest is data and the copier finds zeros by reading.
/// - `release` is NBD TRIM (refused at open with `discard` when the server cannot trim);
///   `sync` is NBD FLUSH when offered (with multi-conn it covers every connection; without it
///   there is only one connection).
/// - Deadlines: a connection attempt (connect, TLS, NBD handshake) ends after `connectTimeoutMs`;
///   a request with no reply for `requestTimeoutMs` counts as a lost connection; once a call has
///   found the server unresponsive, or the job pauses or closes (`waitForConnection(false)`),
///   calls that have had no reply for a second give up too (`cancelGeneration`).
/// - A lost connection: a call reconnects once at once when the connection was closed (a blip
///   costs nothing), not when the server stopped answering. If that fails, reads and
///   BLOCK_STATUS fail with ENOTCONN (`StorageError.isConnectionLost`: the job pauses itself
///   with `SourceUnavailable` and probes the source until it is back, see
///   `HydrationJob.watchSource`), while TRIM and FLUSH, while `waitForConnection(true)` (the job
///   hydrates), wait and reconnect with backoff (100 ms doubling to 2 s): a release must not be
///   given up because the network hiccupped, and the discarder is one caller, so at most one
///   I/O thread waits. `availability` says since when the source is down and why.
/// - Identity: every new connection, before any read or release goes to it, must find the same
///   export (name, size, description, flags and block sizes) and the same bytes at every
///   witness block (`armIdentity`: the recorded fingerprint, random blocks, recently read
///   blocks; a block is dropped from the witnesses before it is released). Otherwise the device
///   is *unconfirmed* for good: the connection is closed unused and every call, now and later,
///   fails with `ESTALE` (`isUnconfirmedSource`; the job stops with `DeviceUnconfirmed`).
///   An NBD error reply (EIO from the server) is an ordinary I/O error of that call.
final class RemoteNBDDevice: StorageDevice {
    /// A read with no reply for this long counts as a lost connection (the job pauses with
    /// `SourceUnavailable` and reconnects): a server that stops answering without closing its
    /// socket must not hold the job, its pause and its removal for ever (Tests/attacks/l13).
    /// `HYDRATION_NBD_TIMEOUT_MS` overrides the default of 30 s (tests).
    static let requestTimeoutMs: Int32 = {
        if let p = getenv("HYDRATION_NBD_TIMEOUT_MS"), let n = Int32(String(cString: p)), n > 0 { return n }
        return 30_000
    }()

    /// A connection attempt (TCP or Unix connect, TLS, NBD handshake) that has not completed
    /// after this long fails with ETIMEDOUT: a port that accepts and never greets (a typo'd port,
    /// a proxy, a frozen server whose kernel still accepts) must not hold a thread.
    /// `HYDRATION_NBD_CONNECT_TIMEOUT_MS` overrides the default of 10 s.
    static let connectTimeoutMs: Int32 = {
        if let p = getenv("HYDRATION_NBD_CONNECT_TIMEOUT_MS"), let n = Int32(String(cString: p)), n > 0 { return n }
        return 10_000
    }()

    let info: DeviceInfo
    let uri: String
    let offer: NBDOffer
    let requestSize: Int
    let requestsPerRead: UInt32

    static let maxConnections = 8
    static let backoffStartMs: UInt64 = 100
    static let backoffMaxMs: UInt64 = 2000
    /// Witnesses: random blocks taken when the identity is armed, and recently read blocks.
    static let randomWitnesses = 8
    static let recentWitnesses = 16
    static let witnessSize = 4096

    /// A 4 KiB block whose checksum every new connection must find again.
    struct Witness: Equatable, Sendable {
        enum Kind: Sendable { case recorded, random, recent }
        var offset: UInt64
        var crc: UInt32
        var kind: Kind
        func overlaps(_ lo: UInt64, _ hi: UInt64) -> Bool {
            offset < hi && lo < offset + UInt64(RemoteNBDDevice.witnessSize)
        }
    }

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
        var witnesses: [Witness] = []
        /// Set once a new connection found another disk: nothing is read or released any more.
        var unconfirmed: String?
    }
    private let state: Mutex<State>
    /// One permit per connection slot.
    private let slots: DispatchSemaphore
    /// Moved (under `state`'s lock) when calls stuck without a reply should give up: the
    /// server was found unresponsive, or waiting is switched off (pause, close). Read by the
    /// libnbd poll loops of the shim atomically (`hyd_atomic_load`).
    private let cancel = CancelGeneration()
    private var cancelGeneration: UnsafeMutablePointer<Int32> { cancel.pointer }

    private init(uri: String, first: NBDConnection) {
        self.uri = uri
        self.offer = first.offer
        let conns = first.offer.canMultiConn ? Self.maxConnections : 1
        let minimum = max(1, first.offer.minimumBlock)
        self.requestSize = max(minimum, min(256 << 10, first.offer.maximumRequest) / minimum * minimum)
        self.requestsPerRead = 16
        self.info = DeviceInfo(
            path: uri, identity: DeviceIdentity(kind: .remote, device: 0, inode: 0, rdev: 0),
            size: first.offer.size, logicalBlockSize: minimum,
            stableID: RemoteIdentity.baseID(first.offer))
        var s = State()
        s.idle = [first]
        self.state = Mutex(s)
        self.slots = DispatchSemaphore(value: conns)
    }

    deinit {
        for c in state.withLock({ $0.idle }) { c.close() }
    }

    /// Calls stuck without a reply give up (see `cancelGeneration`). Under `state`'s lock.
    private func bumpCancel() {
        hyd_atomic_store(cancelGeneration, hyd_atomic_load(cancelGeneration) &+ 1)
    }

    /// The export at `uri`: what `identify` reports (one connection, closed again).
    static func identify(_ uri: String) throws(StorageError) -> DeviceInfo {
        let c = try NBDConnection.connect(uri)
        defer { c.close() }
        return DeviceInfo(
            path: uri, identity: DeviceIdentity(kind: .remote, device: 0, inode: 0, rdev: 0),
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
            throw StorageError(
                .open, path: uri, errno: EOPNOTSUPP,
                detail: "the server does not offer TRIM (can_trim is false), so the source's space cannot be released")
        }
        return RemoteNBDDevice(uri: uri, first: c)
    }

    var availability: SourceAvailability? { state.withLock { $0.outage } }

    /// Why the source is not the job's any more (a reconnection found another disk), if so.
    var unconfirmedReason: String? { state.withLock { $0.unconfirmed } }

    func waitForConnection(_ wait: Bool) {
        state.withLock { s in
            if !wait {
                if s.waiting { s.waitEpoch += 1 }
                // A pause or close: calls stuck on a server that stopped answering end now.
                bumpCancel()
            }
            s.waiting = wait
        }
    }

    // MARK: identity

    /// What every new connection must find again from now on: the recorded fingerprint's
    /// `recorded` samples (those that may still be read), plus `randomWitnesses` blocks chosen
    /// at random where `mayRead` allows and the source has data, read now. Blocking.
    func armIdentity(recorded: [RemoteIdentity.Sample], mayRead: (Range<UInt64>) -> Bool) throws(StorageError) {
        let block = UInt64(Self.witnessSize)
        var out = recorded.filter { $0.offset + block <= info.size && mayRead($0.offset..<$0.offset + block) }
            .map { Witness(offset: $0.offset, crc: $0.crc, kind: .recorded) }
        let blocks = info.size / block
        var tries = 0
        var added = 0
        var rng = SystemRandomNumberGenerator()
        while blocks > 0 && added < Self.randomWitnesses && tries < Self.randomWitnesses * 4 {
            tries += 1
            var at = UInt64.random(in: 0..<blocks, using: &rng) * block
            // A sparse disk: the next data, so that the witness is not a hole (zeros match any hole).
            if let d = try nextData(from: at) { at = d.lowerBound / block * block } else { continue }
            guard at + block <= info.size, mayRead(at..<at + block), !out.contains(where: { $0.offset == at }) else {
                continue
            }
            let bytes = try read(count: Self.witnessSize, at: at)
            if bytes.allSatisfy({ $0 == 0 }) { continue }
            out.append(Witness(offset: at, crc: bytes.withUnsafeBytes { CRC32C.checksum($0) }, kind: .random))
            added += 1
        }
        state.withLock { s in
            // Recent witnesses taken by the reads above stay.
            s.witnesses =
                out + s.witnesses.filter { w in w.kind == .recent && !out.contains(where: { $0.offset == w.offset }) }
        }
    }

    var witnessesForTesting: [Witness] { state.withLock { $0.witnesses } }

    /// A block of a successful read becomes a witness (not a block of zeros: it would match any hole).
    private func noteRecent(_ base: UnsafeRawPointer, count: Int, at offset: UInt64) {
        let block = Self.witnessSize
        let first = (offset + UInt64(block) - 1) / UInt64(block) * UInt64(block)
        guard first + UInt64(block) <= offset + UInt64(count) else { return }
        let n = Int((offset + UInt64(count) - first) / UInt64(block))
        let at = first + UInt64(Int.random(in: 0..<n)) * UInt64(block)
        let p = UnsafeRawBufferPointer(start: base + Int(at - offset), count: block)
        if !p.contains(where: { $0 != 0 }) { return }
        let w = Witness(offset: at, crc: CRC32C.checksum(p), kind: .recent)
        state.withLock { s in
            guard s.unconfirmed == nil, !s.witnesses.contains(where: { $0.offset == at }) else { return }
            s.witnesses.append(w)
            let recent = s.witnesses.indices.filter { s.witnesses[$0].kind == .recent }
            if recent.count > Self.recentWitnesses { s.witnesses.remove(at: recent[0]) }
        }
    }

    /// Is the server behind `c` (a new connection) still this job's export? Returns nil when it
    /// is, the reason when it is another (the caller makes the device unconfirmed); throws when
    /// it could not tell (the connection failed: still down).
    private func differences(_ c: NBDConnection, snap: Int32) throws(Failure) -> String? {
        let o = c.offer
        var diffs: [String] = []
        if o.size != offer.size { diffs.append("\(o.size) bytes, was \(offer.size)") }
        if o.exportName != offer.exportName { diffs.append("export name '\(o.exportName)', was '\(offer.exportName)'") }
        if o.description != offer.description {
            diffs.append(
                "description \(o.description.map { "'\($0)'" } ?? "none"), was \(offer.description.map { "'\($0)'" } ?? "none")"
            )
        }
        if o.canTrim != offer.canTrim || o.canFlush != offer.canFlush || o.canMultiConn != offer.canMultiConn
            || o.blockStatus != offer.blockStatus
        {
            diffs.append(
                "flags trim=\(o.canTrim) flush=\(o.canFlush) multi-conn=\(o.canMultiConn) block-status=\(o.blockStatus), were \(offer.canTrim) \(offer.canFlush) \(offer.canMultiConn) \(offer.blockStatus)"
            )
        }
        if o.minimumBlock != offer.minimumBlock || o.maximumRequest != offer.maximumRequest {
            diffs.append(
                "block sizes \(o.minimumBlock)..\(o.maximumRequest), were \(offer.minimumBlock)..\(offer.maximumRequest)"
            )
        }
        if !diffs.isEmpty { return "it now offers another export (" + diffs.joined(separator: "; ") + ")" }
        guard let h = c.handle else { throw .lost(ENOTCONN, "connection closed") }
        let witnesses = state.withLock { $0.witnesses }
        var mismatched: [Witness] = []
        for w in witnesses {
            let crc = try readBlockCRC(h, at: w.offset, snap: snap)
            if crc != w.crc { mismatched.append(Witness(offset: w.offset, crc: crc, kind: w.kind)) }
        }
        // A witness released meanwhile (by another connection) no longer has to match.
        let still = state.withLock { s in mismatched.filter { m in s.witnesses.contains { $0.offset == m.offset } } }
        guard !still.isEmpty else { return nil }
        let shown = still.prefix(4).map { "block at \($0.offset) (\($0.kind))" }.joined(separator: ", ")
        return
            "\(still.count) of \(witnesses.count) witness blocks differ (\(shown)): it serves another disk of the same size"
    }

    /// The CRC32C of the 4 KiB block at `offset` read on `h` (widened to the minimum block size).
    private func readBlockCRC(_ h: OpaquePointer, at offset: UInt64, snap: Int32) throws(Failure) -> UInt32 {
        let m = UInt64(max(1, offer.minimumBlock))
        let lo = offset / m * m
        let hi = min(info.size, (offset + UInt64(Self.witnessSize) + m - 1) / m * m)
        let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(hi - lo), alignment: 4096)
        defer { buf.deallocate() }
        try preadOn(h, buf.baseAddress!, count: Int(hi - lo), at: lo, snap: snap)
        return CRC32C.checksum(
            UnsafeRawBufferPointer(rebasing: buf[Int(offset - lo)..<Int(offset - lo) + Self.witnessSize]))
    }

    /// The shim's chunked read on a handle this thread holds, with the request deadline.
    private func preadOn(
        _ h: OpaquePointer, _ base: UnsafeMutableRawPointer, count n: Int, at offset: UInt64, snap: Int32
    ) throws(Failure) {
        var err: Int32 = 0
        var failAt: UInt64 = 0
        let r = hyd_nbd_pread_chunked(
            h, base, n, offset, requestSize, requestsPerRead, Self.requestTimeoutMs,
            cancelGeneration, snap, &err, &failAt)
        switch r {
        case HYD_NBD_OK: return
        case HYD_NBD_COMMAND_ERROR where err == ESHUTDOWN:
            // The server is shutting down (see `failure`): every command of the call has
            // completed, so the handle may be closed; the pool reconnects.
            throw .lost(err, String(cString: hyd_nbd_error()))
        case HYD_NBD_COMMAND_ERROR:
            throw .command(err, failAt, String(cString: hyd_nbd_error()))
        default:
            throw .lost(err, Self.lostMessage(err))
        }
    }

    static func lostMessage(_ err: Int32) -> String {
        switch err {
        case ETIMEDOUT: return "no reply from the NBD server for \(requestTimeoutMs) ms"
        case ECANCELED:
            return
                "no reply from the NBD server, and the wait was withdrawn (the server was found unresponsive, or the job paused or closed)"
        default:
            let m = String(cString: hyd_nbd_error())
            return m.isEmpty ? errnoSymbol(err) : m
        }
    }

    // MARK: the connection pool

    private enum Failure: Error {
        /// An NBD error reply: the connection is fine.
        case command(Int32, UInt64?, String)
        /// The connection is gone.
        case lost(Int32, String)
    }

    private func unconfirmedError(_ op: StorageError.Operation, _ why: String, offset: UInt64?, length: UInt64?)
        -> StorageError
    {
        StorageError(
            op, path: uri, errno: ESTALE, offset: offset, length: length,
            detail:
                "the NBD server at \(uri) is not the job's source any more: \(why). Nothing more is read from or released on it"
        )
    }

    /// Runs `body` on a connection of its own, reconnecting when the connection is lost: once,
    /// or (`patient`, while waiting is on) with backoff until the source is back. `body` gets
    /// the handle and the cancel generation at the call's start.
    private func withConnection<T>(
        _ op: StorageError.Operation, offset: UInt64?, length: UInt64?, patient: Bool = false,
        _ body: (OpaquePointer, Int32) throws(Failure) -> T
    ) throws(StorageError) -> T {
        func check() throws(StorageError) {
            let (closed, unconfirmed) = state.withLock { ($0.closed, $0.unconfirmed) }
            if closed { throw StorageError(op, path: uri, errno: EBADF, offset: offset, length: length) }
            if let unconfirmed { throw unconfirmedError(op, unconfirmed, offset: offset, length: length) }
        }
        try check()
        // While the source is down, a read does not queue behind a release that waits for the
        // connection (one connection without multi-conn): it fails at once, holding no thread.
        while slots.wait(timeout: .now() + .milliseconds(50)) == .timedOut {
            try check()
            if !patient, let down = state.withLock({ $0.outage }) {
                throw StorageError(
                    op, path: uri, errno: ENOTCONN, offset: offset, length: length,
                    detail: "the NBD server is unreachable: \(down.lastError)")
            }
        }
        defer { slots.signal() }
        try check()
        let snap = state.withLock { _ in hyd_atomic_load(cancelGeneration) }
        var conn = state.withLock { s -> NBDConnection? in s.idle.popLast() }
        let epoch = state.withLock { $0.waitEpoch }
        var delayMs = Self.backoffStartMs
        var reconnects = 0
        var unresponsive = false
        while true {
            if conn == nil || conn?.handle == nil {
                reconnects += 1
                conn = try reconnect(
                    op, offset: offset, length: length, epoch: patient ? epoch : nil, delayMs: &delayMs)
            }
            guard let c = conn, let h = c.handle else { continue }
            let result: T
            do throws(Failure) {
                result = try body(h, snap)
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
                    // No reply (rather than a closed connection): the server is frozen or cut
                    // off; a reconnection at once would only wait again.
                    unresponsive = e == ETIMEDOUT || e == ECANCELED
                    noteOutage("\(op.rawValue): connection lost: \(m.isEmpty ? errnoSymbol(e) : m)")
                    let wait = patient && state.withLock { $0.waiting && $0.waitEpoch == epoch && !$0.closed }
                    if !wait && (reconnects > 0 || unresponsive) {
                        throw StorageError(
                            op, path: uri, errno: ENOTCONN, offset: offset, length: length,
                            detail: "connection to the NBD server lost: \(m)")
                    }
                }
                continue
            }
            let back = c
            let refused = state.withLock { s -> String? in
                // Another connection found another disk meanwhile: this answer is not used.
                if let u = s.unconfirmed { return u }
                s.outage = nil
                if !s.closed { s.idle.append(back) }
                return nil
            }
            if let refused { throw unconfirmedError(op, refused, offset: offset, length: length) }
            return result
        }
    }

    private func noteOutage(_ why: String) {
        state.withLock { s in
            if s.outage == nil {
                s.outage = SourceAvailability(sinceUnixMs: wallClockMillis(), lastError: why, attempts: 0)
                // Other calls stuck on the same server give up rather than each wait for its own timeout.
                bumpCancel()
            } else {
                s.outage!.lastError = why
            }
        }
    }

    /// A new connection to the same export, confirmed (`differences`) before it is used. With
    /// `epoch` (a patient call), while waiting is on and not withdrawn since, retries with
    /// backoff; otherwise one attempt. Another disk makes the device unconfirmed (ESTALE).
    private func reconnect(
        _ op: StorageError.Operation, offset: UInt64?, length: UInt64?, epoch: Int?,
        delayMs: inout UInt64
    ) throws(StorageError) -> NBDConnection {
        while true {
            let why: String
            var connected = false
            let snap = state.withLock { _ in hyd_atomic_load(cancelGeneration) }
            do {
                let c = try NBDConnection.connect(uri, cancel: UnsafePointer(cancelGeneration), snap: snap)
                connected = true
                do {
                    if let other = try differences(c, snap: snap) {
                        c.close()
                        let reason = "the server at \(uri) was reconnected and \(other)"
                        state.withLock { s in
                            if s.unconfirmed == nil { s.unconfirmed = reason }
                            if s.outage == nil {
                                s.outage = SourceAvailability(
                                    sinceUnixMs: wallClockMillis(), lastError: reason, attempts: 1)
                            } else {
                                s.outage!.lastError = reason
                            }
                            bumpCancel()
                        }
                        throw unconfirmedError(op, reason, offset: offset, length: length)
                    }
                    return c
                } catch let f as Failure {
                    c.close()
                    switch f {
                    case .lost(let e, let m):
                        why = "reconnecting: confirming the export: \(m.isEmpty ? errnoSymbol(e) : m)"
                    case .command(let e, let at, let m):
                        // The server answers, but a witness block cannot be read (an error
                        // reply): an I/O error of this call, as a read of that block would be;
                        // the disk stays unconfirmed on this connection, which is not used.
                        throw StorageError(
                            op, path: uri, errno: e, offset: at ?? offset, length: length,
                            detail: "reading a witness block to confirm the export after reconnecting: \(m)")
                    }
                }
            } catch let e as StorageError where connected {
                // Another disk (ESTALE), or an error reply while confirming: not an outage.
                throw e
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

    private static func outcome(_ r: Int32, _ err: Int32, at: UInt64?) -> Failure? {
        switch r {
        case HYD_NBD_OK: return nil
        // ESHUTDOWN is the server saying it is going away (nbdkit replies it to every request
        // after SIGTERM and keeps the socket open until the client leaves): the connection is as
        // good as lost, reconnect (to the restarted server) rather than keep the handle.
        case HYD_NBD_COMMAND_ERROR where err != ESHUTDOWN: return .command(err, at, String(cString: hyd_nbd_error()))
        default: return .lost(err, lostMessage(err))
        }
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
        let m = UInt64(max(1, offer.minimumBlock))
        let lo = offset / m * m
        let hi = min(info.size, (end + m - 1) / m * m)
        if lo == offset && hi == end {
            try withConnection(.read, offset: offset, length: UInt64(n)) { (h, snap) throws(Failure) in
                try preadOn(h, base, count: n, at: offset, snap: snap)
            }
            noteRecent(base, count: n, at: offset)
            return
        }
        // Widened to the server's minimum block size, then the asked part copied out.
        let wide = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(hi - lo), alignment: 4096)
        defer { wide.deallocate() }
        try withConnection(.read, offset: offset, length: UInt64(n)) { (h, snap) throws(Failure) in
            try preadOn(h, wide.baseAddress!, count: Int(hi - lo), at: lo, snap: snap)
        }
        base.copyMemory(from: wide.baseAddress! + Int(offset - lo), byteCount: n)
        noteRecent(UnsafeRawPointer(wide.baseAddress!), count: Int(hi - lo), at: lo)
    }

    func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(StorageError) {
        throw StorageError(
            .write, path: uri, errno: EBADF, offset: offset, length: UInt64(buffer.count),
            detail: "a remote source is never written")
    }

    func sync() throws(StorageError) {
        guard offer.canFlush else { return }
        try withConnection(.sync, offset: nil, length: nil, patient: true) { (h, snap) throws(Failure) in
            var err: Int32 = 0
            if let f = Self.outcome(hyd_nbd_flush(h, Self.requestTimeoutMs, cancelGeneration, snap, &err), err, at: nil)
            {
                throw f
            }
        }
    }

    func release(offset: UInt64, length: UInt64) throws(StorageError) {
        guard length > 0 else { return }
        guard offer.canTrim else {
            throw StorageError(
                .release, path: uri, errno: EOPNOTSUPP, offset: offset, length: length,
                detail: "the server does not offer TRIM")
        }
        let end = min(offset + length, info.size)
        guard offset < end else { return }
        // Once released, a block reads differently: it is no witness any more (before the TRIM
        // is sent, so a reconnection running meanwhile does not count it against the server).
        state.withLock { s in s.witnesses.removeAll { $0.overlaps(offset, end) } }
        // NBD requests carry a 32-bit length.
        let step: UInt64 = 1 << 30
        var at = offset
        while at < end {
            let len = min(step, end - at)
            let start = at
            try withConnection(.release, offset: start, length: len, patient: true) { (h, snap) throws(Failure) in
                var err: Int32 = 0
                if let f = Self.outcome(
                    hyd_nbd_trim(h, len, start, Self.requestTimeoutMs, cancelGeneration, snap, &err), err, at: start)
                {
                    throw f
                }
            }
            at += len
        }
    }

    func zeroOut(offset: UInt64, length: UInt64) throws(StorageError) {
        throw StorageError(
            .zeroOut, path: uri, errno: EBADF, offset: offset, length: length,
            detail: "a remote source is never written")
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
        let found = try withConnection(.seek, offset: at, length: want) {
            (h, snap) throws(Failure) -> [(UInt64, Bool)] in
            var lengths = [UInt64](repeating: 0, count: capacity)
            var flags = [UInt32](repeating: 0, count: capacity)
            var err: Int32 = 0
            var n: Int64 = 0
            let r = lengths.withUnsafeMutableBufferPointer { l in
                flags.withUnsafeMutableBufferPointer { f in
                    hyd_nbd_extents(
                        h, at, want, l.baseAddress, f.baseAddress, capacity, Self.requestTimeoutMs, cancelGeneration,
                        snap, &err, &n)
                }
            }
            if let f = Self.outcome(r, err, at: at) { throw f }
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
        state.withLock { s in
            s.extentStart = at; s.extents = found
        }
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
        try withConnection(.open, offset: nil, length: nil) { (h, _) throws(Failure) in
            if hyd_nbd_is_usable(h) == 0 { throw .lost(ENOTCONN, "connection not usable") }
        }
    }

    func allocatedBytes() -> UInt64? { nil }

    func close() {
        let conns = state.withLock { s -> [NBDConnection] in
            s.closed = true
            s.waitEpoch += 1
            bumpCancel()
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
        let name =
            offer.exportName.utf8.count <= 64 && !offer.exportName.contains(";")
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
            guard parts.count == 2, let block = UInt64(parts[0], radix: 16), let crc = UInt32(parts[1], radix: 16)
            else { continue }
            samples.append(Sample(offset: block * UInt64(sampleSize), crc: crc))
        }
        return (base, samples)
    }

    static func format(base: String, samples: [Sample]) -> String {
        guard !samples.isEmpty else { return base }
        return base + ";fp="
            + samples.map { "\(String($0.offset / UInt64(sampleSize), radix: 16)):\(hex32($0.crc))" }.joined(
                separator: ",")
    }

    /// Where to sample: one block per eighth of the export, at the first data (BLOCK_STATUS) in
    /// that eighth when there is some, so that a sparse disk is not fingerprinted by its zeros.
    /// Only blocks `mayRead` allows are chosen. Blocking (reads the device).
    static func chooseSamples(_ device: any StorageDevice, mayRead: (Range<UInt64>) -> Bool) throws(StorageError)
        -> [Sample]
    {
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
