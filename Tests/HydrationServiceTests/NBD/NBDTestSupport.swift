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

/// The NBD client programs the tests drive (Debian: libnbd-bin, qemu-utils, python3-libnbd).
enum NBDTools {
    static func path(_ name: String) -> String? {
        for dir in ["/usr/bin", "/usr/local/bin", "/bin"]
        where FileManager.default.isExecutableFile(atPath: dir + "/" + name) {
            return dir + "/" + name
        }
        return nil
    }
    static var hasNbdinfo: Bool { path("nbdinfo") != nil }
    static var hasNbdcopy: Bool { path("nbdcopy") != nil }
    static var hasQemu: Bool { path("qemu-img") != nil && path("qemu-io") != nil }
    /// nbdsh needs Debian's python with the libnbd module.
    static var hasNbdsh: Bool {
        path("nbdsh") != nil && FileManager.default.fileExists(atPath: "/usr/bin/python3")
    }
}

struct ToolResult: Sendable {
    var status: Int32
    var stdout: String
    var stderr: String
}

/// Runs a program to completion on its own thread (never the cooperative pool), with a deadline.
func runTool(
    _ tool: String, _ arguments: [String], stdin: String? = nil, environment: [String: String] = [:],
    timeout: Double = 120
) async throws -> ToolResult {
    guard let exe = NBDTools.path(tool) else { throw POSIXError(.ENOENT) }
    return try await offPool {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: exe)
        p.arguments = arguments
        var env = ProcessInfo.processInfo.environment
        env["PATH"] = "/usr/bin:/bin:" + (env["PATH"] ?? "")
        env["LIBNBD_DEBUG"] = nil
        env.merge(environment) { $1 }
        p.environment = env
        // Output goes to files, so a chatty child never blocks on a full pipe.
        let base = "/tmp/hyd-nbd-tool-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        _ = FileManager.default.createFile(atPath: base + ".out", contents: nil)
        _ = FileManager.default.createFile(atPath: base + ".err", contents: nil)
        defer {
            unlink(base + ".out")
            unlink(base + ".err")
        }
        p.standardOutput = FileHandle(forWritingAtPath: base + ".out")
        p.standardError = FileHandle(forWritingAtPath: base + ".err")
        let input = Pipe()
        p.standardInput = input
        try p.run()
        if let stdin { input.fileHandleForWriting.write(Data(stdin.utf8)) }
        try? input.fileHandleForWriting.close()
        // SIGKILL: children inherit the test thread's blocked signal mask, so SIGTERM stays pending.
        let pid = p.processIdentifier
        let killer = DispatchWorkItem { if p.isRunning { kill(pid, SIGKILL) } }
        DispatchQueue.global().asyncAfter(deadline: .now() + timeout, execute: killer)
        p.waitUntilExit()
        killer.cancel()
        return ToolResult(
            status: p.terminationStatus,
            stdout: (try? String(contentsOfFile: base + ".out", encoding: .utf8)) ?? "",
            stderr: (try? String(contentsOfFile: base + ".err", encoding: .utf8)) ?? "")
    }
}

func nbdURI(_ export: String, socket: String) -> String { "nbd+unix:///\(export)?socket=\(socket)" }

/// A file export with extra knobs for tests: a private meta context (`x-test:stripes`, flags =
/// 1 MiB stripe index mod 4), capabilities taken away, a delay for reads at chosen offsets.
final class TestExport: NBDExport {
    let inner: FileNBDExport
    let name: String
    let capabilities: NBDExportCapabilities
    let slowReadOffsets: Set<UInt64>
    /// Called when a slow read starts (tests wait for it instead of sleeping).
    let onSlowRead: (@Sendable () -> Void)?
    /// Holds a slow read until the test opens it (instead of a 300 ms delay, whose outcome
    /// depends on how busy the machine is).
    let slowReadGate: ReadGate?
    var size: UInt64 { inner.size }
    var description: String? { inner.description }
    var blockSize: NBDBlockSize { inner.blockSize }
    var metaContexts: [String] { [NBDProtocol.baseAllocation, "x-test:stripes"] }

    init(
        name: String, inner: FileNBDExport, removing: NBDExportCapabilities = [], slowReadOffsets: Set<UInt64> = [],
        onSlowRead: (@Sendable () -> Void)? = nil, slowReadGate: ReadGate? = nil
    ) {
        self.onSlowRead = onSlowRead
        self.slowReadGate = slowReadGate
        self.name = name
        self.inner = inner
        self.capabilities = inner.capabilities.subtracting(removing)
        self.slowReadOffsets = slowReadOffsets
    }

    func read(offset: UInt64, length: UInt32) async throws(NBDError) -> ByteBuffer {
        if slowReadOffsets.contains(offset) {
            onSlowRead?()
            if let slowReadGate { await slowReadGate.wait() } else { try? await Task.sleep(for: .milliseconds(300)) }
        }
        return try await inner.read(offset: offset, length: length)
    }
    func write(offset: UInt64, data: ByteBuffer, fua: Bool) async throws(NBDError) {
        try await inner.write(offset: offset, data: data, fua: fua)
    }
    func flush() async throws(NBDError) { try await inner.flush() }
    func trim(offset: UInt64, length: UInt32, fua: Bool) async throws(NBDError) {
        try await inner.trim(offset: offset, length: length, fua: fua)
    }
    func writeZeroes(offset: UInt64, length: UInt32, noHole: Bool, fastZero: Bool, fua: Bool) async throws(NBDError) {
        try await inner.writeZeroes(offset: offset, length: length, noHole: noHole, fastZero: fastZero, fua: fua)
    }
    func cache(offset: UInt64, length: UInt32) async throws(NBDError) {
        try await inner.cache(offset: offset, length: length)
    }
    func blockStatus(context: String, offset: UInt64, length: UInt32) async throws(NBDError) -> [NBDExtent] {
        if context == "x-test:stripes" {
            let stripe: UInt64 = 1 << 20
            var out: [NBDExtent] = []
            var pos = offset
            let end = min(size, offset + UInt64(length))
            while pos < end {
                let next = min(end, (pos / stripe + 1) * stripe)
                out.append(NBDExtent(length: UInt32(next - pos), flags: UInt32((pos / stripe) % 4)))
                pos = next
            }
            return out
        }
        return try await inner.blockStatus(context: context, offset: offset, length: length)
    }
}

/// A server on a fresh socket with the given exports (files under a temp dir), stopped afterwards.
struct NBDFixture {
    let dir: SocketTempDir
    let socket: String
    let server: NBDServer
    let registry: NBDExportRegistry
    let io: IOExecutor

    func uri(_ export: String) -> String { nbdURI(export, socket: socket) }

    /// Creates `path` with `bytes` (sparse where `holes`), opened as a FileNBDExport.
    func fileExport(name: String, path: String, size: Int, description: String? = nil, readOnly: Bool = false) throws
        -> FileNBDExport
    {
        if !FileManager.default.fileExists(atPath: path) {
            let fd = open(path, O_CREAT | O_RDWR | O_CLOEXEC, 0o600)
            ftruncate(fd, off_t(size))
            close(fd)
        }
        let device = try PosixStorage().open(path, mode: .destination(createSize: nil))
        return FileNBDExport(name: name, device: device, io: io, description: description, readOnly: readOnly)
    }
}

func withNBDServer(
    configure: (inout NBDServerConfiguration) -> Void = { _ in },
    _ body: (NBDFixture) async throws -> Void
) async throws {
    let dir = try SocketTempDir()
    defer { dir.remove() }
    let socket = dir.path + "/run/nbd.sock"
    var config = NBDServerConfiguration(listener: .path(socket))
    // The handshake deadline is a property some tests check (they set their own); for the others
    // it is a liveness guard: a raw client's long negotiation on a loaded machine (35 s once, under
    // stress-ng and a second test run) must not be cut by it.
    config.handshakeTimeout = .seconds(600)
    configure(&config)
    let registry = NBDExportRegistry()
    let io = IOExecutor(threads: 4)
    let (listening, listeningContinuation) = AsyncStream<Void>.makeStream()
    let server = NBDServer(configuration: config, exports: registry) { _ in listeningContinuation.yield() }
    let task = Task {
        defer { listeningContinuation.finish() }
        try await server.run()
    }
    var it = listening.makeAsyncIterator()
    guard await it.next() != nil else {
        try await task.value
        throw POSIXError(.EIO)
    }
    let fixture = NBDFixture(dir: dir, socket: socket, server: server, registry: registry, io: io)
    do {
        try await body(fixture)
    } catch {
        server.shutdown()
        _ = try? await task.value
        await io.shutdown()
        throw error
    }
    server.shutdown()
    try await task.value
    await io.shutdown()
    #expect(!FileManager.default.fileExists(atPath: socket), "socket file removed on shutdown")
}

/// A gate a test opens once: every `wait` before and after returns once it is open.
final class ReadGate: Sendable {
    private let state = Mutex<(open: Bool, waiters: [CheckedContinuation<Void, Never>])>((false, []))

    func wait() async {
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            let now = state.withLock { st -> Bool in
                if st.open { return true }
                st.waiters.append(c)
                return false
            }
            if now { c.resume() }
        }
    }

    func open() {
        let waiters = state.withLock { st -> [CheckedContinuation<Void, Never>] in
            st.open = true
            defer { st.waiters = [] }
            return st.waiters
        }
        for w in waiters { w.resume() }
    }
}
