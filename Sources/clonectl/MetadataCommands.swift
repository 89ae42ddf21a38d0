import ArgumentParser
import CloneCtlCore
import ControlProtocol
import FoundationEssentials
import HydrationStorage

#if canImport(Glibc)
    import Glibc
#endif

/// Reads a metadata file read-only with the engine's recovery code; no daemon involved.
enum OfflineMetadata {
    enum Outcome {
        case valid(MetadataStore, MetadataRecoveryReport)
        case invalid(String)
        case unreadable(String)
    }

    static func open(_ path: String) -> Outcome {
        do {
            let (store, report) = try MetadataStore.open(path: path, storage: PosixStorage(remote: nil), readOnly: true)
            return .valid(store, report)
        } catch {
            if case .io(let s) = error.reason {
                let hint =
                    s.errno == ENOENT ? "; check the path (a job's default metadata is <state-dir>/jobs/NAME.meta)" : ""
                return .unreadable("cannot read metadata: \(s)\(hint)")
            }
            return .invalid(error.description)
        }
    }

    /// The same report the daemon's CheckMetadata gives.
    static func report(path: String, _ outcome: Outcome) -> MetadataReport {
        switch outcome {
        case .valid(let store, let r):
            return MetadataReport(path: path, header: store.header, recovery: r)
        case .invalid(let why), .unreadable(let why):
            return MetadataReport(path: path, valid: false, problems: [why])
        }
    }

    static func device(_ d: DeviceRecord) -> MetadataDump.Device {
        MetadataDump.Device(
            path: d.path, kind: d.identity.kind.rawValue, sizeBytes: d.size, identity: d.identity.description,
            stableId: d.stableID)
    }

    static func dump(path: String, store: MetadataStore, report r: MetadataRecoveryReport) -> MetadataDump {
        let h = store.header
        let ranges = store.committedMap.setRanges().map {
            MetadataDump.Range(start: UInt64($0.lowerBound), count: UInt64($0.count))
        }
        var dump = MetadataDump(
            path: path, formatVersion: Int(h.version), generation: h.generation, jobId: h.jobID,
            regionSize: h.regionSize, targetSizeBytes: h.targetSize, regionsTotal: h.regionCount,
            regionsHydrated: h.hydratedCount, pageCount: h.pageCount, discardSource: h.discardSource,
            destZeroed: h.destZeroed, complete: h.complete, source: device(h.source), dest: device(h.dest),
            createdUnixMs: h.createdUnixMs, committedUnixMs: h.committedUnixMs,
            recovery: .init(
                superblockSlot: r.superblockSlot, otherSlotProblem: r.otherSlotProblem,
                uncommittedPageSlots: r.uncommittedPageSlots, invalidPageSlots: r.invalidPageSlots),
            hydratedRanges: ranges)
        dump.pendingReleaseRanges = h.pendingRelease.map {
            MetadataDump.Range(start: UInt64($0.lowerBound), count: UInt64($0.count))
        }
        return dump
    }
}

struct Check: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Validate a metadata file offline (no daemon; read-only).",
        discussion: "Exit 0 when the metadata is valid, 1 when it is damaged, 66 when it cannot be read.")

    @ParentCommand var root: Clonectl
    @Argument(help: ArgumentHelp("Metadata file or device.", valueName: "metadata"), completion: .file())
    var metadata: String

    func validate() throws {
        if let problem = OptionRules.offlineProblem(command: "check", socket: root.socket) {
            throw ValidationError(problem)
        }
    }

    @Flag(help: "Print the report as JSON (the MetadataReport of CheckMetadata).")
    var json = false

    func run() async throws {
        let path = absolutePath(metadata)
        let outcome = OfflineMetadata.open(path)
        let report = OfflineMetadata.report(path: path, outcome)
        if json {
            Output.line(try CloneJSON.string(report))
        }
        switch outcome {
        case .valid:
            if !json { Output.line(MetadataFormatter.check(report)) }
        case .invalid(let why):
            if !json { Output.line(MetadataFormatter.check(report)) }
            throw CloneFailure("\(why); the job using it cannot resume from it", exit: .jobFailed)
        case .unreadable(let why):
            throw CloneFailure(why, exit: .noInput)
        }
    }
}

struct Dump: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Print a metadata file's superblock and hydrated regions offline (no daemon; read-only).",
        discussion:
            "Exit 0 on success, 1 when the metadata is damaged (run 'clonectl check'), 66 when it cannot be read.")

    @ParentCommand var root: Clonectl
    @Argument(help: ArgumentHelp("Metadata file or device.", valueName: "metadata"), completion: .file())
    var metadata: String

    func validate() throws {
        if let problem = OptionRules.offlineProblem(command: "dump", socket: root.socket) {
            throw ValidationError(problem)
        }
    }

    @Flag(help: "Print JSON (dump_version 1; see docs/clonectl.md).")
    var json = false

    func run() async throws {
        let path = absolutePath(metadata)
        switch OfflineMetadata.open(path) {
        case .valid(let store, let report):
            let d = OfflineMetadata.dump(path: path, store: store, report: report)
            Output.line(json ? try CloneJSON.string(d) : MetadataFormatter.dump(d))
        case .invalid(let why):
            throw CloneFailure("\(why); nothing to dump", exit: .jobFailed)
        case .unreadable(let why):
            throw CloneFailure(why, exit: .noInput)
        }
    }
}
