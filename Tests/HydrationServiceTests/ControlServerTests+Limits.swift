import ControlProtocol
import Foundation
import Logging
import ServiceLifecycle
import Synchronization
import Testing

@testable import HydrationService
@testable import HydrationStorage

#if canImport(Glibc)
    import Glibc
#endif

extension ControlServerTests {
    // MARK: limits

    @Test func connectionLimit() async throws {
        try await withServer(configure: {
            $0.maxConnections = 2; $0.overLimitGrace = .seconds(5)
        }) { path, server, _ in
            let (a, b) = try await offPool { () -> (VarlinkClient, VarlinkClient) in
                let a = try VarlinkClient(socketPath: path), b = try VarlinkClient(socketPath: path)
                _ = try a.getInfo(); _ = try b.getInfo()
                return (a, b)
            }
            #expect(server.activeConnections == 2)
            try await offPool {
                let c = try VarlinkClient(socketPath: path)
                #expect(throws: VarlinkError.tooManyConnections(limit: 2)) { try c.getInfo() }
                #expect(throws: VarlinkClientError.self) { try c.getInfo() }
                _ = try a.getInfo()
                b.close()
            }
            let deadline = ContinuousClock.now + .seconds(60)
            while server.activeConnections > 1 && ContinuousClock.now < deadline {
                try await Task.sleep(for: .milliseconds(10))
            }
            let product = try await offPool { try VarlinkClient(socketPath: path).getInfo().product }
            #expect(product == "hydrationd")
            withExtendedLifetime(a) {}
        }
    }

    /// Real peers of other uids (setpriv): a read-only user holding 64 streaming `GetStatus more`
    /// calls, and a socket-group member doing the same, leave room for root and for each other.
    @Test(
        .enabled(
            if: getuid() == 0 && FileManager.default.isExecutableFile(atPath: "/usr/bin/setpriv")
                && FileManager.default.isExecutableFile(atPath: "/usr/bin/python3"),
            "needs root, /usr/bin/setpriv and /usr/bin/python3"))
    func streamingPeersCannotLockOutRoot() async throws {
        // Streams that never end by themselves (one update a second).
        let handler = FakeHandler(watchUpdates: nil, watchInterval: .seconds(1))
        try await withServer(
            handler: handler,
            configure: {
                $0.socketMode = 0o666; $0.socketGroup = 4242
            }
        ) { path, server, _ in
            chmod((path as NSString).deletingLastPathComponent, 0o755)
            chmod(((path as NSString).deletingLastPathComponent as NSString).deletingLastPathComponent, 0o755)
            // Opens 64 connections, each a GetStatus more; prints how many streams started and how
            // many were refused, then holds them all until its stdin closes.
            let script = """
                import json, socket, sys
                held, refused, other = [], 0, []
                for i in range(64):
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    s.connect(sys.argv[1])
                    s.sendall(json.dumps({"method": "org.hydrationd.Control.GetStatus", "parameters": {}, "more": True}).encode() + b"\\0")
                    buf = b""
                    while b"\\0" not in buf:
                        d = s.recv(65536)
                        if not d: break
                        buf += d
                    # A refusal is a TooManyConnections reply, or the connection closed before any
                    # reply (the server's refusal and close can reach a slow client as EOF first).
                    if not buf: refused += 1; s.close(); continue
                    msg = json.loads(buf.partition(b"\\0")[0] or b"{}")
                    if msg.get("error") == "org.hydrationd.Control.TooManyConnections": refused += 1; s.close()
                    elif msg.get("continues"): held.append(s)
                    else: other.append(msg)
                print(json.dumps({"held": len(held), "refused": refused, "other": len(other)}), flush=True)
                for m in other: print(json.dumps(m), file=sys.stderr, flush=True)
                sys.stdin.read()
                """
            final class Flood: Sendable {
                let process: Process
                let stdin: Pipe
                let summary: [String: Int]
                init(_ privArgs: [String], script: String, path: String) throws {
                    let p = Process()
                    p.executableURL = URL(fileURLWithPath: "/usr/bin/setpriv")
                    p.arguments = privArgs + ["/usr/bin/python3", "-I", "-c", script, path]
                    p.currentDirectoryURL = URL(fileURLWithPath: "/")
                    let out = Pipe(), inp = Pipe()
                    p.standardOutput = out
                    p.standardInput = inp
                    try p.run()
                    var line = Data()
                    while !line.contains(UInt8(ascii: "\n")) {
                        let d = out.fileHandleForReading.availableData
                        if d.isEmpty { break }
                        line.append(d)
                    }
                    process = p; stdin = inp
                    summary = (try? JSONDecoder().decode([String: Int].self, from: line)) ?? [:]
                }
                func stop() { try? stdin.fileHandleForWriting.close(); process.waitUntilExit() }
            }
            let reader = try await offPool {
                try Flood(["--reuid=65534", "--regid=65534", "--clear-groups"], script: script, path: path)
            }
            defer { reader.stop() }
            #expect(
                reader.summary == ["held": 16, "refused": 48, "other": 0], "one read-only uid holds at most 16 streams")
            let member = try await offPool {
                try Flood(["--reuid=65533", "--regid=65533", "--groups=4242"], script: script, path: path)
            }
            defer { member.stop() }
            #expect(member.summary == ["held": 16, "refused": 48, "other": 0], "a group member too")
            #expect(server.activeConnections == 32)
            // Root (this process) gets through, and so does another read-only user.
            let product = try await offPool { try VarlinkClient(socketPath: path).getInfo().product }
            #expect(product == "hydrationd")
            let other = try await offPool {
                try Flood(["--reuid=65532", "--regid=65532", "--clear-groups"], script: script, path: path)
            }
            defer { other.stop() }
            #expect(other.summary == ["held": 16, "refused": 48, "other": 0])
            // Read-only peers share 32 slots, now all taken; root still gets through.
            let fourth = try await offPool { () -> [String: Int] in
                let f = try Flood(["--reuid=65531", "--regid=65531", "--clear-groups"], script: script, path: path)
                f.stop()
                return f.summary
            }
            #expect(fourth == ["held": 0, "refused": 64, "other": 0], "read-only peers share 32 slots")
            let again = try await offPool { try VarlinkClient(socketPath: path).getInfo().product }
            #expect(again == "hydrationd")
        }
    }

    @Test func idleConnectionsAreClosedButStreamsAreNot() async throws {
        // Timeouts with room for a loaded 2-core machine (the suites run in parallel): a client
        // thread may well be descheduled for a few hundred milliseconds between connect and call.
        let handler = FakeHandler(watchUpdates: 16, watchInterval: .milliseconds(100))
        try await withServer(handler: handler, configure: { $0.idleTimeout = .milliseconds(1000) }) { path, server, _ in
            try await offPool {
                let c = try VarlinkClient(socketPath: path)
                _ = try c.getInfo()
                Thread.sleep(forTimeInterval: 3)
                let e = #expect(throws: VarlinkClientError.self) { try c.getInfo() }
                #expect(e == .connectionClosed || e == .closed)

                // A stream lasting ~1.6 s (> idle timeout) runs to its end.
                let s = try VarlinkClient(socketPath: path)
                var n = 0
                try s.watchStatus { _ in
                    n += 1; return true
                }
                #expect(n == 17)
            }
            #expect(server.activeConnections <= 1)
        }
    }

    // MARK: authorization

    @Test func authorizationPolicy() {
        let policy = ControlAccessPolicy(socketGroup: 4242, ownerUID: 1000)
        let root = PeerCredentials(pid: 1, uid: 0, gid: 0)
        let owner = PeerCredentials(pid: 2, uid: 1000, gid: 1000)
        let member = PeerCredentials(pid: 3, uid: 2000, gid: 2000, groups: [27, 4242])
        let primary = PeerCredentials(pid: 4, uid: 2001, gid: 4242)
        let stranger = PeerCredentials(pid: 5, uid: 3000, gid: 3000, groups: [100])
        let mutating = ControlMethod.allCases.filter { !$0.isOpenToAnyPeer }.map(\.qualifiedName)
        let readOnly =
            ControlMethod.allCases.filter(\.isOpenToAnyPeer).map(\.qualifiedName)
            + ["org.varlink.service.GetInfo", "org.varlink.service.GetInterfaceDescription"]
        // The six that change state, and CheckMetadata (it reads any path with the daemon's rights).
        #expect(mutating.count == 7)
        #expect(mutating.contains(ControlMethod.checkMetadata.qualifiedName))
        for m in mutating {
            for p in [root, owner, member, primary] {
                #expect(policy.authorize(method: m, peer: p) == nil, "\(p) \(m)")
            }
            for p in [stranger, PeerCredentials.unknown] {
                #expect(policy.authorize(method: m, peer: p)?.kind == .permissionDenied, "\(p) \(m)")
            }
        }
        for m in readOnly {
            for p in [root, owner, member, primary, stranger, .unknown] {
                #expect(policy.authorize(method: m, peer: p) == nil)
            }
        }
        // Unknown methods are treated as mutating.
        #expect(policy.authorize(method: "org.hydrationd.Control.Future", peer: stranger) != nil)
        // Without a socket group only root and the owner may mutate.
        let noGroup = ControlAccessPolicy(socketGroup: nil, ownerUID: 0)
        #expect(noGroup.authorize(method: ControlMethod.start.qualifiedName, peer: member) != nil)
        #expect(noGroup.authorize(method: ControlMethod.start.qualifiedName, peer: root) == nil)
        #expect(ControlAccessPolicy.isReadOnly(method: "org.hydrationd.Control.GetStatus"))
        #expect(!ControlAccessPolicy.isReadOnly(method: "org.hydrationd.Control.Remove"))
    }

    /// A real unprivileged client (uid/gid 65534 via setpriv) may read but not mutate; the same user
    /// with the socket group as a supplementary or primary group may mutate.
    @Test(
        .enabled(
            if: getuid() == 0 && FileManager.default.isExecutableFile(atPath: "/usr/bin/setpriv")
                && FileManager.default.isExecutableFile(atPath: "/usr/bin/python3"),
            "needs root, /usr/bin/setpriv and /usr/bin/python3"))
    func unprivilegedPeersOverTheSocket() async throws {
        try await withServer(configure: {
            $0.socketMode = 0o666; $0.socketGroup = 4242
        }) { path, _, handler in
            chmod((path as NSString).deletingLastPathComponent, 0o755)
            chmod(((path as NSString).deletingLastPathComponent as NSString).deletingLastPathComponent, 0o755)
            let script: String = """
                import json, socket, sys
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(sys.argv[1])
                buf = b""
                def call(method, params):
                    global buf
                    s.sendall(json.dumps({"method": method, "parameters": params}).encode() + b"\\0")
                    while b"\\0" not in buf:
                        buf += s.recv(65536)
                    msg, _, buf = buf.partition(b"\\0")
                    print(msg.decode())
                call("org.hydrationd.Control.GetStatus", {})
                call("org.hydrationd.Control.Start", {"name": sys.argv[2], "source": "/s", "dest": "/d"})
                """
            @Sendable func run(_ privArgs: [String], job: String) throws -> [VarlinkReply] {
                let p = Process()
                p.executableURL = URL(fileURLWithPath: "/usr/bin/setpriv")
                // Nothing from the repository: it may sit under a 0700 home that uid 65534 cannot
                // traverse. An inline script, the system python in isolated mode, cwd /.
                p.arguments = privArgs + ["/usr/bin/python3", "-I", "-c", script, path, job]
                p.currentDirectoryURL = URL(fileURLWithPath: "/")
                let out = Pipe(), err = Pipe()
                p.standardOutput = out
                p.standardError = err
                try p.run()
                let data = out.fileHandleForReading.readDataToEndOfFile()
                let errText = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
                p.waitUntilExit()
                #expect(p.terminationStatus == 0, "\(errText)")
                return try String(decoding: data, as: UTF8.self).split(separator: "\n").map {
                    try VarlinkFraming.decodeReply(Array($0.utf8))
                }
            }
            let nobody = try await offPool { try run(["--reuid=65534", "--regid=65534", "--clear-groups"], job: "n") }
            #expect(nobody.count == 2)
            #expect(nobody.first?.error == nil, "read-only call allowed")
            let denied = nobody.last?.varlinkError
            #expect(denied?.kind == .permissionDenied)
            #expect(denied?.string("method") == "org.hydrationd.Control.Start")

            let member = try await offPool { try run(["--reuid=65534", "--regid=65534", "--groups=4242"], job: "m") }
            #expect(
                member.last?.error == nil, "supplementary group member may mutate: \(String(describing: member.last))")
            let primary = try await offPool { try run(["--reuid=65534", "--regid=4242", "--clear-groups"], job: "p") }
            #expect(primary.last?.error == nil, "primary group member may mutate")

            let starts = zip(handler.calls, handler.peers).filter { $0.0 == "Start" }.map(\.1)
            #expect(starts.map(\.uid) == [65534, 65534])
            #expect(starts.first?.groups.contains(4242) == true)
        }
    }
}
