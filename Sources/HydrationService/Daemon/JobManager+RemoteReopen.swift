import ControlProtocol
import Foundation
import HydrationEngine
import Logging

extension JobManager {
    // MARK: a remote source down at restart

    /// Whether a job failed to open only because its remote source did not answer (the server is
    /// down or restarting): a migration's old host rebooting must not need an operator.
    static func sourceUnreachable(_ def: JobDefinition, _ e: HydrationError) -> Bool {
        guard RemoteSource.isURI(def.source), e.parameter == "source" || e.code == .sourceUnavailable else {
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
    func scheduleReopenIfSourceUnreachable(_ name: String) {
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
    func retryReopen(_ name: String) async -> Bool {
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
}
