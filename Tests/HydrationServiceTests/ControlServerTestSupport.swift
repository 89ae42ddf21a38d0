import ControlProtocol
import Foundation
import Synchronization
import Testing

@testable import HydrationService
@testable import HydrationStorage

#if canImport(Glibc)
    import Glibc
#endif

/// Runs blocking socket code on its own thread so the cooperative pool (2 threads here) stays free
/// for the server's handler.
func offPool<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
    try await withCheckedThrowingContinuation { (c: CheckedContinuation<T, any Error>) in
        Thread { c.resume(with: Result { try body() }) }.start()
    }
}

func makeStatus(
    name: String, state: JobStatus.State = .hydrating, source: String = "/src.img", dest: String = "/dst.img"
) -> JobStatus {
    JobStatus(
        name: name, state: state,
        source: .init(path: source, sizeBytes: 1 << 20), dest: .init(path: dest), regionSize: 4096,
        regions: .init(total: 256, hydrated: 0, hydrating: 0),
        bytes: .init(total: 1 << 20, hydrated: 0, committed: 0, skippedZero: 0, discarded: 0),
        throughputBytesPerSecond: 0, etaSeconds: nil,
        commits: .init(count: 0, lastUnixMs: nil, lastDurationMs: nil),
        discard: .init(enabled: false, pendingBytes: 0, failed: 0), spaceBudgetBytes: nil,
        settings: .init(threshold: 1, batchSize: 1, rateLimitBytesPerSecond: nil, commitIntervalMs: 1000),
        metadata: .init(path: "/state/\(name).meta", mode: .rw), error: nil)
}

struct PlainError: Error {}

/// An in-memory ControlHandler that records what it was asked.
final class FakeHandler: ControlHandler {
    struct State {
        var jobs: [String: JobStatus] = [:]
        var calls: [String] = []
        var peers: [PeerCredentials] = []
        var watchTerminated = false
    }
    let state = Mutex(State())
    /// Non-final updates a watch sends before the final one; nil: never final.
    let watchUpdates: Int?
    let watchInterval: Duration

    init(watchUpdates: Int? = 3, watchInterval: Duration = .milliseconds(20)) {
        self.watchUpdates = watchUpdates
        self.watchInterval = watchInterval
    }

    var calls: [String] { state.withLock { $0.calls } }
    var peers: [PeerCredentials] { state.withLock { $0.peers } }
    var watchTerminated: Bool { state.withLock { $0.watchTerminated } }

    private func record(_ call: String, _ peer: PeerCredentials) {
        state.withLock {
            $0.calls.append(call); $0.peers.append(peer)
        }
    }

    private func job(_ name: String) throws -> JobStatus {
        guard let j = state.withLock({ $0.jobs[name] }) else { throw VarlinkError.noSuchJob(name) }
        return j
    }

    private func update(_ name: String, _ change: (inout JobStatus) -> Void) throws -> JobStatus {
        try state.withLock { st in
            guard var j = st.jobs[name] else { throw VarlinkError.noSuchJob(name) }
            change(&j)
            st.jobs[name] = j
            return j
        }
    }

    func start(_ p: StartParameters, peer: PeerCredentials) async throws -> StartReply {
        record("Start", peer)
        if p.isResumeOnly { return StartReply(job: try update(p.name) { $0.state = .hydrating }, created: false) }
        guard let source = p.source, let dest = p.dest else {
            throw VarlinkError.invalidParameter("source", reason: "source and dest are required")
        }
        return try state.withLock { st in
            if st.jobs[p.name] != nil { throw VarlinkError.jobExists(p.name) }
            var j = makeStatus(
                name: p.name, state: p.noHydration == true ? .paused : .hydrating, source: source, dest: dest)
            if let t = p.threshold { j.settings.threshold = t }
            st.jobs[p.name] = j
            return StartReply(job: j, created: true)
        }
    }

    func pause(_ p: PauseParameters, peer: PeerCredentials) async throws -> JobReply {
        record("Pause", peer)
        return JobReply(job: try update(p.name) { $0.state = .paused })
    }

    func resume(_ p: ResumeParameters, peer: PeerCredentials) async throws -> JobReply {
        record("Resume", peer)
        return JobReply(job: try update(p.name) { $0.state = .hydrating })
    }

    func getStatus(_ p: GetStatusParameters, peer: PeerCredentials) async throws -> GetStatusReply {
        record("GetStatus", peer)
        if let name = p.name { return GetStatusReply(jobs: [try job(name)]) }
        return GetStatusReply(jobs: state.withLock { $0.jobs.values.sorted { $0.name < $1.name } })
    }

    func watchStatus(_ p: GetStatusParameters, peer: PeerCredentials) async throws -> AsyncThrowingStream<
        StatusUpdate, any Error
    > {
        record("WatchStatus", peer)
        let name = p.name ?? "watched"
        var current = try p.name.map { try job($0) } ?? makeStatus(name: name)
        let (stream, continuation) = AsyncThrowingStream<StatusUpdate, any Error>.makeStream()
        let updates = watchUpdates, interval = watchInterval
        let producer = Task {
            var i: UInt64 = 0
            while !Task.isCancelled {
                let final = updates.map { i >= UInt64($0) } ?? false
                current.regions.hydrated = i
                if final { current.state = .complete }
                continuation.yield(StatusUpdate(jobs: [current], isFinal: final))
                if final { continuation.finish(); return }
                i += 1
                try? await Task.sleep(for: interval)
            }
        }
        continuation.onTermination = { [self] _ in
            producer.cancel()
            state.withLock { $0.watchTerminated = true }
        }
        return stream
    }

    func list(_ p: ListParameters, peer: PeerCredentials) async throws -> ListReply {
        record("List", peer)
        return ListReply(jobs: state.withLock { $0.jobs.values.sorted { $0.name < $1.name }.map(JobSummary.init) })
    }

    func set(_ p: SetParameters, peer: PeerCredentials) async throws -> JobReply {
        record("Set", peer)
        return JobReply(
            job: try update(p.name) { j in
                if let t = p.threshold { j.settings.threshold = t }
                if let b = p.batchSize { j.settings.batchSize = b }
                if let r = p.rateLimitBytesPerSecond { j.settings.rateLimitBytesPerSecond = r == 0 ? nil : r }
                if let c = p.commitIntervalMs { j.settings.commitIntervalMs = c }
                if let s = p.spaceBudgetBytes { j.spaceBudgetBytes = s == 0 ? nil : s }
            })
    }

    func commit(_ p: CommitParameters, peer: PeerCredentials) async throws -> JobReply {
        record("Commit", peer)
        _ = try job(p.name)
        try await Task.sleep(for: .milliseconds(30))  // "durable"
        return JobReply(job: try update(p.name) { $0.commits.count += 1 })
    }

    func remove(_ p: RemoveParameters, peer: PeerCredentials) async throws -> RemoveReply {
        record("Remove", peer)
        try state.withLock { st in
            guard let j = st.jobs[p.name] else { throw VarlinkError.noSuchJob(p.name) }
            if j.state == .hydrating && p.force != true { throw VarlinkError.jobRunning(p.name, state: j.state) }
            st.jobs[p.name] = nil
        }
        return RemoveReply()
    }

    func checkMetadata(_ p: CheckMetadataParameters, peer: PeerCredentials) async throws -> CheckMetadataReply {
        record("CheckMetadata", peer)
        if p.path == "/boom" { throw PlainError() }
        return CheckMetadataReply(
            report: MetadataReport(
                path: p.path, valid: p.path.hasSuffix(".meta"),
                problems: p.path.hasSuffix(".meta") ? [] : ["not a metadata file"]))
    }
}

/// A private directory under /tmp (short: socket paths are limited to 107 bytes).
final class SocketTempDir: Sendable {
    let path: String
    init() throws {
        var template = Array("/tmp/hyd-ctl-XXXXXX".utf8CString)
        guard let p = mkdtemp(&template) else { throw POSIXError(.EIO) }
        path = String(cString: p)
    }
    func remove() { try? FileManager.default.removeItem(atPath: path) }
}

/// Starts a ControlServer on a fresh socket, runs `body`, stops the server and cleans up.
func withServer(
    handler: FakeHandler = FakeHandler(),
    configure: (inout ControlServerConfiguration) -> Void = { _ in },
    _ body: (_ socketPath: String, _ server: ControlServer, _ handler: FakeHandler) async throws -> Void
) async throws {
    let dir = try SocketTempDir()
    defer { dir.remove() }
    let path = dir.path + "/run/control.sock"
    var config = ControlServerConfiguration(listener: .path(path))
    configure(&config)
    let (listening, listeningContinuation) = AsyncStream<Void>.makeStream()
    let server = ControlServer(configuration: config, handler: handler) { _ in listeningContinuation.yield() }
    let task = Task {
        defer { listeningContinuation.finish() }
        try await server.run()
    }
    var it = listening.makeAsyncIterator()
    guard await it.next() != nil else {
        try await task.value
        throw POSIXError(.EIO)
    }
    do {
        try await body(path, server, handler)
    } catch {
        server.shutdown()
        _ = try? await task.value
        throw error
    }
    server.shutdown()
    try await task.value
    #expect(!FileManager.default.fileExists(atPath: path), "socket file removed on shutdown")
}

/// A raw blocking connection for sending arbitrary bytes.
/// Calls `body` (connect or bind) with the address of the Unix socket `path`; returns its result,
/// errno set as the call left it.
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

final class RawConnection: Sendable {
    let fd: Int32
    private let buffer = Mutex<[UInt8]>([])

    init(path: String, timeoutSeconds: Int = 60) throws {
        fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        let rc = withUnixAddress(path) { [fd] in Glibc.connect(fd, $0, $1) }
        guard rc == 0 else { let e = errno; Glibc.close(fd); throw POSIXError(POSIXErrorCode(rawValue: e)!) }
        var tv = timeval(tv_sec: timeoutSeconds, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    deinit { Glibc.close(fd) }

    func send(_ bytes: [UInt8]) throws {
        var off = 0
        while off < bytes.count {
            let n = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress! + off, $0.count - off, Int32(MSG_NOSIGNAL)) }
            if n < 0 { throw POSIXError(POSIXErrorCode(rawValue: errno)!) }
            off += n
        }
    }

    func send(_ text: String) throws { try send(Array(text.utf8) + [0]) }

    /// The next NUL-terminated message, or nil at EOF / connection reset.
    func readFrame() throws -> [UInt8]? {
        try buffer.withLock { buf in
            while true {
                if let nul = buf.firstIndex(of: 0) {
                    let frame = Array(buf[..<nul])
                    buf.removeSubrange(...nul)
                    return frame
                }
                var chunk = [UInt8](repeating: 0, count: 65536)
                let n = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress!, $0.count, 0) }
                if n == 0 { return nil }
                if n < 0 {
                    if errno == ECONNRESET { return nil }
                    throw POSIXError(POSIXErrorCode(rawValue: errno)!)
                }
                buf += chunk[0..<n]
            }
        }
    }

    func readReply() throws -> VarlinkReply? {
        guard let f = try readFrame() else { return nil }
        return try VarlinkFraming.decodeReply(f)
    }
}
