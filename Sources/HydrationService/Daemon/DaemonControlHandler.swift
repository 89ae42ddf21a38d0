import ControlProtocol
import Foundation
import HydrationEngine

/// Implements the control protocol on the daemon's `JobManager`, translating engine errors into
/// the interface's named Varlink errors at this one edge.
public struct DaemonControlHandler: ControlHandler {
    public let manager: JobManager
    /// How often a watching client (GetStatus with more) gets an update.
    public var watchInterval: Duration

    public init(manager: JobManager, watchInterval: Duration = .milliseconds(500)) {
        self.manager = manager
        self.watchInterval = watchInterval
    }

    /// One mapping from engine errors to protocol errors.
    static func varlinkError(_ e: HydrationError, job: String? = nil, path: String? = nil) -> VarlinkError {
        switch e.code {
        case .noSuchJob: return .noSuchJob(job ?? "")
        case .jobExists: return .jobExists(job ?? "")
        case .jobRunning: return .jobRunning(job ?? "", state: .hydrating)
        case .invalidParameter, .notFound, .sameDevice, .invalidState:
            return .invalidParameter(parameterName(for: e), reason: e.message)
        case .deviceInUse:
            // `job` names the holder when it is one of ours; empty when something else (a mount,
            // another process) holds the device. The message says which.
            return .deviceInUse(path: e.path ?? path ?? "", job: e.holder ?? "", message: e.message)
        case .sizeMismatch:
            return .sizeMismatch(sourceBytes: e.sourceBytes ?? 0, destBytes: e.destBytes ?? 0, message: e.message)
        case .metadataCorrupt, .metadataMismatch:
            return .metadataCorrupt(path: e.path ?? path ?? "", reason: e.message)
        case .metadataExists:
            return .metadataExists(path: e.path ?? path ?? "", message: e.message)
        case .deviceUnconfirmed:
            return .deviceUnconfirmed(path: e.path ?? path ?? "", message: e.message)
        case .permissionDenied: return .permissionDenied(method: "", reason: e.message)
        case .discardUnsupported:
            return .invalidParameter("discard_source", reason: "DiscardUnsupported: " + e.message)
        case .sourceReadFailed, .sourceUnavailable, .destWriteFailed, .noSpace, .commitFailed, .destinationMismatch:
            return .jobFailed(job ?? "", code: e.code.rawValue, message: e.message)
        case .ioError: return .ioError(path: e.path ?? path, errno: e.errno, message: e.message)
        case .resourceExhausted:
            // An I/O error by errno (EMFILE, ENFILE), named in the message: nothing about the
            // job's devices is wrong.
            return .ioError(path: e.path ?? path, errno: e.errno, message: "ResourceExhausted: " + e.message)
        case .jobRecordUnreadable:
            return .jobRecordUnreadable(job ?? "", path: e.path ?? path ?? "", message: e.message)
        case .dataAtRisk: return .dataAtRisk(job ?? "", message: e.message)
        case .exportInUse: return .exportInUse(job ?? "", clients: e.clients ?? 0, message: e.message)
        }
    }

    /// Which request parameter an engine validation error concerns: the one it was thrown with,
    /// else the job's name for a request about a job in the wrong state.
    static func parameterName(for e: HydrationError) -> String {
        if let p = e.parameter { return p }
        if e.code == .invalidState || e.code == .notFound { return "name" }
        return "parameters"
    }

    private func mapped<T>(job: String?, _ body: () async throws(HydrationError) -> T) async throws -> T {
        do {
            return try await body()
        } catch {
            throw Self.varlinkError(error, job: job)
        }
    }

    public func start(_ p: StartParameters, peer: PeerCredentials) async throws -> StartReply {
        if p.isResumeOnly {
            return try await mapped(job: p.name) { () async throws(HydrationError) in
                StartReply(job: try await manager.resume(p.name), created: false)
            }
        }
        // A Start with more than `name` creates a job: tunables for an existing job go through Set.
        let creating =
            "required to create a job (a Start with only name resumes an existing job; Set changes its tunables)"
        guard let source = p.source else { throw VarlinkError.invalidParameter("source", reason: creating) }
        guard let dest = p.dest else { throw VarlinkError.invalidParameter("dest", reason: creating) }
        if let (name, reason) = p.inapplicableParameter { throw VarlinkError.invalidParameter(name, reason: reason) }
        var io = IOMode.auto
        if let v = p.io {
            guard let m = IOMode(rawValue: v) else {
                throw VarlinkError.invalidParameter(
                    "io",
                    reason: "must be one of \(IOMode.allCases.map(\.rawValue).joined(separator: ", ")) (got '\(v)')")
            }
            io = m
        }
        let req = CreateJobRequest(
            name: p.name, source: source, dest: dest, metadata: p.metadata, regionSize: p.regionSize,
            discardSource: p.discardSource ?? false, destZeroed: p.destZeroed ?? false,
            noHydration: p.noHydration ?? false,
            tunables: TunablesUpdate(
                threshold: p.threshold, batchSize: p.batchSize,
                rateLimitBytesPerSecond: p.rateLimitBytesPerSecond.map { .some($0) },
                spaceBudgetBytes: p.spaceBudgetBytes, commitIntervalMs: p.commitIntervalMs),
            export: p.export ?? false, hydrateOnRead: p.hydrateOnRead ?? false, io: io,
            verify: p.verify ?? false)
        return try await mapped(job: p.name) { () async throws(HydrationError) in
            StartReply(job: try await manager.create(req), created: true)
        }
    }

    public func pause(_ p: PauseParameters, peer: PeerCredentials) async throws -> JobReply {
        try await mapped(job: p.name) { () async throws(HydrationError) in
            JobReply(job: try await manager.pause(p.name))
        }
    }

    public func resume(_ p: ResumeParameters, peer: PeerCredentials) async throws -> JobReply {
        try await mapped(job: p.name) { () async throws(HydrationError) in
            JobReply(job: try await manager.resume(p.name, acceptDevices: p.acceptDevices ?? false))
        }
    }

    func statuses(_ name: String?) async throws -> [JobStatus] {
        if let name {
            return try await mapped(job: name) { () async throws(HydrationError) in [try await manager.status(name)] }
        }
        return await manager.statusAll()
    }

    public func getStatus(_ p: GetStatusParameters, peer: PeerCredentials) async throws -> GetStatusReply {
        GetStatusReply(jobs: try await statuses(p.name))
    }

    public func watchStatus(_ p: GetStatusParameters, peer: PeerCredentials) async throws -> AsyncThrowingStream<
        StatusUpdate, any Error
    > {
        let changes = manager.stateChanges
        // Taken before the first status: a change after it wakes the first wait.
        let firstSeen = changes.generation
        let first = try await statuses(p.name)
        let name = p.name
        let interval = watchInterval
        let handler = self
        return AsyncThrowingStream { continuation in
            let task = Task {
                var jobs = first
                var seen = firstSeen
                while !Task.isCancelled {
                    // Named job: ends when it completes or fails. All jobs: runs until the client leaves.
                    let update = name != nil ? StatusUpdate(jobs: jobs) : StatusUpdate(jobs: jobs, isFinal: false)
                    continuation.yield(update)
                    if update.isFinal { break }
                    // An update per interval, and at once when a job changes state (a script
                    // waiting for completion must not wait for the next tick).
                    let states = jobs.map(\.state)
                    let due = ContinuousClock.now + interval
                    repeat {
                        await changes.wait(past: seen, until: due)
                        seen = changes.generation
                        do { jobs = try await handler.statuses(name) } catch {
                            continuation.finish(throwing: error)
                            return
                        }
                    } while ContinuousClock.now < due && jobs.map(\.state) == states && !Task.isCancelled
                }
                continuation.finish()
            }
            continuation.onTermination = { _ in task.cancel() }
        }
    }

    public func list(_ p: ListParameters, peer: PeerCredentials) async throws -> ListReply {
        ListReply(jobs: await manager.statusAll().map(JobSummary.init))
    }

    public func set(_ p: SetParameters, peer: PeerCredentials) async throws -> JobReply {
        let update = TunablesUpdate(
            threshold: p.threshold, batchSize: p.batchSize,
            rateLimitBytesPerSecond: p.rateLimitBytesPerSecond.map { .some($0) },
            spaceBudgetBytes: p.spaceBudgetBytes, commitIntervalMs: p.commitIntervalMs)
        guard !update.isEmpty else { throw VarlinkError.invalidParameter("parameters", reason: "nothing to set") }
        if p.spaceBudgetBytes != nil {
            // Whether a job discards its source is fixed at creation, so asking first is not racy.
            let job = try await statuses(p.name).first
            if job?.discard.enabled == false {
                throw VarlinkError.invalidParameter(
                    "space_budget_bytes",
                    reason:
                        "applies only to a job created with discard_source; job \(p.name) does not discard its source, so there is nothing to budget"
                )
            }
        }
        return try await mapped(job: p.name) { () async throws(HydrationError) in
            JobReply(job: try await manager.set(p.name, update))
        }
    }

    public func commit(_ p: CommitParameters, peer: PeerCredentials) async throws -> JobReply {
        try await mapped(job: p.name) { () async throws(HydrationError) in
            JobReply(job: try await manager.commit(p.name))
        }
    }

    public func remove(_ p: RemoveParameters, peer: PeerCredentials) async throws -> RemoveReply {
        try await mapped(job: p.name) { () async throws(HydrationError) in
            RemoveReply(keptMetadata: try await manager.remove(p.name, force: p.force ?? false))
        }
    }

    public func checkMetadata(_ p: CheckMetadataParameters, peer: PeerCredentials) async throws -> CheckMetadataReply {
        CheckMetadataReply(report: await Self.report(path: p.path, manager: manager))
    }

    /// A metadata file as the wire reports it: valid with its fields, or invalid with the reasons.
    public static func report(path: String, manager: JobManager) async -> ControlProtocol.MetadataReport {
        do {
            let (h, r) = try await manager.checkMetadata(path)
            return ControlProtocol.MetadataReport(path: path, header: h, recovery: r)
        } catch {
            return ControlProtocol.MetadataReport(path: path, valid: false, problems: [error.message])
        }
    }
}
