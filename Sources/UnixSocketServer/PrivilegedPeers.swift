/// The peers a Unix socket's owner trusts: root, the server's own user and members of the
/// socket's group (as primary or supplementary group). Both servers' access rules start here.
public struct PrivilegedPeers: Sendable, Equatable {
    /// The socket's group (`--socket-group`), if any.
    public var socketGroup: UInt32?
    /// The server's effective uid (an unprivileged server serves its own user).
    public var ownerUID: UInt32

    public init(socketGroup: UInt32?, ownerUID: UInt32) {
        self.socketGroup = socketGroup
        self.ownerUID = ownerUID
    }

    /// True for root and the server's own user (credentials known).
    public func isOwner(_ peer: PeerCredentials) -> Bool {
        peer.uid != UInt32.max && (peer.uid == 0 || peer.uid == ownerUID)
    }

    /// True when `peer` is privileged: root, the server's user, or in the socket group.
    public func contains(_ peer: PeerCredentials) -> Bool {
        if peer.uid == UInt32.max { return false }  // credentials unknown
        if peer.uid == 0 || peer.uid == ownerUID { return true }
        if let g = socketGroup, peer.gid == g || peer.groups.contains(g) { return true }
        return false
    }
}
