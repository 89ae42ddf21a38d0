import Testing

@testable import UnixSocketServer

struct ConnectionAdmissionTests {
    /// The admission rules on their own: a read-only peer, then a group member, fill what they may;
    /// root still gets in.
    @Test func admissionKeepsRoomForPrivilegedPeers() {
        let policy = PrivilegedPeers(socketGroup: 4242, ownerUID: 0)
        var a = ConnectionAdmission(
            limits: .init(total: 64, perPeer: 16, privilegedReserve: 32, ownerReserve: 8), privileged: policy)
        let reader = PeerCredentials(pid: 10, uid: 3000, gid: 3000)
        let member = PeerCredentials(pid: 11, uid: 2000, gid: 2000, groups: [4242])
        let root = PeerCredentials(pid: 1, uid: 0, gid: 0)
        var admitted = 0
        for _ in 0..<64 where a.admit(reader) == nil { admitted += 1 }
        #expect(admitted == 16, "one uid holds at most perPeer")
        // Other read-only uids share 32 slots.
        var others = 0
        for uid in UInt32(3001)..<3010 {
            for _ in 0..<16 where a.admit(PeerCredentials(pid: 12, uid: uid, gid: uid)) == nil { others += 1 }
        }
        #expect(others == 16, "read-only peers together hold at most total - privilegedReserve")
        #expect(a.admit(PeerCredentials.unknown) != nil, "unknown credentials count as read-only")
        var members = 0
        for uid in UInt32(2000)..<2010 {
            for _ in 0..<16 where a.admit(PeerCredentials(pid: 13, uid: uid, gid: uid, groups: [4242])) == nil {
                members += 1
            }
        }
        #expect(members == 56 - 32, "group members fill up to total - ownerReserve")
        #expect(a.admit(member)?.limit == 56)
        for _ in 0..<8 { #expect(a.admit(root) == nil, "root's reserve") }
        #expect(a.admit(root)?.limit == 64, "root too is bounded by the total")
        a.release(reader)
        let otherMember = PeerCredentials(pid: 14, uid: 2005, gid: 2005, groups: [4242])
        #expect(a.admit(otherMember) == nil, "a freed slot is anyone's within the rules")
        #expect(a.admit(otherMember) != nil, "all 64 in use")
        a.release(root)
        #expect(a.admit(root) == nil)
        // A small total (tests, tiny configurations) still admits root and others alike.
        var small = ConnectionAdmission(
            limits: .init(total: 2, perPeer: 16, privilegedReserve: 32, ownerReserve: 8), privileged: policy)
        #expect(small.admit(reader) == nil)
        #expect(small.admit(reader) != nil)
        #expect(small.admit(root) == nil)
        #expect(small.activeConnections == 2)
    }
}
