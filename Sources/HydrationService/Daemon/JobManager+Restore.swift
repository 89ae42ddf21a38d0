import ControlProtocol
import Foundation
import HydrationEngine
import Logging

extension JobManager {
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
    func readRecord(_ name: String) async -> Result<JobDefinition, UnreadableRecord> {
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

    /// Opens a recorded job: a complete one whose releases are all recorded as done from its
    /// metadata alone (its devices are not touched); any other through `HydrationJob.open`, which
    /// confirms the devices. One that cannot be opened is kept as broken, with the reason: it
    /// writes and releases nothing.
    func openEntry(_ def: JobDefinition, acceptDevices: Bool = false) async -> Entry {
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
    func park(_ job: HydrationJob, _ def: JobDefinition) async -> Entry? {
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
}
