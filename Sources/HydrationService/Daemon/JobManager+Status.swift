import ControlProtocol
import Foundation
import HydrationEngine
import Logging

extension JobManager {
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

    func statusWithoutExport(_ name: String) async throws(HydrationError) -> JobStatus {
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
            throw HydrationError(
                .invalidParameter, "metadata path must be absolute: '\(path)'", path: path, parameter: "metadata")
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
                throw HydrationError(.notFound, "metadata \(path) does not exist", path: path, parameter: "metadata")
            }
            throw HydrationError.from(e)
        } catch {
            throw HydrationError(.ioError, "\(error)", path: path)
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
                ? nil : .init(code: e!.code.rawValue, message: e!.message, errno: e!.errno, region: e!.region),
            // Not open: nothing was read back in this process.
            verify: .init(enabled: d.verify, verifiedBytes: 0, mismatches: 0, readBack: nil))
    }
}
