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

@Suite(.serialized) struct ControlServerTests {
    // MARK: calls

    @Test func serviceInfoAndInterfaceDescriptions() async throws {
        try await withServer { path, _, _ in
            try await offPool {
                let c = try VarlinkClient(socketPath: path)
                let info = try c.getInfo()
                #expect(info.product == "hydrationd")
                #expect(info.interfaces == ["org.varlink.service", "org.hydrationd.Control"])
                #expect(try c.getInterfaceDescription("org.hydrationd.Control") == ControlInterface.description)
                #expect(try c.getInterfaceDescription("org.varlink.service") == ControlInterface.serviceDescription)
                #expect(throws: VarlinkError.interfaceNotFound("com.example.Nope")) {
                    try c.getInterfaceDescription("com.example.Nope")
                }
            }
        }
    }

    @Test func everyMethodReachesTheHandlerAndErrorsComeBackNamed() async throws {
        try await withServer { path, _, handler in
            try await offPool {
                let c = try VarlinkClient(socketPath: path)
                let started = try c.start(StartParameters(name: "a", source: "/s.img", dest: "/d.img", threshold: 3))
                #expect(started.created && started.job.state == .hydrating && started.job.settings.threshold == 3)
                #expect(throws: VarlinkError.jobExists("a")) {
                    try c.start(StartParameters(name: "a", source: "/s", dest: "/d"))
                }
                _ = try c.start(StartParameters(name: "b", source: "/s2", dest: "/d2", noHydration: true))
                #expect(try c.getStatus(name: "b").map(\.state) == [.paused])
                #expect(try c.getStatus().map(\.name) == ["a", "b"])
                #expect(try c.list().map(\.name) == ["a", "b"])
                #expect(try c.pause("a").state == .paused)
                #expect(try c.resume("a").state == .hydrating)
                let resumed = try c.start(StartParameters(name: "b"))
                #expect(!resumed.created && resumed.job.state == .hydrating)
                let set = try c.set(SetParameters(name: "a", batchSize: 16, rateLimitBytesPerSecond: 1 << 20))
                #expect(set.settings.batchSize == 16 && set.settings.rateLimitBytesPerSecond == 1 << 20)
                #expect(try c.commit("a").commits.count == 1)
                #expect(throws: VarlinkError.jobRunning("a", state: .hydrating)) { try c.remove("a") }
                try c.remove("a", force: true)
                #expect(throws: VarlinkError.noSuchJob("a")) { try c.getStatus(name: "a") }
                #expect(throws: VarlinkError.noSuchJob("zz")) { try c.pause("zz") }
                #expect(try c.checkMetadata(path: "/x.meta").valid)
                #expect(try c.checkMetadata(path: "/x.txt").problems == ["not a metadata file"])
                // A non-Varlink error from the handler becomes InternalError; the connection survives.
                let e = #expect(throws: VarlinkError.self) { try c.checkMetadata(path: "/boom") }
                #expect(e?.kind == .internalError)
                #expect(try c.list().count == 1)
            }
            #expect(handler.calls.contains("Commit"))
            let peer = try #require(handler.peers.first)
            #expect(peer.uid == getuid() && peer.gid == getgid() && peer.pid == getpid())
        }
    }

    @Test func onewayCallsRunWithoutAReply() async throws {
        try await withServer { path, _, handler in
            try await offPool {
                let c = try VarlinkClient(socketPath: path)
                _ = try c.start(StartParameters(name: "a", source: "/s", dest: "/d"))
                let raw = try RawConnection(path: path)
                try raw.send(#"{"method":"org.hydrationd.Control.Pause","parameters":{"name":"a"},"oneway":true}"#)
                try raw.send(#"{"method":"org.hydrationd.Control.Pause","parameters":{"name":"nope"},"oneway":true}"#)
                try raw.send(#"{"method":"org.varlink.service.GetInfo"}"#)
                let next = try #require(try raw.readReply())
                #expect(next.error == nil)
                #expect(next.parameters?["vendor"] != nil)
                #expect(try c.getStatus(name: "a").first?.state == .paused)
            }
            #expect(handler.calls.filter { $0 == "Pause" }.count == 2)
        }
    }

    // MARK: streaming

    @Test func getStatusWithMoreStreamsUntilTheJobEnds() async throws {
        try await withServer(handler: FakeHandler(watchUpdates: 3)) { path, _, _ in
            try await offPool {
                let c = try VarlinkClient(socketPath: path)
                _ = try c.start(StartParameters(name: "w", source: "/s", dest: "/d"))
                var seen: [UInt64] = []
                var states: [JobStatus.State] = []
                try c.watchStatus(name: "w") { jobs in
                    seen.append(jobs[0].regions.hydrated)
                    states.append(jobs[0].state)
                    return true
                }
                #expect(seen == [0, 1, 2, 3])
                #expect(states.last == .complete)
                // The connection is free again after the final reply.
                #expect(try c.getInfo().product == "hydrationd")

                // On the wire: continues on all but the last reply.
                let raw = try RawConnection(path: path)
                try raw.send(#"{"method":"org.hydrationd.Control.GetStatus","parameters":{"name":"w"},"more":true}"#)
                var flags: [Bool] = []
                while let r = try raw.readReply() {
                    flags.append(r.isContinued)
                    if !r.isContinued { break }
                }
                #expect(flags == [true, true, true, false])
                // Without more, GetStatus replies once.
                #expect(try c.getStatus(name: "w").count == 1)
                // Unknown job: an error, not a stream.
                #expect(throws: VarlinkError.noSuchJob("x")) { try c.watchStatus(name: "x") { _ in true } }
            }
        }
    }

    @Test func streamStopsWhenTheClientLeaves() async throws {
        try await withServer(handler: FakeHandler(watchUpdates: nil, watchInterval: .milliseconds(20))) {
            path, _, handler in
            try await offPool {
                let c = try VarlinkClient(socketPath: path)
                var n = 0
                try c.watchStatus { _ in
                    n += 1; return n < 3
                }
                #expect(n == 3)
                #expect(throws: VarlinkClientError.closed) { try c.getInfo() }
            }
            let deadline = ContinuousClock.now + .seconds(5)
            while !handler.watchTerminated && ContinuousClock.now < deadline {
                try await Task.sleep(for: .milliseconds(20))
            }
            #expect(handler.watchTerminated, "the handler's stream is terminated once the client is gone")
        }
    }

    @Test func asyncStatusUpdatesRunOffThePool() async throws {
        try await withServer(handler: FakeHandler(watchUpdates: 2)) { path, _, _ in
            let c = try await VarlinkClient.connect(socketPath: path)
            _ = try await c.callAsync(
                ControlMethod.start.qualifiedName, parameters: StartParameters(name: "s", source: "/a", dest: "/b"),
                replyType: StartReply.self)
            var count = 0
            for try await jobs in c.statusUpdates(name: "s") {
                count += 1
                #expect(jobs.first?.name == "s")
            }
            #expect(count == 3)
        }
    }

    // MARK: bad input

    @Test func malformedMessagesGetNamedErrorsAndTheConnectionSurvives() async throws {
        try await withServer { path, _, _ in
            try await offPool {
                let raw = try RawConnection(path: path)
                for bad in [
                    "{not json", "[1,2]", #"{"parameters":{}}"#, #"{"method":42}"#, #"{"method":"a.B","more":"yes"}"#,
                    "",
                ] {
                    try raw.send(bad)
                    let r = try #require(try raw.readReply(), "reply to \(bad)")
                    #expect(r.error == VarlinkError.Name.invalidMessage, "\(bad)")
                    #expect(r.parameters?["reason"]?.stringValue?.isEmpty == false)
                }
                try raw.send(#"{"method":"org.varlink.service.GetInfo"}"#)
                #expect(try raw.readReply()?.parameters?["product"] == "hydrationd")
            }
        }
    }

    @Test func unknownMethodsAndInterfaces() async throws {
        try await withServer { path, _, _ in
            try await offPool {
                let raw = try RawConnection(path: path)
                let cases: [(String, VarlinkError)] = [
                    ("org.hydrationd.Control.Explode", .methodNotFound("org.hydrationd.Control.Explode")),
                    ("org.varlink.service.Explode", .methodNotFound("org.varlink.service.Explode")),
                    ("com.example.Other.Call", .interfaceNotFound("com.example.Other")),
                    ("NoDot", .interfaceNotFound("")),
                ]
                for (method, expected) in cases {
                    try raw.send(#"{"method":"\#(method)","parameters":{}}"#)
                    #expect(try raw.readReply()?.varlinkError == expected, "\(method)")
                }
                try raw.send(#"{"method":"org.varlink.service.GetInfo","upgrade":true}"#)
                #expect(try raw.readReply()?.varlinkError == .serviceInvalidParameter("upgrade"))
            }
        }
    }

    @Test func missingIllTypedAndUnknownParameters() async throws {
        try await withServer { path, _, handler in
            try await offPool {
                let raw = try RawConnection(path: path)
                let cases: [(String, String)] = [
                    (#"{"method":"org.hydrationd.Control.Pause","parameters":{}}"#, "name"),
                    (#"{"method":"org.hydrationd.Control.Pause"}"#, "name"),
                    (#"{"method":"org.hydrationd.Control.Pause","parameters":{"name":null}}"#, "name"),
                    (#"{"method":"org.hydrationd.Control.Pause","parameters":{"name":7}}"#, "name"),
                    (
                        #"{"method":"org.hydrationd.Control.Start","parameters":{"name":"a","source":"/s","dest":"/d","region_size":"big"}}"#,
                        "region_size"
                    ),
                    (
                        #"{"method":"org.hydrationd.Control.Start","parameters":{"name":"a","source":"/s","dest":"/d","region_size":-4096}}"#,
                        "region_size"
                    ),
                    (
                        #"{"method":"org.hydrationd.Control.Start","parameters":{"name":"a","discard_source":"yes"}}"#,
                        "discard_source"
                    ),
                    (#"{"method":"org.hydrationd.Control.Set","parameters":{"name":"a","treshold":4}}"#, "treshold"),
                    (
                        #"{"method":"org.hydrationd.Control.Set","parameters":{"name":"a","batch_size":2,"threshold":1e30}}"#,
                        "threshold"
                    ),
                    (
                        #"{"method":"org.hydrationd.Control.Set","parameters":{"name":"a","rate_limit_bytes_per_second":-1}}"#,
                        "rate_limit_bytes_per_second"
                    ),
                    (#"{"method":"org.hydrationd.Control.GetStatus","parameters":[1]}"#, "parameters"),
                    (#"{"method":"org.varlink.service.GetInterfaceDescription","parameters":{}}"#, "interface"),
                ]
                for (text, parameter) in cases {
                    try raw.send(text)
                    let reply = try raw.readReply()
                    #expect(
                        reply?.varlinkError == .serviceInvalidParameter(parameter),
                        "\(text) -> \(String(describing: reply))")
                }
            }
            #expect(handler.calls.isEmpty, "nothing invalid reached the handler")
        }
    }

    @Test func oversizedMessageClosesOnlyThatConnection() async throws {
        try await withServer { path, _, _ in
            try await offPool {
                // Exactly at the limit is fine (the handler says NoSuchJob for the long name).
                let other = try RawConnection(path: path)
                let prefix = #"{"method":"org.hydrationd.Control.GetStatus","parameters":{"name":""#
                let suffix = #""}}"#
                let name = String(
                    repeating: "n", count: VarlinkFraming.maxMessageSize - prefix.utf8.count - suffix.utf8.count)
                try other.send(prefix + name + suffix)
                #expect(try other.readReply()?.error == VarlinkError.Name.noSuchJob)

                let raw = try RawConnection(path: path)
                try raw.send([UInt8](repeating: UInt8(ascii: "a"), count: VarlinkFraming.maxMessageSize + 10))
                let r = try raw.readReply()
                #expect(r?.varlinkError == .messageTooLarge(limit: VarlinkFraming.maxMessageSize))
                #expect(try raw.readFrame() == nil, "connection closed after MessageTooLarge")

                // Everyone else is still served.
                try other.send(#"{"method":"org.varlink.service.GetInfo"}"#)
                #expect(try other.readReply()?.error == nil)
                #expect(try VarlinkClient(socketPath: path).getInfo().product == "hydrationd")
            }
        }
    }

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
            let deadline = ContinuousClock.now + .seconds(5)
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

    // MARK: socket setup

    @Test func socketFileModeGroupStaleAndLiveSockets() async throws {
        let group: UInt32? = getuid() == 0 ? 4242 : nil
        try await withServer(configure: { $0.socketGroup = group }) { path, _, _ in
            var st = stat()
            #expect(lstat(path, &st) == 0)
            #expect(st.st_mode & 0o777 == 0o660)
            if let group { #expect(st.st_gid == group) }

            // A second server on the same live socket refuses to start, and leaves it alone.
            let second = ControlServer(configuration: .init(listener: .path(path)), handler: FakeHandler())
            await #expect(throws: UnixSocketServerError.socketInUse(path: path)) { try await second.run() }
            try await offPool { _ = try VarlinkClient(socketPath: path).getInfo() }
        }

        let dir = try SocketTempDir()
        defer { dir.remove() }
        // A stale socket (nobody listening) is replaced.
        let stale = dir.path + "/stale.sock"
        let fd = try Self.listeningSocket(stale)
        Glibc.close(fd)
        #expect(FileManager.default.fileExists(atPath: stale))
        try UnixSocketFile.prepare(stale)
        #expect(!FileManager.default.fileExists(atPath: stale))
        // A regular file is never removed.
        let file = dir.path + "/file"
        _ = FileManager.default.createFile(atPath: file, contents: Data("x".utf8))
        #expect(throws: UnixSocketServerError.notASocket(path: file)) { try UnixSocketFile.prepare(file) }
        #expect(FileManager.default.fileExists(atPath: file))
    }

    /// A live server whose backlog is full (hung, never accepting) is still a live socket, and
    /// finding that out does not wait: the probe's connect is non-blocking.
    @Test func aListenerWithAFullBacklogIsInUseAndNotWaitedFor() async throws {
        let dir = try SocketTempDir()
        defer { dir.remove() }
        let path = dir.path + "/hung.sock"
        let fd = try Self.listeningSocket(path)
        defer { Glibc.close(fd) }
        // Fill the backlog: non-blocking connects until the kernel says EAGAIN.
        var clients: [Int32] = []
        defer { for c in clients { Glibc.close(c) } }
        while clients.count < 4096 {
            let c = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
            let rc = withUnixAddress(path) { Glibc.connect(c, $0, $1) }
            let e = errno
            clients.append(c)
            if rc != 0 { #expect(e == EAGAIN, "errno \(e)"); break }
        }
        // On a thread of its own, so that a probe that waits fails this test instead of hanging it.
        let verdict = Mutex<Bool?>(nil)
        Thread {
            let refused = (try? UnixSocketFile.prepare(path)) == nil; verdict.withLock { $0 = refused }
        }.start()
        #expect(
            await eventually { verdict.withLock { $0 != nil } }, "the probe of a live socket with a full backlog waited"
        )
        #expect(verdict.withLock { $0 } == true, "a live socket with a full backlog is refused as in use")
        #expect(UnixSocketFile.isListening(path))
        #expect(FileManager.default.fileExists(atPath: path), "and left alone")
    }

    @Test func adoptsAnAlreadyListeningDescriptor() async throws {
        let dir = try SocketTempDir()
        defer { dir.remove() }
        let path = dir.path + "/activated.sock"
        let fd = try Self.listeningSocket(path)
        let (listening, cont) = AsyncStream<String?>.makeStream()
        let server = ControlServer(configuration: .init(listener: .descriptor(fd, path: path)), handler: FakeHandler())
        {
            cont.yield($0.path)
        }
        let task = Task { try await server.run() }
        var it = listening.makeAsyncIterator()
        #expect(await it.next() == path)
        let product = try await offPool { try VarlinkClient(socketPath: path).getInfo().product }
        #expect(product == "hydrationd")
        server.shutdown()
        try await task.value
        #expect(FileManager.default.fileExists(atPath: path), "an adopted socket's file belongs to the activator")
    }

    @Test func gracefulShutdownThroughServiceGroupClosesIdleConnections() async throws {
        let dir = try SocketTempDir()
        defer { dir.remove() }
        let path = dir.path + "/g.sock"
        let (listening, cont) = AsyncStream<Void>.makeStream()
        let server = ControlServer(configuration: .init(listener: .path(path)), handler: FakeHandler()) { _ in
            cont.yield()
        }
        let group = ServiceGroup(services: [server], logger: Logger(label: "test"))
        let task = Task { try await group.run() }
        var it = listening.makeAsyncIterator()
        _ = await it.next()
        let client = try await offPool { () -> VarlinkClient in
            let c = try VarlinkClient(socketPath: path)
            _ = try c.getInfo()
            return c
        }
        let started = ContinuousClock.now
        await group.triggerGracefulShutdown()
        try await task.value
        #expect(ContinuousClock.now - started < .seconds(5), "an idle client does not hold up shutdown")
        _ = try await offPool { #expect(throws: VarlinkClientError.self) { try client.getInfo() } }
        #expect(!FileManager.default.fileExists(atPath: path))
    }

    // MARK: interop

    @Test(
        .enabled(
            if: Self.pythonHasVarlink(), "python3's varlink module is not installed (python3 -m pip install varlink)"))
    func pythonVarlinkClientInterop() async throws {
        try await withServer(handler: FakeHandler(watchUpdates: 2)) { path, _, _ in
            try await offPool {
                let c = try VarlinkClient(socketPath: path)
                _ = try c.start(StartParameters(name: "py", source: "/s.img", dest: "/d.img"))
            }
            let info = try await offPool { try Self.python(["-m", "varlink.cli", "info", "unix:\(path)"]) }
            #expect(info.status == 0, "\(info.err)")
            #expect(info.out.contains("hydrationd"))
            #expect(info.out.contains("org.hydrationd.Control"))

            let status = try await offPool {
                try Self.python(["-m", "varlink.cli", "call", "unix:\(path)/org.hydrationd.Control.GetStatus", "{}"])
            }
            #expect(status.status == 0, "\(status.err)")
            let obj = try JSONSerialization.jsonObject(with: Data(status.out.utf8)) as? [String: Any]
            let jobs = obj?["jobs"] as? [[String: Any]]
            #expect(jobs?.first?["name"] as? String == "py")
            #expect(jobs?.first?["state"] as? String == "hydrating")

            let more = try await offPool {
                try Self.python([
                    "-m", "varlink.cli", "call", "--more", "unix:\(path)/org.hydrationd.Control.GetStatus",
                    #"{"name": "py"}"#,
                ])
            }
            #expect(more.status == 0, "\(more.err)")
            #expect(more.out.components(separatedBy: "\"name\": \"py\"").count - 1 == 3, "\(more.out)")

            let err = try await offPool {
                try Self.python([
                    "-m", "varlink.cli", "call", "unix:\(path)/org.hydrationd.Control.Pause", #"{"name": "ghost"}"#,
                ])
            }
            #expect((err.out + err.err).contains("org.hydrationd.Control.NoSuchJob"))

            let desc = try await offPool {
                try Self.python(["-m", "varlink.cli", "help", "unix:\(path)/org.hydrationd.Control"])
            }
            #expect(desc.status == 0, "\(desc.err)")
            #expect(desc.out.contains("method GetStatus"))
        }
    }

    // MARK: helpers

    static func pythonHasVarlink() -> Bool {
        (try? python(["-c", "import varlink"]).status) == 0
    }

    static func python(_ args: [String]) throws -> (status: Int32, out: String, err: String) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = ["python3"] + args
        let out = Pipe(), err = Pipe()
        p.standardOutput = out
        p.standardError = err
        try p.run()
        let o = out.fileHandleForReading.readDataToEndOfFile()
        let e = err.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return (p.terminationStatus, String(decoding: o, as: UTF8.self), String(decoding: e, as: UTF8.self))
    }

    static func listeningSocket(_ path: String) throws -> Int32 {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        let rc = withUnixAddress(path) { Glibc.bind(fd, $0, $1) }
        guard rc == 0, listen(fd, 16) == 0 else { throw POSIXError(POSIXErrorCode(rawValue: errno)!) }
        return fd
    }
}
