import HydrationStorage
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

package actor Copier {
    package enum Outcome: Sendable, Equatable {
        case complete
        case stopped
        case failed(HydrationError)
        case noSpace(HydrationError)
        /// The committer failed; its error is the job's.
        case halted
    }

    package let source: SourceReader
    package let dest: any StorageDevice
    package let io: IOExecutor
    package let committer: Committer
    package let discarder: Discarder?
    package let progress: JobProgress
    package let geometry: Geometry
    package let logger: Logger
    /// Whether hole and zero regions must be zeroed on the destination: read per batch, because a
    /// client's write makes a destination that read as zeros hold data (RegionOwnership).
    package var zeroDestination: Bool { !ownership.destZeroed }
    package let sparseAware: Bool
    package let retryDelaysMs: [UInt64]
    /// Verified release (JobConfiguration.verify): every batch reads its range back before it ends.
    package let verify: Bool

    private let buffers = IOBufferPool()
    /// Hydrated bits and claims, shared with the live clone's writers.
    package let ownership: RegionOwnership
    package var tunables: Tunables
    /// Runs are numbered by the job; a stop names the run it stops, so a stop that arrives
    /// before its run has started is not lost (a plain flag reset by run() would be).
    package var stoppedUpTo = 0
    package var currentRun = 0
    package var stopRequested: Bool { stoppedUpTo >= currentRun }
    package var running = false

    // Where the next data is, from SEEK_DATA; nil when unknown.
    /// Data extents of the source ahead of the cursor, from SEEK_DATA/SEEK_HOLE.
    package var extents: [Range<UInt64>] = []
    package var noMoreData = false
    package var rateStart: UInt64 = 0
    package var rateBytes: UInt64 = 0

    package init(
        source: SourceReader, dest: any StorageDevice, io: IOExecutor, committer: Committer,
        discarder: Discarder?, progress: JobProgress, geometry: Geometry, ownership: RegionOwnership,
        tunables: Tunables, logger: Logger, retryDelaysMs: [UInt64] = [10, 100, 1000], verify: Bool = false
    ) {
        self.verify = verify
        self.source = source; self.dest = dest; self.io = io; self.committer = committer
        self.discarder = discarder; self.progress = progress; self.geometry = geometry; self.ownership = ownership
        self.tunables = tunables; self.logger = logger
        self.sparseAware = source.reportsHoles
        self.retryDelaysMs = retryDelaysMs
    }

    package func update(_ t: Tunables) { tunables = t }
    private var gate: (any CopierGate)?
    package func setGate(_ g: (any CopierGate)?) { gate = g }
    package func requestStop(run: Int) { stoppedUpTo = max(stoppedUpTo, run) }
    package var hydratedMap: RegionMap { ownership.hydratedSnapshot }

    /// Runs until every region is hydrated, a stop is requested, or a failure.
    package func run(id: Int) async -> Outcome {
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

                // With verify, a hole goes as a batch: its range is read back like any other.
                if case .hole = candidate, !zeroDestination, !verify {
                    // A hole of a destination that reads as zeros: no I/O at all, so it is
                    // recorded here rather than queued against the threshold behind the batches
                    // in flight: a 1 GiB hole drained the whole pipeline before it, once per data
                    // extent of a sparse image. It does wait for the evictions in
                    // flight, as it did queued behind them: one that reports a writeback error
                    // fails the job before anything after it is recorded.
                    while evictionsInFlight > 0 { await waitForBatchEvent() }
                    if let f = batchFailure { outcome = f; break }
                    guard let claim = ownership.tryClaim(regions) else {
                        cursor = regions.lowerBound + 1
                        continue
                    }
                    let claimed = claim.regions
                    if zeroDestination {
                        // A client wrote meanwhile (a failed write may have left data in these
                        // very regions): they are zeroed like any hole, by a batch.
                        claim.end()
                        cursor = claimed.lowerBound
                        continue
                    }
                    cursor = claimed.upperBound
                    await finished(
                        BatchResult(regions: claimed, written: 0, zero: geometry.byteLength(of: claimed)), claim: claim,
                        reserved: 0)
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
                    if progress.budgetOutstanding + need > tunables.spaceBudgetBytes / 2 && !earlyCommitInFlight {
                        // Half full: commit early (without waiting) so the discarder can start releasing.
                        // A child of this run: its failure stops the run at once (earlyCommitFinished),
                        // not only when the loop next asks the committer, after the waits below
                        // (at a low rate limit, minutes) and a batch written that no commit can record.
                        earlyCommitInFlight = true
                        let committer = self.committer
                        group.addTask {
                            let failure: HydrationError?
                            do throws(HydrationError) {
                                try await committer.commit()
                                failure = nil
                            } catch {
                                failure = error
                            }
                            await self.earlyCommitFinished(failure)
                        }
                    }
                    while progress.budgetOutstanding > 0
                        && progress.budgetOutstanding + need > tunables.spaceBudgetBytes
                    {
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

                // The rate limit as it is now, after the waits above (it may have changed meanwhile).
                if case .copy = candidate, let limit = tunables.rateLimitBytesPerSecond {
                    await throttle(bytes: geometry.byteLength(of: regions), limit: limit)
                    if stopRequested { outcome = .stopped; break }
                    if let f = batchFailure { outcome = f; break }
                }

                // Now the claim: the longest prefix no client took (or hydrated) meanwhile.
                guard let claim = ownership.tryClaim(regions) else {
                    cursor = regions.lowerBound + 1
                    continue
                }
                let claimed = claim.regions
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
                    retryDelaysMs: retryDelaysMs, logger: logger, buffers: buffers, verify: verify)
                let io = self.io
                let handoff = ClaimHandoff(claim)
                group.addTask {
                    let result = await job.execute(work, io: io)
                    await self.batchFinished(Completion(claim: handoff.take(), reserved: reserve, result: result))
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
    var batchFailure: Outcome?
    private var batchWaiters: [CheckedContinuation<Void, Never>] = []

    /// Suspends until some batch finishes.
    private func waitForBatchEvent() async {
        await withCheckedContinuation { batchWaiters.append($0) }
    }

    private func batchFinished(_ c: consuming Completion) async {
        let regions = c.claim.regions
        let reserved = c.reserved
        let result = c.result
        let claim = c.claim
        switch result {
        case .success(let b):
            // Recorded (and handed to the committer) before the batch stops counting as in flight.
            await finished(b, claim: claim, reserved: reserved)
        case .failure(let e):
            // The regions of a failed batch stay unhydrated (a mismatch's too: never noted to
            // the committer, so never committed nor released; a resume copies them again).
            claim.end()
            if e.code == .destinationMismatch { progress.update { $0.verifyMismatches += 1 } }
            if e.code == .commitFailed {
                // A writeback error (BatchJob.startWriteback): final for the metadata.
                await committer.writebackFailed(e)
                if batchFailure == nil { batchFailure = .halted }
            } else if batchFailure == nil {
                batchFailure = e.code == .noSpace ? .noSpace(e) : .failed(e)
            }
            progress.update { $0.budgetInFlight -= reserved }
        }
        inFlight -= regions.count
        if let k = inFlightStarts.firstIndex(of: regions.lowerBound) { inFlightStarts.remove(at: k) }
        progress.update { [inFlight] in $0.hydratingRegions = inFlight }
        let w = batchWaiters
        batchWaiters = []
        for k in w { k.resume() }
    }

    private var earlyCommitInFlight = false
    /// The early commit ended; a failure (recorded by the committer, final for the job) ends the
    /// run as a failed commit does anywhere else: nothing more is issued.
    private func earlyCommitFinished(_ failure: HydrationError?) {
        earlyCommitInFlight = false
        guard failure != nil else { return }
        if batchFailure == nil { batchFailure = .halted }
        let w = batchWaiters
        batchWaiters = []
        for k in w { k.resume() }
    }

    /// How much of the source and destination may stay in the page cache behind the copy front.
    package static let cacheWindow: UInt64 = 16 << 20
    /// `cacheWindow`, smaller in tests so that the crash explorer's 1 MiB images see evictions.
    private var cacheWindow: UInt64 = Copier.cacheWindow
    package func setCacheWindowForTesting(_ bytes: UInt64) { cacheWindow = bytes }
    /// Tests: where the rate window starts and what it has issued (a run that began long ago).
    package func setRateWindowForTesting(start: UInt64, bytes: UInt64) { rateStart = start; rateBytes = bytes }
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

    private func finished(_ b: BatchResult, claim: consuming RegionClaim, reserved: UInt64) async {
        copyFront = max(copyFront, geometry.byteRange(of: b.regions).upperBound)
        if copyFront >= evictedUpTo + 2 * cacheWindow {
            // On a 4 MiB boundary: large folios are aligned to their size, and one straddling
            // the end of a range would be dropped by neither this call nor the next.
            // Never past a batch still in flight: a hole recorded without I/O, or a batch that
            // finished early, may have moved the front well beyond it.
            let lowest = inFlightStarts.min().map { UInt64($0) * geometry.regionSize } ?? copyFront
            let upTo = (min(copyFront - cacheWindow, lowest)) & ~(min(UInt64(4 << 20), cacheWindow) - 1)
            if upTo > evictedUpTo {
                pendingEviction = (pendingEviction?.lowerBound ?? evictedUpTo)..<upTo
                evictedUpTo = upTo
            }
        }
        // The committer hears of the regions before they are marked hydrated (RegionClaim.finish).
        let newly = await claim.finish(
            hydrated: [b.regions], noting: committer, budgetBytes: discarder != nil ? b.written : 0
        ).reduce(0) { $0 + $1.count }
        let bytes = geometry.byteLength(of: b.regions)
        progress.update { c in
            c.hydratedRegions += newly
            c.hydratedBytes += bytes
            c.writtenBytes += b.written
            c.skippedZeroBytes += b.zero
            c.verifiedBytes += b.verified
            if let p = b.readBack { c.readBackPath = max(c.readBackPath ?? p, p) }
            // One update: the reservation becomes the real charge without being counted twice.
            if discarder != nil { c.budgetCharged += b.written }
            c.budgetInFlight -= reserved
        }
        progress.recordSample()
    }

}
