import ArgumentParser
import CloneCtlCore
import ControlProtocol
import FoundationEssentials

struct Start: AsyncParsableCommand, DaemonCommand {
    static let configuration = CommandConfiguration(
        abstract: "Create a hydration job and start it, or resume an existing one.",
        discussion: """
            With --source and --dest, creates job NAME and starts copying (created paused with --no-hydration). \
            With NAME alone, resumes the existing job of that name; any other option then is a usage error \
            (change an existing job's tunables with 'clonectl set'). --space-budget needs --discard-source. \
            Relative paths are resolved against the current directory. With --wait, stays until the job is \
            complete (exit 0) or failed (exit 1), as 'clonectl wait NAME' does.
            """)

    @OptionGroup var daemon: DaemonOptions
    @ParentCommand var root: Clonectl
    @Argument(help: ArgumentHelp("Job name (letters, digits and - _ . : @; up to 64 characters).", valueName: "name"))
    var name: String

    @Option(
        help: ArgumentHelp(
            "Source image or block device, or an NBD URI: nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH, nbds://… (TLS; ?tls-psk-file=FILE).",
            valueName: "path|uri"), completion: .file())
    var source: String?

    @Option(
        help: ArgumentHelp("Destination image or block device (at least as large as the source).", valueName: "path"),
        completion: .file())
    var dest: String?

    @Option(
        help: ArgumentHelp("Metadata file (default: <state-dir>/jobs/NAME.meta).", valueName: "path"),
        completion: .file())
    var metadata: String?

    @Option(
        help: ArgumentHelp("Region size: a power of two from 4K to 64M (default 64K).", valueName: "size"),
        transform: parseSize)
    var regionSize: UInt64?

    @Flag(help: "Release (discard) source regions once their copy is committed.")
    var discardSource = false

    @Flag(help: "The destination is known to read as zeros: zero source regions are not written.")
    var destZeroed = false

    @Flag(help: "Create the job paused; start copying later with 'clonectl resume'.")
    var noHydration = false

    @Flag(
        help: "Serve the clone as NBD export NAME on the daemon's NBD socket (see 'clonectl status NAME' for its URI).")
    var export = false

    @Flag(
        help:
            "With --export: a read served by the source also hydrates the regions it read, in the background (dm-clone lacks this)."
    )
    var hydrateOnRead = false

    @Option(
        help: ArgumentHelp(
            "auto (default: direct I/O for a regular-file source, buffered for a block device or NBD), buffered, or direct (O_DIRECT where supported).",
            valueName: "mode"))
    var io: String?

    @Flag(
        help:
            "Verified release: read each copied region back from the destination, bypassing the page cache, and compare it with the source's bytes before it is committed (and released); a difference fails the job with DestinationMismatch."
    )
    var verify = false

    @OptionGroup(title: "Tunables") var tunables: TunableOptions

    @Flag(help: "Print the new job's status as JSON (the JobStatus object); with --wait, the status it ended with.")
    var json = false

    @Flag(
        help:
            "Then wait until the job is complete (exit 0) or failed (exit 1), as 'clonectl wait' (one command for a one-off copy)."
    )
    var wait = false

    /// The options given besides --source, --dest and --json: each one means "create a job".
    var creationOptions: [String] {
        var o: [String] = []
        if metadata != nil { o.append("--metadata") }
        if regionSize != nil { o.append("--region-size") }
        if discardSource { o.append("--discard-source") }
        if destZeroed { o.append("--dest-zeroed") }
        if noHydration { o.append("--no-hydration") }
        if export { o.append("--export") }
        if hydrateOnRead { o.append("--hydrate-on-read") }
        if io != nil { o.append("--io") }
        if verify { o.append("--verify") }
        return o + tunables.givenOptions
    }

    var createsJob: Bool { source != nil || dest != nil || !creationOptions.isEmpty }

    func validate() throws {
        if let problem = OptionRules.startProblem(
            name: name, hasSource: source != nil, hasDest: dest != nil, creationOptions: creationOptions,
            discardSource: discardSource, spaceBudget: tunables.spaceBudget != nil,
            export: export, hydrateOnRead: hydrateOnRead)
        {
            throw ValidationError(problem)
        }
        if wait && noHydration {
            throw ValidationError(
                "--wait with --no-hydration would wait for ever: the job is created paused (leave out one of them)")
        }
        if let m = io, !["auto", "buffered", "direct"].contains(m) {
            throw ValidationError("--io must be auto, buffered or direct (got '\(m)')")
        }
        if let r = regionSize, r < 4096 || r > 64 << 20 || r & (r - 1) != 0 {
            throw ValidationError("--region-size must be a power of two from 4K to 64M (got \(r) bytes)")
        }
    }

    func run() async throws {
        let params: StartParameters
        if createsJob {
            params = StartParameters(
                name: name, source: source.map(absolutePath), dest: dest.map(absolutePath),
                metadata: metadata.map(absolutePath), regionSize: regionSize,
                discardSource: discardSource ? true : nil, destZeroed: destZeroed ? true : nil,
                noHydration: noHydration ? true : nil, threshold: tunables.threshold, batchSize: tunables.batchSize,
                commitIntervalMs: tunables.commitInterval, spaceBudgetBytes: tunables.spaceBudget,
                rateLimitBytesPerSecond: tunables.rateLimit, export: export ? true : nil,
                hydrateOnRead: hydrateOnRead ? true : nil, io: io, verify: verify ? true : nil)
        } else {
            params = StartParameters(name: name)
        }
        let reply = try call { try $0.start(params) }
        if json && !wait {
            Output.line(try CloneJSON.string(reply.job))
        } else if !json {
            let verb = reply.created ? "created" : "resumed"
            Output.line(
                "\(verb) job \(reply.job.name): \(reply.job.state.rawValue), \(StatusFormatter.progressText(reply.job))"
            )
        }
        guard wait else { return }
        let ended = try await JobWaiter.wait(for: reply.job.name, timeoutMs: nil, command: self)
        if json { Output.line(try CloneJSON.string(ended)) }
        let s = try JobWaiter.requireComplete(ended)
        if !json { Output.line("job \(s.name) complete: \(Human.bytes(s.bytes.hydrated)) hydrated") }
    }
}

struct Pause: AsyncParsableCommand, DaemonCommand {
    static let configuration = CommandConfiguration(
        abstract: "Pause a job (regions in flight finish, then a final commit).")
    @OptionGroup var daemon: DaemonOptions
    @ParentCommand var root: Clonectl
    @OptionGroup var job: JobName

    func run() async throws {
        let s = try call { try $0.pause(job.name) }
        Output.line("paused job \(s.name): \(s.state.rawValue), \(StatusFormatter.progressText(s))")
    }
}

struct Resume: AsyncParsableCommand, DaemonCommand {
    static let configuration = CommandConfiguration(
        abstract: "Resume a paused job.",
        discussion:
            "A job that could not be opened (device missing or not confirmed) is opened again first. --accept-devices states that the devices now at its paths are its own (for a device without a stable identity, e.g. a disk without a serial after a reboot); their size and kind must still match."
    )
    @OptionGroup var daemon: DaemonOptions
    @ParentCommand var root: Clonectl
    @OptionGroup var job: JobName
    @Flag(help: "Take the devices now at the job's paths as its own, recording their identity anew.")
    var acceptDevices = false

    func run() async throws {
        let s = try call { try $0.resume(job.name, acceptDevices: acceptDevices) }
        Output.line("resumed job \(s.name): \(s.state.rawValue), \(StatusFormatter.progressText(s))")
    }
}

struct SetTunables: AsyncParsableCommand, DaemonCommand {
    static let configuration = CommandConfiguration(
        commandName: "set",
        abstract: "Change the tunables of a job while it runs or is paused.",
        discussion: """
            Tunables not given keep their value. --rate-limit 0 and --space-budget 0 remove the limit. \
            --space-budget applies only to a job started with --discard-source (the daemon refuses it otherwise, exit 65).
            """)
    @OptionGroup var daemon: DaemonOptions
    @ParentCommand var root: Clonectl
    @OptionGroup var job: JobName
    @OptionGroup(title: "Tunables") var tunables: TunableOptions

    func validate() throws {
        if tunables.isEmpty {
            throw ValidationError(
                "nothing to set: give at least one of --threshold, --batch-size, --commit-interval, --space-budget, --rate-limit"
            )
        }
    }

    func run() async throws {
        let p = SetParameters(
            name: job.name, threshold: tunables.threshold, batchSize: tunables.batchSize,
            rateLimitBytesPerSecond: tunables.rateLimit, spaceBudgetBytes: tunables.spaceBudget,
            commitIntervalMs: tunables.commitInterval)
        let s = try call { try $0.set(p) }
        Output.line("\(s.name): \(StatusFormatter.settingsText(s.settings))")
    }
}

struct Commit: AsyncParsableCommand, DaemonCommand {
    static let configuration = CommandConfiguration(
        abstract: "Commit a job's progress now; returns once the commit is durable.")
    @OptionGroup var daemon: DaemonOptions
    @ParentCommand var root: Clonectl
    @OptionGroup var job: JobName

    func run() async throws {
        let s = try call { try $0.commit(job.name) }
        Output.line(
            "committed job \(s.name): \(Human.bytes(s.bytes.committed)) of \(Human.bytes(s.bytes.total)) durable, \(s.commits.count) commit\(s.commits.count == 1 ? "" : "s")"
        )
    }
}

struct Remove: AsyncParsableCommand, DaemonCommand {
    static let configuration = CommandConfiguration(
        abstract: "Forget a job; its destination (and a metadata file outside the state directory) stay on disk.",
        discussion:
            "A hydrating job is refused unless --force, which pauses it with a final commit first. An incomplete --discard-source job whose source is partly released is refused unless --force; even then its metadata is kept (the only record of which regions the destination alone holds) and its path printed. An exported job with NBD clients connected is refused unless --force, which disconnects them."
    )
    @OptionGroup var daemon: DaemonOptions
    @ParentCommand var root: Clonectl
    @OptionGroup var job: JobName
    @Flag(
        help:
            "Pause a hydrating job (with a final commit), disconnect the NBD clients of an exported one, and remove it."
    )
    var force = false

    func run() async throws {
        let kept = try call { try $0.remove(job.name, force: force) }
        Output.line("removed job \(job.name)")
        if let kept {
            Output.line(
                "its metadata was kept at \(kept): the source is partly released, and the destination holds the only copy of those regions"
            )
            Output.line(
                "resume the copy with: clonectl start \(job.name) --metadata \(kept) --source SOURCE --dest DEST")
        }
    }
}

struct List: AsyncParsableCommand, DaemonCommand {
    static let configuration = CommandConfiguration(abstract: "List every job briefly.")
    @OptionGroup var daemon: DaemonOptions
    @ParentCommand var root: Clonectl
    @Flag(help: "Print a JSON array of JobSummary objects.")
    var json = false

    func run() async throws {
        let jobs = try call { try $0.list() }
        Output.line(json ? try CloneJSON.string(jobs) : StatusFormatter.table(jobs))
    }
}
