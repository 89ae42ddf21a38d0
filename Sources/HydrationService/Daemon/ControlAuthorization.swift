import ControlProtocol
import UnixSocketServer

/// Who may call what on the control socket.
///
/// - Read-only methods about the daemon's own jobs (`org.varlink.service.*`, `GetStatus`, `List`)
///   are open to any peer that can connect (the socket's 0660 mode already limits who can).
/// - Everything else (`Start`, `Pause`, `Resume`, `Set`, `Commit`, `Remove`, `CheckMetadata`, which
///   reads a path the peer names with the daemon's rights, and any method this version does not
///   know) needs a peer that is root, runs as the daemon's own user, or has the socket group as its
///   primary or a supplementary group. Such a peer is root-equivalent: the daemon opens the paths
///   it names as root (docs/systemd.md, "Who may do what").
public struct ControlAccessPolicy: Sendable, Equatable {
    /// The `--socket-group` gid, if any.
    public var socketGroup: UInt32?
    /// The daemon's effective uid (an unprivileged daemon serves its own user).
    public var ownerUID: UInt32

    public init(socketGroup: UInt32?, ownerUID: UInt32) {
        self.socketGroup = socketGroup
        self.ownerUID = ownerUID
    }

    /// True for methods anyone connected may call (`ControlMethod.isOpenToAnyPeer`).
    public static func isReadOnly(method: String) -> Bool {
        if method == "org.varlink.service.GetInfo" || method == "org.varlink.service.GetInterfaceDescription" {
            return true
        }
        let prefix = ControlMethod.interfaceName + "."
        guard method.hasPrefix(prefix), let m = ControlMethod(rawValue: String(method.dropFirst(prefix.count))) else {
            return false
        }
        return m.isOpenToAnyPeer
    }

    /// True when `peer` is privileged: root, the daemon's user, or in the socket group.
    public func isPrivileged(_ peer: PeerCredentials) -> Bool {
        PrivilegedPeers(socketGroup: socketGroup, ownerUID: ownerUID).contains(peer)
    }

    /// nil when `peer` may call `method`, otherwise the `PermissionDenied` error to reply.
    public func authorize(method: String, peer: PeerCredentials) -> VarlinkError? {
        if Self.isReadOnly(method: method) || isPrivileged(peer) { return nil }
        let who = socketGroup.map { "root, uid \(ownerUID) or members of group \($0)" } ?? "root or uid \(ownerUID)"
        return .permissionDenied(
            method: method, reason: "uid \(peer.uid) may only call read-only methods; \(who) may call \(method)")
    }
}
