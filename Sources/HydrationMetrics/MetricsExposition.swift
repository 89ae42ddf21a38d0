import ControlProtocol
import Prometheus

/// What the metrics say of one job: its status (what `clonectl status` shows) and the counters
/// that only the engine keeps (absent for a job that is not open).
public struct JobMetrics: Sendable {
    public var status: JobStatus
    /// Bytes the copier wrote to the destination since the job was opened.
    public var copiedBytes: UInt64?
    public var commitDurations: DurationHistogramSnapshot?
    public init(status: JobStatus, copiedBytes: UInt64? = nil, commitDurations: DurationHistogramSnapshot? = nil) {
        self.status = status; self.copiedBytes = copiedBytes; self.commitDurations = commitDurations
    }
}

/// A histogram's buckets: `counts` has one count per bound, then those above the last (not cumulative).
public struct DurationHistogramSnapshot: Sendable, Equatable {
    public var boundsSeconds: [Double]
    public var counts: [UInt64]
    public var sumSeconds: Double
    public init(boundsSeconds: [Double], counts: [UInt64], sumSeconds: Double) {
        precondition(counts.count == boundsSeconds.count + 1, "one count per bound and one above them")
        self.boundsSeconds = boundsSeconds; self.counts = counts; self.sumSeconds = sumSeconds
    }
}

/// The Prometheus text exposition of the daemon's jobs, made from the same status snapshots that
/// `clonectl status` prints, so that a scrape and a status call agree on every number.
///
/// A new registry is filled at each scrape: a job that is gone has no series at all (rather than a
/// stale one frozen at its last value), and nothing has to be unregistered when a job is removed.
/// The job-level counters (`_total`) are the job's own counters since it was opened: they restart
/// at zero when the daemon restarts or the job is reopened, which Prometheus' `rate()` treats as a
/// counter reset.
public enum MetricsExposition {
    /// Metric names, for the docs and the tests.
    public enum Name {
        public static let jobSize = "hydrationd_job_size_bytes"
        public static let jobHydrated = "hydrationd_job_hydrated_bytes"
        public static let jobCommitted = "hydrationd_job_committed_bytes"
        public static let jobReleased = "hydrationd_job_released_bytes"
        public static let jobReleasePending = "hydrationd_job_release_pending_bytes"
        public static let jobSkippedZero = "hydrationd_job_skipped_zero_bytes"
        public static let jobState = "hydrationd_job_state"
        public static let jobThroughput = "hydrationd_job_throughput_bytes_per_second"
        public static let jobCommits = "hydrationd_job_commits_total"
        public static let jobLastCommitDuration = "hydrationd_job_last_commit_duration_seconds"
        public static let jobLastCommitTime = "hydrationd_job_last_commit_timestamp_seconds"
        public static let jobReleaseFailures = "hydrationd_job_release_failures_total"
        public static let jobError = "hydrationd_job_error"
        public static let jobSourceAvailable = "hydrationd_job_source_available"
        public static let jobExportClients = "hydrationd_job_export_clients"
        public static let jobExportReadBytes = "hydrationd_job_export_read_bytes_total"
        public static let jobExportWrittenBytes = "hydrationd_job_export_written_bytes_total"
        public static let jobExportTrimmedBytes = "hydrationd_job_export_trimmed_bytes_total"
        public static let jobs = "hydrationd_jobs"
        public static let jobCopiedBytes = "hydrationd_job_copied_bytes_total"
        public static let jobCommitDuration = "hydrationd_job_commit_duration_seconds"
    }

    /// The exposition (text format 0.0.4) of jobs known by their status alone.
    public static func render(jobs: [JobStatus]) -> [UInt8] { render(jobs.map { JobMetrics(status: $0) }) }

    /// The exposition (text format 0.0.4) of `jobs`.
    public static func render(_ jobs: [JobMetrics]) -> [UInt8] {
        let r = PrometheusCollectorRegistry()
        var byState: [JobStatus.State: Int] = [:]
        var histograms = ""
        for m in jobs {
            let s = m.status
            byState[s.state, default: 0] += 1
            let job = [("job", s.name)]
            func gauge(_ name: String, _ help: String, _ value: Double, _ labels: [(String, String)] = []) {
                r.makeGauge(descriptor: descriptor(name, help), labels: job + labels).set(to: value)
            }
            func counter(_ name: String, _ help: String, _ value: UInt64) {
                r.makeCounter(descriptor: descriptor(name, help), labels: job).increment(by: Int64(clamping: value))
            }
            gauge(Name.jobSize, "Bytes the job hydrates (the source's size).", Double(s.bytes.total))
            gauge(
                Name.jobHydrated, "Bytes hydrated (copied, or known zero) on the destination.", Double(s.bytes.hydrated)
            )
            gauge(
                Name.jobCommitted, "Hydrated bytes whose hydration is durable in the metadata.",
                Double(s.bytes.committed))
            gauge(Name.jobReleased, "Source bytes released (discarded) after their commit.", Double(s.bytes.discarded))
            gauge(
                Name.jobReleasePending, "Committed bytes whose source range is not yet released.",
                Double(s.discard.pendingBytes))
            gauge(
                Name.jobSkippedZero, "Bytes found zero on the source and not written to the destination.",
                Double(s.bytes.skippedZero))
            for state in JobStatus.State.allCases {
                gauge(
                    Name.jobState, "The job's state: 1 for the state it is in, 0 for the others.",
                    s.state == state ? 1 : 0, [("state", state.rawValue)])
            }
            gauge(
                Name.jobThroughput, "Hydration throughput over the last few seconds, as clonectl status shows it.",
                s.throughputBytesPerSecond)
            counter(Name.jobCommits, "Metadata commits since the job was opened.", s.commits.count)
            if let copied = m.copiedBytes {
                counter(
                    Name.jobCopiedBytes, "Bytes the copier wrote to the destination since the job was opened.", copied)
            }
            if let h = m.commitDurations { histograms += histogram(Name.jobCommitDuration, job: s.name, h) }
            if let ms = s.commits.lastDurationMs {
                gauge(Name.jobLastCommitDuration, "Duration of the job's last metadata commit.", ms / 1000)
            }
            if let ms = s.commits.lastUnixMs {
                gauge(Name.jobLastCommitTime, "Wall-clock time of the job's last metadata commit.", Double(ms) / 1000)
            }
            counter(
                Name.jobReleaseFailures, "Source releases (discards) that failed since the job was opened.",
                s.discard.failed)
            if let e = s.error {
                gauge(
                    Name.jobError, "1 while the job reports an error, labelled with the error's code.", 1,
                    [("code", e.code)])
            }
            if isRemote(s.source.path) {
                let unavailable = s.error?.code == "SourceUnavailable"
                gauge(
                    Name.jobSourceAvailable, "For a remote (NBD) source: 1 while it is reachable, 0 while it is not.",
                    unavailable ? 0 : 1)
            }
            if let x = s.export {
                gauge(Name.jobExportClients, "NBD clients connected to the job's export.", Double(x.clients))
                if let io = x.io {
                    counter(Name.jobExportReadBytes, "Bytes NBD clients read through the export.", io.readBytes)
                    counter(Name.jobExportWrittenBytes, "Bytes NBD clients wrote through the export.", io.writtenBytes)
                    counter(
                        Name.jobExportTrimmedBytes, "Bytes NBD clients trimmed through the export.", io.trimmedBytes)
                }
            }
        }
        for state in JobStatus.State.allCases {
            r.makeGauge(descriptor: descriptor(Name.jobs, "Jobs by state."), labels: [("state", state.rawValue)])
                .set(to: Double(byState[state, default: 0]))
        }
        var out = r.emitToBuffer()
        if !histograms.isEmpty {
            out += Array(
                "# HELP \(Name.jobCommitDuration) Duration of the job's metadata commits since it was opened.\n# TYPE \(Name.jobCommitDuration) histogram\n"
                    .utf8)
            out += Array(histograms.utf8)
        }
        return out
    }

    /// The engine counts commit durations itself (it knows nothing of Prometheus): its buckets are
    /// written here as a histogram family (cumulative `_bucket`s, `_sum`, `_count`), after the
    /// registry's families, under a name the registry does not use.
    static func histogram(_ name: String, job: String, _ h: DurationHistogramSnapshot) -> String {
        let label = "job=\"\(escape(job))\""
        var out = ""
        var cumulative: UInt64 = 0
        for (i, bound) in h.boundsSeconds.enumerated() {
            cumulative += h.counts[i]
            out += "\(name)_bucket{\(label),le=\"\(bound)\"} \(cumulative)\n"
        }
        cumulative += h.counts.last ?? 0
        out += "\(name)_bucket{\(label),le=\"+Inf\"} \(cumulative)\n"
        out += "\(name)_sum{\(label)} \(h.sumSeconds)\n"
        out += "\(name)_count{\(label)} \(cumulative)\n"
        return out
    }

    /// A label value as the text format wants it: backslash, double quote and newline escaped.
    static func escape(_ v: String) -> String {
        var out = ""
        for ch in v {
            switch ch {
            case "\\": out += "\\\\"
            case "\"": out += "\\\""
            case "\n": out += "\\n"
            default: out.append(ch)
            }
        }
        return out
    }

    /// The whole name in `metricName` (the names above are already complete, unit included).
    static func descriptor(_ name: String, _ help: String) -> MetricNameDescriptor {
        MetricNameDescriptor(metricName: name, unitName: "", helpText: help)
    }

    /// `nbd://`, `nbds://`, `nbd+unix://` and the like: the sources that can be unreachable.
    static func isRemote(_ path: String) -> Bool {
        guard let scheme = path.split(separator: ":", maxSplits: 1).first, path.contains("://") else { return false }
        return scheme.hasPrefix("nbd")
    }
}
