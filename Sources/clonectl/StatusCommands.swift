import ArgumentParser
import CloneCtlCore
import ControlProtocol
import FoundationEssentials

#if canImport(Glibc)
    import Glibc
#endif

enum Terminal {
    static var stdoutIsTTY: Bool { isatty(STDOUT_FILENO) == 1 }

    /// Columns of the terminal on stdout ($COLUMNS, else 80 when it cannot be asked).
    static var width: Int {
        var w = winsize()
        if ioctl(STDOUT_FILENO, UInt(TIOCGWINSZ), &w) == 0, w.ws_col > 0 { return Int(w.ws_col) }
        if let c = ProcessInfo.processInfo.environment["COLUMNS"].flatMap(Int.init), c > 0 { return c }
        return 80
    }

    /// Ctrl-C while a progress bar is drawn: end the line so the shell prompt starts clean, exit 130.
    static func installInterruptHandler() {
        signal(SIGINT) { _ in
            let nl: [UInt8] = [10]
            _ = nl.withUnsafeBytes { write(STDOUT_FILENO, $0.baseAddress, 1) }
            _exit(130)
        }
    }
}

struct Status: AsyncParsableCommand, DaemonCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show the status of one job, or of every job.",
        discussion: """
            --json prints exactly the JobStatus object of NAME (or a JSON array of them without NAME); the schema \
            is versioned and documented in docs/control-protocol.md and docs/clonectl.md. --watch follows the \
            daemon's streamed updates: a live progress bar on a terminal, one line per update otherwise (one JSON \
            document per line with --json). It ends when the job completes (exit 0) or fails (exit 1), or on Ctrl-C; \
            without NAME it runs until interrupted.
            """)

    @OptionGroup var daemon: DaemonOptions
    @ParentCommand var root: Clonectl
    @Argument(help: ArgumentHelp("Job name (all jobs when omitted).", valueName: "name"))
    var name: String?

    @Flag(help: "Print JSON: the JobStatus object of NAME, or an array of them.")
    var json = false

    @Flag(help: "Follow the job's progress until it completes or fails.")
    var watch = false

    func run() async throws {
        if watch { return try runWatch() }
        let jobs = try call { try $0.getStatus(name: name) }
        if json {
            if name != nil, let s = jobs.first {
                Output.line(try CloneJSON.string(s))
            } else {
                Output.line(try CloneJSON.string(jobs))
            }
            return
        }
        if name != nil {
            Output.line(jobs.map { StatusFormatter.detailed($0) }.joined(separator: "\n\n"))
        } else {
            Output.line(StatusFormatter.statusTable(jobs))
        }
    }

    func runWatch() throws {
        let tty = Terminal.stdoutIsTTY && !json
        if tty { Terminal.installInterruptHandler() }
        var drawnLines = 0
        var last: [JobStatus] = []
        let client = try connect()
        do {
            try client.watchStatus(name: name) { jobs in
                last = jobs
                if json {
                    let text =
                        name != nil && jobs.count == 1
                        ? try CloneJSON.string(jobs[0], pretty: false) : try CloneJSON.string(jobs, pretty: false)
                    Output.line(text)
                } else if tty {
                    let width = Terminal.width
                    var out = ""
                    // Back to the first line drawn last time, then redraw every line.
                    if drawnLines > 1 { out += "\u{1B}[\(drawnLines - 1)A" }
                    let lines =
                        jobs.isEmpty ? ["no jobs"] : jobs.map { StatusFormatter.progressBar($0, width: width - 1) }
                    out += lines.map { "\r\u{1B}[2K" + $0 }.joined(separator: "\n")
                    // Fewer jobs than last time: clear the leftover lines below.
                    if lines.count < drawnLines {
                        out += String(repeating: "\n\u{1B}[2K", count: drawnLines - lines.count)
                        out += "\u{1B}[\(drawnLines - lines.count)A"
                    }
                    drawnLines = max(lines.count, drawnLines)
                    fflush(nil)
                    Output.write(STDOUT_FILENO, out)
                } else {
                    for s in jobs { print(StatusFormatter.line(s)) }
                    fflush(nil)
                }
                return true
            }
        } catch {
            if tty && drawnLines > 0 { print("") }
            throw CloneFailure.from(error, socketPath: socketPath)
        }
        if tty && drawnLines > 0 { print("") }
        fflush(nil)
        if name != nil, let s = last.first, s.state == .failed {
            let why = s.error.map { "\($0.code): \($0.message)" } ?? "no reason given"
            throw CloneFailure("job \(s.name) failed: \(why)", exit: .jobFailed)
        }
    }
}

struct Wait: AsyncParsableCommand, DaemonCommand {
    static let configuration = CommandConfiguration(
        abstract: "Wait until a job is complete (exit 0) or failed (exit 1).",
        discussion:
            "With --timeout, gives up after DURATION (exit 124). A paused job is waited for until it is resumed and ends."
    )

    @OptionGroup var daemon: DaemonOptions
    @ParentCommand var root: Clonectl
    @OptionGroup var job: JobName

    @Option(
        help: ArgumentHelp("Give up after this long, e.g. 30s, 5m, 1h.", valueName: "duration"),
        transform: parseDurationMs)
    var timeout: Int?

    @Flag(name: .shortAndLong, help: "Print nothing on success.")
    var quiet = false

    func validate() throws {
        if let problem = OptionRules.waitProblem(timeoutMs: timeout) { throw ValidationError(problem) }
    }

    func run() async throws {
        let s = try JobWaiter.requireComplete(
            try await JobWaiter.wait(for: job.name, timeoutMs: timeout, command: self))
        if !quiet { Output.line("job \(s.name) complete: \(Human.bytes(s.bytes.hydrated)) hydrated") }
    }
}

/// Follows a job's status stream until it is complete or failed, and returns the status it ended
/// with: `wait`, and `start --wait`. The stream's first update is the job's state now, so a job that ended before
/// the subscription is seen at once.
enum JobWaiter {
    enum Outcome: Sendable {
        case ended(JobStatus)
        case streamEnded(JobStatus?)
        case timedOut
    }

    static func wait(for name: String, timeoutMs: Int?, command: some DaemonCommand) async throws -> JobStatus {
        let client = try command.connect()
        let updates = client.statusUpdates(name: name)
        let outcome: Outcome
        do {
            outcome = try await withThrowingTaskGroup(of: Outcome.self) { group in
                group.addTask {
                    var last: JobStatus?
                    var toldPaused = false
                    for try await jobs in updates {
                        guard let s = jobs.first(where: { $0.name == name }) else { continue }
                        last = s
                        if s.state == .complete || s.state == .failed { return .ended(s) }
                        if s.state == .paused && !toldPaused {
                            toldPaused = true
                            // Paused by the daemon (NoSpace, say): say why, or the wait looks hung.
                            let why = s.error.map { " (\($0.code): \($0.message))" } ?? ""
                            Output.err(
                                "job \(name) is paused\(why); waiting for it to be resumed ('clonectl resume \(name)')")
                        }
                    }
                    return .streamEnded(last)
                }
                if let ms = timeoutMs {
                    group.addTask {
                        try await Task.sleep(for: .milliseconds(ms))
                        return .timedOut
                    }
                }
                let first = try await group.next()!
                group.cancelAll()
                return first
            }
        } catch {
            throw CloneFailure.from(error, socketPath: command.socketPath)
        }
        client.close()
        switch outcome {
        case .ended(let s):
            return s
        case .streamEnded:
            throw CloneFailure(
                "hydrationd ended the status stream of job \(name) before it finished", exit: .unavailable)
        case .timedOut:
            throw CloneFailure(
                "timed out after \(Human.milliseconds(timeoutMs ?? 0)) waiting for job \(name); see 'clonectl status \(name)'",
                exit: .timeout)
        }
    }

    /// A complete job's status; a failed one is exit 1 with its error.
    static func requireComplete(_ s: JobStatus) throws(CloneFailure) -> JobStatus {
        if s.state == .complete { return s }
        let why = s.error.map { "\($0.code): \($0.message)" } ?? "no reason given"
        throw CloneFailure("job \(s.name) failed: \(why)", exit: .jobFailed)
    }
}
