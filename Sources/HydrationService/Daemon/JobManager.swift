import ControlProtocol
import Foundation
import HydrationEngine
import Logging

/// A request to create a job (the engine-level form of the control protocol's Start).
public struct CreateJobRequest: Sendable, Equatable {
    public var name: String
    public var source: String
    public var dest: String
    public var metadata: String?
    public var regionSize: UInt64?
    public var discardSource: Bool
    public var destZeroed: Bool
    public var noHydration: Bool
    public var tunables: TunablesUpdate
    /// Serve the job's clone as NBD export `name`.
    public var export: Bool
    /// With `export`: reads served by the source hydrate what they read.
    public var hydrateOnRead: Bool
    /// Direct or buffered I/O.
    public var io: IOMode

    public init(
        name: String, source: String, dest: String, metadata: String? = nil, regionSize: UInt64? = nil,
        discardSource: Bool = false, destZeroed: Bool = false, noHydration: Bool = false,
        tunables: TunablesUpdate = TunablesUpdate(), export: Bool = false, hydrateOnRead: Bool = false,
        io: IOMode = .auto
    ) {
        self.io = io
        self.name = name; self.source = source; self.dest = dest; self.metadata = metadata; self.regionSize = regionSize
        self.discardSource = discardSource; self.destZeroed = destZeroed; self.noHydration = noHydration;
        self.tunables = tunables
        self.export = export
        self.hydrateOnRead = hydrateOnRead
    }
}

/// A partial change of tunables: nil fields are left as they are.
public struct TunablesUpdate: Sendable, Equatable {
    public var threshold: Int?
    public var batchSize: Int?
    /// `.some(nil)` removes the limit.
    public var rateLimitBytesPerSecond: UInt64??
    public var spaceBudgetBytes: UInt64?
    public var commitIntervalMs: Int?

    public init(
        threshold: Int? = nil, batchSize: Int? = nil, rateLimitBytesPerSecond: UInt64?? = nil,
        spaceBudgetBytes: UInt64? = nil, commitIntervalMs: Int? = nil
    ) {
        self.threshold = threshold; self.batchSize = batchSize; self.rateLimitBytesPerSecond = rateLimitBytesPerSecond
        self.spaceBudgetBytes = spaceBudgetBytes; self.commitIntervalMs = commitIntervalMs
    }

    func applied(to t: Tunables) -> Tunables {
        var t = t
        if let v = threshold { t.threshold = v }
        if let v = batchSize { t.batchSize = v }
        if let v = rateLimitBytesPerSecond { t.rateLimitBytesPerSecond = v == 0 ? nil : v }
        if let v = spaceBudgetBytes { t.spaceBudgetBytes = v }
        if let v = commitIntervalMs { t.commitIntervalMs = v }
        return t
    }

    public var isEmpty: Bool {
        threshold == nil && batchSize == nil && rateLimitBytesPerSecond == nil && spaceBudgetBytes == nil
            && commitIntervalMs == nil
    }
}

/// The daemon's jobs: creation with validation, persistence of their definitions, restoration at
/// start, and the control operations. Every method is safe to call while jobs copy.
public actor JobManager {
    enum Entry {
        case live(HydrationJob, JobDefinition)
        /// Could not be opened at start (metadata corrupt, device gone...): reported as failed —
        /// or, when its metadata (read-only) says it completed, as complete: a finished job's
        /// source may well have been deleted since.
        case broken(JobDefinition, HydrationError, MetadataHeader?)
        /// Complete, every release recorded as done: restored from its metadata alone. Its devices
        /// are never opened again (they may belong to other jobs or other owners by now).
        case finished(JobDefinition, MetadataHeader)
        /// Its record (`jobs/NAME.json`) cannot be read: listed as failed with
        /// `JobRecordUnreadable`, every device found in the record's text or its metadata stays
        /// reserved, and nothing is opened, written or released until the operator acts.
        case unreadable(UnreadableRecord)
        /// Paused by the operator, and closed: it holds no descriptor, thread or lock (a daemon
        /// with thousands of paused jobs must not run out of descriptors). Its devices stay
        /// reserved (`reservations`); a resume opens it again through `HydrationJob.open`,
        /// which confirms that the devices are still the job's own, as a restart does.
        case parked(JobDefinition, ParkedJob)

        var definition: JobDefinition {
            switch self {
            case .live(_, let d), .broken(let d, _, _), .finished(let d, _), .parked(let d, _): return d
            case .unreadable(let u): return u.definition
            }
        }

        var isCompleteOffline: Bool {
            switch self {
            case .broken(_, _, let h?): return h.complete
            case .finished: return true
            default: return false
            }
        }
    }

    /// What a parked job reports: its status when it was closed (paused, everything committed).
    struct ParkedJob: Sendable {
        var status: JobStatus
        var jobID: String
    }

    public nonisolated let stateDirectory: String
    private let storage: any StorageProvider
    private let io: IOExecutor
    private let logger: Logger
    private var jobs: [String: Entry] = [:] {
        didSet { stateChanges.signal() }
    }
    /// Bumped by every job's state change and every change to `jobs`: status watchers wait on it.
    public nonisolated let stateChanges = StateChangeSignal()
    /// The last status of jobs closed by `retireCompleteJobs` (their counters: commits, bytes
    /// discarded...), which the metadata alone does not have.
    private var retiredStatus: [String: JobStatus] = [:]
    /// Names being created right now (creation awaits I/O; actor reentrancy must not let two
    /// Starts of one name both proceed).
    private var creating: Set<String> = []
    /// One control operation at a time per job name (FIFO): each reads state, awaits, and writes
    /// the definition back, so interleaving them would lose updates (a pause undone by a
    /// concurrent set, a removed job resurrected by a concurrent persist).
    private var operationQueues: [String: [CheckedContinuation<Void, Never>]] = [:]
    /// Jobs with a remote source that could not be reached when they were opened: retried in
    /// the background until the server answers (`retryUnreachableSource`).
    private var reopenTasks: [String: Task<Void, Never>] = [:]
    /// Set by `shutdown`: a background reopen that finishes after it must not leave a job open.
    private var shuttingDown = false
    private var stateLock: StateDirectoryLock?
    /// Where exported jobs are served (nil: this manager serves none, and refuses `export`).
    public nonisolated let exportHost: JobExportHost?
    /// Jobs whose export is in `exportHost`'s registry now.
    private var published: Set<String> = []
    /// Destinations opened only to serve a complete job restored from its metadata alone
    /// (`CompleteCloneExport`): closed when the export is withdrawn.
    private var servedDestinations: [String: any StorageDevice] = [:]
    /// Why an exported job's clone is not served (shown as its status error): a complete job's
    /// destination that is no longer the job's own, or gone.
    private var exportErrors: [String: HydrationError] = [:]

    public static let maxNameLength = 64

    public init(
        stateDirectory: String, storage: any StorageProvider = PosixStorage(), io: IOExecutor, logger: Logger,
        exports: JobExportHost? = nil
    ) {
        self.stateDirectory = stateDirectory
        self.storage = storage
        self.io = io
        self.logger = logger
        self.exportHost = exports
    }

    var jobsDirectory: String { stateDirectory + "/jobs" }
    var keptDirectory: String { stateDirectory + "/kept" }
    func definitionPath(_ name: String) -> String { jobsDirectory + "/\(name).json" }

    // MARK: restore

    /// Creates the state directory if needed and restores every recorded job in its recorded
    /// state: hydrating jobs resume from their committed state, paused ones stay paused,
    /// complete ones stay complete. Jobs that cannot be opened are kept, as failed, with the reason.
    public func restore() async throws {
        // File-system calls run on an I/O thread, never on the cooperative pool: a slow or hung
        // state directory must not hold the threads the control socket and the jobs need.
        let jobsDirectory = self.jobsDirectory, stateDirectory = self.stateDirectory
        try await io.run {
            try FileManager.default.createDirectory(
                atPath: jobsDirectory, withIntermediateDirectories: true,
                attributes: [.posixPermissions: 0o700])
        }
        // Two daemons on one state directory would both open every job's metadata read-write.
        // A refusal is retried for about a second: a process forked elsewhere in this program
        // (or a previous daemon's) holds the lock's open file until it execs or exits, so the
        // lock of a manager that has just shut down can outlive its close by a moment (a full
        // test run once failed a restart on this). A real second daemon holds it for good.
        var delaysMs: [UInt64] = [20, 40, 80, 160, 320, 400]
        while true {
            do {
                stateLock = try await io.run { try StateDirectoryLock(directory: stateDirectory) }
                break
            } catch let error as HydrationError {
                guard error.code == .deviceInUse, !delaysMs.isEmpty else { throw error }
                try? await Task.sleep(nanoseconds: delaysMs.removeFirst() * 1_000_000)
            }
        }
        let names = try await io.run { try FileManager.default.contentsOfDirectory(atPath: jobsDirectory) }
            .filter { $0.hasSuffix(".json") && !$0.hasPrefix(".") }
            .sorted()
        for file in names {
            let name = String(file.dropLast(".json".count))
            // A record that cannot be read is never a reason to forget its job: it may be the
            // only thing left that says which devices hold data no other copy has.
            let def: JobDefinition
            switch await readRecord(name) {
            case .success(let d): def = d
            case .failure(let u):
                jobs[name] = .unreadable(u)
                logger.error(
                    "job record unreadable; the job is listed as failed and its devices stay reserved",
                    metadata: [
                        "job": "\(name)", "path": "\(u.file)", "reason": "\(u.reason)",
                        "reserved_sources": "\(u.sources)", "reserved_destinations": "\(u.dests)",
                    ])
                continue
            }
            jobs[def.name] = await openEntry(def)
            await publishExport(def.name)
            scheduleReopenIfSourceUnreachable(def.name)
        }
    }

    /// Reads `jobs/NAME.json` (on an I/O thread): the definition, or what could be recovered
    /// of an unreadable one.
    private func readRecord(_ name: String) async -> Result<JobDefinition, UnreadableRecord> {
        let path = definitionPath(name)
        let defaultMetadata = jobsDirectory + "/\(name).meta"
        let storage = self.storage
        let r = try? await io.run { () -> Result<JobDefinition, UnreadableRecord> in
            let bytes = JobRecords.readBytes(path)
            switch bytes.flatMap({ JobRecords.decode(JobDefinition.self, $0) }) {
            case .success(let def) where def.name == name:
                return .success(def)
            case .success(let def):
                return .failure(
                    UnreadableRecord.examine(
                        name: name, file: path, bytes: try? bytes.get(),
                        reason: "it names job '\(def.name)', not '\(name)' as its file name says",
                        defaultMetadata: defaultMetadata, storage: storage))
            case .failure(let e):
                return .failure(
                    UnreadableRecord.examine(
                        name: name, file: path, bytes: try? bytes.get(), reason: e.reason, errno: e.errno,
                        defaultMetadata: defaultMetadata, storage: storage))
            }
        }
        return r
            ?? .failure(
                UnreadableRecord(name: name, file: path, reason: "the I/O executor is shut down", salvaged: .init()))
    }

    // MARK: exports

    /// Serves the job's clone if its definition asks for it and it is open (a live entry). A job
    /// that could not be opened, or that is complete and restored from its metadata alone (its
    /// devices are not opened), is not served.
    private func publishExport(_ name: String) async {
        guard let host = exportHost, let entry = jobs[name], entry.definition.export, !published.contains(name) else {
            return
        }
        if case .finished(let def, let header) = entry {
            // Complete and restored from its metadata alone: the clone is the destination itself.
            // Only the destination is opened (confirmed to be the job's own), never the source.
            let storage = self.storage
            do {
                let (export, device) = try await io.run {
                    try CompleteCloneExport.open(def, header: header, storage: storage, io: LiveCloneExport.clientIO)
                }
                do {
                    try host.publish(export)
                } catch {
                    device.close()
                    throw error
                }
                servedDestinations[name] = device
                published.insert(name)
                logger.info(
                    "complete job's destination exported over NBD",
                    metadata: ["job": "\(name)", "uri": "\(host.uri(for: name))"])
            } catch {
                exportErrors[name] = error as? HydrationError ?? HydrationError(.ioError, "\(error)")
                logger.error("complete job not exported", metadata: ["job": "\(name)", "error": "\(error)"])
            }
            return
        }
        guard case .live(let job, _) = entry else {
            logger.notice("exported job is not served: it is not open", metadata: ["job": "\(name)"])
            return
        }
        do {
            try host.publish(await job.liveExport(hydrateOnRead: entry.definition.hydrateOnRead))
            published.insert(name)
            logger.info("job exported over NBD", metadata: ["job": "\(name)", "uri": "\(host.uri(for: name))"])
        } catch {
            logger.error("job not exported", metadata: ["job": "\(name)", "error": "\(error)"])
        }
    }

    /// Stops serving the job's clone: out of the registry, then its connections ended and waited
    /// for. Called before the job is closed for good or replaced.
    private func withdrawExport(_ name: String) async {
        guard let host = exportHost, published.remove(name) != nil else { return }
        let ended = await host.withdraw(name)
        servedDestinations.removeValue(forKey: name)?.close()
        logger.info("job export withdrawn", metadata: ["job": "\(name)", "clients_disconnected": "\(ended)"])
    }

    /// The job's export as the status shows it, nil when it is not served.
    private func exportStatus(_ name: String) -> JobStatus.Export? {
        guard let host = exportHost, published.contains(name) else { return nil }
        return JobStatus.Export(uri: host.uri(for: name), clients: host.clients(of: name))
    }

    /// Opens a recorded job: a complete one whose releases are all recorded as done from its
    /// metadata alone (its devices are not touched); any other through `HydrationJob.open`, which
    /// confirms the devices. One that cannot be opened is kept as broken, with the reason: it
    /// writes and releases nothing.
    private func openEntry(_ def: JobDefinition, acceptDevices: Bool = false) async -> Entry {
        let storage = self.storage
        let header = try? await io.run {
            try MetadataStore.open(path: def.metadata, storage: storage, readOnly: true).0.header
        }
        if let header, header.complete {
            // A complete job never touches its source again, even with releases pending (a crash
            // between its last commit and their record, a source whose sync failed): that source
            // may be anything by now. What was not released is shown as pending in its status.
            logger.info("complete job restored from its metadata alone", metadata: ["job": "\(def.name)"])
            return .finished(def, header)
        }
        do {
            let job = try await HydrationJob.open(
                def.configuration, storage: storage, io: io, logger: logger,
                acceptDevices: acceptDevices)
            job.reportStateChanges(to: stateChanges)
            if def.desired == .hydrating, await job.currentState != .complete {
                try await job.start()
            } else if def.desired == .paused {
                await job.pause()
                if let parked = await park(job, def) { return parked }
            }
            let state = await job.currentState
            logger.info("job restored", metadata: ["job": "\(def.name)", "state": "\(state.rawValue)"])
            return .live(job, def)
        } catch {
            if header?.complete == true {
                logger.info(
                    "complete job restored from its metadata alone",
                    metadata: ["job": "\(def.name)", "note": "\(error.message)"])
            } else {
                logger.error(
                    "job could not be restored; it writes and releases nothing until resumed",
                    metadata: ["job": "\(def.name)", "error": "\(error)"])
            }
            return .broken(def, error, header)
        }
    }

    /// Closes a job the operator paused, so that it holds nothing while it waits: only a local,
    /// unexported job paused cleanly (an export needs its devices; a remote source's job and a
    /// job paused on an error keep their own machinery). nil when the job stays open.
    private func park(_ job: HydrationJob, _ def: JobDefinition) async -> Entry? {
        guard !def.export, !RemoteSource.isURI(def.source), await job.currentState == .paused,
            await !job.needsReopen, await job.lastError == nil, await !job.isExported
        else { return nil }
        let status = await job.status()
        let id = await job.jobID
        await job.close()
        logger.info("paused job closed; it holds no descriptors until resumed", metadata: ["job": "\(def.name)"])
        return .parked(def, ParkedJob(status: status, jobID: id))
    }

    /// Closes the jobs that completed while open and are not served over NBD, keeping them as
    /// restored-from-metadata entries (`.finished`), as a restart would: a complete job needs
    /// nothing open (its devices are already let go; this closes its metadata and its actors).
    /// The daemon calls it when a job's state changes.
    public func retireCompleteJobs() async {
        for name in jobs.keys.sorted() {
            guard case .live(let job, _)? = jobs[name], !published.contains(name), await job.currentState == .complete
            else { continue }
            try? await serialized(name) { () async throws(HydrationError) in
                // Checked again under the job's lock: an operation may have changed it meanwhile.
                guard case .live(let job, let def)? = jobs[name], !published.contains(name), await !job.isExported,
                    await job.currentState == .complete
                else { return }
                let header = await job.metadataHeader
                guard header.complete else { return }
                let last = await job.status()
                await job.close()
                retiredStatus[name] = last
                jobs[name] = .finished(def, header)
                logger.info("complete job closed; it holds no descriptors", metadata: ["job": "\(name)"])
            }
        }
    }

    // MARK: a remote source down at restart

    /// Whether a job failed to open only because its remote source did not answer (the server is
    /// down or restarting): a migration's old host rebooting must not need an operator.
    static func sourceUnreachable(_ def: JobDefinition, _ e: HydrationError) -> Bool {
        guard RemoteSource.isURI(def.source), e.message.hasPrefix("source") || e.code == .sourceUnavailable else {
            return false
        }
        switch e.errno {
        case ECONNREFUSED?, ENOENT?, ENOTCONN?, ECONNRESET?, EHOSTUNREACH?, ENETUNREACH?, ETIMEDOUT?, EPIPE?:
            return true
        default: return e.code == .sourceUnavailable
        }
    }

    /// A job that was hydrating and could not be reopened because its remote source is down is
    /// reopened in the background, with backoff (1 s doubling to 30 s), once the server answers:
    /// as the engine does for an outage while it runs. Its status meanwhile is the open error. A
    /// resume, pause or remove by the operator takes over (the retry stops when the entry changes).
    private func scheduleReopenIfSourceUnreachable(_ name: String) {
        guard reopenTasks[name] == nil, case .broken(let def, let e, _)? = jobs[name], def.desired == .hydrating,
            Self.sourceUnreachable(def, e)
        else { return }
        logger.notice(
            "remote source unreachable; the job is reopened once it answers",
            metadata: ["job": "\(name)", "error": "\(e.message)"])
        reopenTasks[name] = Task { [weak self] in
            var delay: UInt64 = 1_000_000_000
            while !Task.isCancelled {
                try? await Task.sleep(nanoseconds: delay)
                if Task.isCancelled { return }
                guard let self, await self.retryReopen(name) else { return }
                delay = min(delay * 2, 30_000_000_000)
            }
        }
    }

    /// One attempt; returns whether to go on trying.
    private func retryReopen(_ name: String) async -> Bool {
        await acquire(name)
        defer { release(name) }
        guard case .broken(let def, let e, _)? = jobs[name], def.desired == .hydrating, Self.sourceUnreachable(def, e)
        else {
            reopenTasks[name] = nil
            return false
        }
        guard !shuttingDown else { return false }
        let entry = await openEntry(def)
        if shuttingDown {
            // The daemon stopped while this open ran: close what it opened (the jobs were
            // closed already), keeping the definition as it is for the next start.
            if case .live(let job, _) = entry { await job.close() }
            reopenTasks[name] = nil
            return false
        }
        if case .broken(_, let e2, _) = entry, Self.sourceUnreachable(def, e2) {
            jobs[name] = entry
            return true
        }
        jobs[name] = entry
        reopenTasks[name] = nil
        if case .live = entry {
            logger.info("remote source reachable again; job reopened", metadata: ["job": "\(name)"])
            await publishExport(name)
        }
        return false
    }

    // MARK: one operation at a time per job

    private func acquire(_ name: String) async {
        if operationQueues[name] == nil {
            operationQueues[name] = []
            return
        }
        await withCheckedContinuation { operationQueues[name]!.append($0) }
    }

    private func release(_ name: String) {
        guard var queue = operationQueues[name] else { return }
        if queue.isEmpty {
            operationQueues[name] = nil
        } else {
            // Ownership passes straight to the next waiter: nobody can slip in between.
            let next = queue.removeFirst()
            operationQueues[name] = queue
            next.resume()
        }
    }

    private func serialized<T>(_ name: String, _ body: () async throws(HydrationError) -> T)
        async throws(HydrationError) -> T
    {
        await acquire(name)
        defer { release(name) }
        return try await body()
    }

    // MARK: control

    public static func validateName(_ name: String) throws(HydrationError) {
        guard !name.isEmpty, name.utf8.count <= maxNameLength else {
            throw HydrationError(
                .invalidParameter, "job name must be 1 to \(maxNameLength) characters (got \(name.utf8.count))")
        }
        guard !name.hasPrefix("."),
            name.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || "-_.:@".contains($0)) })
        else {
            throw HydrationError(
                .invalidParameter,
                "job name '\(name)' may contain only letters, digits and - _ . : @, and may not start with '.'")
        }
    }

    /// Creates a job and starts it (paused with `noHydration`). A request naming the metadata of
    /// a kept record (a removed, partly released job) resumes that job instead; any other request
    /// whose destination is such a record's destination is refused.
    public func create(_ req: CreateJobRequest) async throws(HydrationError) -> JobStatus {
        try Self.validateName(req.name)
        return try await serialized(req.name) { () async throws(HydrationError) -> JobStatus in
            try await createLocked(req)
        }
    }

    private func createLocked(_ req: CreateJobRequest) async throws(HydrationError) -> JobStatus {
        guard jobs[req.name] == nil, !creating.contains(req.name) else {
            throw HydrationError(.jobExists, "job \(req.name) already exists")
        }
        if req.export && exportHost == nil {
            throw HydrationError(.invalidParameter, "export: this daemon serves no NBD socket")
        }
        let regionSize = req.regionSize ?? RegionGeometry.defaultRegionSize
        guard JobConfiguration.isValidRegionSize(regionSize) else {
            throw JobConfiguration.regionSizeError(regionSize)
        }
        let tunables = req.tunables.applied(to: .defaults(regionSize: regionSize))
        var defaultMetadata = jobsDirectory + "/\(req.name).meta"
        let keptNow = await keptScan()
        if keptNow.readable.contains(where: { $0.record.definition.metadata == defaultMetadata })
            || keptNow.unreadable.contains(where: { $0.metadataPath == defaultMetadata })
        {
            // A removed job of the same name kept its metadata there.
            defaultMetadata = jobsDirectory + "/\(req.name)-\(wallClockMillis()).meta"
        }
        var def = JobDefinition(
            name: req.name, source: req.source, dest: req.dest,
            metadata: req.metadata ?? defaultMetadata,
            regionSize: regionSize, discardSource: req.discardSource, destZeroed: req.destZeroed,
            tunables: tunables, desired: req.noHydration ? .paused : .hydrating, export: req.export,
            hydrateOnRead: req.hydrateOnRead, io: req.io)
        // Another job's metadata must not be touched by this one.
        for entry in jobs.values {
            let other = entry.definition
            // Devices are guarded by their locks (released once a job completes); metadata files
            // are not locked, so they are checked here.
            for path in [def.source, def.dest, def.metadata]
            where path == other.metadata || (path == def.metadata && [other.source, other.dest].contains(path)) {
                var e = HydrationError(.deviceInUse, "\(path) is used by job \(other.name)")
                e.path = path
                e.holder = other.name
                throw e
            }
        }
        let kept = try await keptRecord(concerning: def)
        try await checkReservations(def, except: kept?.file)
        creating.insert(req.name)
        defer { creating.remove(req.name) }
        // A destination file this create makes is removed again if the create fails.
        let destPath = def.dest
        var destExisted = RemoteSource.isURI(destPath)
        if !destExisted {
            destExisted = (try? await io.run { FileManager.default.fileExists(atPath: destPath) }) ?? true
        }
        let job: HydrationJob
        do {
            if let kept {
                // Resuming a kept record: its metadata says what the job is; the request's paths
                // are confirmed against it by `open`.
                def.regionSize = kept.record.definition.regionSize
                def.discardSource = kept.record.definition.discardSource
                def.destZeroed = kept.record.definition.destZeroed
                job = try await HydrationJob.open(def.configuration, storage: storage, io: io, logger: logger)
            } else {
                job = try await HydrationJob.create(def.configuration, storage: storage, io: io, logger: logger)
            }
            job.reportStateChanges(to: stateChanges)
        } catch {
            var e = error
            if e.code == .deviceInUse, let path = e.path {
                e.holder =
                    jobs.values.first { [$0.definition.source, $0.definition.dest].contains(path) }?.definition.name
                if let holder = e.holder { e.message += " (job \(holder))" }
            }
            throw e
        }
        // The record last: until it is durably in place the job does not exist after a restart,
        // and a failure of anything up to it takes back what this create made (the record, the
        // metadata, a destination file it created), so that a client told "not created" finds
        // nothing of it later (no failed ghost at the next start, no "metadata already exists").
        do {
            try await persist(def, previous: nil)
        } catch {
            await job.close()
            await rollBackCreate(def, job: job, keptMetadata: kept != nil, destExisted: destExisted)
            throw error
        }
        if let kept {
            let file = kept.file
            _ = try? await io.run { try FileManager.default.removeItem(atPath: file) }
            logger.info("kept job record resumed", metadata: ["job": "\(def.name)", "metadata": "\(def.metadata)"])
        }
        jobs[req.name] = .live(job, def)
        await publishExport(req.name)
        if req.noHydration {
            await job.pause()
            // Created paused: closed like any paused job, until resumed.
            if let parked = await park(job, def) { jobs[req.name] = parked }
        } else {
            do {
                try await job.start()
            } catch {
                await withdrawExport(req.name)
                await job.close()
                jobs[req.name] = nil
                await rollBackCreate(def, job: job, keptMetadata: kept != nil, destExisted: destExisted, record: true)
                throw error
            }
        }
        return try await status(req.name)
    }

    /// Takes back what a failed create made: its record (when `record`; `persist` removes a
    /// record it could not make durable itself), its metadata (unless it is a kept job's), and
    /// its destination file if the create made it and it is still that file. The job is closed.
    /// Best effort: what cannot be removed is logged with the reason.
    private func rollBackCreate(
        _ def: JobDefinition, job: HydrationJob, keptMetadata: Bool, destExisted: Bool, record: Bool = false
    ) async {
        var paths: [(String, DeviceIdentity?)] = []
        if record { paths.append((definitionPath(def.name), nil)) }
        if !keptMetadata { paths.append((def.metadata, nil)) }
        if !destExisted { paths.append((def.dest, job.destIdentity)) }
        let toRemove = paths
        let failures =
            (try? await io.run { () -> [String] in
                var failed: [String] = []
                for (path, identity) in toRemove {
                    var st = stat()
                    guard lstat(path, &st) == 0 else { continue }
                    if let identity, identity.kind == .regularFile,
                        UInt64(st.st_dev) != identity.device || UInt64(st.st_ino) != identity.inode
                    {
                        continue
                    }
                    if unlink(path) != 0 && errno != ENOENT {
                        failed.append("\(path): \(errnoSymbol(errno))")
                        continue
                    }
                    do { try PosixStorage().syncDirectory(containing: path) } catch {
                        failed.append("\(path): \(error)")
                    }
                }
                return failed
            }) ?? ["the I/O executor is shut down"]
        if failures.isEmpty {
            logger.info("failed create rolled back", metadata: ["job": "\(def.name)"])
        } else {
            logger.error(
                "failed create not fully rolled back", metadata: ["job": "\(def.name)", "left": "\(failures)"])
        }
    }

    /// The kept record a new job concerns: the one whose metadata it names (to resume it), or an
    /// error when it would write over the destination of one (that destination holds the only
    /// copy of regions already released from the record's source).
    private func keptRecord(concerning def: JobDefinition) async throws(HydrationError) -> (
        record: KeptRecord, file: String
    )? {
        await keptRecords().first { $0.record.definition.metadata == def.metadata }
    }

    /// What other jobs still need, so that no new job may write to it or release it: the source
    /// and destination of every job that is not complete (live, or listed as failed because it
    /// could not be opened: its devices are unlocked, but its data is not free), and the source
    /// and destination of every kept record. (A complete job needs nothing: it never touches its
    /// devices again, not even to finish releases a crash left pending.) A discard_source job's source is not
    /// even to be read by a new job (it is being punched).
    private func reservations(except keptFile: String?, job skipped: String? = nil) async -> [Reservation] {
        var out: [Reservation] = []
        for (name, entry) in jobs where name != skipped {
            let d = entry.definition
            switch entry {
            case .live(let job, _):
                if await job.currentState != .complete {
                    out.append(
                        Reservation(
                            path: d.source, role: "source", owner: name, keptMetadata: nil, noReaders: d.discardSource))
                    out.append(
                        Reservation(path: d.dest, role: "destination", owner: name, keptMetadata: nil, noReaders: false)
                    )
                } else if published.contains(name) {
                    // Complete, but its clone is still served over NBD (reads and writes go there).
                    out.append(
                        Reservation(
                            path: d.dest, role: "destination (served over NBD)", owner: name, keptMetadata: nil,
                            noReaders: false))
                }
            case .broken(_, _, let h):
                if h?.complete != true {
                    out.append(
                        Reservation(
                            path: d.source, role: "source", owner: name, keptMetadata: nil, noReaders: d.discardSource))
                    out.append(
                        Reservation(path: d.dest, role: "destination", owner: name, keptMetadata: nil, noReaders: false)
                    )
                }
            case .finished:
                if published.contains(name) {
                    out.append(
                        Reservation(
                            path: d.dest, role: "destination (served over NBD)", owner: name, keptMetadata: nil,
                            noReaders: false))
                }
            case .unreadable(let u):
                // Complete or not, unknown until the record is read: everything it names.
                out += Self.reservations(of: u, kept: false)
            case .parked:
                // As exclusive as while it was open (where its locks refused even readers): a
                // paused job must find its devices free when it is resumed.
                out.append(Reservation(path: d.source, role: "source", owner: name, keptMetadata: nil, noReaders: true))
                out.append(
                    Reservation(path: d.dest, role: "destination", owner: name, keptMetadata: nil, noReaders: true))
            }
        }
        let kept = await keptScan()
        for (record, file) in kept.readable where file != keptFile {
            let k = record.definition
            out.append(
                Reservation(
                    path: k.source, role: "source", owner: k.name, keptMetadata: k.metadata, noReaders: k.discardSource)
            )
            out.append(
                Reservation(
                    path: k.dest, role: "destination", owner: k.name, keptMetadata: k.metadata, noReaders: false))
        }
        for u in kept.unreadable where u.file != keptFile {
            out += Self.reservations(of: u, kept: true)
        }
        return out
    }

    /// What an unreadable record reserves: every source and destination found in it or in its
    /// metadata; with none found, a reservation of everything (`Reservation.everything`).
    static func reservations(of u: UnreadableRecord, kept: Bool) -> [Reservation] {
        let e = u.error(kept: kept)
        if u.namesNothing {
            return [
                Reservation(
                    path: "", role: "everything", owner: u.name, keptMetadata: nil, noReaders: true, unreadable: e)
            ]
        }
        return u.sources.map {
            Reservation(
                path: $0, role: "source", owner: u.name, keptMetadata: nil, noReaders: u.discardSource, unreadable: e)
        }
            + u.dests.map {
                Reservation(
                    path: $0, role: "destination", owner: u.name, keptMetadata: nil, noReaders: false, unreadable: e)
            }
    }

    /// Refuses a new job that would write to (its destination), release (its discard_source
    /// source) or read while it is being punched (any source) what another job still needs —
    /// by path, and by what the bytes live on (a loop device over the file, a partition of the
    /// disk, ...), so an alias does not get around it.
    private func checkReservations(_ def: JobDefinition, except keptFile: String?, job skipped: String? = nil)
        async throws(HydrationError)
    {
        let reserved = await reservations(except: keptFile, job: skipped)
        guard !reserved.isEmpty else { return }
        if let blind = reserved.first(where: { $0.role == "everything" }), let e = blind.unreadable {
            // A record from which no device could be recovered: nothing can be checked against it.
            throw e
        }
        let storage = self.storage
        let cached = reservedFileStacks
        let conflict: (String, String, Reservation)?
        let learned: [String: CachedStack]
        do {
            (conflict, learned) = try await io.run {
                () throws -> ((String, String, Reservation)?, [String: CachedStack]) in
                var targets: [(String, String, Bool)] = [("destination", def.dest, false)]
                targets.append(("source", def.source, !def.discardSource))
                var stacks: [String: StorageStack?] = [:]
                var learned: [String: CachedStack] = [:]
                let newPaths = Set(targets.map(\.1))
                func stack(_ p: String) -> StorageStack? {
                    if let s = stacks[p] { return s }
                    // A reserved regular file's stack (file, filesystem, disk) is reused while the
                    // path names the same file: with thousands of jobs, recomputing every one at
                    // each create made creation quadratic. A loop device or anything else attached
                    // over it later appears in the new job's own stack, computed fresh.
                    var st = stat()
                    let isFile = !newPaths.contains(p) && stat(p, &st) == 0 && (st.st_mode & S_IFMT) == S_IFREG
                    if isFile, let c = cached[p], c.device == UInt64(st.st_dev), c.inode == UInt64(st.st_ino) {
                        stacks[p] = c.stack
                        return c.stack
                    }
                    let s = (try? storage.stack(of: p)) ?? nil
                    stacks[p] = s
                    if isFile {
                        learned[p] = CachedStack(device: UInt64(st.st_dev), inode: UInt64(st.st_ino), stack: s)
                    }
                    return s
                }
                for (label, path, readOnly) in targets {
                    for r in reserved where !readOnly || r.noReaders {
                        if r.path == path { return ((label, path, r), learned) }
                        if let a = stack(path), let b = stack(r.path),
                            let why = a.overlap(with: b, as: label, otherLabel: r.role)
                        {
                            return ((label, why, r), learned)
                        }
                    }
                }
                return (nil, learned)
            }
        } catch {
            throw HydrationError(.ioError, "checking the devices of other jobs: \(error)")
        }
        reservedFileStacks.merge(learned) { $1 }
        if reservedFileStacks.count > 4 * max(64, jobs.count) { reservedFileStacks = learned }
        guard let (label, detail, r) = conflict else { return }
        let what = label == "destination" ? "written" : (def.discardSource ? "released" : "read while it is released")
        if var e = r.unreadable {
            e.message =
                "\(label) \(def.source == detail || def.dest == detail ? detail : "(" + detail + ")") is the \(r.role) \(r.path) of job \(r.owner.isEmpty ? "(unknown)" : r.owner) and may not be \(what): "
                + e.message
            throw e
        }
        if let keptMetadata = r.keptMetadata {
            var e = HydrationError(
                .dataAtRisk,
                "\(label) \(def.source == detail || def.dest == detail ? detail : "(" + detail + ")") is the \(r.role) \(r.path) of removed job \(r.owner), whose metadata was kept at \(keptMetadata): it holds data no other copy has and may not be \(what). Resume that job (clonectl start \(r.owner) --metadata \(keptMetadata) --source SOURCE --dest DEST), or delete \(keptMetadata) and its record in the state directory's kept/ by hand once that data is no longer needed"
            )
            e.path = r.path
            throw e
        }
        var e = HydrationError(
            .deviceInUse,
            "\(label) \(def.source == detail || def.dest == detail ? detail : "(" + detail + ")") is the \(r.role) \(r.path) of job \(r.owner), which still needs it (it is not complete, or its releases are pending): it may not be \(what). Finish or remove job \(r.owner) first"
        )
        e.path = r.path
        e.holder = r.owner
        throw e
    }

    struct CachedStack: Sendable {
        var device: UInt64
        var inode: UInt64
        var stack: StorageStack?
    }
    /// Stacks of reserved regular files, by path (`checkReservations`).
    private var reservedFileStacks: [String: CachedStack] = [:]

    struct Reservation: Sendable {
        var path: String
        var role: String
        var owner: String
        /// Set for a kept record (a removed job): where its metadata is.
        var keptMetadata: String?
        /// A discard_source job's source: being punched, so not even to be read by a new job.
        var noReaders: Bool
        /// Set when the reservation comes from a record that cannot be read: the refusal is
        /// this error (naming the file and why), with the conflict added.
        var unreadable: HydrationError? = nil
    }

    /// The kept records: those that read, and those that do not (with what could be recovered
    /// from them: they still reserve what they name). Read on an I/O thread.
    func keptScan() async -> (readable: [(record: KeptRecord, file: String)], unreadable: [UnreadableRecord]) {
        let dir = keptDirectory
        let storage = self.storage
        let read =
            (try? await io.run { () -> ([(KeptRecord, String)], [UnreadableRecord]) in
                let names: [String]
                switch JobRecords.list(dir) {
                case .success(let n): names = n ?? []
                case .failure(let e):
                    // A kept/ that cannot be listed may hold records: refused as one unreadable record
                    // that names nothing.
                    return (
                        [], [UnreadableRecord(name: "", file: dir, reason: e.reason, errno: e.errno, salvaged: .init())]
                    )
                }
                var out: [(KeptRecord, String)] = []
                var bad: [UnreadableRecord] = []
                for file in names where file.hasSuffix(".json") && !file.hasPrefix(".") {
                    let path = dir + "/" + file
                    let bytes = JobRecords.readBytes(path)
                    switch bytes.flatMap({ JobRecords.decode(KeptRecord.self, $0) }) {
                    case .success(let r): out.append((r, path))
                    case .failure(let e):
                        bad.append(
                            UnreadableRecord.examine(
                                name: String(file.dropLast(".json".count)), file: path, bytes: try? bytes.get(),
                                reason: e.reason, errno: e.errno, defaultMetadata: nil, storage: storage))
                    }
                }
                return (out, bad)
            }) ?? ([], [])
        for u in read.1 {
            logger.error(
                "kept job record unreadable; what it names stays reserved",
                metadata: [
                    "path": "\(u.file)", "reason": "\(u.reason)", "reserved_sources": "\(u.sources)",
                    "reserved_destinations": "\(u.dests)",
                ])
        }
        return (read.0.map { (record: $0.0, file: $0.1) }, read.1)
    }

    /// Every kept record that reads.
    func keptRecords() async -> [(record: KeptRecord, file: String)] {
        await keptScan().readable
    }

    private func live(_ name: String) throws(HydrationError) -> (HydrationJob, JobDefinition) {
        switch jobs[name] {
        case .live(let j, let d)?: return (j, d)
        case .broken(_, let e, _)?:
            throw HydrationError(.invalidState, "job \(name) could not be opened: \(e.message)")
        case .finished?:
            throw HydrationError(.invalidState, "job \(name) is complete")
        case .unreadable(let u)?:
            throw u.error(kept: false)
        case .parked?:
            throw HydrationError(.invalidState, "job \(name) is paused; resume it first")
        case nil:
            throw HydrationError(.noSuchJob, "no job named \(name)")
        }
    }

    private func setDesired(_ name: String, _ desired: JobDefinition.Desired) async throws(HydrationError) {
        guard case .live(let j, var d)? = jobs[name], d.desired != desired else { return }
        d.desired = desired
        try await persist(d)
        jobs[name] = .live(j, d)
    }

    /// Resumes a job. One that could not be opened (a device missing or not confirmed, metadata
    /// unreadable) is opened again first: the operator may have put the right device back.
    public func resume(_ name: String, acceptDevices: Bool = false) async throws(HydrationError) -> JobStatus {
        try await serialized(name) { () async throws(HydrationError) -> JobStatus in
            if jobs[name]?.isCompleteOffline == true { return try await status(name) }
            if case .unreadable = jobs[name] {
                // The operator may have repaired or restored the record: read it again. Still
                // unreadable, it stays as it is (with the reason as it is now).
                switch await readRecord(name) {
                case .failure(let u):
                    jobs[name] = .unreadable(u)
                    throw u.error(kept: false)
                case .success(let def):
                    logger.notice("job record readable again", metadata: ["job": "\(name)"])
                    jobs[name] = .broken(def, HydrationError(.invalidState, "not opened yet"), nil)
                }
            }
            if case .live(let job, _)? = jobs[name], await job.needsReopen {
                // Out of space in a commit, or a remote source found to be another disk: open it
                // again from its durable state (confirming its devices), as a restart would.
                await withdrawExport(name)
                await job.close()
                jobs[name] = .broken(
                    jobs[name]!.definition, HydrationError(.noSpace, "reopening from the last commit"), nil)
            }
            var closedDefinition: JobDefinition? = nil
            switch jobs[name] {
            case .broken(let d, _, _)?, .parked(let d, _)?: closedDefinition = d
            default: break
            }
            if var def = closedDefinition {
                // A parked job is opened as at a restart: its devices are confirmed again.
                // Devices the operator vouches for are still not to be another job's.
                if acceptDevices { try await checkReservations(def, except: nil, job: name) }
                def.desired = .hydrating
                let entry = await openEntry(def, acceptDevices: acceptDevices)
                if case .broken(_, let e, _) = entry {
                    jobs[name] = entry
                    scheduleReopenIfSourceUnreachable(name)
                    throw e
                }
                try await persist(def)
                jobs[name] = entry
                await publishExport(name)
            }
            let (job, _) = try live(name)
            let wasHydrating = await job.currentState == .hydrating
            try await job.start()
            do throws(HydrationError) {
                try await setDesired(name, .hydrating)
            } catch {
                // Its record still says paused: so does the job (as it was before this resume).
                if !wasHydrating { await job.pause() }
                throw error
            }
            return try await status(name)
        }
    }

    public func pause(_ name: String) async throws(HydrationError) -> JobStatus {
        try await serialized(name) { () async throws(HydrationError) -> JobStatus in
            if jobs[name]?.isCompleteOffline == true { return try await status(name) }
            if case .parked? = jobs[name] { return try await status(name) }
            let (job, _) = try live(name)
            try await setDesired(name, .paused)
            await job.pause()
            if let def = jobs[name]?.definition, let parked = await park(job, def) { jobs[name] = parked }
            return try await status(name)
        }
    }

    public func commit(_ name: String) async throws(HydrationError) -> JobStatus {
        try await serialized(name) { () async throws(HydrationError) -> JobStatus in
            if jobs[name]?.isCompleteOffline == true { return try await status(name) }
            // Parked: everything was committed when it paused.
            if case .parked? = jobs[name] { return try await status(name) }
            let (job, _) = try live(name)
            try await job.commit()
            return try await status(name)
        }
    }

    public func set(_ name: String, _ update: TunablesUpdate) async throws(HydrationError) -> JobStatus {
        try await serialized(name) { () async throws(HydrationError) -> JobStatus in
            if case .parked(var def, var parked)? = jobs[name] {
                // Recorded in the definition; the reopened job starts with it.
                let t = update.applied(to: def.tunables)
                try t.validate(regionSize: def.regionSize)
                def.tunables = t
                try await persist(def)
                parked.status.settings = .init(
                    threshold: t.threshold, batchSize: t.batchSize,
                    rateLimitBytesPerSecond: t.rateLimitBytesPerSecond, commitIntervalMs: t.commitIntervalMs)
                if def.discardSource { parked.status.spaceBudgetBytes = t.spaceBudgetBytes }
                jobs[name] = .parked(def, parked)
                return try await status(name)
            }
            let (job, def) = try live(name)
            let t = update.applied(to: await job.currentTunables)
            try await job.update(t)
            var d = def
            d.tunables = t
            try await persist(d)
            jobs[name] = .live(job, d)
            return try await status(name)
        }
    }

    /// Removes a job: its definition and, when it lives in the state directory, its metadata.
    /// Refuses a hydrating job unless `force`, which pauses it (with a final commit) first.
    /// An incomplete discard_source job with committed regions (so possibly released from the
    /// source: the destination holds their only copy) is refused with DataAtRisk unless `force`;
    /// even then its metadata is kept, with a record in `kept/`, and its path is returned.
    @discardableResult
    public func remove(_ name: String, force: Bool) async throws(HydrationError) -> String? {
        try await serialized(name) { () async throws(HydrationError) -> String? in
            try await removeLocked(name, force: force)
        }
    }

    private func removeLocked(_ name: String, force: Bool) async throws(HydrationError) -> String? {
        guard let entry = jobs[name] else { throw HydrationError(.noSuchJob, "no job named \(name)") }
        let def = entry.definition
        // Clients of its export would lose their disk: only with force.
        if published.contains(name), let clients = exportHost?.clients(of: name), clients > 0, !force {
            var e = HydrationError(
                .exportInUse,
                "job \(name) is exported over NBD and \(clients) client\(clients == 1 ? " is" : "s are") connected; disconnect \(clients == 1 ? "it" : "them") first, or remove with force to disconnect \(clients == 1 ? "it" : "them")"
            )
            e.clients = clients
            throw e
        }
        // What the metadata says (durably) before anything changes.
        var atRisk = false
        var jobID: String? = nil
        var unreadable: UnreadableRecord? = nil
        switch entry {
        case .live(let job, _):
            if await job.currentState == .hydrating {
                if !force {
                    throw HydrationError(.jobRunning, "job \(name) is hydrating; pause it first or remove with force")
                }
                // Its final commit may be what puts it at risk: decide after it. Clients first.
                await withdrawExport(name)
                await job.close()
            }
            let s = await job.status()
            atRisk = def.discardSource && s.state != .complete && s.bytes.committed > 0
            jobID = await job.jobID
        case .broken(_, _, let h):
            // Unreadable metadata: it may still be the only record; keep it.
            atRisk = def.discardSource && (h.map { !$0.complete && $0.hydratedCount > 0 } ?? true)
            jobID = h?.jobID
        case .finished(_, let h):
            jobID = h.jobID
        case .unreadable(let u):
            // What the job was is not known: only with force, and then everything recovered is
            // kept (a kept record of it, the metadata, and the unreadable file itself in kept/).
            if !force { throw u.error(kept: false) }
            unreadable = u
            atRisk = !u.namesNothing
            jobID = u.header?.jobID
        case .parked(_, let p):
            atRisk = def.discardSource && p.status.state != .complete && p.status.bytes.committed > 0
            jobID = p.jobID
        }
        if atRisk && !force {
            throw HydrationError(
                .dataAtRisk,
                "job \(name) has released part of its source \(def.source); the destination \(def.dest) holds the only copy of those regions and the metadata \(def.metadata) the only record of which they are. Finish it (clonectl resume \(name)), or remove it with --force: the metadata is then kept"
            )
        }
        await withdrawExport(name)
        if case .live(let job, _) = entry { await job.close() }
        // Until the end of this function the entry stays in `jobs`, so its devices stay reserved
        // (`checkReservations`) while their locks are already gone. A failure on the way leaves
        // the job as it was (opened again if it was open), so that its status says what is so.
        do {
            return try await finishRemove(name, def: def, atRisk: atRisk, jobID: jobID, unreadable: unreadable)
        } catch {
            if case .live = entry {
                jobs[name] = await openEntry(def)
                scheduleReopenIfSourceUnreachable(name)
            }
            await publishExport(name)
            logger.error("remove failed; the job is as it was", metadata: ["job": "\(name)", "error": "\(error)"])
            throw error
        }
    }

    private func finishRemove(
        _ name: String, def: JobDefinition, atRisk: Bool, jobID: String?,
        unreadable: UnreadableRecord?
    ) async throws(HydrationError) -> String? {
        var kept: String? = nil
        let stem = "\(name)-\(jobID ?? String(wallClockMillis()))"
        if atRisk {
            // The record first, durably, and the metadata left where it is: a crash at any point
            // leaves the definition, the record, or both, and never a metadata file nothing
            // points at.
            let path = keptDirectory + "/\(stem).json"
            do {
                let data = try JobRecords.encode(KeptRecord(definition: def, removedUnixMs: wallClockMillis()))
                let keptDirectory = self.keptDirectory
                try await io.run {
                    try FileManager.default.createDirectory(
                        atPath: keptDirectory, withIntermediateDirectories: true,
                        attributes: [.posixPermissions: 0o700])
                    try Self.writeDurably(data, to: path)
                }
            } catch let e as StorageError {
                var h = HydrationError(.ioError, "saving kept job record \(path): \(e)", errno: e.errno)
                h.path = path
                throw h
            } catch {
                throw HydrationError(.ioError, "saving kept job record \(path): \(error)")
            }
            kept = def.metadata.isEmpty ? nil : def.metadata
        }
        let definitionFile = definitionPath(name)
        let dir = keptDirectory
        do {
            try await io.run {
                if unreadable != nil {
                    // Kept for the operator, under a name that is not read as a record.
                    try FileManager.default.createDirectory(
                        atPath: dir, withIntermediateDirectories: true,
                        attributes: [.posixPermissions: 0o700])
                    let aside = dir + "/\(stem).unreadable-record"
                    if rename(definitionFile, aside) != 0 && errno != ENOENT {
                        throw StorageError(.create, path: aside, errno: errno)
                    }
                    try PosixStorage().syncDirectory(containing: aside)
                } else if unlink(definitionFile) != 0 && errno != ENOENT {
                    throw StorageError(.create, path: definitionFile, errno: errno)
                }
            }
        } catch {
            var h = HydrationError(
                .ioError, "removing job record \(definitionFile): \(error)", errno: (error as? StorageError)?.errno)
            h.path = definitionFile
            throw h
        }
        // The record is gone: the job is removed. An unsynced directory may bring it back after
        // a crash, as it was before the remove.
        do {
            try await io.run { try PosixStorage().syncDirectory(containing: definitionFile) }
        } catch {
            logger.error(
                "job record removed but its directory not synced", metadata: ["job": "\(name)", "error": "\(error)"])
        }
        jobs[name] = nil
        exportErrors[name] = nil
        retiredStatus[name] = nil
        if kept == nil, unreadable == nil, def.metadata.hasPrefix(jobsDirectory + "/") {
            let metadata = def.metadata
            _ = try? await io.run { try FileManager.default.removeItem(atPath: metadata) }
        }
        logger.info("job removed", metadata: ["job": "\(name)", "kept_metadata": "\(kept ?? "")"])
        return kept
    }

    public func status(_ name: String) async throws(HydrationError) -> JobStatus {
        var s = try await statusWithoutExport(name)
        let io = s.export?.io
        s.export = exportStatus(name)
        s.export?.io = io
        s.export?.hydrateOnRead = jobs[name]?.definition.hydrateOnRead ?? false
        if s.export == nil, s.error == nil, let e = exportErrors[name], jobs[name]?.definition.export == true {
            // Complete, but its clone is not served: say why (the job itself is fine).
            s.error = JobStatus.ErrorInfo(
                code: e.code.rawValue, message: "the clone is not served: \(e.message)", errno: e.errno,
                region: e.region)
        }
        return s
    }

    private func statusWithoutExport(_ name: String) async throws(HydrationError) -> JobStatus {
        switch jobs[name] {
        case .live(let j, _)?: return await j.status()
        case .broken(let d, let e, let h)?: return Self.offlineStatus(d, e, h)
        case .finished(let d, let h)?: return retiredStatus[name] ?? Self.offlineStatus(d, nil, h)
        case .parked(_, let p)?: return p.status
        case .unreadable(let u)?:
            // Failed whatever its metadata says: the record that says what the job is, is not read.
            var s = Self.offlineStatus(u.definition, nil, u.header)
            let e = u.error(kept: false)
            s.state = .failed
            s.metadata.mode = .fail
            s.etaSeconds = nil
            s.error = .init(code: e.code.rawValue, message: e.message, errno: nil, region: nil)
            return s
        case nil: throw HydrationError(.noSuchJob, "no job named \(name)")
        }
    }

    public func statusAll() async -> [JobStatus] {
        var out: [JobStatus] = []
        for name in jobs.keys.sorted() {
            if let s = try? await status(name) { out.append(s) }
        }
        return out
    }

    public var names: [String] { jobs.keys.sorted() }

    /// Pauses every job with a final commit (graceful shutdown); definitions keep what the user
    /// asked for, so a restart resumes the hydrating ones.
    public func shutdown() async {
        shuttingDown = true
        for (_, t) in reopenTasks { t.cancel() }
        reopenTasks = [:]
        for name in published.sorted() { await withdrawExport(name) }
        for (name, entry) in jobs {
            if case .live(let job, _) = entry {
                await job.close()
                let state = await job.currentState
                logger.info("job closed for shutdown", metadata: ["job": "\(name)", "state": "\(state.rawValue)"])
            }
        }
        stateLock = nil
    }

    /// Validates a metadata file offline (read only).
    public nonisolated func checkMetadata(_ path: String) async throws(HydrationError) -> (
        MetadataHeader, MetadataRecoveryReport
    ) {
        guard path.hasPrefix("/") else {
            throw HydrationError(.invalidParameter, "metadata path must be absolute: '\(path)'")
        }
        let storage = self.storage
        do {
            let r = try await io.run { () throws -> (MetadataHeader, MetadataRecoveryReport) in
                let (store, report) = try MetadataStore.open(path: path, storage: storage, readOnly: true)
                return (store.header, report)
            }
            return r
        } catch let e as MetadataError {
            if case .io(let s) = e.reason, s.errno == ENOENT {
                throw HydrationError(.notFound, "metadata \(path) does not exist")
            }
            throw HydrationError.from(e)
        } catch {
            throw HydrationError(.ioError, "\(error)")
        }
    }

    // MARK: persistence

    /// Saves a definition durably, on an I/O thread (it fsyncs): write a temporary file, fsync,
    /// rename, fsync the directory, so a crash leaves the old or the new file. A failure leaves
    /// the record as it was: `previous` (the record this replaces) is written back if the rename
    /// happened and what followed failed, and a new record (`previous` nil) is removed.
    private func persist(_ def: JobDefinition) async throws(HydrationError) {
        // Every caller updates a listed job: its record is the listed definition.
        try await persist(def, previous: jobs[def.name]?.definition ?? def)
    }

    private func persist(_ def: JobDefinition, previous: JobDefinition?) async throws(HydrationError) {
        let path = definitionPath(def.name)
        let data: Data, old: Data?
        do {
            data = try JobRecords.encode(def)
            old = try previous.map { try JobRecords.encode($0) }
        } catch {
            throw HydrationError(.ioError, "encoding job definition \(path): \(error)")
        }
        do {
            try await io.run { try Self.writeDurably(data, to: path, previous: old) }
        } catch let e as StorageError {
            // IOError with its errno (ENOSPC...), not NoSpace: that code says the job failed, and
            // it has not (its record is as it was).
            var h = HydrationError(.ioError, "saving job record \(path): \(e)", errno: e.errno)
            h.path = path
            throw h
        } catch {
            throw HydrationError(.ioError, "saving job record \(path): \(error)")
        }
    }

    /// Writes `data` to `path` through a temporary file and a rename, durably. On a failure the
    /// temporary file is removed, and once the rename has happened `path` is put back as it was:
    /// `previous` written again the same way, or (nil) the file removed; all of this is synced.
    /// The directory is opened before anything is written, so that running out of descriptors
    /// (EMFILE) fails before the rename, not after it.
    static func writeDurably(_ data: Data, to path: String, previous: Data? = nil) throws {
        let dir = path.contains("/") ? String(path[..<path.lastIndex(of: "/")!]) : "."
        let dirFD = open(dir.isEmpty ? "/" : dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard dirFD >= 0 else { throw StorageError(.syncDirectory, path: dir, errno: errno) }
        defer { close(dirFD) }
        try replace(path, with: data, dirFD: dirFD)
        guard fsync(dirFD) == 0 else {
            let e = StorageError(.syncDirectory, path: dir, errno: errno)
            if let previous {
                try? replace(path, with: previous, dirFD: dirFD)
            } else {
                unlink(path)
            }
            _ = fsync(dirFD)
            throw e
        }
    }

    /// Temporary file, fsync, rename (the directory is not synced); the temporary file is
    /// removed on a failure.
    private static func replace(_ path: String, with data: Data, dirFD: Int32) throws {
        let tmp = path + ".tmp"
        do {
            let fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
            guard fd >= 0 else { throw StorageError(.create, path: tmp, errno: errno) }
            defer { close(fd) }
            try data.withUnsafeBytes { raw in
                var off = 0
                while off < raw.count {
                    let n = write(fd, raw.baseAddress! + off, raw.count - off)
                    if n < 0 { if errno == EINTR { continue }; throw StorageError(.write, path: tmp, errno: errno) }
                    off += n
                }
            }
            guard fsync(fd) == 0 else { throw StorageError(.sync, path: tmp, errno: errno) }
            guard rename(tmp, path) == 0 else { throw StorageError(.create, path: path, errno: errno) }
        } catch {
            unlink(tmp)
            throw error
        }
    }

    /// The status of a job that is not open: from its definition and, when readable, its metadata.
    static func offlineStatus(_ d: JobDefinition, _ e: HydrationError?, _ h: MetadataHeader?) -> JobStatus {
        let complete = h?.complete == true
        let total = h?.targetSize ?? 0
        let regionsTotal = h?.regionCount ?? 0
        let hydrated = h?.hydratedCount ?? 0
        let hydratedBytes = complete ? total : min(total, hydrated * d.regionSize)
        return JobStatus(
            name: d.name, state: complete ? .complete : .failed,
            source: .init(path: d.source, sizeBytes: total), dest: .init(path: d.dest),
            regionSize: d.regionSize, regions: .init(total: regionsTotal, hydrated: hydrated, hydrating: 0),
            bytes: .init(total: total, hydrated: hydratedBytes, committed: hydratedBytes, skippedZero: 0, discarded: 0),
            throughputBytesPerSecond: 0, etaSeconds: complete ? 0 : nil,
            commits: .init(count: 0, lastUnixMs: h?.committedUnixMs, lastDurationMs: nil),
            // Releases a complete job will never make (it does not touch its source again).
            discard: .init(
                enabled: d.discardSource,
                pendingBytes: min(total, UInt64(h?.pendingRelease.reduce(0) { $0 + $1.count } ?? 0) * d.regionSize),
                failed: 0),
            spaceBudgetBytes: d.discardSource ? d.tunables.spaceBudgetBytes : nil,
            settings: .init(
                threshold: d.tunables.threshold, batchSize: d.tunables.batchSize,
                rateLimitBytesPerSecond: d.tunables.rateLimitBytesPerSecond,
                commitIntervalMs: d.tunables.commitIntervalMs),
            metadata: .init(path: d.metadata, mode: complete ? .ro : .fail),
            error: complete || e == nil
                ? nil : .init(code: e!.code.rawValue, message: e!.message, errno: e!.errno, region: e!.region))
    }
}
