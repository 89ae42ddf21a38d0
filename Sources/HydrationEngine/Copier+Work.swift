import HydrationStorage
import Logging

/// A batch: what it is, and how it ends.
extension Copier {
    package enum Work: Sendable {
        /// Regions wholly inside a hole of the source: nothing to read.
        case hole(Range<Int>)
        case copy(Range<Int>)
        package var regions: Range<Int> {
            switch self {
            case .hole(let r), .copy(let r): return r
            }
        }
    }

    /// A batch's end, with the claim its task held: the batch ends it here (`batchFinished`).
    package struct Completion: ~Copyable, Sendable {
        package var claim: RegionClaim
        /// Space-budget bytes reserved while in flight.
        package var reserved: UInt64
        package var result: Result<BatchResult, HydrationError>
    }

    package struct BatchResult: Sendable {
        package var regions: Range<Int>
        package var written: UInt64
        package var zero: UInt64
        /// Verified release: bytes read back and found equal, and how the page cache was bypassed.
        package var verified: UInt64 = 0
        package var readBack: ReadBackPath? = nil
        package init(regions: Range<Int>, written: UInt64, zero: UInt64) {
            self.regions = regions; self.written = written; self.zero = zero
        }
    }
}

/// Where the next batch is (the region map, the source's data extents) and the rate limit.
extension Copier {
    /// The next batch to issue, at or after `cursor`.
    /// The next batch to issue, not yet claimed (the caller claims it once its pacing allows):
    /// a region a client holds is stepped over (RegionOwnership).
    package func nextWork(from cursor: inout Int) async throws(HydrationError) -> Work? {
        while true {
            guard let work = try await candidateWork(from: &cursor) else { return nil }
            if ownership.isClaimed(work.regions.lowerBound) {
                cursor = work.regions.lowerBound + 1
                continue
            }
            return work
        }
    }

    /// The next batch at or after `cursor`, before claiming it.
    package func candidateWork(from cursor: inout Int) async throws(HydrationError) -> Work? {
        guard let r = ownership.firstHydrated(false, from: cursor) else { return nil }
        let regionSize = geometry.regionSize
        let regionStart = UInt64(r) * regionSize
        var dataCap = geometry.regionCount
        if sparseAware {
            // Extents at or after this region, fetched in bulk (one I/O-thread hop per 64 MiB or
            // 512 extents, not one per extent).
            while let first = extents.first, first.upperBound <= regionStart { extents.removeFirst() }
            if extents.isEmpty && !noMoreData {
                // Queries start only at unhydrated positions: a hydrated region's source range
                // may already be released, and must not even be looked at.
                var runs: [Range<UInt64>] = []
                let windowEnd = min(geometry.regionCount, r + max(1, Int((64 << 20) / regionSize)))
                var i = r
                while i < windowEnd, runs.count < 512, let a = ownership.firstHydrated(false, from: i), a < windowEnd {
                    let b = min(ownership.firstHydrated(true, from: a) ?? geometry.regionCount, windowEnd)
                    runs.append(geometry.byteRange(of: a..<b))
                    i = b
                }
                let source = self.source
                let queryRuns = runs
                do {
                    let (found, exhausted) = try await io.run { () throws -> ([Range<UInt64>], Bool) in
                        var out: [Range<UInt64>] = []
                        var at: UInt64 = 0
                        var k = 0
                        while k < queryRuns.count && out.count < 512 {
                            if at < queryRuns[k].lowerBound { at = queryRuns[k].lowerBound }
                            if at >= queryRuns[k].upperBound { k += 1; continue }
                            guard let e = try source.nextData(from: at) else { return (out, true) }
                            out.append(e)
                            at = e.upperBound
                        }
                        return (out, false)
                    }
                    extents = found
                    noMoreData = exhausted
                } catch {
                    let s = error as? StorageError
                    throw HydrationError(
                        s.map { HydrationJob.sourceErrorCode($0, remote: source.info.identity.kind == .remote) }
                            ?? .sourceReadFailed,
                        "finding data in the source: \(error)", errno: s?.errno, region: r)
                }
                while let first = extents.first, first.upperBound <= regionStart { extents.removeFirst() }
            }
            let dataStart = extents.first.map { max($0.lowerBound, regionStart) } ?? geometry.targetSize
            // Regions that end at or before the next data are holes.
            let holeEnd = dataStart >= geometry.targetSize ? geometry.regionCount : Int(dataStart / regionSize)
            if r < holeEnd {
                // At most 1 GiB of holes per item, so a pause is noticed and progress moves.
                let cap = r + max(1, Int((1 << 30) / regionSize))
                let e = min(holeEnd, ownership.firstHydrated(true, from: r) ?? geometry.regionCount, cap)
                cursor = e
                return .hole(r..<e)
            }
            // A batch may span several extents and the small holes between them (they read as
            // zeros and are not written): it ends with the last extent that starts within it.
            let batchEnd = regionStart + UInt64(tunables.batchSize) * regionSize
            if let last = extents.last(where: { $0.lowerBound < batchEnd }) {
                dataCap = min(geometry.regionCount, Int((last.upperBound + regionSize - 1) / regionSize))
                if last == extents.last && !noMoreData && last.upperBound < batchEnd {
                    // The fetched extents may stop short of the batch: do not cap on that alone.
                    dataCap = geometry.regionCount
                }
            }
        }
        let e = min(
            r + tunables.batchSize, ownership.firstHydrated(true, from: r) ?? geometry.regionCount, max(dataCap, r + 1))
        cursor = e
        return .copy(r..<e)
    }

    package func throttle(bytes: UInt64, limit: UInt64) async {
        // A batch may start once the bytes issued before it have had their time: the first
        // batch goes at once.
        let due = rateStart + UInt64(Double(rateBytes) / Double(limit) * 1e9)
        rateBytes += bytes
        var now = monotonicNanos()
        if due > now {
            // In slices, so that a pause or a new rate is noticed at once even at a low rate.
            while due > now && !stopRequested && batchFailure == nil && tunables.rateLimitBytesPerSecond == limit {
                try? await Task.sleep(nanoseconds: min(due - now, 50_000_000))
                now = monotonicNanos()
            }
            if tunables.rateLimitBytesPerSecond != limit {
                // A new rate from now on; this batch goes now and is the first under it.
                rateStart = now
                rateBytes = bytes
            }
        } else if now - due > 1_000_000_000 {
            // Idle for a while (paused, or slow disk): do not let a backlog of credit build up.
            // This batch goes now and counts: forgetting it let the next batch go at once too (a
            // first batch more than a second after the run's start, on a busy machine, gave the
            // limit a burst of two batches).
            rateStart = now
            rateBytes = bytes
        }
    }
}
