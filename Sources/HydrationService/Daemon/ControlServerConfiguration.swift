import ControlProtocol
import UnixSocketServer

#if canImport(Glibc)
    import Glibc
#endif

/// Settings of the control socket server.
public struct ControlServerConfiguration: Sendable {
    /// Where connections come from: a path to bind (parent created, stale socket replaced,
    /// `socketMode` and `socketGroup` applied) or an adopted descriptor (socket activation).
    public typealias Listener = UnixSocketListener

    public var listener: Listener
    /// gid that owns the socket and whose members may call mutating methods (`--socket-group`).
    public var socketGroup: UInt32?
    public var socketMode: UInt32 = 0o660
    /// Connections served at once. Beyond it a new connection gets `TooManyConnections` in reply to
    /// its first call (or is closed after `overLimitGrace` without one). Within it
    /// (`ConnectionAdmission`): read-only peers together may hold all but `privilegedReserve`,
    /// socket-group members with them all but `ownerReserve`, and each uid other than root and the
    /// daemon's own at most `maxConnectionsPerPeer`; root and the daemon's user always find room
    /// unless they themselves hold it.
    public var maxConnections = 64
    public var maxConnectionsPerPeer = 16
    public var privilegedReserve = 32
    public var ownerReserve = 8
    /// A connection with no request in flight and nothing received for this long is closed.
    public var idleTimeout: Duration = .seconds(60)
    public var overLimitGrace: Duration = .seconds(2)
    public var maxMessageSize = VarlinkFraming.maxMessageSize
    /// Returned by `org.varlink.service.GetInfo` (the `interfaces` field is filled in by the server).
    public var vendor = "hydrationd"
    public var product = "hydrationd"
    public var version = "0.1.0"
    public var url = "https://github.com/hydrationd/hydrationd"
    /// The daemon's effective uid, privileged like root (defaults to geteuid()).
    public var ownerUID: UInt32 = geteuid()

    public init(listener: Listener, socketGroup: UInt32? = nil) {
        self.listener = listener
        self.socketGroup = socketGroup
    }

    public var accessPolicy: ControlAccessPolicy {
        ControlAccessPolicy(socketGroup: socketGroup, ownerUID: ownerUID)
    }

    var privilegedPeers: PrivilegedPeers {
        PrivilegedPeers(socketGroup: socketGroup, ownerUID: ownerUID)
    }

    var admissionLimits: ConnectionAdmission.Limits {
        .init(
            total: maxConnections, perPeer: maxConnectionsPerPeer, privilegedReserve: privilegedReserve,
            ownerReserve: ownerReserve)
    }
}
