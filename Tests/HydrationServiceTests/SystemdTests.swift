import ControlProtocol
import Testing

@testable import HydrationService
@testable import HydrationStorage

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

// MARK: - Fixtures

private func job(
    _ name: String, _ state: JobStatus.State, hydrated: UInt64 = 0, total: UInt64 = 100,
    rate: Double = 0, errorCode: String? = nil
) -> JobStatus {
    JobStatus(
        name: name, state: state,
        source: .init(path: "/src/\(name)", sizeBytes: total &* 4096),
        dest: .init(path: "/dst/\(name)"),
        regionSize: 4096,
        regions: .init(total: total, hydrated: hydrated, hydrating: 0),
        bytes: .init(
            total: total &* 4096, hydrated: hydrated &* 4096, committed: hydrated &* 4096,
            skippedZero: 0, discarded: 0),
        throughputBytesPerSecond: rate, etaSeconds: nil,
        commits: .init(count: 0, lastUnixMs: nil, lastDurationMs: nil),
        discard: .init(enabled: false, pendingBytes: 0, failed: 0),
        spaceBudgetBytes: nil,
        settings: .init(threshold: 1, batchSize: 1, rateLimitBytesPerSecond: nil, commitIntervalMs: 1000),
        metadata: .init(path: "/var/lib/hydrationd/\(name).meta", mode: .rw),
        error: errorCode.map { .init(code: $0, message: "boom") })
}

private let MiB = 1024.0 * 1024.0

// MARK: - Status line

@Suite("systemd status line")
struct StatusLineTests {
    @Test func noJobs() {
        #expect(statusLine(jobs: []) == "0 jobs")
    }

    @Test func issueExample() {
        let line = statusLine(jobs: [
            job("db", .hydrating, hydrated: 43, total: 100, rate: 310 * MiB),
            job("vm", .paused, hydrated: 12, total: 100),
        ])
        #expect(line == "2 jobs: db hydrating 43% 310 MiB/s, vm paused 12%")
    }

    @Test func singularAndOtherStates() {
        #expect(statusLine(jobs: [job("a", .idle)]) == "1 job: a idle")
        #expect(statusLine(jobs: [job("a", .complete, hydrated: 100)]) == "1 job: a complete")
        #expect(
            statusLine(jobs: [job("a", .failed, errorCode: "SourceReadFailed")])
                == "1 job: a failed (SourceReadFailed)")
        #expect(statusLine(jobs: [job("a", .failed)]) == "1 job: a failed")
        // No rate shown before the first measurement.
        #expect(statusLine(jobs: [job("a", .hydrating, hydrated: 0)]) == "1 job: a hydrating 0%")
    }

    @Test func percentIsFlooredAndNeverOverflows() {
        #expect(statusLine(jobs: [job("a", .hydrating, hydrated: 999, total: 1000)]) == "1 job: a hydrating 99%")
        #expect(statusLine(jobs: [job("a", .hydrating, hydrated: 5, total: 0)]) == "1 job: a hydrating 0%")
        #expect(statusLine(jobs: [job("a", .hydrating, hydrated: .max, total: .max)]) == "1 job: a hydrating 100%")
        #expect(statusLine(jobs: [job("a", .hydrating, hydrated: .max / 2, total: .max)]) == "1 job: a hydrating 49%")
        // hydrated > total (a torn read of counters) is clamped.
        #expect(statusLine(jobs: [job("a", .paused, hydrated: 7, total: 5)]) == "1 job: a paused 100%")
    }

    @Test func rates() {
        #expect(formatRate(0) == "0 B/s")
        #expect(formatRate(512) == "512 B/s")
        #expect(formatRate(12.7 * 1024) == "12 KiB/s")
        #expect(formatRate(310.9 * MiB) == "310 MiB/s")
        #expect(formatRate(1.25 * 1024 * MiB) == "1.3 GiB/s")
        #expect(formatRate(.nan) == "0 B/s")
        #expect(formatRate(-5) == "0 B/s")
    }

    @Test func namesCannotBreakTheLine() {
        let line = statusLine(jobs: [job("evil\nSTATUS=x y", .idle)])
        #expect(!line.contains("\n"))
        #expect(line == "1 job: evil_STATUS=x_y idle")
    }

    @Test func manyJobsAreCutWithACount() {
        let jobs = (0..<50).map { job("job-number-\($0)", .hydrating, hydrated: 50, rate: 100 * MiB) }
        let line = statusLine(jobs: jobs)
        #expect(line.count <= SystemdNotifier.maxStatusLength)
        #expect(line.hasPrefix("50 jobs: job-number-0 hydrating 50% 100 MiB/s, "))
        let shown = line.split(separator: ",").filter { $0.contains("hydrating") }.count
        #expect(line.hasSuffix(", +\(50 - shown) more"))
        #expect(shown >= 1 && shown < 50)
    }

    @Test func sanitizeStatus() {
        #expect(SystemdNotifier.sanitizeStatus("a\nb\rc\td") == "a b c d")
        let long = String(repeating: "x", count: 500)
        let cut = SystemdNotifier.sanitizeStatus(long)
        #expect(cut.count == SystemdNotifier.maxStatusLength)
        #expect(cut.hasSuffix("…"))
        let exact = String(repeating: "y", count: SystemdNotifier.maxStatusLength)
        #expect(SystemdNotifier.sanitizeStatus(exact) == exact)
    }

    @Test func microsecondConversion() {
        #expect(SystemdNotifier.microseconds(.seconds(3)) == 3_000_000)
        #expect(SystemdNotifier.microseconds(.milliseconds(1500)) == 1_500_000)
        #expect(SystemdNotifier.microseconds(.seconds(-1)) == 0)
        #expect(SystemdNotifier.microseconds(.seconds(Int64.max)) == Int64.max)
    }
}

// MARK: - A fake NOTIFY_SOCKET

/// A Unix datagram socket bound in a fresh temporary directory, standing in for systemd's
/// notification socket. Removes its path and directory on `close()`.
private final class FakeNotifySocket {
    let dir: String
    let path: String
    let fd: Int32

    init() throws {
        var template = Array("/tmp/hydr-notify-XXXXXX".utf8CString)
        guard let d = mkdtemp(&template) else { throw Failure("mkdtemp: errno \(errno)") }
        dir = String(cString: d)
        path = dir + "/notify"
        fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw Failure("socket: errno \(errno)") }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: addr.sun_path) else { throw Failure("path too long") }
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            for (i, b) in bytes.enumerated() { raw[i] = b }
            raw[bytes.count] = 0
        }
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        guard rc == 0 else { throw Failure("bind: errno \(errno)") }
    }

    /// The next datagram, or nil if none arrives within `timeoutMs`.
    func receive(timeoutMs: Int32 = 2000) -> String? {
        var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        guard poll(&pfd, 1, timeoutMs) == 1 else { return nil }
        var buffer = [UInt8](repeating: 0, count: 4096)
        let n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
        guard n >= 0 else { return nil }
        return String(decoding: buffer[0..<n], as: UTF8.self)
    }

    func close() {
        _ = Glibc.close(fd)
        unlink(path)
        rmdir(dir)
    }
}

private struct Failure: Error, CustomStringConvertible {
    let description: String
    init(_ d: String) { description = d }
}

/// Runs `body` with the given variables set, restoring the previous environment afterwards.
private func withEnvironment<T>(_ vars: [String: String?], _ body: () throws -> T) rethrows -> T {
    var saved: [String: String?] = [:]
    for (k, v) in vars {
        saved[k] = getenv(k).map { String(cString: $0) }
        if let v { setenv(k, v, 1) } else { unsetenv(k) }
    }
    defer {
        for (k, v) in saved {
            if let v { setenv(k, v, 1) } else { unsetenv(k) }
        }
    }
    return try body()
}

// These tests change process-wide environment variables: they run one at a time, and nothing else
// in the test bundle reads NOTIFY_SOCKET / WATCHDOG_* / LISTEN_*.
@Suite("systemd notifier", .serialized)
struct SystemdNotifierTests {
    @Test func sendsReadyStatusWatchdogStoppingToNotifySocket() throws {
        let sock = try FakeNotifySocket()
        defer { sock.close() }
        withEnvironment(["NOTIFY_SOCKET": sock.path]) {
            #expect(SystemdNotifier.isUnderSystemd)
            let n = SystemdNotifier()
            #expect(n.isEnabled)

            #expect(n.ready(status: "restored 2 jobs"))
            #expect(sock.receive() == "READY=1\nSTATUS=restored 2 jobs")

            #expect(n.status("1 job: db hydrating 43%\nSTATUS=forged"))
            #expect(sock.receive() == "STATUS=1 job: db hydrating 43% STATUS=forged")

            #expect(n.watchdogPing())
            #expect(sock.receive() == "WATCHDOG=1")

            #expect(n.extendTimeout(by: .seconds(90)))
            #expect(sock.receive() == "EXTEND_TIMEOUT_USEC=90000000")

            #expect(n.failed(errno: 5, status: "commit failed"))
            #expect(sock.receive() == "STATUS=commit failed\nERRNO=5")

            #expect(n.stopping(status: "final commit"))
            #expect(sock.receive() == "STOPPING=1\nSTATUS=final commit")

            #expect(n.mainPID(1234))
            #expect(sock.receive() == "MAINPID=1234")

            // Nothing else was sent.
            #expect(sock.receive(timeoutMs: 100) == nil)
            // The environment is left in place for later notifications.
            #expect(getenv("NOTIFY_SOCKET") != nil)
        }
    }

    @Test func silentOutsideSystemd() throws {
        let sock = try FakeNotifySocket()
        defer { sock.close() }
        // A notifier made without NOTIFY_SOCKET stays silent even if the variable appears later.
        let n = withEnvironment(["NOTIFY_SOCKET": nil]) { () -> SystemdNotifier in
            #expect(!SystemdNotifier.isUnderSystemd)
            return SystemdNotifier()
        }
        #expect(!n.isEnabled)
        withEnvironment(["NOTIFY_SOCKET": sock.path]) {
            #expect(!n.ready())
            #expect(!n.status("x"))
            #expect(!n.watchdogPing())
            #expect(!n.stopping())
            #expect(!n.extendTimeout(by: .seconds(1)))
            #expect(sock.receive(timeoutMs: 100) == nil)
        }
        withEnvironment(["NOTIFY_SOCKET": ""]) {
            #expect(!SystemdNotifier.isUnderSystemd)
            #expect(!SystemdNotifier().isEnabled)
        }
    }

    @Test func unreachableSocketIsNotFatal() {
        withEnvironment(["NOTIFY_SOCKET": "/nonexistent/hydr-notify"]) {
            let n = SystemdNotifier()
            #expect(n.isEnabled)
            #expect(!n.ready())
            #expect(!n.watchdogPing())
        }
    }

    @Test func watchdogIntervalIsHalfTheTimeout() {
        let pid = String(getpid())
        withEnvironment(["WATCHDOG_USEC": "4000000", "WATCHDOG_PID": pid]) {
            let n = SystemdNotifier()
            #expect(n.watchdogTimeout() == .seconds(4))
            #expect(n.watchdogInterval() == .seconds(2))
            // Not unset: asking twice gives the same answer.
            #expect(n.watchdogInterval() == .seconds(2))
        }
        withEnvironment(["WATCHDOG_USEC": "4000000", "WATCHDOG_PID": String(getpid() + 1)]) {
            #expect(SystemdNotifier().watchdogInterval() == nil)
        }
        withEnvironment(["WATCHDOG_USEC": nil, "WATCHDOG_PID": nil]) {
            #expect(SystemdNotifier().watchdogInterval() == nil)
        }
    }

    @Test func watchdogFromEnvironmentNeedsNotifySocketAndWatchdog() throws {
        let sock = try FakeNotifySocket()
        defer { sock.close() }
        let pid = String(getpid())
        try withEnvironment([
            "NOTIFY_SOCKET": sock.path, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": pid,
            SystemdWatchdog.stallEnvironmentVariable: nil,
        ]) {
            let w = try #require(SystemdWatchdog.fromEnvironment())
            #expect(w.interval == .seconds(1))
            #expect(w.stallAfter == nil)
            #expect(w.pingIfDue())
            #expect(sock.receive() == "WATCHDOG=1")
        }
        withEnvironment(["NOTIFY_SOCKET": nil, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": pid]) {
            #expect(SystemdWatchdog.fromEnvironment() == nil)
        }
        withEnvironment(["NOTIFY_SOCKET": sock.path, "WATCHDOG_USEC": nil, "WATCHDOG_PID": nil]) {
            #expect(SystemdWatchdog.fromEnvironment() == nil)
        }
    }

    @Test func watchdogPingsAreRateLimited() throws {
        let sock = try FakeNotifySocket()
        defer { sock.close() }
        withEnvironment(["NOTIFY_SOCKET": sock.path]) {
            let t0 = ContinuousClock.now
            let w = SystemdWatchdog(notifier: SystemdNotifier(), interval: .seconds(1), now: t0)
            #expect(w.pingIfDue(now: t0))
            #expect(!w.pingIfDue(now: t0 + .milliseconds(999)))
            #expect(w.pingIfDue(now: t0 + .milliseconds(1000)))
            #expect(!w.pingIfDue(now: t0 + .milliseconds(1500)))
            #expect(w.pingIfDue(now: t0 + .milliseconds(2100)))
            #expect(sock.receive() == "WATCHDOG=1")
            #expect(sock.receive() == "WATCHDOG=1")
            #expect(sock.receive() == "WATCHDOG=1")
            #expect(sock.receive(timeoutMs: 100) == nil)
        }
    }

    @Test func stallHookStopsPings() throws {
        let sock = try FakeNotifySocket()
        defer { sock.close() }
        withEnvironment(["NOTIFY_SOCKET": sock.path]) {
            let t0 = ContinuousClock.now
            let w = SystemdWatchdog(
                notifier: SystemdNotifier(), interval: .milliseconds(100),
                stallAfter: .milliseconds(500), now: t0)
            #expect(w.pingIfDue(now: t0 + .milliseconds(400)))
            #expect(!w.isStalled)
            #expect(!w.pingIfDue(now: t0 + .milliseconds(500)))
            #expect(w.isStalled)
            #expect(!w.pingIfDue(now: t0 + .seconds(60)))
            #expect(sock.receive() == "WATCHDOG=1")
            #expect(sock.receive(timeoutMs: 100) == nil)
        }
    }

    @Test func stallHookIsReadOnlyInDebugBuilds() {
        withEnvironment([SystemdWatchdog.stallEnvironmentVariable: "1500"]) {
            #if DEBUG
                #expect(SystemdWatchdog.testStallFromEnvironment() == .milliseconds(1500))
            #else
                #expect(SystemdWatchdog.testStallFromEnvironment() == nil)
            #endif
        }
        withEnvironment([SystemdWatchdog.stallEnvironmentVariable: "soon"]) {
            #expect(SystemdWatchdog.testStallFromEnvironment() == nil)
        }
    }

    @Test func listenFileDescriptors() throws {
        // Not activated: nothing.
        withEnvironment(["LISTEN_PID": nil, "LISTEN_FDS": nil]) {
            #expect(SystemdNotifier.listenFileDescriptors() == [])
        }
        // Activated for another process: nothing, and the variables are consumed.
        withEnvironment(["LISTEN_PID": String(getpid() + 1), "LISTEN_FDS": "1"]) {
            #expect(SystemdNotifier.listenFileDescriptors() == [])
        }
        // Activated for us with one fd: [3]. sd_listen_fds sets FD_CLOEXEC on fd 3, so make sure
        // fd 3 exists, and restore its flags afterwards.
        var opened: Int32 = -1
        if fcntl(3, F_GETFD) == -1 {
            opened = open("/dev/null", O_RDONLY)
            try #require(opened == 3, "could not place a stand-in on fd 3")
        }
        let savedFlags = fcntl(3, F_GETFD)
        defer {
            _ = fcntl(3, F_SETFD, savedFlags)
            if opened == 3 { _ = Glibc.close(3) }
        }
        withEnvironment(["LISTEN_PID": String(getpid()), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "control"]) {
            #expect(SystemdNotifier.listenFileDescriptors() == [3])
            #expect(fcntl(3, F_GETFD) & FD_CLOEXEC != 0)
            // Unset after use: a second call (or a child process) sees nothing.
            #expect(getenv("LISTEN_FDS") == nil)
            #expect(getenv("LISTEN_PID") == nil)
            #expect(SystemdNotifier.listenFileDescriptors() == [])
        }
    }
}

/// READY=1 waits for every listener; the wait suspends (no polling) and ends early when cancelled.
@Suite struct ReadinessTests {
    @Test func waitEndsWhenEveryPartIsDone() async {
        let r = Readiness(parts: 2)
        let waiter = Task {
            await r.wait(); return r.isReady
        }
        r.done()
        #expect(!r.isReady)
        r.done()
        #expect(await waiter.value, "the wait ended with both parts done")
        await r.wait()  // already ready: returns at once
    }

    @Test func waitEndsOnCancellation() async {
        let r = Readiness(parts: 1)
        let waiter = Task {
            await r.wait(); return r.isReady
        }
        waiter.cancel()
        #expect(await waiter.value == false, "cancelled before ready")
    }
}

/// The descriptors kept aside for the sockets while jobs are restored never take what the
/// restore itself needs under a low limit.
@Suite struct DescriptorReserveTests {
    @Test func reserveLeavesHalfOfWhatIsLeft() {
        #expect(DescriptorReserve.size(softLimit: 1024, inUse: 20) == DescriptorReserve.forSockets)
        #expect(DescriptorReserve.size(softLimit: 44, inUse: 20) == 12)
        #expect(DescriptorReserve.size(softLimit: 20, inUse: 20) == 0)
        #expect(DescriptorReserve.size(softLimit: 10, inUse: 20) == 0)
    }
}
