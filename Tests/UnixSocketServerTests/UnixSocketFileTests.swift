import Foundation
import Synchronization
import Testing

@testable import UnixSocketServer

#if canImport(Glibc)
    import Glibc
#endif

struct UnixSocketFileTests {
    /// A live server whose backlog is full (hung, never accepting) is still a live socket, and
    /// finding that out does not wait: the probe's connect is non-blocking.
    @Test func aListenerWithAFullBacklogIsInUseAndNotWaitedFor() async throws {
        let dir = try TempDir()
        defer { dir.remove() }
        let path = dir.path + "/hung.sock"
        let fd = try listeningSocket(path)
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
}

final class TempDir: Sendable {
    let path: String
    init() throws {
        var template = Array("/tmp/hyd-sock-XXXXXX".utf8CString)
        guard let p = mkdtemp(&template) else { throw POSIXError(.EIO) }
        path = String(cString: p)
    }
    func remove() { try? FileManager.default.removeItem(atPath: path) }
}

/// A bound, listening Unix socket that never accepts.
func listeningSocket(_ path: String) throws -> Int32 {
    let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
    let rc = withUnixAddress(path) { Glibc.bind(fd, $0, $1) }
    guard rc == 0, listen(fd, 16) == 0 else { throw POSIXError(POSIXErrorCode(rawValue: errno)!) }
    return fd
}

func withUnixAddress(_ path: String, _ body: (UnsafePointer<sockaddr>, socklen_t) -> Int32) -> Int32 {
    var addr = sockaddr_un()
    addr.sun_family = sa_family_t(AF_UNIX)
    withUnsafeMutableBytes(of: &addr.sun_path) { raw in
        let b = Array(path.utf8)
        raw.copyBytes(from: b)
        raw[b.count] = 0
    }
    return withUnsafePointer(to: &addr) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
    }
}

/// Polls `condition` until it holds or the deadline (a generous liveness guard) passes.
func eventually(_ seconds: Double = 120, _ condition: () async -> Bool) async -> Bool {
    let deadline = Date().addingTimeInterval(seconds)
    while Date() < deadline {
        if await condition() { return true }
        try? await Task.sleep(nanoseconds: 10_000_000)
    }
    return await condition()
}
