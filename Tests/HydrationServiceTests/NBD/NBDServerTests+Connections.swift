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

extension NBDServerTests {
    @Test func disconnectEndsOnlyTheConnectionsOfThatExport() async throws {
        try await withNBDServer { f in
            _ = try addDisk(f)
            try f.registry.add(try f.fileExport(name: "other", path: f.dir.path + "/other.img", size: Self.mib))
            let (a, b) = try await offPool {
                let a = try RawNBDClient(path: f.socket)
                try a.handshake(export: "disk", structured: true)
                let b = try RawNBDClient(path: f.socket)
                try b.handshake(export: "other", structured: true)
                return (a, b)
            }
            #expect(f.server.disconnect(export: "disk") == 1)
            f.registry.remove("disk")
            try await offPool {
                #expect(a.isClosed(), "the connection to the removed export ended")
                try b.sendRequest(NBDRequest(.read, cookie: 1, offset: 0, length: 512))
                #expect(try b.readReply().error == 0, "the other export's connection goes on")
                let c = try RawNBDClient(path: f.socket)
                try c.greet()
                try c.sendOption(NBDOption.go.rawValue, RawNBDClient.nameData("disk"))
                #expect(try c.readOptionReply().type == NBDOptionReply.errUnknown.rawValue)
            }
        }
    }

    @Test(.enabled(if: NBDTools.hasNbdinfo, "nbdinfo (libnbd-bin) is not installed"))
    func adoptsAListeningDescriptor() async throws {
        let dir = try SocketTempDir()
        defer { dir.remove() }
        let socket = dir.path + "/activated.sock"
        let fd = try #require(listeningSocket(path: socket))
        let registry = NBDExportRegistry()
        let io = IOExecutor(threads: 2)
        let path = dir.path + "/disk.img"
        _ = FileManager.default.createFile(atPath: path, contents: Data(repeating: 1, count: Self.mib))
        try registry.add(
            FileNBDExport(
                name: "disk", device: try PosixStorage().open(path, mode: .destination(createSize: nil)), io: io))
        let (listening, cont) = AsyncStream<String?>.makeStream()
        let server = NBDServer(
            configuration: NBDServerConfiguration(listener: .descriptor(fd, path: socket)), exports: registry
        ) { info in
            cont.yield(info.path)
        }
        let task = Task { try await server.run() }
        var it = listening.makeAsyncIterator()
        #expect(await it.next() == socket)
        let r = try await runTool("nbdinfo", ["--size", nbdURI("disk", socket: socket)])
        #expect(
            r.status == 0 && r.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "\(Self.mib)", "\(r.stderr)")
        server.shutdown()
        try await task.value
        await io.shutdown()
    }
}

/// An in-memory export whose failures the test chooses by offset.
private struct FaultyExport: NBDExport {
    var name: String { "faulty" }
    var size: UInt64 { 1 << 20 }
    var capabilities: NBDExportCapabilities { [.flush, .trim, .writeZeroes, .fastZero] }
    func read(offset: UInt64, length: UInt32) async throws(NBDError) -> ByteBuffer {
        if offset == 0 { throw NBDError(.EIO, "disk on fire") }
        if offset == 512 { return ByteBuffer(bytes: [1, 2, 3]) }  // short: a broken export
        return ByteBuffer(repeating: 9, count: Int(length))
    }
    func write(offset: UInt64, data: ByteBuffer, fua: Bool) async throws(NBDError) {
        throw NBDError(StorageError(.write, path: "/x", errno: EDQUOT))
    }
    func writeZeroes(offset: UInt64, length: UInt32, noHole: Bool, fastZero: Bool, fua: Bool) async throws(NBDError) {
        throw NBDError(.ENOTSUP, "slow")
    }
    func blockStatus(context: String, offset: UInt64, length: UInt32) async throws(NBDError) -> [NBDExtent] {
        [NBDExtent(length: 4096, flags: 3), NBDExtent(length: 1 << 19, flags: 0)]
    }
}

extension NBDServerTests {
    @Test func exportErrorsMapToWireErrorsWithTheirMessage() async throws {
        try await withNBDServer { f in
            try f.registry.add(FaultyExport())
            try await offPool {
                let c = try RawNBDClient(path: f.socket)
                try c.handshake(export: "faulty", structured: true)
                func error(_ r: NBDRequest) throws -> (UInt32, String) {
                    try c.sendRequest(
                        r,
                        payload: r.type == NBDCommand.write.rawValue ? [UInt8](repeating: 0, count: Int(r.length)) : [])
                    let reply = try c.readReply()
                    guard reply.error != 0 else { return (0, "") }
                    let n = Int(RawNBDClient.be(reply.payload, 4, UInt16.self))
                    return (reply.error, String(decoding: reply.payload[6..<(6 + n)], as: UTF8.self))
                }
                #expect(try error(NBDRequest(.read, cookie: 1, offset: 0, length: 512)) == (5, "disk on fire"))
                #expect(
                    try error(NBDRequest(.read, cookie: 2, offset: 512, length: 512)).0 == NBDErrorCode.EIO.rawValue,
                    "a short read is EIO")
                #expect(
                    try error(NBDRequest(.write, cookie: 3, offset: 0, length: 512)).0 == NBDErrorCode.ENOSPC.rawValue,
                    "EDQUOT is ENOSPC")
                #expect(
                    try error(NBDRequest(.writeZeroes, cookie: 4, offset: 0, length: 512)).0
                        == NBDErrorCode.EINVAL.rawValue,
                    "ENOTSUP only answers FAST_ZERO")
                #expect(
                    try error(NBDRequest(.writeZeroes, flags: .fastZero, cookie: 5, offset: 0, length: 512)).0
                        == NBDErrorCode.ENOTSUP.rawValue)
                // REQ_ONE: one extent, not longer than the request; without: cut after the request's end.
                try c.sendRequest(NBDRequest(.blockStatus, flags: .reqOne, cookie: 6, offset: 0, length: 1000))
                var r = try c.readReply()
                #expect(Array(r.payload[4...]) == [0, 0, 3, 0xe8, 0, 0, 0, 3])
                try c.sendRequest(NBDRequest(.blockStatus, cookie: 7, offset: 0, length: 8192))
                r = try c.readReply()
                #expect(r.payload.count == 4 + 16 && r.flags == 1)
                try c.sendRequest(NBDRequest(.read, cookie: 8, offset: 4096, length: 100))
                r = try c.readReply()
                #expect(
                    r.type == NBDReplyType.offsetData.rawValue && r.payload.count == 108, "and the connection goes on")
            }
        }
    }
}

/// Counts how many reads run at once.
private final class CountingExport: NBDExport {
    let state = Mutex<(now: Int, peak: Int, total: Int)>((0, 0, 0))
    var name: String { "counting" }
    var size: UInt64 { 64 << 20 }
    var capabilities: NBDExportCapabilities { .readOnly }
    func read(offset: UInt64, length: UInt32) async throws(NBDError) -> ByteBuffer {
        state.withLock {
            $0.now += 1; $0.peak = max($0.peak, $0.now); $0.total += 1
        }
        try? await Task.sleep(for: .milliseconds(20))
        state.withLock { $0.now -= 1 }
        return ByteBuffer(repeating: 0, count: Int(length))
    }
}

extension NBDServerTests {
    @Test func requestsInFlightAreBoundedPerConnectionByCountAndBytes() async throws {
        let export = CountingExport()
        try await withNBDServer(configure: {
            $0.maxRequestsInFlight = 4; $0.maxBytesInFlight = 8 << 20
        }) { f in
            try f.registry.add(export)
            try await offPool {
                let c = try RawNBDClient(path: f.socket)
                try c.handshake(export: "counting", structured: false)
                for i in 0..<24 { try c.sendRequest(NBDRequest(.read, cookie: UInt64(i), offset: 0, length: 4096)) }
                for _ in 0..<24 { #expect(try c.readReply { _ in 4096 }.error == 0) }
            }
            #expect(export.state.withLock { $0.peak } == 4, "at most maxRequestsInFlight at once, and that many")
            export.state.withLock { $0 = (0, 0, 0) }
            try await offPool {
                let c = try RawNBDClient(path: f.socket)
                try c.handshake(export: "counting", structured: false)
                // 3 MiB reads: 8 MiB of payload in flight allows two at a time.
                for i in 0..<8 { try c.sendRequest(NBDRequest(.read, cookie: UInt64(i), offset: 0, length: 3 << 20)) }
                for _ in 0..<8 { #expect(try c.readReply { _ in 3 << 20 }.error == 0) }
            }
            #expect(export.state.withLock { $0.peak } == 2, "at most maxBytesInFlight of payload at once")
        }
    }

    @Test func aClientThatDoesNotFinishTheHandshakeIsClosed() async throws {
        try await withNBDServer(configure: { $0.handshakeTimeout = .milliseconds(200) }) { f in
            try await offPool {
                let c = try RawNBDClient(path: f.socket)
                try c.greet()
                let start = Date()
                #expect(c.isClosed(), "closed by the handshake timeout")
                // The 200 ms handshake timeout, not a later one; generous for a loaded machine.
                #expect(Date().timeIntervalSince(start) < 30)
            }
        }
    }
}
