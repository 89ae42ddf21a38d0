import ControlProtocol
import Foundation
import HydrationEngine
import Logging

extension JobManager {
    // MARK: control

    public static func validateName(_ name: String) throws(HydrationError) {
        guard !name.isEmpty, name.utf8.count <= maxNameLength else {
            throw HydrationError(
                .invalidParameter, "job name must be 1 to \(maxNameLength) characters (got \(name.utf8.count))",
                parameter: "name")
        }
        guard !name.hasPrefix("."),
            name.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || "-_.:@".contains($0)) })
        else {
            throw HydrationError(
                .invalidParameter,
                "job name '\(name)' may contain only letters, digits and - _ . : @, and may not start with '.'",
                parameter: "name")
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

    func createLocked(_ req: CreateJobRequest) async throws(HydrationError) -> JobStatus {
        guard jobs[req.name] == nil, !creating.contains(req.name) else {
            throw HydrationError(.jobExists, "job \(req.name) already exists")
        }
        if req.export && exportHost == nil {
            throw HydrationError(.invalidParameter, "export: this daemon serves no NBD socket", parameter: "export")
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
            hydrateOnRead: req.hydrateOnRead, io: req.io, verify: req.verify)
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
    func rollBackCreate(
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
    func keptRecord(concerning def: JobDefinition) async throws(HydrationError) -> (
        record: KeptRecord, file: String
    )? {
        await keptRecords().first { $0.record.definition.metadata == def.metadata }
    }
}
