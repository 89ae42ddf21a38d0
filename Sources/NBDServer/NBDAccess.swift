import UnixSocketServer

/// What a peer may do with an export.
public enum NBDAccess: Sendable, Equatable {
    case readWrite
    /// Served with NBD_FLAG_READ_ONLY; writes, trims and zeroes get EPERM.
    case readOnly
    /// Refused: NBD_REP_ERR_POLICY with this message (OPT_GO/INFO), the export is left out of
    /// OPT_LIST, and OPT_EXPORT_NAME closes the connection.
    case denied(String)
}

/// The access check: who (SO_PEERCRED of the connection) wants which export.
public typealias NBDAccessCheck = @Sendable (_ peer: PeerCredentials, _ export: any NBDExport) -> NBDAccess

/// The default access rule (`PrivilegedPeers`, the daemon's rule for mutating control calls too):
/// root, the server's user and members of the socket group get read-write access; every other
/// peer is refused.
public struct NBDAccessPolicy: Sendable, Equatable {
    public var socketGroup: UInt32?
    public var ownerUID: UInt32
    /// Peers that are not privileged get read-only access instead of none.
    public var othersReadOnly: Bool

    public init(socketGroup: UInt32?, ownerUID: UInt32, othersReadOnly: Bool = false) {
        self.socketGroup = socketGroup
        self.ownerUID = ownerUID
        self.othersReadOnly = othersReadOnly
    }

    public func check(peer: PeerCredentials, export: any NBDExport) -> NBDAccess {
        if PrivilegedPeers(socketGroup: socketGroup, ownerUID: ownerUID).contains(peer) { return .readWrite }
        if othersReadOnly && peer.uid != UInt32.max { return .readOnly }
        return .denied("uid \(peer.uid) may not use export '\(export.name)'")
    }
}
