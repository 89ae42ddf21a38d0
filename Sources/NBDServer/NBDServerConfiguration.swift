import UnixSocketServer

#if canImport(Glibc)
    import Glibc
#endif

/// Settings of the NBD server.
public struct NBDServerConfiguration: Sendable {
    /// A socket path to bind (parent created, stale socket replaced, `socketMode`/`socketGroup`
    /// applied) or an adopted listening descriptor (socket activation): a `UnixSocketListener`.
    public var listener: UnixSocketListener
    public var socketGroup: UInt32?
    public var socketMode: UInt32 = 0o660
    /// Connections in transmission at once, over every export; an OPT_GO beyond it gets
    /// NBD_REP_ERR_POLICY (EXPORT_NAME: closed).
    public var maxConnections = 64
    /// Connections in transmission with one export at once, so one export's clients (idle ones
    /// never time out) cannot take every connection from the others; an OPT_GO beyond it gets
    /// NBD_REP_ERR_POLICY naming the export (EXPORT_NAME: closed).
    public var maxConnectionsPerExport = 16
    /// Connections negotiating at once; beyond it a connection gets NBD_REP_ERR_POLICY to every
    /// option and is closed after 2 s.
    public var maxHandshakes = 64
    /// Connections of one peer process (SO_PEERCRED pid) negotiating at once; beyond it a
    /// connection is refused like one over `maxHandshakes`. A process that opens connections and
    /// never finishes their handshakes holds this many at most, for `handshakeTimeout` each.
    public var maxHandshakesPerPeer = 8
    /// Requests executing at once on one connection; the connection stops reading beyond it.
    public var maxRequestsInFlight = 64
    /// Bytes held at once by one connection's requests in flight: READ and WRITE payloads, and
    /// BLOCK_STATUS replies at their largest (`blockStatusCost`).
    public var maxBytesInFlight = 128 << 20
    /// Extents in one context's BLOCK_STATUS reply at most (8 bytes each); the client asks
    /// again from where the reply ends.
    public var maxBlockStatusExtents = 1 << 16
    /// Largest READ/WRITE payload (the export's `blockSize.maximum` may lower it). A WRITE up to
    /// twice this is read, dropped and refused with EINVAL; beyond, the connection is closed.
    public var maxPayload: UInt32 = NBDProtocol.defaultMaxPayload
    /// Option data beyond this closes the connection (a name and queries fit easily).
    public var maxOptionLength = 64 << 10
    /// Options one connection may send before it is considered abusive and closed.
    public var maxOptions = 256
    /// The handshake must end (OPT_GO / EXPORT_NAME) within this time (qemu-nbd's default too),
    /// else the connection is closed.
    public var handshakeTimeout: Duration = .seconds(10)
    /// On shutdown, requests in flight get this long to finish before connections are closed.
    public var shutdownGrace: Duration = .seconds(5)
    /// The server's effective uid, privileged in the default access policy.
    public var ownerUID: UInt32 = geteuid()
    /// Decides who may use which export; nil: `NBDAccessPolicy(socketGroup:ownerUID:)`.
    public var access: NBDAccessCheck?

    public init(
        listener: UnixSocketListener, socketGroup: UInt32? = nil, access: NBDAccessCheck? = nil
    ) {
        self.listener = listener
        self.socketGroup = socketGroup
        self.access = access
    }

    var accessCheck: NBDAccessCheck {
        if let access { return access }
        let policy = NBDAccessPolicy(socketGroup: socketGroup, ownerUID: ownerUID)
        return { peer, export in policy.check(peer: peer, export: export) }
    }
}
