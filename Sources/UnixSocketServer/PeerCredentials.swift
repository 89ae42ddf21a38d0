import NIOCore

#if canImport(Glibc)
    import Glibc
#endif

/// Who is on the other end of a Unix socket connection, from SO_PEERCRED (and SO_PEERGROUPS).
public struct PeerCredentials: Sendable, Equatable, CustomStringConvertible {
    public var pid: Int32
    public var uid: UInt32
    public var gid: UInt32
    /// Supplementary groups of the peer process (SO_PEERGROUPS; at most 64, group 0 not reported).
    public var groups: [UInt32]

    public init(pid: Int32, uid: UInt32, gid: UInt32, groups: [UInt32] = []) {
        self.pid = pid; self.uid = uid; self.gid = gid; self.groups = groups
    }

    /// Credentials that could not be read: an invalid uid/gid (-1) that no policy authorizes.
    public static let unknown = PeerCredentials(pid: 0, uid: UInt32.max, gid: UInt32.max)

    public var description: String { "pid=\(pid) uid=\(uid) gid=\(gid)" }
}

extension PeerCredentials {
    /// The credentials of the peer of `channel` (`.unknown` when they cannot be read).
    public static func of(_ channel: any Channel) async -> PeerCredentials {
        (try? await future(of: channel).get()) ?? .unknown
    }

    /// SO_PEERCRED and SO_PEERGROUPS of a connection (`.unknown` when they cannot be read). On the
    /// channel's event loop (a child channel initializer) the future is already complete.
    public static func future(of channel: any Channel) -> EventLoopFuture<PeerCredentials> {
        guard let provider = channel as? any SocketOptionProvider else {
            return channel.eventLoop.makeSucceededFuture(.unknown)
        }
        let cred: EventLoopFuture<PeerUCred> = provider.unsafeGetSocketOption(
            level: SocketOptionLevel(SOL_SOCKET), name: SocketOptionName(SO_PEERCRED))
        // SO_PEERGROUPS (Linux 4.13+); the buffer is zero-filled, so zero entries are padding.
        let rawGroups: EventLoopFuture<InlineArray<64, UInt32>> = provider.unsafeGetSocketOption(
            level: SocketOptionLevel(SOL_SOCKET), name: SocketOptionName(59))
        return cred.flatMap { cred in
            rawGroups.map { raw -> [UInt32] in
                var groups: [UInt32] = []
                for i in raw.indices where raw[i] != 0 { groups.append(raw[i]) }
                return groups
            }.recover { _ in [] }.map { groups in
                PeerCredentials(pid: cred.pid, uid: cred.uid, gid: cred.gid, groups: groups)
            }
        }.recover { _ in .unknown }
    }
}

/// `struct ucred` of <sys/socket.h> (only visible to C with _GNU_SOURCE): what SO_PEERCRED returns.
struct PeerUCred: Sendable, BitwiseCopyable {
    var pid: Int32
    var uid: UInt32
    var gid: UInt32
}
