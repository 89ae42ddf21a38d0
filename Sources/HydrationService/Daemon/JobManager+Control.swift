import ControlProtocol
import Foundation
import HydrationEngine
import Logging

extension JobManager {
    func live(_ name: String) throws(HydrationError) -> (HydrationJob, JobDefinition) {
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

    func setDesired(_ name: String, _ desired: JobDefinition.Desired) async throws(HydrationError) {
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

    func removeLocked(_ name: String, force: Bool) async throws(HydrationError) -> String? {
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

    func finishRemove(
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
                throw HydrationError(.ioError, "saving kept job record \(path): \(e)", errno: e.errno, path: path)
            } catch {
                throw HydrationError(.ioError, "saving kept job record \(path): \(error)", path: path)
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
            throw HydrationError(
                .ioError, "removing job record \(definitionFile): \(error)", errno: (error as? StorageError)?.errno,
                path: definitionFile)
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
}
