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
        // Well under the 60 s idle timeout that would otherwise end the client's connection.
        #expect(ContinuousClock.now - started < .seconds(30), "an idle client does not hold up shutdown")
        _ = try await offPool { #expect(throws: VarlinkClientError.self) { try client.getInfo() } }
        #expect(!FileManager.default.fileExists(atPath: path))
    }
}
