import ControlProtocol
import Foundation
import Logging
import ServiceLifecycle

/// How the daemon was asked to run.
public struct DaemonOptions: Sendable {
    public var stateDirectory: String
    public var socketPath: String
    /// Group (name or numeric gid) that owns the socket and may call mutating methods.
    public var socketGroup: String?
    public var ioThreads: Int
    /// How often STATUS= is refreshed and the watchdog considered.
    public var supervisorInterval: Duration

    public init(stateDirectory: String = DefaultPaths.stateDirectory(), socketPath: String = DefaultPaths.socketPath(),
                socketGroup: String? = nil, ioThreads: Int = 8, supervisorInterval: Duration = .milliseconds(250)) {
        self.stateDirectory = stateDirectory; self.socketPath = socketPath; self.socketGroup = socketGroup
        self.ioThreads = ioThreads; self.supervisorInterval = supervisorInterval
    }
}

public struct DaemonError: Error, CustomStringConvertible {
    public var description: String
}

/// The daemon: restores the jobs, then serves the control socket; READY=1 once both are done.
/// SIGTERM/SIGINT pause every job with a final commit, then it exits 0.
public enum HydrationDaemon {
    public static func run(_ options: DaemonOptions, logger: Logger) async throws {
        // A client that disappears mid-reply must not kill the daemon.
        signal(SIGPIPE, SIG_IGN)
        let gid = try resolveGroup(options.socketGroup)
        let notifier = SystemdNotifier()
        let io = IOExecutor(threads: options.ioThreads)
        let manager = JobManager(stateDirectory: options.stateDirectory, io: io, logger: logger)
        do {
            try await manager.restore()
        } catch {
            throw DaemonError(description: "cannot use state directory \(options.stateDirectory): \(error)")
        }

        let listener: ControlServerConfiguration.Listener
        if let fd = SystemdNotifier.listenFileDescriptors().first {
            listener = .descriptor(fd, path: options.socketPath)
            logger.info("using the socket passed by systemd", metadata: ["fd": "\(fd)"])
        } else {
            listener = .path(options.socketPath)
        }
        let configuration = ControlServerConfiguration(listener: listener, socketGroup: gid)
        let server = ControlServer(
            configuration: configuration, handler: DaemonControlHandler(manager: manager), logger: logger,
            onListening: { info in
                // Jobs are restored and the socket listens: now, and only now, ready.
                let line = statusLine(jobs: await manager.statusAll())
                _ = notifier.ready(status: line)
                logger.info("ready", metadata: ["socket": "\(info.path ?? options.socketPath)", "state_dir": "\(options.stateDirectory)"])
            })
        let supervisor = JobSupervisor(manager: manager, notifier: notifier, watchdog: SystemdWatchdog.fromEnvironment(notifier: notifier),
                                       interval: options.supervisorInterval, logger: logger)
        // Services stop in reverse order: the socket first, then the jobs (final commits).
        let group = ServiceGroup(configuration: .init(
            services: [.init(service: supervisor), .init(service: server)],
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

    init(manager: JobManager, notifier: SystemdNotifier, watchdog: SystemdWatchdog?, interval: Duration, logger: Logger) {
        self.manager = manager; self.notifier = notifier; self.watchdog = watchdog; self.interval = interval; self.logger = logger
    }

    func run() async throws {
        var last = ""
        while !Task.isShuttingDownGracefully && !Task.isCancelled {
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
