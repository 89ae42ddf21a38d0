// systemd integration building blocks: readiness/status/watchdog notifications (sd_notify),
// the watchdog interval (sd_watchdog_enabled), socket activation (sd_listen_fds), and the one-line
// STATUS= summary of the jobs.
//
// Outside systemd (no NOTIFY_SOCKET in the environment) every notification is a no-op that costs
// one Bool test: nothing is sent, nothing is logged.

import CSystemd
import ControlProtocol
import Synchronization

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// Sends state changes to the service manager over `$NOTIFY_SOCKET` (sd_notify(3)).
///
/// Whether the notifier is active is decided once, when it is made (`init()` reads NOTIFY_SOCKET).
/// The environment is never unset, so several notifiers (and libsystemd itself) keep working.
/// `sd_notify` opens a fresh datagram socket per call and is safe to call from any thread.
public struct SystemdNotifier: Sendable {
    /// True when NOTIFY_SOCKET was set (non-empty) when this notifier was made.
    public let isEnabled: Bool

    /// Longest STATUS= text sent; longer texts are cut and end in "…".
    public static let maxStatusLength = 200

    public init() {
        self.isEnabled = Self.isUnderSystemd
    }

    /// True when the process was started by a service manager that accepts notifications
    /// (NOTIFY_SOCKET set and non-empty). Reads the environment on every call.
    public static var isUnderSystemd: Bool {
        guard let value = getenv("NOTIFY_SOCKET") else { return false }
        return value.pointee != 0
    }

    /// The PID systemd expects notifications and watchdog pings from (`$WATCHDOG_PID`,
    /// else this process).
    public static var mainPID: Int32 {
        if let value = getenv("WATCHDOG_PID"), let pid = Int32(String(cString: value)) { return pid }
        return getpid()
    }

    // MARK: Notifications

    /// Sends raw `KEY=value` lines (joined by newlines). Returns true when the manager got them;
    /// false when not under systemd or when sending failed (sending never throws: a lost
    /// notification must not take the daemon down).
    @discardableResult
    public func send(_ lines: [String]) -> Bool {
        guard isEnabled, !lines.isEmpty else { return false }
        let message = lines.joined(separator: "\n")
        return sd_notify(0, message) > 0
    }

    /// READY=1: the control socket listens and every job has been restored.
    /// Optionally sets STATUS= in the same datagram.
    @discardableResult
    public func ready(status: String? = nil) -> Bool {
        guard isEnabled else { return false }
        var lines = ["READY=1"]
        if let status { lines.append("STATUS=" + Self.sanitizeStatus(status)) }
        return send(lines)
    }

    /// STATUS=<text>, made one line (control characters become spaces) and cut to
    /// `maxStatusLength` characters.
    @discardableResult
    public func status(_ text: String) -> Bool {
        guard isEnabled else { return false }
        return send(["STATUS=" + Self.sanitizeStatus(text)])
    }

    /// STOPPING=1 (at the start of shutdown), optionally with a STATUS= line.
    @discardableResult
    public func stopping(status: String? = nil) -> Bool {
        guard isEnabled else { return false }
        var lines = ["STOPPING=1"]
        if let status { lines.append("STATUS=" + Self.sanitizeStatus(status)) }
        return send(lines)
    }

    /// WATCHDOG=1. Prefer `SystemdWatchdog.pingIfDue()` from the work loop, which rate-limits.
    @discardableResult
    public func watchdogPing() -> Bool {
        guard isEnabled else { return false }
        return send(["WATCHDOG=1"])
    }

    /// EXTEND_TIMEOUT_USEC=: asks for more time for the current start-up or shutdown step
    /// (e.g. a final commit that is still flushing the destination). The manager then waits at
    /// least `duration` from now, even past TimeoutStartSec=/TimeoutStopSec=.
    @discardableResult
    public func extendTimeout(by duration: Duration) -> Bool {
        guard isEnabled else { return false }
        return send(["EXTEND_TIMEOUT_USEC=\(Self.microseconds(duration))"])
    }

    /// STATUS= and ERRNO= before exiting with a failure.
    @discardableResult
    public func failed(errno code: Int32, status: String) -> Bool {
        guard isEnabled else { return false }
        return send(["STATUS=" + Self.sanitizeStatus(status), "ERRNO=\(code)"])
    }

    /// MAINPID=: only needed if the daemon ever hands over to another process.
    @discardableResult
    public func mainPID(_ pid: Int32) -> Bool {
        guard isEnabled else { return false }
        return send(["MAINPID=\(pid)"])
    }

    // MARK: Watchdog

    /// The watchdog timeout systemd enforces (WatchdogSec=), or nil when the watchdog is off for
    /// this process (no WATCHDOG_USEC, or WATCHDOG_PID names another process).
    public func watchdogTimeout() -> Duration? {
        var usec: UInt64 = 0
        guard sd_watchdog_enabled(0, &usec) > 0, usec > 0 else { return nil }
        return .microseconds(Int64(clamping: usec))
    }

    /// How often to send WATCHDOG=1: half the timeout (sd_watchdog_enabled(3)), or nil when the
    /// watchdog is off.
    public func watchdogInterval() -> Duration? {
        watchdogTimeout().map { $0 / 2 }
    }

    // MARK: Socket activation

    /// The listening sockets systemd passed (sd_listen_fds(1)): fds SD_LISTEN_FDS_START..<+n,
    /// already close-on-exec. Empty when not socket-activated. Unsets LISTEN_PID/LISTEN_FDS/
    /// LISTEN_FDNAMES, so call it once, at start-up, before other threads read the environment.
    public static func listenFileDescriptors() -> [Int32] {
        let n = sd_listen_fds(1)
        guard n > 0 else { return [] }
        let start = Int32(SD_LISTEN_FDS_START)
        return Array(start..<(start + n))
    }

    /// The listening sockets systemd passed, with their names (sd_listen_fds_with_names(3): a
    /// socket unit's `FileDescriptorName=`, by default the unit's name, e.g. `hydrationd.socket`).
    /// Empty when not socket-activated. Unsets LISTEN_PID/LISTEN_FDS/LISTEN_FDNAMES, like
    /// `listenFileDescriptors()`: call one of them once, at start-up.
    public static func namedListenFileDescriptors() -> [(fd: Int32, name: String)] {
        var names: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>? = nil
        let n = sd_listen_fds_with_names(1, &names)
        defer {
            if let names {
                var i = 0
                while let p = names[i] { free(p); i += 1 }
                free(names)
            }
        }
        guard n > 0 else { return [] }
        let start = Int32(SD_LISTEN_FDS_START)
        return (0..<Int(n)).map { i in
            let name = names.flatMap { $0[i] }.map { String(cString: $0) } ?? "unknown"
            return (start + Int32(i), name)
        }
    }

    /// Which passed descriptor is which socket of the daemon: the one named `nbd` is the NBD
    /// socket (`FileDescriptorName=nbd`); the control socket is the one named `control`, else the
    /// first other one (an unnamed `hydrationd.socket`). Others are returned as `unused`.
    public static func assignListeners(_ fds: [(fd: Int32, name: String)]) -> (
        control: Int32?, nbd: Int32?, unused: [Int32]
    ) {
        let nbd = fds.first { $0.name == "nbd" }?.fd
        let others = fds.filter { $0.fd != nbd }
        let control = (others.first { $0.name == "control" } ?? others.first)?.fd
        return (control, nbd, others.filter { $0.fd != control }.map(\.fd))
    }

    // MARK: Helpers

    /// One line, no control characters, at most `maxStatusLength` characters.
    public static func sanitizeStatus(_ text: String) -> String {
        var out = ""
        out.reserveCapacity(min(text.utf8.count, maxStatusLength))
        var count = 0
        for ch in text {
            if count == maxStatusLength {
                out.removeLast()
                out.append("…")
                break
            }
            if ch.unicodeScalars.contains(where: { $0.properties.generalCategory == .control }) {
                out.append(" ")
            } else {
                out.append(ch)
            }
            count += 1
        }
        return out
    }

    static func microseconds(_ d: Duration) -> Int64 {
        let (seconds, attoseconds) = d.components
        let us = seconds.multipliedReportingOverflow(by: 1_000_000)
        if us.overflow { return seconds < 0 ? 0 : Int64.max }
        return max(0, us.partialValue &+ attoseconds / 1_000_000_000_000)
    }
}

/// Rate-limited watchdog pings, meant to be driven by the loop that does the work (so a stuck
/// loop stops pinging and systemd restarts the daemon): call `pingIfDue()` often; it sends
/// WATCHDOG=1 at most once per `interval` (half of WatchdogSec=).
///
/// Test hook: in debug builds only, `HYDRATIOND_TEST_WATCHDOG_STALL_AFTER_MS=N` makes it stop
/// pinging N ms after it was made, simulating a stuck daemon. Release builds ignore the variable.
public final class SystemdWatchdog: Sendable {
    public static let stallEnvironmentVariable = "HYDRATIOND_TEST_WATCHDOG_STALL_AFTER_MS"

    public let notifier: SystemdNotifier
    /// Minimum time between two pings.
    public let interval: Duration
    /// When set, pings stop once this much time has passed since `init` (test hook).
    public let stallAfter: Duration?

    private struct State {
        var lastPing: ContinuousClock.Instant?
        var stalled = false
    }
    private let created: ContinuousClock.Instant
    private let state = Mutex(State())

    public init(
        notifier: SystemdNotifier, interval: Duration, stallAfter: Duration? = nil,
        now: ContinuousClock.Instant = .now
    ) {
        self.notifier = notifier
        self.interval = interval
        self.stallAfter = stallAfter
        self.created = now
    }

    /// The watchdog systemd asked for, or nil when there is none (not under systemd, or no
    /// WatchdogSec=). Reads the stall hook in debug builds.
    public static func fromEnvironment(notifier: SystemdNotifier = SystemdNotifier()) -> SystemdWatchdog? {
        guard notifier.isEnabled, let interval = notifier.watchdogInterval() else { return nil }
        return SystemdWatchdog(notifier: notifier, interval: interval, stallAfter: testStallFromEnvironment())
    }

    static func testStallFromEnvironment() -> Duration? {
        #if DEBUG
            guard let raw = getenv(stallEnvironmentVariable), let ms = Int64(String(cString: raw)), ms >= 0 else {
                return nil
            }
            return .milliseconds(ms)
        #else
            return nil
        #endif
    }

    /// True once the test stall hook has switched pinging off.
    public var isStalled: Bool { state.withLock { $0.stalled } }

    /// Sends WATCHDOG=1 if `interval` has passed since the last ping (or none was sent yet).
    /// Returns true when it sent one. Cheap enough to call on every loop iteration.
    @discardableResult
    public func pingIfDue(now: ContinuousClock.Instant = .now) -> Bool {
        let due: Bool = state.withLock { s in
            if s.stalled { return false }
            if let stallAfter, now - created >= stallAfter {
                s.stalled = true
                return false
            }
            if let last = s.lastPing, now - last < interval { return false }
            s.lastPing = now
            return true
        }
        guard due else { return false }
        return notifier.watchdogPing()
    }
}

// MARK: - STATUS= summary

/// One line summarising the jobs for STATUS= (and `systemctl status`), e.g.
/// `2 jobs: db hydrating 43% 310 MiB/s, vm paused 12%`.
///
/// Per job: `hydrating P% RATE` (RATE omitted while 0), `paused P%`, `idle`, `complete`,
/// `failed (CODE)`. P is the floor of hydrated/total regions, so 100% only appears once complete.
/// When the line would exceed `maxLength`, the remaining jobs are summarised as `+N more`.
public func statusLine(jobs: [JobStatus], maxLength: Int = SystemdNotifier.maxStatusLength) -> String {
    if jobs.isEmpty { return "0 jobs" }
    let head = jobs.count == 1 ? "1 job: " : "\(jobs.count) jobs: "
    var line = head
    for (index, job) in jobs.enumerated() {
        let part = describe(job)
        let separator = index == 0 ? "" : ", "
        let remainingAfter = jobs.count - index - 1
        // Reserve room for a trailing ", +N more" unless this is the last job.
        let reserve = remainingAfter > 0 ? ", +\(remainingAfter) more".count : 0
        if line.count + separator.count + part.count + reserve > maxLength {
            let more = jobs.count - index
            line += (index == 0 ? "" : ", ") + "+\(more) more"
            return line
        }
        line += separator + part
    }
    return line
}

private func describe(_ job: JobStatus) -> String {
    let name = SystemdNotifier.sanitizeStatus(job.name).replacingSpaces()
    switch job.state {
    case .hydrating:
        var s = "\(name) hydrating \(percent(job))%"
        if job.throughputBytesPerSecond >= 1 { s += " " + formatRate(job.throughputBytesPerSecond) }
        return s
    case .paused:
        return "\(name) paused \(percent(job))%"
    case .idle:
        return "\(name) idle"
    case .complete:
        return "\(name) complete"
    case .failed:
        if let code = job.error?.code, !code.isEmpty {
            return "\(name) failed (\(SystemdNotifier.sanitizeStatus(code)))"
        }
        return "\(name) failed"
    }
}

private func percent(_ job: JobStatus) -> UInt64 {
    let total = job.regions.total
    guard total > 0 else { return 0 }
    let hydrated = min(job.regions.hydrated, total)
    // Floor, computed without overflow for any UInt64 inputs.
    let p = hydrated.multipliedFullWidth(by: 100)
    return total.dividingFullWidth(p).quotient
}

/// Bytes per second in binary units: `512 B/s`, `12 KiB/s`, `310 MiB/s`, `1.2 GiB/s`.
public func formatRate(_ bytesPerSecond: Double) -> String {
    let v = max(0, bytesPerSecond.isFinite ? bytesPerSecond : 0)
    let kib = 1024.0, mib = kib * 1024, gib = mib * 1024
    if v >= gib {
        let tenths = Int((v / gib * 10).rounded())
        return "\(tenths / 10).\(tenths % 10) GiB/s"
    }
    if v >= mib { return "\(Int(v / mib)) MiB/s" }
    if v >= kib { return "\(Int(v / kib)) KiB/s" }
    return "\(Int(v)) B/s"
}

private extension String {
    /// Job names are single tokens in the status line.
    func replacingSpaces() -> String {
        String(map { $0 == " " ? "_" : $0 })
    }
}
