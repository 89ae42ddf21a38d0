import Foundation
import NIOCore
import Synchronization
import Testing

@testable import UnixSocketServer

#if canImport(Glibc)
    import Glibc
#endif

struct UnixSocketServerTests {
    /// `shutdown()` stops each tracked connection and `run()` returns; at exit the server removes
    /// its socket file only if it is still the one it bound (here another socket replaced it).
    @Test func shutdownStopsTrackedConnectionsAndLeavesAReplacedSocketFile() async throws {
        let dir = try TempDir()
        defer { dir.remove() }
        let path = dir.path + "/s.sock"
        let server = UnixSocketServer(listener: .path(path))
        let (listening, listeningContinuation) = AsyncStream<String?>.makeStream()
        let accepted = Mutex(0)
        let stopped = Mutex(0)
        let returned = Mutex(false)
        let task = Task {
            try await server.run(
                bootstrap: server.makeBootstrap(),
                initializer: { channel in
                    accepted.withLock { $0 += 1 }
                    server.track(channel) {
                        stopped.withLock { $0 += 1 }
                        channel.close(promise: nil)
                    }
                    return channel.eventLoop.makeSucceededFuture(channel)
                },
                onListening: { listeningContinuation.yield($0.path) },
                serve: { channel in try? await channel.closeFuture.get() })
            returned.withLock { $0 = true }
        }
        var it = listening.makeAsyncIterator()
        #expect(await it.next() == path)
        var st = stat()
        #expect(lstat(path, &st) == 0 && st.st_mode & 0o777 == 0o660)

        let client = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        defer { Glibc.close(client) }
        #expect(withUnixAddress(path) { Glibc.connect(client, $0, $1) } == 0)
        #expect(await eventually { accepted.withLock { $0 } == 1 }, "the connection was not accepted")

        // Another socket takes the path (the bound one keeps its inode while the server holds it).
        unlink(path)
        let other = try listeningSocket(path)
        defer { Glibc.close(other) }

        server.shutdown()
        #expect(await eventually { returned.withLock { $0 } }, "run() did not return after shutdown()")
        try await task.value
        #expect(stopped.withLock { $0 } == 1)
        #expect(UnixSocketFile.isListening(path), "the replacing socket's file is left alone")
    }
}
