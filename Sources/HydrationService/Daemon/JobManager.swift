import ControlProtocol
import Foundation
import Logging

/// What the daemon remembers of a job across restarts: `<state-dir>/jobs/<name>.json`.
public struct JobDefinition: Codable, Sendable, Equatable {
    public enum Desired: String, Codable, Sendable { case hydrating, paused }
    public var name: String
    public var source: String
    public var dest: String
    public var metadata: String
    public var regionSize: UInt64
    public var discardSource: Bool
    public var destZeroed: Bool
    public var tunables: Tunables
    /// What the user last asked for. A graceful shutdown pauses jobs but keeps this, so that a
    /// restart resumes what was hydrating and leaves paused jobs paused.
    public var desired: Desired

    var configuration: JobConfiguration {
        JobConfiguration(name: name, sourcePath: source, destPath: dest, metadataPath: metadata, regionSize: regionSize,
                         discardSource: discardSource, destZeroed: destZeroed, tunables: tunables)
    }
}

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

    public init(name: String, source: String, dest: String, metadata: String? = nil, regionSize: UInt64? = nil,
                discardSource: Bool = false, destZeroed: Bool = false, noHydration: Bool = false,
                tunables: TunablesUpdate = TunablesUpdate()) {
        self.name = name; self.source = source; self.dest = dest; self.metadata = metadata; self.regionSize = regionSize
        self.discardSource = discardSource; self.destZeroed = destZeroed; self.noHydration = noHydration; self.tunables = tunables
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

    public init(threshold: Int? = nil, batchSize: Int? = nil, rateLimitBytesPerSecond: UInt64?? = nil,
                spaceBudgetBytes: UInt64? = nil, commitIntervalMs: Int? = nil) {
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
        threshold == nil && batchSize == nil && rateLimitBytesPerSecond == nil && spaceBudgetBytes == nil && commitIntervalMs == nil
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

        var definition: JobDefinition {
            switch self { case .live(_, let d), .broken(let d, _, _): return d }
        }

        var isCompleteOffline: Bool {
            if case .broken(_, _, let h?) = self { return h.complete }
            return false
        }
    }

    public nonisolated let stateDirectory: String
    private let storage: any StorageProvider
    private let io: IOExecutor
    private let logger: Logger
    private var jobs: [String: Entry] = [:]
    /// Names being created right now (creation awaits I/O; actor reentrancy must not let two
    /// Starts of one name both proceed).
    private var creating: Set<String> = []

    public static let maxNameLength = 64

    public init(stateDirectory: String, storage: any StorageProvider = PosixStorage(), io: IOExecutor, logger: Logger) {
        self.stateDirectory = stateDirectory
        self.storage = storage
        self.io = io
        self.logger = logger
    }

    var jobsDirectory: String { stateDirectory + "/jobs" }
    func definitionPath(_ name: String) -> String { jobsDirectory + "/\(name).json" }

    // MARK: restore

    /// Creates the state directory if needed and restores every recorded job in its recorded
    /// state: hydrating jobs resume from their committed state, paused ones stay paused,
    /// complete ones stay complete. Jobs that cannot be opened are kept, as failed, with the reason.
    public func restore() async throws {
        try FileManager.default.createDirectory(atPath: jobsDirectory, withIntermediateDirectories: true,
                                                attributes: [.posixPermissions: 0o700])
        let names = try FileManager.default.contentsOfDirectory(atPath: jobsDirectory)
            .filter { $0.hasSuffix(".json") && !$0.hasPrefix(".") }
            .sorted()
        for file in names {
            let path = jobsDirectory + "/" + file
            let def: JobDefinition
            do {
                def = try JSONDecoder().decode(JobDefinition.self, from: Data(contentsOf: URL(fileURLWithPath: path)))
            } catch {
                logger.error("ignoring unreadable job definition", metadata: ["path": "\(path)", "error": "\(error)"])
                continue
            }
            do {
                let job = try await HydrationJob.open(def.configuration, storage: storage, io: io, logger: logger)
                jobs[def.name] = .live(job, def)
                if def.desired == .hydrating, await job.currentState != .complete {
                    try await job.start()
                } else if def.desired == .paused {
                    await job.pause()
                }
                let state = await job.currentState
                logger.info("job restored", metadata: ["job": "\(def.name)", "state": "\(state.rawValue)"])
            } catch {
                let e = error
                let storage = self.storage
                let header = try? await io.run { try MetadataStore.open(path: def.metadata, storage: storage, readOnly: true).0.header }
                if header?.complete == true {
                    logger.info("complete job restored from its metadata alone", metadata: ["job": "\(def.name)", "note": "\(e.message)"])
                } else {
                    logger.error("job could not be restored", metadata: ["job": "\(def.name)", "error": "\(e)"])
                }
                jobs[def.name] = .broken(def, e, header)
            }
        }
    }

    // MARK: control

    public static func validateName(_ name: String) throws(HydrationError) {
        guard !name.isEmpty, name.utf8.count <= maxNameLength else {
            throw HydrationError(.invalidParameter, "job name must be 1 to \(maxNameLength) characters (got \(name.utf8.count))")
        }
        guard !name.hasPrefix("."), name.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || "-_.:@".contains($0)) }) else {
            throw HydrationError(.invalidParameter, "job name '\(name)' may contain only letters, digits and - _ . : @, and may not start with '.'")
        }
    }

    /// Creates a job and starts it (paused with `noHydration`).
    public func create(_ req: CreateJobRequest) async throws(HydrationError) -> JobStatus {
        try Self.validateName(req.name)
        guard jobs[req.name] == nil, !creating.contains(req.name) else {
            throw HydrationError(.jobExists, "job \(req.name) already exists")
        }
        let regionSize = req.regionSize ?? RegionGeometry.defaultRegionSize
        guard RegionGeometry.isValidRegionSize(regionSize) else {
            throw HydrationError(.invalidParameter, "region_size must be a power of two from 4 KiB to 1 GiB (got \(regionSize))")
        }
        let tunables = req.tunables.applied(to: .defaults(regionSize: regionSize))
        let def = JobDefinition(name: req.name, source: req.source, dest: req.dest,
                                metadata: req.metadata ?? jobsDirectory + "/\(req.name).meta",
                                regionSize: regionSize, discardSource: req.discardSource, destZeroed: req.destZeroed,
                                tunables: tunables, desired: req.noHydration ? .paused : .hydrating)
        // Another job's metadata must not be touched by this one.
        for entry in jobs.values {
            let other = entry.definition
            // Devices are guarded by their locks (released once a job completes); metadata files
            // are not locked, so they are checked here.
            for path in [def.source, def.dest, def.metadata] where path == other.metadata || (path == def.metadata && [other.source, other.dest].contains(path)) {
                var e = HydrationError(.deviceInUse, "\(path) is used by job \(other.name)")
                e.path = path
                e.holder = other.name
                throw e
            }
        }
        creating.insert(req.name)
        defer { creating.remove(req.name) }
        let job: HydrationJob
        do {
            job = try await HydrationJob.create(def.configuration, storage: storage, io: io, logger: logger)
        } catch {
            var e = error
            if e.code == .deviceInUse, let path = e.path {
                e.holder = jobs.values.first { [$0.definition.source, $0.definition.dest].contains(path) }?.definition.name
                if let holder = e.holder { e.message += " (job \(holder))" }
            }
            throw e
        }
        do {
            try await persist(def)
        } catch {
            await job.close()
            try? FileManager.default.removeItem(atPath: def.metadata)
            throw error
        }
        jobs[req.name] = .live(job, def)
        if req.noHydration {
            await job.pause()
        } else {
            try await job.start()
        }
        return await job.status()
    }

    private func live(_ name: String) throws(HydrationError) -> (HydrationJob, JobDefinition) {
        switch jobs[name] {
        case .live(let j, let d)?: return (j, d)
        case .broken(_, let e, _)?:
            throw HydrationError(.invalidState, "job \(name) could not be opened: \(e.message)")
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

    public func resume(_ name: String) async throws(HydrationError) -> JobStatus {
        if jobs[name]?.isCompleteOffline == true { return try await status(name) }
        let (job, _) = try live(name)
        try await job.start()
        try await setDesired(name, .hydrating)
        return await job.status()
    }

    public func pause(_ name: String) async throws(HydrationError) -> JobStatus {
        if jobs[name]?.isCompleteOffline == true { return try await status(name) }
        let (job, _) = try live(name)
        try await setDesired(name, .paused)
        await job.pause()
        return await job.status()
    }

    public func commit(_ name: String) async throws(HydrationError) -> JobStatus {
        if jobs[name]?.isCompleteOffline == true { return try await status(name) }
        let (job, _) = try live(name)
        try await job.commit()
        return await job.status()
    }

    public func set(_ name: String, _ update: TunablesUpdate) async throws(HydrationError) -> JobStatus {
        let (job, def) = try live(name)
        let t = update.applied(to: await job.currentTunables)
        try await job.update(t)
        var d = def
        d.tunables = t
        try await persist(d)
        jobs[name] = .live(job, d)
        return await job.status()
    }

    /// Removes a job (its definition and, when it lives in the state directory, its metadata).
    /// Refuses a hydrating job unless `force`, which pauses it (with a final commit) first.
    public func remove(_ name: String, force: Bool) async throws(HydrationError) {
        guard let entry = jobs[name] else { throw HydrationError(.noSuchJob, "no job named \(name)") }
        if case .live(let job, _) = entry {
            if await job.currentState == .hydrating && !force {
                throw HydrationError(.jobRunning, "job \(name) is hydrating; pause it first or remove with force")
            }
            await job.close()
        }
        jobs[name] = nil
        let def = entry.definition
        try? FileManager.default.removeItem(atPath: definitionPath(name))
        if def.metadata.hasPrefix(jobsDirectory + "/") {
            try? FileManager.default.removeItem(atPath: def.metadata)
        }
        logger.info("job removed", metadata: ["job": "\(name)"])
    }

    public func status(_ name: String) async throws(HydrationError) -> JobStatus {
        switch jobs[name] {
        case .live(let j, _)?: return await j.status()
        case .broken(let d, let e, let h)?: return Self.offlineStatus(d, e, h)
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
        for (name, entry) in jobs {
            if case .live(let job, _) = entry {
                await job.close()
                let state = await job.currentState
                logger.info("job closed for shutdown", metadata: ["job": "\(name)", "state": "\(state.rawValue)"])
            }
        }
    }

    /// Validates a metadata file offline (read only).
    public nonisolated func checkMetadata(_ path: String) async throws(HydrationError) -> (MetadataHeader, MetadataRecoveryReport) {
        guard path.hasPrefix("/") else { throw HydrationError(.invalidParameter, "metadata path must be absolute: '\(path)'") }
        let storage = self.storage
        do {
            let r = try await io.run { () throws -> (MetadataHeader, MetadataRecoveryReport) in
                let (store, report) = try MetadataStore.open(path: path, storage: storage, readOnly: true)
                return (store.header, report)
            }
            return r
        } catch let e as MetadataError {
            if case .io(let s) = e.reason, s.errno == ENOENT { throw HydrationError(.notFound, "metadata \(path) does not exist") }
            throw HydrationError.from(e)
        } catch {
            throw HydrationError(.ioError, "\(error)")
        }
    }

    // MARK: persistence

    /// Saves a definition durably, on an I/O thread (it fsyncs): write a temporary file, fsync,
    /// rename, fsync the directory, so a crash leaves the old or the new file.
    private func persist(_ def: JobDefinition) async throws(HydrationError) {
        let path = definitionPath(def.name)
        let data: Data
        do {
            let enc = JSONEncoder()
            enc.outputFormatting = [.prettyPrinted, .sortedKeys]
            data = try enc.encode(def)
        } catch {
            throw HydrationError(.ioError, "encoding job definition \(path): \(error)")
        }
        do {
            try await io.run { try Self.writeDurably(data, to: path) }
        } catch {
            throw HydrationError(.ioError, "saving job definition \(path): \(error)")
        }
    }

    static func writeDurably(_ data: Data, to path: String) throws {
        let tmp = path + ".tmp"
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
        try PosixStorage().syncDirectory(containing: path)
    }

    /// The status of a job that is not open: from its definition and, when readable, its metadata.
    static func offlineStatus(_ d: JobDefinition, _ e: HydrationError, _ h: MetadataHeader?) -> JobStatus {
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
            discard: .init(enabled: d.discardSource, pendingBytes: 0, failed: 0),
            spaceBudgetBytes: d.discardSource ? d.tunables.spaceBudgetBytes : nil,
            settings: .init(threshold: d.tunables.threshold, batchSize: d.tunables.batchSize,
                            rateLimitBytesPerSecond: d.tunables.rateLimitBytesPerSecond, commitIntervalMs: d.tunables.commitIntervalMs),
            metadata: .init(path: d.metadata, mode: complete ? .ro : .fail),
            error: complete ? nil : .init(code: e.code.rawValue, message: e.message, errno: e.errno, region: e.region))
    }
}
