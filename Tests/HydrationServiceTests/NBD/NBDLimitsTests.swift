import Foundation
import NIOCore
import Synchronization
import Testing

@testable import HydrationService
@testable import HydrationStorage
@testable import NBDServer

#if canImport(Glibc)
    import Glibc
#endif

/// The server's limits seen from outside: one export's clients, or one process's unfinished
/// handshakes, cannot take the connections every other export needs; BLOCK_STATUS replies count
/// against a connection's byte budget and are cut at `maxBlockStatusExtents`.
@Suite(.serialized) struct NBDLimitsTests {
    private func addExport(_ f: NBDFixture, _ name: String, size: Int) throws {
        try f.registry.add(f.fileExport(name: name, path: f.dir.path + "/\(name).img", size: size))
    }

    /// `maxConnections` idle clients of export A (connections in transmission never time out)
    /// refused every client of export B: the limit was shared. Now A holds at most
    /// `maxConnectionsPerExport` and B's client (nbdinfo) gets in.
    @Test(.enabled(if: NBDTools.hasNbdinfo, "nbdinfo (libnbd-bin) is not installed"))
    func oneExportsIdleClientsDoNotLockOutAnother() async throws {
        // The refused clients stay connected, negotiating: the handshake limits must not refuse
        // them first (they are this test process's), nor the deadline close them.
        try await withNBDServer(configure: { c in
            c.maxHandshakes = 1000
            c.maxHandshakesPerPeer = 1000
            c.handshakeTimeout = .seconds(600)
        }) { f in
            try addExport(f, "a", size: 1 << 20)
            try addExport(f, "b", size: 2 << 20)
            let cfg = f.server.configuration
            #expect(cfg.maxConnectionsPerExport < cfg.maxConnections)
            let (held, refusals) = try await offPool { () -> ([RawNBDClient], [String]) in
                var held: [RawNBDClient] = []
                var refusals: [String] = []
                var refused: [RawNBDClient] = []
                defer { withExtendedLifetime(refused) {} }
                for _ in 0..<cfg.maxConnections {
                    let c = try RawNBDClient(path: f.socket)
                    try c.greet()
                    try c.sendOption(NBDOption.go.rawValue, RawNBDClient.nameData("a"))
                    while true {
                        let r = try c.readOptionReply()
                        if r.type == NBDOptionReply.ack.rawValue { held.append(c); break }
                        if r.type & 0x8000_0000 != 0 {
                            #expect(r.type == NBDOptionReply.errPolicy.rawValue)
                            refusals.append(String(decoding: r.data, as: UTF8.self))
                            refused.append(c)
                            break
                        }
                    }
                }
                return (held, refusals)
            }
            #expect(held.count == cfg.maxConnectionsPerExport, "export a holds its share and no more")
            #expect(f.server.connections(export: "a") == cfg.maxConnectionsPerExport)
            #expect(
                Set(refusals) == [
                    "export 'a' has too many connections (limit \(cfg.maxConnectionsPerExport) per export)"
                ])
            let r = try await runTool("nbdinfo", ["--size", f.uri("b")], environment: ["LIBNBD_DEBUG": "1"])
            #expect(
                r.status == 0 && r.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "\(2 << 20)",
                "a client of export b gets in while a's clients hold their share: \(r.stdout) \(r.stderr.suffix(600))")
            withExtendedLifetime(held) {}
        }
    }

    /// Connections that never finish their handshake (renewed before the deadline) took every
    /// slot: `maxConnections` of them refused everyone. Now one process negotiates on at most
    /// `maxHandshakesPerPeer` connections; the others are refused by name, and a client of
    /// another process (nbdinfo) gets in.
    @Test(.enabled(if: NBDTools.hasNbdinfo, "nbdinfo (libnbd-bin) is not installed"))
    func unfinishedHandshakesOfOneProcessDoNotLockOutOthers() async throws {
        // Held handshakes must outlive the test's own steps however slow the machine.
        try await withNBDServer(configure: { $0.handshakeTimeout = .seconds(600) }) { f in
            try addExport(f, "b", size: 2 << 20)
            let cfg = f.server.configuration
            let (held, admitted, refused) = try await offPool { () -> ([RawNBDClient], Int, [String]) in
                let held = try (0..<max(cfg.maxHandshakes, 64)).map { _ in
                    let c = try RawNBDClient(path: f.socket, timeoutSeconds: 60)
                    try c.greet()
                    return c
                }
                // Ask each for the export list: the admitted ones answer it.
                var admitted = 0
                var refused: [String] = []
                // A refused connection is closed 2 s after its refusal: on a slow machine that can
                // come before this loop reaches it (EPIPE), which is the same verdict.
                var gone = Set<Int>()
                for (i, c) in held.enumerated() {
                    do { try c.sendOption(NBDOption.list.rawValue) } catch { gone.insert(i); refused.append("closed") }
                }
                for (i, c) in held.enumerated() where !gone.contains(i) {
                    do {
                        while true {
                            let r = try c.readOptionReply()
                            if r.type == NBDOptionReply.ack.rawValue { admitted += 1; break }
                            if r.type & 0x8000_0000 != 0 {
                                refused.append(String(decoding: r.data, as: UTF8.self)); break
                            }
                        }
                    } catch {
                        refused.append("closed")  // refused, and closed 2 s later before we read (EOF or reset)
                    }
                }
                return (held, admitted, refused)
            }
            #expect(admitted == cfg.maxHandshakesPerPeer, "one process negotiates on maxHandshakesPerPeer connections")
            #expect(refused.count == held.count - admitted)
            #expect(
                refused.allSatisfy {
                    $0 == "closed"
                        || $0
                            == "process \(getpid()) has too many connections negotiating (limit \(cfg.maxHandshakesPerPeer))"
                },
                "\(Set(refused))")
            let r = try await runTool("nbdinfo", ["--size", f.uri("b")], environment: ["LIBNBD_DEBUG": "1"])
            #expect(
                r.status == 0 && r.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "\(2 << 20)",
                "another process's client gets in: \(r.stdout) \(r.stderr.suffix(600))")
            withExtendedLifetime(held) {}
        }
    }

    /// BLOCK_STATUS replies were not counted in `maxBytesInFlight`: a flood held up to
    /// `maxRequestsInFlight` replies per connection whatever their size. Each now counts at its
    /// largest (24 + 8 x 65536 bytes for a request of 1 GiB), so a 2 MiB budget lets 3 run.
    @Test func blockStatusRepliesCountAgainstTheByteBudget() async throws {
        let export = GatedStatusExport()
        try await withNBDServer(configure: { $0.maxBytesInFlight = 2 << 20 }) { f in
            try f.registry.add(export)
            let cfg = f.server.configuration
            let perReply = NBDEncoder.blockStatusChunkOverhead + 8 * cfg.maxBlockStatusExtents
            let fit = cfg.maxBytesInFlight / perReply
            #expect(fit == 3)
            let c = try await offPool { () -> RawNBDClient in
                let c = try RawNBDClient(path: f.socket, timeoutSeconds: 60)
                try c.handshake(export: "gated", structured: true)
                for i in 0..<16 {
                    try c.sendRequest(NBDRequest(.blockStatus, cookie: UInt64(i), offset: 0, length: 1 << 30))
                }
                return c
            }
            // Liveness guard only: either more than `fit` calls started (the bound failed) or
            // `fit` did and the connection stopped reading for its budget.
            let deadline = ContinuousClock.now + .seconds(60)
            var seen = 0
            while true {
                seen = export.state.withLock { $0.now }
                if seen > fit || (seen == fit && f.server.budgetWaits.load(ordering: .relaxed) > 0) { break }
                if ContinuousClock.now > deadline {
                    Issue.record(
                        "awaited \(fit) block status calls held by the byte budget; saw \(seen) started, \(f.server.budgetWaits.load(ordering: .relaxed)) budget waits"
                    )
                    break
                }
                try await Task.sleep(for: .milliseconds(5))
            }
            #expect(seen == fit, "at most maxBytesInFlight of block status replies at once")
            export.open()
            let sizes = try await offPool { try (0..<16).map { _ in try c.readReply() } }
            #expect(sizes.allSatisfy { $0.error == 0 })
            // The export answered 70000 extents: the reply is cut at maxBlockStatusExtents.
            #expect(Set(sizes.map(\.payload.count)) == [4 + 8 * cfg.maxBlockStatusExtents])
        }
    }
}

/// An export whose BLOCK_STATUS calls wait until `open()`, then answer 70000 one-byte extents.
private final class GatedStatusExport: NBDExport {
    let state = Mutex<(now: Int, isOpen: Bool, waiters: [CheckedContinuation<Void, Never>])>((0, false, []))
    var name: String { "gated" }
    var size: UInt64 { 1 << 30 }
    var capabilities: NBDExportCapabilities { .readOnly }
    func read(offset: UInt64, length: UInt32) async throws(NBDError) -> ByteBuffer {
        ByteBuffer(repeating: 0, count: Int(length))
    }
    func blockStatus(context: String, offset: UInt64, length: UInt32) async throws(NBDError) -> [NBDExtent] {
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            let go = state.withLock { s -> Bool in
                s.now += 1
                if s.isOpen { return true }
                s.waiters.append(c)
                return false
            }
            if go { c.resume() }
        }
        return (0..<70000).map { NBDExtent(length: 1, flags: UInt32($0 % 2)) }
    }
    func open() {
        let waiters = state.withLock { s -> [CheckedContinuation<Void, Never>] in
            s.isOpen = true
            defer { s.waiters = [] }
            return s.waiters
        }
        for c in waiters { c.resume() }
    }
}
