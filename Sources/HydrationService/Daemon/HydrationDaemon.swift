import ControlProtocol
import Foundation
import HydrationEngine
import HydrationMetrics
import Logging
import ServiceLifecycle
import Synchronization

/// How the daemon was asked to run.
public struct DaemonOptions: Sendable {
    public var stateDirectory: String
    public var socketPath: String
    /// NBD socket path (exported jobs); nil: `nbd.sock` next to the control socket.
    public var nbdSocketPath: String?
    /// Group (name or numeric gid) that owns the socket and may call mutating methods.
    public var socketGroup: String?
    public var ioThreads: Int
    /// How often STATUS= is refreshed and the watchdog considered.
    public var supervisorInterval: Duration
    /// Where Prometheus metrics are served (`--metrics-listen`); nil: not served.
    public var metricsListen: MetricsListenAddress?

    public init(
        stateDirectory: String = DefaultPaths.stateDirectory(), socketPath: String = DefaultPaths.socketPath(),
        socketGroup: String? = nil, ioThreads: Int = 8, supervisorInterval: Duration = .milliseconds(250),
        nbdSocketPath: String? = nil, metricsListen: MetricsListenAddress? = nil
    ) {
        self.metricsListen = metricsListen
        self.stateDirectory = stateDirectory; self.socketPath = socketPath; self.socketGroup = socketGroup
        self.nbdSocketPath = nbdSocketPath
        self.ioThreads = ioThreads; self.supervisorInterval = supervisorInterval
    }

    /// The NBD socket path in effect: `nbdSocketPath`, else `nbd.sock` in the control socket's directory.
    public var effectiveNBDSocketPath: String {
        if let nbdSocketPath { return nbdSocketPath }
        return Self.defaultNBDSocketPath(controlSocket: socketPath)
    }

    public static func defaultNBDSocketPath(controlSocket: String) -> String {
        let dir = (controlSocket as NSString).deletingLastPathComponent
        return (dir.isEmpty ? "." : dir) + "/nbd.sock"
    }
}

public struct DaemonError: Error, CustomStringConvertible {
    public var description: String
}

/// The daemon: restores the jobs, then serves the control socket and the NBD socket (exported
/// jobs); READY=1 once all three are done. SIGTERM/SIGINT stop the control socket, then the NBD
/// server (requests in flight answered), then pause every job with a final commit; exit 0.
public enum HydrationDaemon {
    public static func run(_ options: DaemonOptions, logger: Logger) async throws {
        // A client that disappears mid-reply must not kill the daemon.
        signal(SIGPIPE, SIG_IGN)
        // SIGHUP's default action ends the process without final commits and leaves the socket
        // file behind. There is no configuration to reload: it is ignored (and logged, below).
        signal(SIGHUP, SIG_IGN)
        let limit = raiseDescriptorLimit()
        if let limit {
            logger.info(
                "descriptor limit",
                metadata: ["soft": "\(limit.soft)", "hard": "\(limit.hard)", "raised_from": "\(limit.previousSoft)"])
            if limit.soft < DescriptorLimit.recommended {
                logger.warning(
                    "the descriptor limit is low: each open job holds a few descriptors (a complete or paused one none); raise LimitNOFILE=",
                    metadata: ["soft": "\(limit.soft)", "recommended": "\(DescriptorLimit.recommended)"])
            }
        }
        let gid = try resolveGroup(options.socketGroup)
        let notifier = SystemdNotifier()
        let io = IOExecutor(threads: options.ioThreads)

        // Socket activation: the control socket and, named "nbd", the NBD socket.
        let passed = SystemdNotifier.namedListenFileDescriptors()
        let activated = SystemdNotifier.assignListeners(passed)
        for fd in activated.unused {
            logger.warning("ignoring an unexpected socket passed by systemd", metadata: ["fd": "\(fd)"])
        }

        // The NBD server is made first (it binds only when it runs) so that restored jobs can be
        // published in its registry.
        let nbdListener: ControlServerConfiguration.Listener
        var nbdPath = options.effectiveNBDSocketPath
        if let fd = activated.nbd {
            if let bound = boundUnixPath(fd) { nbdPath = bound }
            nbdListener = .descriptor(fd, path: nbdPath)
            logger.info("using the NBD socket passed by systemd", metadata: ["fd": "\(fd)", "path": "\(nbdPath)"])
        } else {
            nbdListener = .path(nbdPath)
        }
        let readiness = Readiness(parts: 2)
        let registry = NBDExportRegistry()
        // Mode 0660 and group `gid`, as the control socket. Access (the default, `NBDAccessPolicy`):
        // root, the daemon's user and members of the socket group read-write; anyone else is refused
        // in the handshake (NBD_REP_ERR_POLICY).
        let nbdServer = NBDServer(
            configuration: NBDServerConfiguration(listener: nbdListener, socketGroup: gid), exports: registry,
            logger: logger, onListening: { _ in readiness.done() })
        let exports = JobExportHost(registry: registry, server: nbdServer, socketPath: nbdPath)
        let manager = JobManager(stateDirectory: options.stateDirectory, io: io, logger: logger, exports: exports)
        // Bound before any job is restored: a metrics address that cannot be used stops the start
        // before anything is opened, with the address and the reason.
        var metrics: MetricsServer? = nil
        if let address = options.metricsListen {
            do {
                metrics = try await MetricsServer.start(address: address, logger: logger) {
                    MetricsExposition.render(await manager.metricsSnapshot())
                }
            } catch {
                await io.shutdown()
                throw DaemonError(description: "\(error)")
            }
            logger.info("serving metrics", metadata: ["address": "http://\(address)/metrics"])
        }
        // Descriptors kept aside while the jobs are restored, given back just before the sockets
        // are bound: jobs that exhaust the limit are reported as not opened, and the daemon still
        // serves its sockets (to report them, and to take the operator's orders).
        let reserve = DescriptorReserve(count: DescriptorReserve.size())
        do {
            try await manager.restore()
        } catch {
            reserve.release()
            throw DaemonError(description: "cannot use state directory \(options.stateDirectory): \(error)")
        }
        reserve.release()

        let listener: ControlServerConfiguration.Listener
        if let fd = activated.control {
            listener = .descriptor(fd, path: options.socketPath)
            logger.info("using the socket passed by systemd", metadata: ["fd": "\(fd)"])
        } else {
            listener = .path(options.socketPath)
        }
        let configuration = ControlServerConfiguration(listener: listener, socketGroup: gid)
        let server = ControlServer(
            configuration: configuration, handler: DaemonControlHandler(manager: manager), logger: logger,
            onListening: { info in
                // Jobs are restored and both sockets listen: now, and only now, ready.
                readiness.done()
                await readiness.wait()
                guard readiness.isReady else { return }
                let line = statusLine(jobs: await manager.statusAll())
                _ = notifier.ready(status: line)
                logger.info(
                    "ready",
                    metadata: [
                        "socket": "\(info.path ?? options.socketPath)", "nbd_socket": "\(exports.socketPath)",
                        "state_dir": "\(options.stateDirectory)",
                    ])
            })
        // Last, so stopped first: scrapes end before the jobs' final commits.
        let metricsServices: [ServiceGroupConfiguration.ServiceConfiguration] =
            metrics.map { [.init(service: MetricsService(server: $0))] } ?? []
        let supervisor = JobSupervisor(
            manager: manager, notifier: notifier, watchdog: SystemdWatchdog.fromEnvironment(notifier: notifier),
            interval: options.supervisorInterval, logger: logger)
        // Services stop in reverse order, each once the previous one has ended: the control socket
        // first, then the NBD server (requests in flight answered), then the jobs (final commits).
        let group = ServiceGroup(
            configuration: .init(
                services: [
                    .init(service: HangupIgnorer(logger: logger)), .init(service: supervisor),
                    .init(service: NBDServerService(nbdServer)),
                    .init(service: server),
                ] + metricsServices,
                gracefulShutdownSignals: [.sigterm, .sigint],
                logger: logger))
        do {
            try await group.run()
        } catch {
            await manager.shutdown()
            await io.shutdown()
            throw error
        }
        await io.shutdown()
        logger.info("stopped")
    }

    /// RLIMIT_NOFILE as the daemon runs with it.
    public struct DescriptorLimit: Sendable, Equatable {
        public var previousSoft: UInt64
        public var soft: UInt64
        public var hard: UInt64
        /// Below this the daemon warns at start (the packaged unit sets far more).
        public static let recommended: UInt64 = 65536
    }

    /// Raises the soft RLIMIT_NOFILE to the hard limit (systemd and most shells start services with
    /// a soft limit of 1024, which a few hundred open jobs, their clients and the sockets exceed;
    /// nothing in the daemon uses select(), so descriptors above 1024 are safe). nil when the limit
    /// cannot be read; a refused raise (a seccomp filter) keeps the soft limit and reports it.
    @discardableResult
    public static func raiseDescriptorLimit() -> DescriptorLimit? {
        var rl = rlimit()
        guard getrlimit(resourceNOFILE, &rl) == 0 else { return nil }
        let previous = UInt64(rl.rlim_cur)
        if rl.rlim_cur < rl.rlim_max {
            var raised = rl
            raised.rlim_cur = rl.rlim_max
            if setrlimit(resourceNOFILE, &raised) == 0 { rl = raised }
        }
        return DescriptorLimit(previousSoft: previous, soft: UInt64(rl.rlim_cur), hard: UInt64(rl.rlim_max))
    }

    private static var resourceNOFILE: __rlimit_resource_t { __rlimit_resource_t(RLIMIT_NOFILE.rawValue) }

    /// The path a listening Unix socket is bound to (getsockname), nil if none or not AF_UNIX.
    static func boundUnixPath(_ fd: Int32) -> String? {
        var addr = sockaddr_un()
        var len = socklen_t(MemoryLayout<sockaddr_un>.size)
        let ok = withUnsafeMutablePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) == 0 }
        }
        guard ok, addr.sun_family == sa_family_t(AF_UNIX) else { return nil }
        let path = withUnsafeBytes(of: addr.sun_path) { raw -> String in
            let bytes = raw.prefix(max(0, Int(len) - MemoryLayout<sa_family_t>.size)).prefix { $0 != 0 }
            return String(decoding: bytes, as: UTF8.self)
        }
        return path.hasPrefix("/") ? path : nil
    }

    static func resolveGroup(_ g: String?) throws -> UInt32? {
        guard let g, !g.isEmpty else { return nil }
        if let n = UInt32(g) { return n }
        guard let gr = getgrnam(g) else { throw DaemonError(description: "--socket-group: no group named '\(g)'") }
        return gr.pointee.gr_gid
    }
}

/// Keeps STATUS= current and pings the watchdog from a loop that needs the job manager to answer
/// (a stuck manager stops the pings and systemd restarts the daemon). On graceful shutdown it
/// closes every job with a final commit.
final class JobSupervisor: Service, Sendable {
    let manager: JobManager
    let notifier: SystemdNotifier
    let watchdog: SystemdWatchdog?
    let interval: Duration
    let logger: Logger

    init(manager: JobManager, notifier: SystemdNotifier, watchdog: SystemdWatchdog?, interval: Duration, logger: Logger)
    {
        self.manager = manager; self.notifier = notifier; self.watchdog = watchdog; self.interval = interval;
        self.logger = logger
    }

    func run() async throws {
        var last = ""
        var seenChanges: UInt64 = .max
        while !Task.isShuttingDownGracefully && !Task.isCancelled {
            // A job completed (or changed state otherwise): close those that are complete.
            let changes = manager.stateChanges.generation
            if changes != seenChanges {
                seenChanges = changes
                await manager.retireCompleteJobs()
            }
            let jobs = await manager.statusAll()
            watchdog?.pingIfDue()
            let line = statusLine(jobs: jobs)
            if line != last && notifier.isEnabled {
                _ = notifier.status(line)
                last = line
            }
            try? await cancelWhenGracefulShutdown { try await Task.sleep(for: self.interval) }
        }
        _ = notifier.stopping(status: "committing and pausing jobs")
        logger.info("shutting down: final commits")
        await manager.shutdown()
    }
}

/// The metrics endpoint as a service: stops listening on graceful shutdown (first of all, being
/// the last service), so that scrapes end before the jobs' final commits.
struct MetricsService: Service {
    let server: MetricsServer
    func run() async throws {
        await withTaskCancellationHandler {
            await withGracefulShutdownHandler {
                await server.waitClosed()
            } onGracefulShutdown: {
                server.close()
            }
        } onCancel: {
            server.close()
        }
    }
}

/// Descriptors (of /dev/null) held aside so that something else may use them later: opened before
/// the jobs are restored, closed just before the sockets are bound.
final class DescriptorReserve: Sendable {
    /// The two listening sockets, the event loops' epoll/eventfd/timerfd and the first clients.
    static let forSockets = 32

    /// `forSockets`, or half of what is left under a low limit: the restore itself needs some
    /// (the state directory's lock, its listing, the first job), and a reserve that took them
    /// all would stop the daemon before it reached its sockets.
    static func size() -> Int {
        var lim = rlimit()
        guard getrlimit(Int32(RLIMIT_NOFILE.rawValue), &lim) == 0 else { return forSockets }
        let inUse = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd").count) ?? 0
        return size(softLimit: Int(clamping: lim.rlim_cur), inUse: inUse)
    }

    static func size(softLimit: Int, inUse: Int) -> Int {
        min(forSockets, max(0, (softLimit - inUse) / 2))
    }
    private let fds: Mutex<[Int32]>

    init(count: Int) {
        var fds: [Int32] = []
        for _ in 0..<count {
            let fd = open("/dev/null", O_RDONLY | O_CLOEXEC)
            if fd < 0 { break }
            fds.append(fd)
        }
        self.fds = Mutex(fds)
    }

    var count: Int { fds.withLock { $0.count } }

    func release() {
        let all = fds.withLock { f -> [Int32] in
            defer { f = [] }; return f
        }
        for fd in all { close(fd) }
    }

    deinit { release() }
}

/// SIGHUP is ignored (the daemon has no configuration to reload; restart it to change options):
/// each one is logged, so an operator who sent it sees that it did nothing.
final class HangupIgnorer: Service, Sendable {
    let logger: Logger
    init(logger: Logger) { self.logger = logger }

    func run() async throws {
        // SIG_IGN stays in place (set at start); the signal source still sees each delivery.
        let (hangups, continuation) = AsyncStream<Void>.makeStream(bufferingPolicy: .bufferingNewest(1))
        let source = DispatchSource.makeSignalSource(signal: SIGHUP, queue: .global())
        source.setEventHandler { continuation.yield() }
        source.resume()
        defer { source.cancel(); continuation.finish() }
        for await _ in hangups.cancelOnGracefulShutdown() {
            logger.notice(
                "SIGHUP ignored: hydrationd has no configuration to reload (restart the service to change its options)")
        }
    }
}

/// Counts listeners that have reported: the daemon is ready only when every socket listens.
final class Readiness: Sendable {
    private struct State {
        var left: Int
        /// Set on cancellation or graceful shutdown: waiting is over, ready or not.
        var abandoned = false
        var waiters: [CheckedContinuation<Void, Never>] = []
    }
    private let state: Mutex<State>

    init(parts: Int) { state = Mutex(State(left: parts)) }

    func done() {
        let waiters = state.withLock { s -> [CheckedContinuation<Void, Never>] in
            s.left -= 1
            guard s.left <= 0 else { return [] }
            defer { s.waiters = [] }
            return s.waiters
        }
        for w in waiters { w.resume() }
    }

    var isReady: Bool { state.withLock { $0.left <= 0 } }

    private func abandon() {
        let waiters = state.withLock { s -> [CheckedContinuation<Void, Never>] in
            s.abandoned = true
            defer { s.waiters = [] }
            return s.waiters
        }
        for w in waiters { w.resume() }
    }

    /// Returns once ready, or early on cancellation or graceful shutdown (a socket that failed to
    /// bind ends the service group, which cancels this wait). Suspends without polling.
    func wait() async {
        await withTaskCancellationHandler {
            await withGracefulShutdownHandler {
                await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
                    let now = state.withLock { s -> Bool in
                        if s.left <= 0 || s.abandoned { return true }
                        s.waiters.append(c)
                        return false
                    }
                    if now { c.resume() }
                }
            } onGracefulShutdown: {
                self.abandon()
            }
        } onCancel: {
            self.abandon()
        }
    }
}
