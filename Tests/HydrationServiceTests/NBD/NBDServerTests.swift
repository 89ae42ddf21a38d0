import Foundation
import NIOCore
import Synchronization
import Testing

@testable import HydrationEngine
@testable import HydrationLiveClone
@testable import HydrationService
@testable import HydrationStorage
@testable import NBDServer

#if canImport(Glibc)
    import Glibc
#endif

/// The server's protocol handling at the byte level (a raw client sends what real clients never
/// would), its limits, and its socket lifecycle.
@Suite(.serialized) struct NBDServerTests {
    static let mib = 1 << 20

    /// A 4 MiB export "disk" whose bytes are i % 251, plus its expected content.
    func addDisk(
        _ f: NBDFixture, slowReadOffsets: Set<UInt64> = [], slowReadGate: ReadGate? = nil,
        description: String? = "raw test disk"
    ) throws -> [UInt8] {
        let path = f.dir.path + "/disk.img"
        let bytes = (0..<(4 * Self.mib)).map { UInt8($0 % 251) }
        _ = FileManager.default.createFile(atPath: path, contents: Data(bytes))
        let inner = try f.fileExport(name: "disk", path: path, size: bytes.count, description: description)
        try f.registry.add(
            TestExport(name: "disk", inner: inner, slowReadOffsets: slowReadOffsets, slowReadGate: slowReadGate))
        return bytes
    }

    @Test func optionErrorsAreRepliedAndNegotiationGoesOn() async throws {
        try await withNBDServer { f in
            _ = try addDisk(f)
            try await offPool {
                let c = try RawNBDClient(path: f.socket)
                try c.greet()
                func expect(_ code: UInt32, _ data: [UInt8] = [], _ type: NBDOptionReply, _ line: Int = #line) throws {
                    try c.sendOption(code, data)
                    let r = try c.readOptionReply()
                    #expect(
                        r.option == code && r.type == type.rawValue,
                        "option \(code): reply 0x\(String(r.type, radix: 16)) (line \(line))")
                }
                try expect(99, [1, 2, 3], .errUnsupported)
                try expect(NBDOption.startTLS.rawValue, [], .errUnsupported)
                try expect(NBDOption.list.rawValue, [0], .errInvalid)
                try expect(NBDOption.go.rawValue, [0, 0, 0, 50, 0, 0], .errInvalid)
                try expect(
                    NBDOption.setMetaContext.rawValue, RawNBDClient.metaData("disk", ["base:allocation"]), .errInvalid)
                try expect(NBDOption.info.rawValue, RawNBDClient.nameData("nosuch"), .errUnknown)
                try expect(NBDOption.structuredReply.rawValue, [], .ack)
                try expect(NBDOption.structuredReply.rawValue, [], .errInvalid)
                try expect(
                    NBDOption.setMetaContext.rawValue, RawNBDClient.metaData("disk", ["nonamespace"]), .errInvalid)

                // LIST_META_CONTEXT: everything, a namespace wildcard, exact names; unknown ones ignored.
                func contexts(_ code: NBDOption, _ queries: [String]) throws -> [(UInt32, String)] {
                    try c.sendOption(code.rawValue, RawNBDClient.metaData("disk", queries))
                    var out: [(UInt32, String)] = []
                    while true {
                        let r = try c.readOptionReply()
                        if r.type == NBDOptionReply.ack.rawValue { return out }
                        #expect(r.type == NBDOptionReply.metaContext.rawValue)
                        out.append(
                            (RawNBDClient.be(r.data, 0, UInt32.self), String(decoding: r.data[4...], as: UTF8.self)))
                    }
                }
                #expect(try contexts(.listMetaContext, []).map(\.1) == ["base:allocation", "x-test:stripes"])
                #expect(try contexts(.listMetaContext, ["x-test:"]).map(\.1) == ["x-test:stripes"])
                #expect(try contexts(.listMetaContext, ["base:", "x-other:y"]).map(\.1) == ["base:allocation"])
                #expect(try contexts(.setMetaContext, ["base:"]).isEmpty, "a wildcard selects nothing in SET")
                let set = try contexts(.setMetaContext, ["x-test:stripes", "base:allocation", "base:nosuch"])
                #expect(Set(set.map(\.1)) == ["base:allocation", "x-test:stripes"], "unknown leaf names are ignored")
                #expect(Set(set.map(\.0)).count == 2 && !set.contains { $0.0 == 0 }, "distinct non-zero ids")

                // INFO with name, description and block size.
                try c.sendOption(NBDOption.info.rawValue, RawNBDClient.nameData("disk", infos: [1, 2, 3]))
                var infos: [UInt16: [UInt8]] = [:]
                while true {
                    let r = try c.readOptionReply()
                    if r.type == NBDOptionReply.ack.rawValue { break }
                    infos[RawNBDClient.be(r.data, 0, UInt16.self)] = Array(r.data[2...])
                }
                #expect(RawNBDClient.be(infos[0] ?? [], 0, UInt64.self) == UInt64(4 * Self.mib))
                #expect(infos[1].map { String(decoding: $0, as: UTF8.self) } == "disk")
                #expect(infos[2].map { String(decoding: $0, as: UTF8.self) } == "raw test disk")
                #expect(infos[3] == [0, 0, 0, 1, 0, 0, 0x10, 0, 2, 0, 0, 0])

                // Still negotiating: GO works, and block status answers both selected contexts.
                try c.sendOption(NBDOption.go.rawValue, RawNBDClient.nameData("disk"))
                while try c.readOptionReply().type != NBDOptionReply.ack.rawValue {}
                try c.sendRequest(NBDRequest(.blockStatus, cookie: 7, offset: 0, length: UInt32(2 * Self.mib)))
                let first = try c.readReply()
                let second = try c.readReply()
                #expect(first.type == NBDReplyType.blockStatus.rawValue && first.flags == 0)
                #expect(second.type == NBDReplyType.blockStatus.rawValue && second.flags == 1, "the last chunk is DONE")
                #expect(first.cookie == 7 && second.cookie == 7)
            }
        }
    }

    @Test func abusiveInputClosesOnlyItsOwnConnection() async throws {
        try await withNBDServer(configure: { $0.maxOptionLength = 1024 }) { f in
            let bytes = try addDisk(f)
            try await offPool {
                let good = try RawNBDClient(path: f.socket)
                try good.handshake(export: "disk", structured: false)

                let badFlags = try RawNBDClient(path: f.socket)
                try badFlags.greet(flags: 0x80)
                #expect(badFlags.isClosed(), "unknown client flags")

                let longOption = try RawNBDClient(path: f.socket)
                try longOption.greet()
                try longOption.sendOption(NBDOption.go.rawValue, [UInt8](repeating: 0, count: 2048))
                #expect(longOption.isClosed(), "option over the limit")

                let badMagic = try RawNBDClient(path: f.socket)
                try badMagic.greet()
                try badMagic.send([UInt8](repeating: 0x55, count: 16))
                #expect(badMagic.isClosed(), "bad option magic")

                let unknownExport = try RawNBDClient(path: f.socket)
                try unknownExport.greet()
                try unknownExport.sendOption(NBDOption.exportName.rawValue, Array("nosuch".utf8))
                #expect(unknownExport.isClosed(), "EXPORT_NAME of an unknown export cannot be answered")

                let badRequest = try RawNBDClient(path: f.socket)
                try badRequest.handshake(export: "disk", structured: true)
                try badRequest.send([UInt8](repeating: 0x11, count: 28))
                #expect(badRequest.isClosed(), "bad request magic")

                let hugeWrite = try RawNBDClient(path: f.socket)
                try hugeWrite.handshake(export: "disk", structured: false)
                try hugeWrite.sendRequest(NBDRequest(.write, cookie: 1, offset: 0, length: UInt32.max))
                #expect(hugeWrite.isClosed(), "a write payload too large to skip")

                // The first connection never noticed.
                try good.sendRequest(NBDRequest(.read, cookie: 5, offset: 1000, length: 4096))
                let r = try good.readReply { _ in 4096 }
                let same = r.payload == Array(bytes[1000..<5096])
                #expect(r.cookie == 5 && r.error == 0 && same)
            }
        }
    }

    @Test func unknownCommandsAndOversizedWritesGetEINVALAndTheConnectionGoesOn() async throws {
        try await withNBDServer { f in
            let bytes = try addDisk(f)
            try await offPool {
                for structured in [false, true] {
                    let c = try RawNBDClient(path: f.socket)
                    try c.handshake(export: "disk", structured: structured)
                    try c.sendRequest(NBDRequest(type: 42, cookie: 1, offset: 0, length: 512))
                    var r = try c.readReply()
                    #expect(r.cookie == 1 && r.error == NBDErrorCode.EINVAL.rawValue)
                    if structured {
                        #expect(r.type == NBDReplyType.error.rawValue && r.flags == 1)
                        let length = Int(RawNBDClient.be(r.payload, 4, UInt16.self))
                        #expect(String(decoding: r.payload[6..<(6 + length)], as: UTF8.self) == "unknown command 42")
                    }
                    // 40 MiB: over the 32 MiB maximum, read and dropped.
                    let big = 40 * Self.mib
                    try c.sendRequest(
                        NBDRequest(.write, cookie: 2, offset: 0, length: UInt32(big)),
                        payload: [UInt8](repeating: 0xee, count: big))
                    r = try c.readReply()
                    #expect(r.cookie == 2 && r.error == NBDErrorCode.EINVAL.rawValue)
                    // A simple-reply read of an error carries no data; the stream stays in step.
                    try c.sendRequest(NBDRequest(.read, cookie: 3, offset: UInt64(4 * Self.mib), length: 512))
                    r = try c.readReply()
                    #expect(r.cookie == 3 && r.error == NBDErrorCode.EINVAL.rawValue)
                    try c.sendRequest(NBDRequest(.read, cookie: 4, offset: 0, length: 512))
                    r = try c.readReply { _ in 512 }
                    #expect(r.cookie == 4 && r.error == 0)
                    let unchanged = (structured ? Array(r.payload[8...]) : r.payload) == Array(bytes[0..<512])
                    #expect(unchanged, "nothing was written")
                    try c.sendRequest(NBDRequest(.disconnect, cookie: 5))
                    #expect(c.isClosed(), "DISC closes the connection")
                }
            }
        }
    }

    @Test func repliesComeOutOfOrderAndWhole() async throws {
        try await withNBDServer { f in
            // The slow read is held until the 40 other replies are in: out of order by construction.
            let gate = ReadGate()
            // A liveness guard, not a verdict: a server that answered in order would wait for the
            // held read forever; opened after 60 s, the order check then fails instead.
            let guardTask = Task {
                try? await Task.sleep(for: .seconds(60))
                gate.open()
            }
            defer { guardTask.cancel() }
            let bytes = try addDisk(f, slowReadOffsets: [0], slowReadGate: gate)
            try await offPool {
                let c = try RawNBDClient(path: f.socket)
                try c.handshake(export: "disk", structured: false)
                // One slow read at offset 0, then 40 reads (first 2 MiB) and writes (last 2 MiB) of
                // 32 KiB sent back to back.
                let chunk = 32 << 10
                var expected: [UInt64: [UInt8]] = [1: Array(bytes[0..<chunk])]
                try c.sendRequest(NBDRequest(.read, cookie: 1, offset: 0, length: UInt32(chunk)))
                for i in 1...40 {
                    let offset = i * chunk
                    if i % 2 == 0 {
                        try c.sendRequest(
                            NBDRequest(.read, cookie: UInt64(100 + i), offset: UInt64(offset), length: UInt32(chunk)))
                        expected[UInt64(100 + i)] = Array(bytes[offset..<(offset + chunk)])
                    } else {
                        try c.sendRequest(
                            NBDRequest(
                                .write, cookie: UInt64(100 + i), offset: UInt64(2 * Self.mib + (i / 2) * chunk),
                                length: UInt32(chunk)),
                            payload: [UInt8](repeating: UInt8(i), count: chunk))
                        expected[UInt64(100 + i)] = []
                    }
                }
                var order: [UInt64] = []
                for i in 0...40 {
                    if i == 40 { gate.open() }
                    let r = try c.readReply { cookie in expected[cookie]?.count ?? 0 }
                    #expect(r.error == 0)
                    let own = r.payload == expected[r.cookie]
                    #expect(own, "cookie \(r.cookie) got its own bytes")
                    order.append(r.cookie)
                }
                #expect(order.last == 1, "the slow read finished last: \(order)")
                #expect(Set(order) == Set(expected.keys))
            }
        }
    }

    @Test func oldStyleExportNameAndTheConnectionLimit() async throws {
        try await withNBDServer(configure: { $0.maxConnections = 2 }) { f in
            _ = try addDisk(f)
            try await offPool {
                let a = try RawNBDClient(path: f.socket)
                try a.greet(flags: 1)  // no NO_ZEROES
                try a.sendOption(NBDOption.exportName.rawValue, Array("disk".utf8))
                let reply = try a.read(8 + 2 + 124)
                #expect(RawNBDClient.be(reply, 0, UInt64.self) == UInt64(4 * Self.mib))
                #expect(reply[10...].allSatisfy { $0 == 0 })
                let b = try RawNBDClient(path: f.socket)
                try b.greet(flags: 3)
                try b.sendOption(NBDOption.exportName.rawValue, Array("disk".utf8))
                #expect(try b.read(10).count == 10)

                let over = try RawNBDClient(path: f.socket)
                try over.greet()
                try over.sendOption(NBDOption.go.rawValue, RawNBDClient.nameData("disk"))
                let refused = try over.readOptionReply()
                #expect(refused.type == NBDOptionReply.errPolicy.rawValue)
                #expect(String(decoding: refused.data, as: UTF8.self) == "too many connections (limit 2)")

                try a.sendRequest(NBDRequest(.flush, cookie: 9))
                #expect(try a.readReply().error == 0, "admitted connections are unaffected")
            }
        }
    }

    @Test func accessPolicyRefusesWithPolicyAndReadOnlyGrantRefusesWrites() async throws {
        try await withNBDServer(configure: { c in
            c.access = { _, e in e.name == "disk" ? .readOnly : .denied("nope") }
        }) { f in
            _ = try addDisk(f)
            try f.registry.add(try f.fileExport(name: "other", path: f.dir.path + "/other.img", size: Self.mib))
            try await offPool {
                let c = try RawNBDClient(path: f.socket)
                try c.greet()
                try c.sendOption(NBDOption.go.rawValue, RawNBDClient.nameData("other"))
                let r = try c.readOptionReply()
                #expect(
                    r.type == NBDOptionReply.errPolicy.rawValue && String(decoding: r.data, as: UTF8.self) == "nope")
                try c.sendOption(NBDOption.go.rawValue, RawNBDClient.nameData("disk"))
                var flags: UInt16 = 0
                while true {
                    let i = try c.readOptionReply()
                    if i.type == NBDOptionReply.ack.rawValue { break }
                    if RawNBDClient.be(i.data, 0, UInt16.self) == 0 { flags = RawNBDClient.be(i.data, 10, UInt16.self) }
                }
                let tf = NBDTransmissionFlags(rawValue: flags)
                #expect(tf.contains(.readOnly) && !tf.contains(.sendTrim) && !tf.contains(.sendWriteZeroes))
                try c.sendRequest(NBDRequest(.write, cookie: 1, offset: 0, length: 4), payload: [1, 2, 3, 4])
                #expect(try c.readReply().error == NBDErrorCode.EPERM.rawValue)
            }
        }
    }

    @Test func shutdownLetsRequestsInFlightFinishThenCloses() async throws {
        let dir = try SocketTempDir()
        defer { dir.remove() }
        let socket = dir.path + "/nbd/nbd.sock"
        // A stale socket file (nobody listening) is replaced.
        let stale = socket_(path: socket)
        #expect(stale)
        let registry = NBDExportRegistry()
        let io = IOExecutor(threads: 2)
        let path = dir.path + "/disk.img"
        _ = FileManager.default.createFile(atPath: path, contents: Data(repeating: 7, count: Self.mib))
        let inner = FileNBDExport(
            name: "disk", device: try PosixStorage().open(path, mode: .destination(createSize: nil)), io: io)
        let (slowReadStarted, slowCont) = AsyncStream<Void>.makeStream()
        try registry.add(TestExport(name: "disk", inner: inner, slowReadOffsets: [0], onSlowRead: { slowCont.yield() }))
        let (listening, cont) = AsyncStream<Void>.makeStream()
        let server = NBDServer(configuration: NBDServerConfiguration(listener: .path(socket)), exports: registry) { _ in
            cont.yield()
        }
        let task = Task { try await server.run() }
        var it = listening.makeAsyncIterator()
        _ = await it.next()
        var st = stat()
        #expect(lstat(socket, &st) == 0 && st.st_mode & 0o777 == 0o660, "socket mode 0660")

        let client = try RawNBDClient(path: socket)
        let reply = Task.detached {
            try client.handshake(export: "disk", structured: false)
            try client.sendRequest(NBDRequest(.read, cookie: 1, offset: 0, length: 4096))
            let r = try client.readReply { _ in 4096 }
            return (r, client.isClosed())
        }
        var started = slowReadStarted.makeAsyncIterator()
        _ = await started.next()  // the slow read is in flight
        server.shutdown()
        let (r, closedAfter) = try await reply.value
        #expect(r.error == 0 && r.payload == [UInt8](repeating: 7, count: 4096), "the read in flight completed")
        #expect(closedAfter, "then the connection closed")
        try await task.value
        await io.shutdown()
        #expect(!FileManager.default.fileExists(atPath: socket))
    }
}

/// A bound, listening Unix socket (what systemd passes with socket activation).
func listeningSocket(path: String) -> Int32? {
    let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
    let ok = withUnixAddress(path) { bind(fd, $0, $1) } == 0 && listen(fd, 16) == 0
    if !ok { close(fd); return nil }
    return fd
}

/// Binds and abandons a Unix socket at `path` (a stale socket file, as a crashed daemon leaves).
func socket_(path: String) -> Bool {
    try? FileManager.default.createDirectory(
        atPath: (path as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
    let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
    defer { close(fd) }
    return withUnixAddress(path) { bind(fd, $0, $1) } == 0
}
