/// Who gets one of a socket's connection slots. Decided at accept from the peer's credentials
/// (SO_PEERCRED), so a flood by one class of peer cannot lock out a more privileged one: a
/// connection that is never idle-cut (a streaming call) would otherwise let a read-only peer
/// holding every slot lock root out indefinitely.
///
/// - root and the server's own user: admitted while fewer than `total` connections are open;
/// - other privileged peers (socket-group members): while fewer than `total - ownerReserve` are
///   open and their uid holds fewer than `perPeer`;
/// - any other (read-only) peer: while read-only peers hold fewer than `total - privilegedReserve`
///   and its uid holds fewer than `perPeer`; a peer whose credentials are unknown counts as read-only.
/// Reserves are capped at half the total so that a small limit still admits everyone.
public struct ConnectionAdmission: Sendable {
    public struct Limits: Sendable, Equatable {
        public var total: Int
        public var perPeer: Int
        public var privilegedReserve: Int
        public var ownerReserve: Int

        public init(total: Int = 64, perPeer: Int = 16, privilegedReserve: Int = 32, ownerReserve: Int = 8) {
            self.total = total; self.perPeer = perPeer; self.privilegedReserve = privilegedReserve;
            self.ownerReserve = ownerReserve
        }
    }

    public enum PeerClass: Sendable, Equatable { case owner, privileged, readOnly }

    /// A refusal, for the log and the reply.
    public struct Refusal: Sendable, Equatable, CustomStringConvertible {
        public var limit: Int
        public var reason: String
        public var description: String { reason }
    }

    public let limits: Limits
    public let privileged: PrivilegedPeers
    private(set) var total = 0
    private(set) var readOnly = 0
    private(set) var nonOwner = 0
    private(set) var perUID: [UInt32: Int] = [:]

    public init(limits: Limits, privileged: PrivilegedPeers) {
        self.limits = limits
        self.privileged = privileged
    }

    public func peerClass(_ peer: PeerCredentials) -> PeerClass {
        if privileged.isOwner(peer) { return .owner }
        return privileged.contains(peer) ? .privileged : .readOnly
    }

    public var activeConnections: Int { total }

    /// Takes a slot for `peer`, or says why not. Each admitted peer must be `release`d once.
    public mutating func admit(_ peer: PeerCredentials) -> Refusal? {
        let cls = peerClass(peer)
        let half = limits.total / 2
        if total >= limits.total {
            return Refusal(limit: limits.total, reason: "all \(limits.total) connections are in use")
        }
        if cls != .owner {
            let cap = limits.total - min(limits.ownerReserve, half)
            if nonOwner >= cap {
                return Refusal(
                    limit: cap,
                    reason:
                        "\(cap) connections of peers other than root and the daemon's user are in use (\(limits.total - cap) kept for them)"
                )
            }
            if perUID[peer.uid, default: 0] >= limits.perPeer {
                return Refusal(
                    limit: limits.perPeer,
                    reason: "uid \(peer.uid) already holds \(limits.perPeer) connections, the limit per peer")
            }
        }
        if cls == .readOnly {
            let cap = limits.total - min(limits.privilegedReserve, half)
            if readOnly >= cap {
                return Refusal(
                    limit: cap,
                    reason:
                        "read-only peers hold \(cap) connections, their share (\(limits.total - cap) kept for privileged peers)"
                )
            }
        }
        total += 1
        if cls != .owner { nonOwner += 1; perUID[peer.uid, default: 0] += 1 }
        if cls == .readOnly { readOnly += 1 }
        return nil
    }

    public mutating func release(_ peer: PeerCredentials) {
        let cls = peerClass(peer)
        total -= 1
        if cls != .owner {
            nonOwner -= 1
            let n = perUID[peer.uid, default: 1] - 1
            perUID[peer.uid] = n > 0 ? n : nil
        }
        if cls == .readOnly { readOnly -= 1 }
    }
}
