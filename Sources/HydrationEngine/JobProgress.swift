import HydrationStorage
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// What the metadata still takes: `rw`; `ro` after a destination sync failed (the metadata
/// untouched); `fail` after the metadata write failed.
public enum MetadataMode: String, Sendable, Equatable {
    case rw, ro, fail
}

/// Durations counted by upper bound (a histogram without the reporting): whoever reports them
/// (the daemon's Prometheus metrics) reads a snapshot. Fixed bounds, so recording allocates nothing.
package struct DurationCounts: Sendable, Equatable {
    /// From 1 ms (a commit to a fast disk) to 10 s (a stalled device or a remote metadata path).
    package static let commitBoundsSeconds: [Double] = [
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
    ]
    /// Upper bounds (inclusive), ascending.
    package let boundsSeconds: [Double]
    /// One count per bound, then those above the last bound (not cumulative).
    package private(set) var counts: [UInt64]
    package private(set) var sumSeconds: Double = 0

    package init(boundsSeconds: [Double]) {
        self.boundsSeconds = boundsSeconds
        counts = Array(repeating: 0, count: boundsSeconds.count + 1)
    }

    package mutating func record(seconds: Double) {
        let i = boundsSeconds.firstIndex { seconds <= $0 } ?? boundsSeconds.count
        counts[i] += 1
        sumSeconds += seconds
    }
}

/// Counters shared by the three actors and read by status calls without waiting for any of them:
/// a status request must answer at once while the copier is busy.
package final class JobProgress: Sendable {
    package struct Counters {
        package var hydratedRegions = 0
        package var hydratingRegions = 0
        package var hydratedBytes: UInt64 = 0
        package var writtenBytes: UInt64 = 0
        package var skippedZeroBytes: UInt64 = 0
        package var committedRegions = 0
        package var committedBytes: UInt64 = 0
        package var commits: UInt64 = 0
        package var lastCommitUnixMs: Int64?
        package var lastCommitDurationMs: Double?
        /// Every commit's duration, by bucket: for the daemon's metrics (a histogram).
        package var commitDurations = DurationCounts(boundsSeconds: DurationCounts.commitBoundsSeconds)
        package var discardedBytes: UInt64 = 0
        package var discardPendingBytes: UInt64 = 0
        package var discardFailures: UInt64 = 0
        package var lastDiscardError: String?
        /// Space budget: bytes written to the destination whose source range is not yet released.
        package var budgetCharged: UInt64 = 0
        /// Reserved for batches in flight (their whole length, until they report what they wrote).
        package var budgetInFlight: UInt64 = 0
        package var budgetReleased: UInt64 = 0
        package var metadataMode: MetadataMode = .rw
        /// Live clone: regions hydrated by clients' writes, trims, zeroes and cache requests, and
        /// bytes clients read, wrote and trimmed.
        package var liveHydratedRegions = 0
        package var liveReadBytes: UInt64 = 0
        package var liveWrittenBytes: UInt64 = 0
        package var liveTrimmedBytes: UInt64 = 0
        /// Verified release: bytes read back and found equal, regions found different, and the
        /// weakest way a read-back bypassed the page cache (nil until one ran).
        package var verifiedBytes: UInt64 = 0
        package var verifyMismatches: UInt64 = 0
        package var readBackPath: ReadBackPath?
        /// (monotonic ns, hydrated bytes) samples for the throughput window.
        package var samples: [(UInt64, UInt64)] = []
    }

    package let counters: Mutex<Counters>

    package init(hydratedRegions: Int, hydratedBytes: UInt64, committedRegions: Int) {
        var c = Counters()
        c.hydratedRegions = hydratedRegions
        c.hydratedBytes = hydratedBytes
        c.committedRegions = committedRegions
        c.committedBytes = hydratedBytes
        counters = Mutex(c)
    }

    package func update<T>(_ body: (inout Counters) -> T) -> T { counters.withLock { body(&$0) } }
    package var snapshot: Counters { counters.withLock { $0 } }

    package var budgetOutstanding: UInt64 {
        counters.withLock { $0.budgetCharged + $0.budgetInFlight &- $0.budgetReleased }
    }

    /// Bytes per second over the last few seconds of hydration.
    package func throughput(now: UInt64 = monotonicNanos()) -> Double {
        counters.withLock { c in
            guard let first = c.samples.first, let last = c.samples.last, last.0 > first.0 else { return 0 }
            // A stalled copy shows 0, not the rate it had before it stalled.
            if now > last.0 + 3_000_000_000 { return 0 }
            return Double(last.1 - first.1) / (Double(last.0 - first.0) / 1e9)
        }
    }

    package func recordSample(now: UInt64 = monotonicNanos()) {
        counters.withLock { c in
            if let last = c.samples.last, now - last.0 < 100_000_000 { return }
            c.samples.append((now, c.hydratedBytes))
            while let f = c.samples.first, now - f.0 > 5_000_000_000, c.samples.count > 2 { c.samples.removeFirst() }
        }
    }

    package func resetSamples() { counters.withLock { $0.samples = [] } }
}

package func monotonicNanos() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}

package func wallClockMillis() -> Int64 {
    var ts = timespec()
    clock_gettime(CLOCK_REALTIME, &ts)
    return Int64(ts.tv_sec) * 1000 + Int64(ts.tv_nsec) / 1_000_000
}
