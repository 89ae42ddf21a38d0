import ControlProtocol
import HydrationEngine
import HydrationMetrics

extension JobManager {
    /// What `/metrics` shows: every job's status, as `statusAll` (so as `clonectl status`), with
    /// the counters only an open job's engine keeps (bytes copied, commit durations).
    public func metricsSnapshot() async -> [JobMetrics] {
        var out: [JobMetrics] = []
        for name in jobs.keys.sorted() {
            guard let s = try? await status(name) else { continue }
            var m = JobMetrics(status: s)
            if case .live(let j, _)? = jobs[name] {
                let c = await j.progress.snapshot
                m.copiedBytes = c.writtenBytes
                m.commitDurations = DurationHistogramSnapshot(
                    boundsSeconds: c.commitDurations.boundsSeconds, counts: c.commitDurations.counts,
                    sumSeconds: c.commitDurations.sumSeconds)
            }
            out.append(m)
        }
        return out
    }
}
