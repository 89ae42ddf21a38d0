import Logging

#if canImport(Glibc)
    import Glibc
#endif

/// Copies unhydrated regions from the source to the destination.
///
/// It walks the region map in order, groups contiguous unhydrated regions into batches of
/// `batchSize` (one read, one write), and keeps at most `threshold` regions in flight. On a file
/// source it asks SEEK_DATA/SEEK_HOLE where data is: regions entirely in a hole are recorded as
/// hydrated without reading. Regions that read back all zeros are not written. Either way the
/// destination range is made to read back as zeros (punch / BLKZEROOUT) unless the job says the
/// destination is already zeroed.
///
/// Every blocking call runs on the I/O executor. Finished batches go to the committer; nothing
/// here ever talks to the discarder except to wait for it when the space budget is exhausted.
/// A hold on the copier, asked before it claims regions: the copier goes on only with the prefix
/// of a batch that the gate admits, and waits (polling, until the run is stopped) while it admits
/// none. Tests use it to keep a job hydrating at an exact region while clients act on the live
/// clone, instead of racing a rate-limited copier against the machine's speed. Production jobs
/// have no gate.
public protocol CopierGate: Sendable {
    /// The prefix of `regions` the copier may claim now (empty: not yet).
    func admit(_ regions: Range<Int>) -> Range<Int>
}

actor Copier {
    enum Outcome: Sendable, Equatable {
        case complete
        case stopped
        case failed(HydrationError)
        case noSpace(HydrationError)
        /// The committer failed; its error is the job's.
        case halted
    }

    private let source: any StorageDevice
    private let dest: any StorageDevice
    private let io: IOExecutor
    private let committer: Committer
    private let discarder: Discarder?
    private let progress: JobProgress
    private let geometry: Geometry
    private let logger: Logger
    /// Whether hole and zero regions must be zeroed on the destination: read per batch, because a
    /// client's write makes a destination that read as zeros hold data (RegionOwnership).
    private var zeroDestination: Bool { !ownership.destZeroed }
    private let sparseAware: Bool
    private let retryDelaysMs: [UInt64]

    private let buffers = IOBufferPool()
    /// Hydrated bits and claims, shared with the live clone's writers.
    private let ownership: RegionOwnership
    private var tunables: Tunables
    /// Runs are numbered by the job; a stop names the run it stops, so a stop that arrives
    /// before its run has started is not lost (a plain flag reset by run() would be).
    private var stoppedUpTo = 0
    private var currentRun = 0
    private var stopRequested: Bool { stoppedUpTo >= currentRun }
    private var running = false

    // Where the next data is, from SEEK_DATA; nil when unknown.
    /// Data extents of the source ahead of the cursor, from SEEK_DATA/SEEK_HOLE.
    private var extents: [Range<UInt64>] = []
    private var noMoreData = false
    private var rateStart: UInt64 = 0
    private var rateBytes: UInt64 = 0

    init(
        source: any StorageDevice, dest: any StorageDevice, io: IOExecutor, committer: Committer,
        discarder: Discarder?, progress: JobProgress, geometry: Geometry, ownership: RegionOwnership,
        tunables: Tunables, logger: Logger, retryDelaysMs: [UInt64] = [10, 100, 1000]
    ) {
        self.source = source; self.dest = dest; self.io = io; self.committer = committer
        self.discarder = discarder; self.progress = progress; self.geometry = geometry; self.ownership = ownership
        self.tunables = tunables; self.logger = logger
        self.sparseAware = source.reportsHoles
        self.retryDelaysMs = retryDelaysMs
    }

    func update(_ t: Tunables) { tunables = t }
    private var gate: (any CopierGate)?
    func setGate(_ g: (any CopierGate)?) { gate = g }
    func requestStop(run: Int) { stoppedUpTo = max(stoppedUpTo, run) }
    var hydratedMap: RegionMap { ownership.hydratedSnapshot }

    enum Work: Sendable {
        /// Regions wholly inside a hole of the source: nothing to read.
        case hole(Range<Int>)
        case copy(Range<Int>)
        var regions: Range<Int> {
            switch self {
            case .hole(let r), .copy(let r): return r
            }
        }
    }

    struct Completion: Sendable {
        var regions: Range<Int>
        /// Space-budget bytes reserved while in flight.
        var reserved: UInt64
        var result: Result<BatchResult, HydrationError>
    }

    struct BatchResult: Sendable {
        var regions: Range<Int>
        var written: UInt64
        var zero: UInt64
    }

    /// Runs until every region is hydrated, a stop is requested, or a failure.
    func run(id: Int) async -> Outcome {
        precondition(!running, "copier already running")
        running = true
        currentRun = id
        extents = []
        noMoreData = false
        rateStart = monotonicNanos()
        rateBytes = 0
        defer { running = false }
        progress.resetSamples()

        var cursor = 0
        copyFront = 0
        evictedUpTo = 0
        pendingEviction = nil
        inFlight = 0
        inFlightStarts = []
        evictionsInFlight = 0
        batchFailure = nil
        var outcome: Outcome? = nil

        // Each batch reports back to this actor as soon as it finishes (batchFinished), not when
        // the loop next looks: progress, commits and the budget must not wait for the threshold
        // to fill up, which at a low rate limit could take minutes.
        await withTaskGroup(of: Void.self) { group in
            while outcome == nil {
                if let f = batchFailure { outcome = f; break }
                if stopRequested { outcome = .stopped; break }
                if await committer.failure != nil { outcome = .halted; break }

                let candidate: Work?
                do throws(HydrationError) {
                    candidate = try await nextWork(from: &cursor)
                } catch {
                    outcome = .failed(error)
                    break
                }
                guard var candidate else {
                    // The end of a pass. Regions a client held were stepped over, and a client
                    // operation that failed leaves its regions unhydrated behind the cursor: once
                    // this run's own batches and the clients' claims end, go round again.
                    while inFlight > 0 { await waitForBatchEvent() }
                    if ownership.isComplete { break }
                    if batchFailure != nil || stopRequested { continue }
                    if ownership.anyClaimed { await ownership.waitForChange() }
                    // Back to the start: the extents fetched so far describe what lay ahead of
                    // the cursor only, and would make a region behind it look like a hole.
                    cursor = 0
                    extents = []
                    noMoreData = false
                    continue
                }
                // The batch is claimed only after every wait below (threshold, budget, rate limit):
                // a client writing to these regions meanwhile must not wait for the copier's pacing
                // (at a low rate limit, minutes), only for a copy actually under way.
                if let gate {
                    let admitted = gate.admit(candidate.regions)
                    if admitted.isEmpty {
                        try? await Task.sleep(nanoseconds: 10_000_000)
                        continue  // the candidate is looked up again: clients may have taken it meanwhile
                    }
                    switch candidate {
                    case .hole: candidate = .hole(admitted)
                    case .copy: candidate = .copy(admitted)
                    }
                }
                var regions = candidate.regions
                let t = tunables

                if case .hole = candidate, !zeroDestination {
                    // A hole of a destination that reads as zeros: no I/O at all, so it is
                    // recorded here rather than queued against the threshold behind the batches
                    // in flight: a 1 GiB hole drained the whole pipeline before it, once per data
                    // extent of a sparse image (issue 13). It does wait for the evictions in
                    // flight, as it did queued behind them: one that reports a writeback error
                    // fails the job before anything after it is recorded.
                    while evictionsInFlight > 0 { await waitForBatchEvent() }
                    if let f = batchFailure { outcome = f; break }
                    guard let claimed = ownership.tryClaim(regions) else {
                        cursor = regions.lowerBound + 1
                        continue
                    }
                    if zeroDestination {
                        // A client wrote meanwhile (a failed write may have left data in these
                        // very regions): they are zeroed like any hole, by a batch.
                        ownership.finish(claimed, hydrated: [])
                        cursor = claimed.lowerBound
                        continue
                    }
                    cursor = claimed.upperBound
                    await finished(
                        BatchResult(regions: claimed, written: 0, zero: geometry.byteLength(of: claimed)), reserved: 0)
                    continue
                }

                // Threshold: regions in flight.
                while inFlight > 0 && inFlight + regions.count > tunables.threshold && batchFailure == nil {
                    await waitForBatchEvent()
                }
                if let f = batchFailure { outcome = f; break }

                // Space budget (discard_source only): bytes written but not yet released.
                if let discarder, case .copy = candidate {
                    let need = geometry.byteLength(of: regions)
                    if progress.budgetOutstanding + need > t.spaceBudgetBytes / 2 && !earlyCommitInFlight {
                        // Half full: commit early (without waiting) so the discarder can start releasing.
                        earlyCommitInFlight = true
                        let committer = self.committer
                        Task {
                            _ = try? await committer.commit()
                            self.earlyCommitFinished()
                        }
                    }
                    while progress.budgetOutstanding > 0 && progress.budgetOutstanding + need > t.spaceBudgetBytes {
                        // Full: let the batches in flight finish, commit them, and wait for the
                        // discarder to release them.
                        while inFlight > 0 { await waitForBatchEvent() }
                        if batchFailure != nil { break }
                        do {
                            try await committer.commit()
                        } catch {
                            outcome = .halted
                            break
                        }
                        await discarder.drain(published: await committer.publishedCount)
                    }
                    if outcome != nil { break }
                    if let f = batchFailure { outcome = f; break }
                }

                if case .copy = candidate, let limit = t.rateLimitBytesPerSecond {
                    await throttle(bytes: geometry.byteLength(of: regions), limit: limit)
                    if stopRequested { outcome = .stopped; break }
                }

                // Now the claim: the longest prefix no client took (or hydrated) meanwhile.
                guard let claimed = ownership.tryClaim(regions) else {
                    cursor = regions.lowerBound + 1
                    continue
                }
                cursor = claimed.upperBound
                regions = claimed
                let work: Work
                switch candidate {
                case .hole: work = .hole(claimed)
                case .copy: work = .copy(claimed)
                }

                // Page cache: everything more than a window behind the copy front is dropped from
                // the source and, once written back, from the destination (as nbdcopy does). A
                // range per call, well behind the front: dropping each batch's own range right
                // after reading it misses the large folios readahead builds across batches.
                // The destination's eviction waits for writeback on a descriptor of its own and
                // reports a writeback error (see PosixDevice.evict): the job then fails at once.
                if let range = pendingEviction {
                    pendingEviction = nil
                    let (src, dst, io) = (source, dest, self.io)
                    evictionsInFlight += 1
                    group.addTask {
                        do {
                            try await io.run {
                                src.dropCache(offset: range.lowerBound, length: range.upperBound - range.lowerBound)
                                try dst.evict(offset: range.lowerBound, length: range.upperBound - range.lowerBound)
                            }
                        } catch {
                            await self.writebackFailed(error, range: range)
                        }
                        await self.evictionFinished()
                    }
                }

                inFlight += regions.count
                inFlightStarts.append(regions.lowerBound)
                let reserve: UInt64 =
                    (discarder != nil
                        && {
                            if case .copy = work { return true }; return false
                        }())
                    ? geometry.byteLength(of: regions) : 0
                progress.update { [inFlight] in
                    $0.hydratingRegions = inFlight; $0.budgetInFlight += reserve
                }
                let job = BatchJob(
                    source: source, dest: dest, geometry: geometry, zeroDestination: zeroDestination,
                    retryDelaysMs: retryDelaysMs, logger: logger, buffers: buffers)
                let io = self.io
                let batch = regions
                group.addTask {
                    let result = await job.execute(work, io: io)
                    await self.batchFinished(Completion(regions: batch, reserved: reserve, result: result))
                }
            }
            // Finish what is in flight whatever happened: its writes may be committed.
            await group.waitForAll()
        }
        // What the lagging drops left behind at the end of the source.
        let sourceDevice = self.source
        _ = try? await io.run { sourceDevice.dropCache(offset: 0, length: 0) }
        // Every batch has given its buffer back: a finished or paused job keeps none (munmap,
        // so on an I/O thread, not the actor's).
        let pool = buffers
        _ = try? await io.run { pool.drain() }
        progress.update { $0.hydratingRegions = 0 }
        if let outcome { return outcome }
        if let f = batchFailure { return f }
        if await committer.failure != nil { return .halted }
        return ownership.isComplete ? .complete : .stopped
    }

    private var inFlight = 0
    private var evictionsInFlight = 0
    private func evictionFinished() {
        evictionsInFlight -= 1
        let w = batchWaiters
        batchWaiters = []
        for k in w { k.resume() }
    }
    private var batchFailure: Outcome?
    private var batchWaiters: [CheckedContinuation<Void, Never>] = []

    /// Suspends until some batch finishes.
    private func waitForBatchEvent() async {
        await withCheckedContinuation { batchWaiters.append($0) }
    }

    private func batchFinished(_ c: Completion) async {
        switch c.result {
        case .success(let b):
            // Recorded (and handed to the committer) before the batch stops counting as in flight.
            await finished(b, reserved: c.reserved)
        case .failure(let e):
            // The regions of a failed batch stay unhydrated.
            ownership.finish(c.regions, hydrated: [])
            if e.code == .commitFailed {
                // A writeback error (BatchJob.startWriteback): final for the metadata.
                await committer.writebackFailed(e)
                if batchFailure == nil { batchFailure = .halted }
            } else if batchFailure == nil {
                batchFailure = e.code == .noSpace ? .noSpace(e) : .failed(e)
            }
            progress.update { $0.budgetInFlight -= c.reserved }
        }
        inFlight -= c.regions.count
        if let k = inFlightStarts.firstIndex(of: c.regions.lowerBound) { inFlightStarts.remove(at: k) }
        progress.update { [inFlight] in $0.hydratingRegions = inFlight }
        let w = batchWaiters
        batchWaiters = []
        for k in w { k.resume() }
    }

    private var earlyCommitInFlight = false
    private func earlyCommitFinished() { earlyCommitInFlight = false }

    /// How much of the source and destination may stay in the page cache behind the copy front.
    static let cacheWindow: UInt64 = 16 << 20
    /// `cacheWindow`, smaller in tests so that the crash explorer's 1 MiB images see evictions.
    private var cacheWindow: UInt64 = Copier.cacheWindow
    func setCacheWindowForTesting(_ bytes: UInt64) { cacheWindow = bytes }
    private var copyFront: UInt64 = 0
    private var evictedUpTo: UInt64 = 0
    private var pendingEviction: Range<UInt64>?
    /// First region of each batch in flight (the eviction stays behind the lowest).
    private var inFlightStarts: [Int] = []

    /// The kernel reported a writeback error on the destination (starting writeback or evicting):
    /// data written since the last commit may be lost, exactly as after a failed fdatasync. The
    /// committer fails (metadata `ro`, nothing more committed or published), and so does the job.
    private func writebackFailed(_ error: any Error, range: Range<UInt64>) async {
        let s = error as? StorageError
        let region = Int((s?.offset ?? range.lowerBound) / geometry.regionSize)
        let e = HydrationError(
            .commitFailed,
            "destination writeback failed, metadata left at its last commit: \(error) (reported by the eviction of that range; the lost pages may be anywhere written since the last commit)",
            errno: s?.errno, region: region)
        await committer.writebackFailed(e)
        if batchFailure == nil { batchFailure = .halted }
    }

    private func finished(_ b: BatchResult, reserved: UInt64) async {
        copyFront = max(copyFront, geometry.byteRange(of: b.regions).upperBound)
        if copyFront >= evictedUpTo + 2 * cacheWindow {
            // On a 4 MiB boundary: large folios are aligned to their size, and one straddling
            // the end of a range would be dropped by neither this call nor the next.
            // Never past a batch still in flight: a hole recorded without I/O, or a batch that
            // finished early, may have moved the front well beyond it (issue 13).
            let lowest = inFlightStarts.min().map { UInt64($0) * geometry.regionSize } ?? copyFront
            let upTo = (min(copyFront - cacheWindow, lowest)) & ~(min(UInt64(4 << 20), cacheWindow) - 1)
            if upTo > evictedUpTo {
                pendingEviction = (pendingEviction?.lowerBound ?? evictedUpTo)..<upTo
                evictedUpTo = upTo
            }
        }
        // The committer hears of the regions before they are marked hydrated: from the moment they
        // are, clients write into them directly, and a FLUSH replied to after such a write must
        // find them in its commit (were they marked first, a flush in between would commit
        // without them, and a crash would re-copy the source over the flushed write).
        await committer.noteHydrated(b.regions, budgetBytes: discarder != nil ? b.written : 0)
        let newly = ownership.finish(b.regions, hydrated: [b.regions]).reduce(0) { $0 + $1.count }
        let bytes = geometry.byteLength(of: b.regions)
        progress.update { c in
            c.hydratedRegions += newly
            c.hydratedBytes += bytes
            c.writtenBytes += b.written
            c.skippedZeroBytes += b.zero
            // One update: the reservation becomes the real charge without being counted twice.
            if discarder != nil { c.budgetCharged += b.written }
            c.budgetInFlight -= reserved
        }
        progress.recordSample()
    }

    /// The next batch to issue, at or after `cursor`.
    /// The next batch to issue, not yet claimed (the caller claims it once its pacing allows):
    /// a region a client holds is stepped over (RegionOwnership).
    private func nextWork(from cursor: inout Int) async throws(HydrationError) -> Work? {
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
    private func candidateWork(from cursor: inout Int) async throws(HydrationError) -> Work? {
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
                        s.map(HydrationJob.sourceErrorCode) ?? .sourceReadFailed,
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

    private func throttle(bytes: UInt64, limit: UInt64) async {
        // A batch may start once the bytes issued before it have had their time: the first
        // batch goes at once.
        let due = rateStart + UInt64(Double(rateBytes) / Double(limit) * 1e9)
        rateBytes += bytes
        var now = monotonicNanos()
        if due > now {
            // In slices, so that a pause or a new rate is noticed at once even at a low rate.
            while due > now && !stopRequested && tunables.rateLimitBytesPerSecond == limit {
                try? await Task.sleep(nanoseconds: min(due - now, 50_000_000))
                now = monotonicNanos()
            }
            if tunables.rateLimitBytesPerSecond != limit {
                rateStart = now
                rateBytes = 0
            }
        } else if now - due > 1_000_000_000 {
            // Idle for a while (paused, or slow disk): do not let a backlog of credit build up.
            rateStart = now
            rateBytes = 0
        }
    }
}

/// One batch's I/O, run on an I/O thread: read, zero check, write or zero-out, with retries.
struct BatchJob: Sendable {
    let source: any StorageDevice
    let dest: any StorageDevice
    let geometry: Geometry
    let zeroDestination: Bool
    let retryDelaysMs: [UInt64]
    let logger: Logger
    let buffers: IOBufferPool

    func execute(_ work: Copier.Work, io: IOExecutor) async -> Result<Copier.BatchResult, HydrationError> {
        var attempt = 0
        while true {
            do {
                let r = try await io.run { try self.perform(work) }
                return .success(r)
            } catch let e as BatchFailure {
                // Out of space is not retried: the job pauses until space is freed. Nor is a
                // writeback error: it is final, like a failed fdatasync.
                if e.error.code == .noSpace || e.error.code == .commitFailed || e.error.code == .sourceUnavailable
                    || e.error.code == .deviceUnconfirmed
                    || attempt >= retryDelaysMs.count
                {
                    if attempt > 0 {
                        logger.error("giving up after \(attempt) retries", metadata: ["error": "\(e.error)"])
                    }
                    return .failure(e.error)
                }
                logger.warning("I/O failed, retrying", metadata: ["error": "\(e.error)", "attempt": "\(attempt + 1)"])
                try? await Task.sleep(nanoseconds: retryDelaysMs[attempt] * 1_000_000)
                attempt += 1
            } catch {
                return .failure(HydrationError(.ioError, "\(error)", region: work.regions.lowerBound))
            }
        }
    }

    struct BatchFailure: Error { var error: HydrationError }

    func perform(_ work: Copier.Work) throws(BatchFailure) -> Copier.BatchResult {
        let bytes = geometry.byteRange(of: work.regions)
        let length = Int(bytes.upperBound - bytes.lowerBound)
        switch work {
        case .hole(let regions):
            if zeroDestination {
                try zero(bytes.lowerBound, UInt64(length), region: regions.lowerBound)
            }
            return Copier.BatchResult(regions: regions, written: 0, zero: UInt64(length))
        case .copy(let regions):
            let whole = buffers.take(length)
            defer { buffers.give(whole) }
            let buffer = UnsafeMutableRawBufferPointer(rebasing: whole[0..<length])
            // Only the data extents are read (a batch may span small holes of a file); the
            // regions wholly inside a hole are known zero without reading or scanning them.
            let holes: [Range<Int>]
            do {
                holes = try readData(into: buffer, bytes: bytes)
            } catch {
                let region = regionOf(error.offset, default: regions.lowerBound)
                // A remote source whose connection is down: the job pauses itself (HydrationJob); one
                // that is another disk now: it stops (DeviceUnconfirmed).
                let code = HydrationJob.sourceErrorCode(error)
                throw BatchFailure(
                    error: HydrationError(code, "region \(region): \(error)", errno: error.errno, region: region))
            }
            let isZero = { (r: Int) -> Bool in
                holes.contains { $0.contains(r) } || regionIsZero(r, in: buffer, base: bytes.lowerBound)
            }

            // Split the batch into runs of data regions (written) and zero regions (not written).
            var written: UInt64 = 0
            var zeroBytes: UInt64 = 0
            var i = regions.lowerBound
            while i < regions.upperBound {
                let zeroRun = isZero(i)
                var j = i + 1
                while j < regions.upperBound && isZero(j) == zeroRun { j += 1 }
                let run = geometry.byteRange(of: i..<j)
                let lo = Int(run.lowerBound - bytes.lowerBound)
                let hi = Int(run.upperBound - bytes.lowerBound)
                if zeroRun {
                    if zeroDestination { try zero(run.lowerBound, run.upperBound - run.lowerBound, region: i) }
                    zeroBytes += run.upperBound - run.lowerBound
                } else {
                    do {
                        try dest.write(UnsafeRawBufferPointer(rebasing: buffer[lo..<hi]), at: run.lowerBound)
                    } catch {
                        let code: HydrationError.Code = error.isNoSpace ? .noSpace : .destWriteFailed
                        let region = regionOf(error.offset, default: i)
                        throw BatchFailure(
                            error: HydrationError(
                                code, "region \(region): \(error)", errno: error.errno, region: region))
                    }
                    written += run.upperBound - run.lowerBound
                    do {
                        try dest.startWriteback(offset: run.lowerBound, length: run.upperBound - run.lowerBound)
                    } catch {
                        // Not retried: data already written may be lost (BatchJob.execute).
                        let region = regionOf(error.offset, default: i)
                        throw BatchFailure(
                            error: HydrationError(
                                .commitFailed,
                                "destination writeback failed at region \(region), metadata left at its last commit: \(error)",
                                errno: error.errno, region: region))
                    }
                }
                i = j
            }
            return Copier.BatchResult(regions: regions, written: written, zero: zeroBytes)
        }
    }

    /// Reads the batch's bytes from the source. On a file only its data extents are read
    /// (SEEK_DATA/SEEK_HOLE, asked only from positions inside the batch: its regions are claimed
    /// and unhydrated, hence never released), each widened to the source's direct-I/O alignment
    /// (at least 4 KiB) within the batch; a gap between them is zero-filled only inside regions
    /// that also hold data. Returns the regions wholly inside gaps: their bytes in `buffer` are
    /// not set, and they read as zeros.
    private func readData(into buffer: UnsafeMutableRawBufferPointer, bytes: Range<UInt64>) throws(StorageError)
        -> [Range<Int>]
    {
        guard source.info.identity.kind == .regularFile else {
            try source.read(into: buffer, at: bytes.lowerBound)
            return []
        }
        let align = UInt64(max(4096, source.directIO.alignment))
        var reads: [Range<UInt64>] = []
        var at = bytes.lowerBound
        while at < bytes.upperBound, let e = try source.nextData(from: at), e.lowerBound < bytes.upperBound {
            // bytes.lowerBound is a region boundary, hence aligned.
            let lo = max(bytes.lowerBound, max(e.lowerBound, at) & ~(align - 1))
            let hi = min(bytes.upperBound, (e.upperBound + align - 1) & ~(align - 1))
            if let last = reads.last, last.upperBound >= lo {
                reads[reads.count - 1] = last.lowerBound..<hi
            } else {
                reads.append(lo..<hi)
            }
            at = hi
        }
        var holes: [Range<Int>] = []
        var gapStart = bytes.lowerBound
        let rs = geometry.regionSize
        for r in reads + [bytes.upperBound..<bytes.upperBound] {
            if gapStart < r.lowerBound {
                // A gap: its head and tail lie in regions that hold data (zero-filled), the
                // regions between are holes. The end of the target counts as a region boundary.
                let g = gapStart..<r.lowerBound
                let headEnd = min(g.upperBound, (g.lowerBound + rs - 1) / rs * rs)
                let tailStart = max(
                    headEnd, g.upperBound == geometry.targetSize ? g.upperBound : g.upperBound / rs * rs)
                for z in [g.lowerBound..<headEnd, tailStart..<g.upperBound] where !z.isEmpty {
                    let lo = Int(z.lowerBound - bytes.lowerBound)
                    UnsafeMutableRawBufferPointer(rebasing: buffer[lo..<lo + Int(z.upperBound - z.lowerBound)])
                        .initializeMemory(as: UInt8.self, repeating: 0)
                }
                if headEnd < tailStart { holes.append(Int(headEnd / rs)..<Int((tailStart + rs - 1) / rs)) }
            }
            if !r.isEmpty {
                let lo = Int(r.lowerBound - bytes.lowerBound)
                try source.read(
                    into: UnsafeMutableRawBufferPointer(rebasing: buffer[lo..<lo + Int(r.upperBound - r.lowerBound)]),
                    at: r.lowerBound)
            }
            gapStart = max(gapStart, r.upperBound)
        }
        return holes
    }

    private func zero(_ offset: UInt64, _ length: UInt64, region: Int) throws(BatchFailure) {
        do {
            try dest.zeroOut(offset: offset, length: length)
        } catch {
            if error.isUnsupported {
                // No punch/zero-out support: write zeros instead, in 1 MiB pieces.
                try writeZeros(offset, length, region: region)
                return
            }
            let code: HydrationError.Code = error.isNoSpace ? .noSpace : .destWriteFailed
            throw BatchFailure(
                error: HydrationError(code, "region \(region): \(error)", errno: error.errno, region: region))
        }
    }

    private func writeZeros(_ offset: UInt64, _ length: UInt64, region: Int) throws(BatchFailure) {
        let chunk = Int(min(length, 1 << 20))
        let zeros = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: 4096)
        defer { zeros.deallocate() }
        zeros.initializeMemory(as: UInt8.self, repeating: 0)
        var at = offset
        while at < offset + length {
            let n = Int(min(UInt64(chunk), offset + length - at))
            do {
                try dest.write(UnsafeRawBufferPointer(rebasing: zeros[0..<n]), at: at)
            } catch {
                let code: HydrationError.Code = error.isNoSpace ? .noSpace : .destWriteFailed
                throw BatchFailure(
                    error: HydrationError(code, "region \(region): \(error)", errno: error.errno, region: region))
            }
            at += UInt64(n)
        }
    }

    private func regionOf(_ offset: UInt64?, default d: Int) -> Int {
        offset.map { Int($0 / geometry.regionSize) } ?? d
    }

    private func regionIsZero(_ region: Int, in buffer: UnsafeMutableRawBufferPointer, base: UInt64) -> Bool {
        let r = geometry.byteRange(of: region..<region + 1)
        let lo = Int(r.lowerBound - base)
        let hi = Int(r.upperBound - base)
        return isAllZero(UnsafeRawBufferPointer(rebasing: buffer[lo..<hi]))
    }
}

/// True when every byte is zero; 8 bytes at a time.
func isAllZero(_ b: UnsafeRawBufferPointer) -> Bool {
    guard let base = b.baseAddress else { return true }
    let n = b.count
    var i = 0
    // Fast path over aligned words.
    while i < n && (Int(bitPattern: base + i) & 7) != 0 {
        if b[i] != 0 { return false }
        i += 1
    }
    var acc: UInt64 = 0
    while i + 64 <= n {
        let p = (base + i).assumingMemoryBound(to: UInt64.self)
        acc = p[0] | p[1] | p[2] | p[3] | p[4] | p[5] | p[6] | p[7]
        if acc != 0 { return false }
        i += 64
    }
    while i < n {
        if b[i] != 0 { return false }
        i += 1
    }
    return true
}
