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
            let deadline = ContinuousClock.now + .seconds(60)
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
