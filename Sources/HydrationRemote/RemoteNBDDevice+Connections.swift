import CNBD
import Dispatch
import HydrationStorage
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

extension RemoteNBDDevice {

    /// The shim's chunked read on a handle this thread holds, with the request deadline.
    func preadOn(
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

    enum Failure: Error {
        /// An NBD error reply: the connection is fine.
        case command(Int32, UInt64?, String)
        /// The connection is gone.
        case lost(Int32, String)
    }

    func unconfirmedError(_ op: StorageError.Operation, _ why: String, offset: UInt64?, length: UInt64?)
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
    func withConnection<T>(
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

    func noteOutage(_ why: String) {
        state.withLock { s in
            if s.outage == nil {
                s.outage = SourceAvailability(sinceUnixMs: Self.wallClockMillis(), lastError: why, attempts: 0)
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
    func reconnect(
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
                                    sinceUnixMs: Self.wallClockMillis(), lastError: reason, attempts: 1)
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

    static func outcome(_ r: Int32, _ err: Int32, at: UInt64?) -> Failure? {
        switch r {
        case HYD_NBD_OK: return nil
        // ESHUTDOWN is the server saying it is going away (nbdkit replies it to every request
        // after SIGTERM and keeps the socket open until the client leaves): the connection is as
        // good as lost, reconnect (to the restarted server) rather than keep the handle.
        case HYD_NBD_COMMAND_ERROR where err != ESHUTDOWN: return .command(err, at, String(cString: hyd_nbd_error()))
        default: return .lost(err, lostMessage(err))
        }
    }
}

extension RemoteNBDDevice {
    /// Now, in milliseconds since the epoch: when an outage began, as status shows it.
    static func wallClockMillis() -> Int64 {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return Int64(ts.tv_sec) * 1000 + Int64(ts.tv_nsec) / 1_000_000
    }
}
