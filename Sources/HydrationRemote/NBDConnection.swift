import CNBD
import Dispatch
import HydrationStorage
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

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

extension NBDOffer {
    /// The export's base stable ID (`RemoteIdentity.baseID`).
    var baseID: String { RemoteIdentity.baseID(exportName: exportName, size: size, description: description) }
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
