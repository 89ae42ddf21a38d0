import ArgumentParser
import ControlProtocol
import HydrationMetrics
import HydrationService
import Logging

/// hydrationd: a thin entry point over HydrationService.
@main
struct Hydrationd: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "hydrationd",
        abstract: "Background disk hydration service with commit-gated source discard.",
        discussion: """
            Serves the org.hydrationd.Control Varlink interface on a Unix socket; drive it with clonectl.
            Jobs started with --export are served as NBD exports on a second socket (--nbd-socket).
            Under systemd it reports readiness (READY=1) once every job is restored and the socket listens,
            keeps STATUS= current, pings the watchdog and accepts a socket-activated listener.
            SIGTERM and SIGINT stop it with a final commit of every job; SIGHUP is ignored (logged):
            there is no configuration to reload. At start the soft descriptor limit is raised to the hard one.
            """)

    @Option(
        help:
            "State directory (job definitions and default metadata). Default: $STATE_DIRECTORY, /var/lib/hydrationd as root, $XDG_STATE_HOME/hydrationd otherwise."
    )
    var stateDir: String = DefaultPaths.stateDirectory()

    @Option(
        help:
            "Control socket path. Default: $RUNTIME_DIRECTORY/control.sock, /run/hydrationd/control.sock as root, $XDG_RUNTIME_DIR/hydrationd/control.sock otherwise."
    )
    var socket: String = DefaultPaths.socketPath()

    @Option(
        help:
            "NBD socket path, where exported jobs (clonectl start --export) are served. Default: nbd.sock in the control socket's directory."
    )
    var nbdSocket: String?

    @Option(
        help:
            "Group (name or gid) owning the sockets; its members may create and change jobs and use exports. Membership is root-equivalent: the daemon opens the source, destination and metadata paths a member names with its own (root) rights, so a member can read any file and overwrite any file or device. Give it only to those you would give root."
    )
    var socketGroup: String?

    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical.")
    var logLevel: String = "info"

    @Option(help: "Threads doing blocking I/O, shared by all jobs.")
    var ioThreads: Int = 8

    @Option(
        help: ArgumentHelp(
            "Serve Prometheus metrics (HTTP GET /metrics) on this address: PORT (on 127.0.0.1), IPV4:PORT or [IPV6]:PORT. Off by default.",
            discussion:
                "The endpoint has no authentication: keep it on a loopback address, or behind a firewall, unless the network is trusted.",
            valueName: "addr:port"))
    var metricsListen: String?

    func validate() throws {
        guard Logger.Level(rawValue: logLevel) != nil else {
            throw ValidationError("--log-level must be one of trace, debug, info, notice, warning, error, critical")
        }
        guard stateDir.hasPrefix("/") else { throw ValidationError("--state-dir must be an absolute path") }
        guard socket.hasPrefix("/") else { throw ValidationError("--socket must be an absolute path") }
        if let nbdSocket {
            guard nbdSocket.hasPrefix("/") else { throw ValidationError("--nbd-socket must be an absolute path") }
            guard nbdSocket != socket else { throw ValidationError("--nbd-socket must differ from --socket") }
        } else if DaemonOptions.defaultNBDSocketPath(controlSocket: socket) == socket {
            throw ValidationError("--socket is named nbd.sock, the default NBD socket next to it: give --nbd-socket")
        }
        guard (1...256).contains(ioThreads) else { throw ValidationError("--io-threads must be between 1 and 256") }
        if let metricsListen {
            do { _ = try MetricsListenAddress.parse(metricsListen) } catch { throw ValidationError("\(error)") }
        }
    }

    func run() async throws {
        let level = Logger.Level(rawValue: logLevel) ?? .info
        LoggingSystem.bootstrap { label in
            var h = StreamLogHandler.standardError(label: label)
            h.logLevel = level
            return h
        }
        let logger = Logger(label: "hydrationd")
        do {
            try await HydrationDaemon.run(
                DaemonOptions(
                    stateDirectory: stateDir, socketPath: socket,
                    socketGroup: socketGroup, ioThreads: ioThreads,
                    nbdSocketPath: nbdSocket,
                    metricsListen: try metricsListen.map { try MetricsListenAddress.parse($0) }), logger: logger)
        } catch {
            logger.critical("hydrationd: \(error)")
            throw ExitCode(1)
        }
    }
}
