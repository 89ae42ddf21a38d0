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
}
