import CNBD
import Dispatch
import HydrationStorage
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

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
final class RemoteNBDDevice: RemoteSourceDevice {
    /// A read with no reply for this long counts as a lost connection (the job pauses with
    /// `SourceUnavailable` and reconnects): a server that stops answering without closing its
    /// socket must not hold the job, its pause and its removal for ever.
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

    struct State {
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
    let state: Mutex<State>
    /// One permit per connection slot.
    let slots: DispatchSemaphore
    /// Moved (under `state`'s lock) when calls stuck without a reply should give up: the
    /// server was found unresponsive, or waiting is switched off (pause, close). Read by the
    /// libnbd poll loops of the shim atomically (`hyd_atomic_load`).
    let cancel = CancelGeneration()
    var cancelGeneration: UnsafeMutablePointer<Int32> { cancel.pointer }

    init(uri: String, first: NBDConnection) {
        self.uri = uri
        self.offer = first.offer
        let conns = first.offer.canMultiConn ? Self.maxConnections : 1
        let minimum = max(1, first.offer.minimumBlock)
        self.requestSize = max(minimum, min(256 << 10, first.offer.maximumRequest) / minimum * minimum)
        self.requestsPerRead = 16
        self.info = DeviceInfo(
            path: uri, identity: DeviceIdentity(kind: .remote, device: 0, inode: 0, rdev: 0),
            size: first.offer.size, logicalBlockSize: minimum,
            stableID: first.offer.baseID)
        var s = State()
        s.idle = [first]
        self.state = Mutex(s)
        self.slots = DispatchSemaphore(value: conns)
    }

    deinit {
        for c in state.withLock({ $0.idle }) { c.close() }
    }

    /// Calls stuck without a reply give up (see `cancelGeneration`). Under `state`'s lock.
    func bumpCancel() {
        hyd_atomic_store(cancelGeneration, hyd_atomic_load(cancelGeneration) &+ 1)
    }

    /// The export at `uri`: what `identify` reports (one connection, closed again).
    static func identify(_ uri: String) throws(StorageError) -> DeviceInfo {
        let c = try NBDConnection.connect(uri)
        defer { c.close() }
        return DeviceInfo(
            path: uri, identity: DeviceIdentity(kind: .remote, device: 0, inode: 0, rdev: 0),
            size: c.offer.size, logicalBlockSize: max(1, c.offer.minimumBlock),
            stableID: c.offer.baseID)
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
}
