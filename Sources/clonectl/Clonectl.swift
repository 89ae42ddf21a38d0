import ArgumentParser
import CloneCtlCore
import ControlProtocol
import FoundationEssentials

#if canImport(Glibc)
    import Glibc
#endif

/// clonectl: the command-line client of hydrationd.
@main
struct Clonectl: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "clonectl",
        abstract: "Control hydrationd: start, watch and manage disk hydration jobs.",
        discussion: """
            clonectl talks to hydrationd over its Varlink control socket (org.hydrationd.Control). \
            `check` and `dump` read a metadata file directly, and `digest` reads images; they need no daemon.

            SIZES are bytes with an optional binary suffix: 4096, 64K, 64KiB, 1M, 1.5G (K = 1024). \
            RATES are sizes per second: 20M, 20MiB/s (0 = no limit). DURATIONS take a unit: 500ms, 1s, 2m, 1m30s.

            EXIT STATUS: 0 success; 1 the job failed (wait, status --watch) or check found the metadata \
            invalid; 64 usage error; 65 the daemon rejected the request (unknown job, bad parameter, device in use, \
            permission denied); 66 metadata file or image missing or unreadable; 69 daemon (or NBD server) unreachable; 70 internal or \
            protocol error; 74 I/O error reported by the daemon or while digesting; 124 wait timed out; 130 interrupted.
            """,
        version: "1.0.0",
        subcommands: [
            Start.self, Pause.self, Resume.self, SetTunables.self, Commit.self, Remove.self, List.self,
            Status.self, Wait.self, Apply.self, Check.self, Dump.self, Digest.self,
        ]
    )

    /// `clonectl --socket PATH <command>`; a command's own `--socket` wins.
    @Option(
        name: .long,
        help: ArgumentHelp(
            "Control socket of hydrationd (also accepted after the command).",
            discussion:
                "Default: $HYDRATION_SOCKET, else $RUNTIME_DIRECTORY/control.sock, /run/hydrationd/control.sock as root, $XDG_RUNTIME_DIR/hydrationd/control.sock otherwise.",
            valueName: "path"),
        completion: .file())
    var socket: String?

    /// Runs the command; a `CloneFailure` becomes one line on stderr and its exit code, every other
    /// error (usage, help, ExitCode) goes through ArgumentParser.
    static func main() async {
        do {
            var command = try parseAsRoot()
            if var asyncCommand = command as? any AsyncParsableCommand {
                try await asyncCommand.run()
            } else {
                try command.run()
            }
        } catch let f as CloneFailure {
            Output.fail(f)
        } catch {
            exit(withError: error)
        }
    }
}

enum Output {
    static func line(_ s: String) {
        print(s)
        fflush(nil)
    }

    static func err(_ s: String) {
        write(STDERR_FILENO, "clonectl: " + s + "\n")
    }

    /// All of `s` to `fd` (a short write to a pipe or terminal is continued, EINTR retried).
    static func write(_ fd: Int32, _ s: String) {
        let bytes = Array(s.utf8)
        var done = 0
        while done < bytes.count {
            let n = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress! + done, $0.count - done) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return }
            done += n
        }
    }

    static func fail(_ f: CloneFailure) -> Never {
        err(f.message)
        Glibc.exit(f.exit.rawValue)
    }
}

/// `--socket`, shared by every command that talks to the daemon.
struct DaemonOptions: ParsableArguments {
    @Option(
        name: .long,
        help: ArgumentHelp(
            "Control socket of hydrationd.",
            discussion:
                "Default: $HYDRATION_SOCKET, else $RUNTIME_DIRECTORY/control.sock, /run/hydrationd/control.sock as root, $XDG_RUNTIME_DIR/hydrationd/control.sock otherwise.",
            valueName: "path"),
        completion: .file())
    var socket: String?

}

/// A command talking to the daemon: `--socket` after the command, else before it, else the default.
protocol DaemonCommand {
    var daemon: DaemonOptions { get }
    var root: Clonectl { get }
}

extension DaemonCommand {
    var socketPath: String { daemon.socket ?? root.socket ?? DefaultPaths.socketPath() }

    /// Connects, or fails with exit 69 and how to start the daemon.
    func connect() throws(CloneFailure) -> VarlinkClient {
        let path = socketPath
        do {
            return try VarlinkClient(socketPath: path)
        } catch {
            throw CloneFailure.from(error, socketPath: path)
        }
    }

    /// One request on a fresh connection, its errors mapped to clonectl's messages and exit codes.
    func call<T>(_ body: (VarlinkClient) throws -> T) throws(CloneFailure) -> T {
        let client = try connect()
        do {
            return try body(client)
        } catch {
            throw CloneFailure.from(error, socketPath: socketPath)
        }
    }
}

/// Absolute paths for the daemon (which refuses relative ones), resolved against the current directory.
func absolutePath(_ p: String) -> String {
    // A remote source (nbd://, nbds://, nbd+unix://…) is passed on as given.
    if p.hasPrefix("/") || p.hasPrefix("nbd") && p.contains("://") { return p }
    let cwd = FileManager.default.currentDirectoryPath
    return URL(fileURLWithPath: p, relativeTo: URL(fileURLWithPath: cwd + "/")).standardizedFileURL.path
}

// MARK: value parsing (usage errors name what is accepted)

func parseSize(_ s: String) throws -> UInt64 {
    do { return try ByteSize.parse(s) } catch { throw ValidationError(error.description) }
}

func parseRate(_ s: String) throws -> UInt64 {
    let l = s.lowercased()
    if l == "none" || l == "off" || l == "unlimited" { return 0 }
    do { return try ByteRate.parse(s) } catch { throw ValidationError(error.description) }
}

func parseDurationMs(_ s: String) throws -> Int {
    do { return try DurationParser.milliseconds(s) } catch { throw ValidationError(error.description) }
}

/// The tunables shared by `start` and `set`.
struct TunableOptions: ParsableArguments {
    @Option(
        help: ArgumentHelp(
            "Regions in flight at once, across all batches (a positive count; default: 8 MiB worth).", valueName: "n"))
    var threshold: Int?

    @Option(
        help: ArgumentHelp(
            "Contiguous regions copied by one read and one write (a positive count; default: 1 MiB worth).",
            valueName: "n"))
    var batchSize: Int?

    @Option(
        help: ArgumentHelp(
            "How often progress is committed to the metadata, e.g. 500ms, 1s, 2m.", valueName: "duration"),
        transform: parseDurationMs)
    var commitInterval: Int?

    @Option(
        help: ArgumentHelp(
            "With --discard-source: bytes hydrated but not yet released from the source never exceed this, e.g. 1G (0 = no budget).",
            valueName: "size"),
        transform: parseSize)
    var spaceBudget: UInt64?

    @Option(
        help: ArgumentHelp(
            "Copy at most this many bytes per second, e.g. 20M or 20MiB/s (0 or none = no limit).", valueName: "rate"),
        transform: parseRate)
    var rateLimit: UInt64?

    var isEmpty: Bool { givenOptions.isEmpty }

    /// The tunables given, spelled as on the command line.
    var givenOptions: [String] {
        [
            ("--threshold", threshold != nil), ("--batch-size", batchSize != nil),
            ("--commit-interval", commitInterval != nil),
            ("--space-budget", spaceBudget != nil), ("--rate-limit", rateLimit != nil),
        ].filter(\.1).map(\.0)
    }

    func validate() throws {
        if let t = threshold, t < 1 { throw ValidationError("--threshold must be a positive count (got \(t))") }
        if let b = batchSize, b < 1 { throw ValidationError("--batch-size must be a positive count (got \(b))") }
        if let c = commitInterval, c < 1 {
            throw ValidationError("--commit-interval must be longer than 0, e.g. 500ms or 1s")
        }
    }
}

/// `NAME`, for the commands acting on one job.
struct JobName: ParsableArguments {
    @Argument(help: ArgumentHelp("Job name.", valueName: "name"))
    var name: String
}
