import HydrationStorage
import Logging

/// A set of regions whose hydration is durably recorded in the metadata.
///
/// Its initialiser is `fileprivate`: only the `Committer` in this file can make one, and it does
/// so only after the metadata fsync returned (or, at open, from metadata it has just synced).
/// The `Discarder` accepts nothing else, so "release only committed regions" is enforced by the
/// type system rather than by convention.
public struct CommittedRegions: Sendable, Equatable {
    /// Metadata generation that made these regions durable.
    public let generation: UInt64
    /// Region index ranges, sorted and coalesced.
    public let ranges: [Range<Int>]
    /// Space-budget bytes these regions were charged with (bytes written to the destination).
    package let budgetBytes: UInt64

    fileprivate init(generation: UInt64, ranges: [Range<Int>], budgetBytes: UInt64) {
        self.generation = generation
        self.ranges = ranges
        self.budgetBytes = budgetBytes
    }
}

#if DEBUG
    /// Deliberately wrong commit orders, for the crash-safety harness to prove it notices them.
    /// Compiled only into debug builds; the shipped (release) commit path has no such branch.
    package enum CommitterFault: Sendable, Equatable {
        /// Publish the region set to the discarder before the metadata is written or synced.
        case publishBeforeDurable
        /// Write and sync the metadata before the destination's fdatasync.
        case metadataBeforeDestinationSync
    }
#endif

/// Makes hydration durable. Each commit, every step finished before the next:
/// swap the dirty set -> fdatasync the destination -> write the metadata atomically and fsync it
/// -> publish the just-committed region set to the discarder.
///
/// Any failure is final for this job: the metadata mode becomes `ro` (destination sync failed,
/// metadata untouched) or `fail` (metadata write failed), nothing more is committed or published,
/// so nothing more is discarded. A failed fsync is never retried as if nothing happened.
package actor Committer {
    private let store: MetadataStore
    private let dest: any StorageDevice
    private let io: IOExecutor
    private let progress: JobProgress
    private let geometry: Geometry
    private let logger: Logger
    private let publish: AsyncStream<CommittedRegions>.Continuation?
    /// Told what each commit made durable (BLOCK_STATUS `x-hydrationd:state`).
    private let ownership: RegionOwnership?

    /// What the discarder has finished (it says so; the committer only reads it).
    private let releasesDone: ReleasesDone
    private var pending: [Range<Int>] = []
    private var pendingBudgetBytes: UInt64 = 0
    private var requested: UInt64 = 0
    private var completedTicket: UInt64 = 0
    private var committing = false
    private var waiters: [CheckedContinuation<Void, Never>] = []
    package private(set) var failure: HydrationError?
    private var completeRequested = false
    /// Sets handed to the discarder so far (the copier waits for the discarder to catch up).
    package private(set) var publishedCount = 0
    /// Published sets (by sequence number, 1-based) whose release the discarder has not finished:
    /// the pending-release list each commit records, so that a restart releases only these.
    private var unconfirmed: [(seq: Int, ranges: [Range<Int>])] = []
    private var confirmRequested = false
    /// A flush: the destination is synced even when no region changed (live writes to hydrated
    /// regions are in no pending set).
    private var syncRequested = false
    private var clearDestZeroedRequested = false

    #if DEBUG
        package var fault: CommitterFault?
        package func injectFault(_ f: CommitterFault?) { fault = f }
    #endif

    package init(
        store: MetadataStore, dest: any StorageDevice, io: IOExecutor, progress: JobProgress,
        geometry: Geometry, logger: Logger, publish: AsyncStream<CommittedRegions>.Continuation?,
        ownership: RegionOwnership? = nil, releasesDone: ReleasesDone = ReleasesDone()
    ) {
        self.releasesDone = releasesDone
        self.store = store; self.dest = dest; self.io = io; self.progress = progress
        self.geometry = geometry; self.logger = logger; self.publish = publish; self.ownership = ownership
    }

    package var generation: UInt64 { store.header.generation }
    package var hasPending: Bool { !pending.isEmpty }

    /// The copier reports a finished batch: its destination writes have completed (not yet synced).
    package func noteHydrated(_ regions: Range<Int>, budgetBytes: UInt64) {
        pending.append(regions)
        pendingBudgetBytes += budgetBytes
    }

    /// After open: every region the durable metadata records as hydrated, for the discarder to
    /// release again (idempotent), so a crash between a commit and its discard leaves nothing
    /// behind. The store synced the file before reporting this state.
    package func publishRecovered() {
        // Only what may still be pending (the store intersected it with the committed map): a
        // complete job whose releases were confirmed never touches its source again, and a
        // source device reused since is not released twice.
        let ranges = store.header.pendingRelease
        guard !ranges.isEmpty, let publish else { return }
        unconfirmed.append((publishedCount + 1, ranges))
        let bytes = ranges.reduce(UInt64(0)) { $0 + geometry.byteLength(of: $1) }
        progress.update { $0.discardPendingBytes += bytes }
        publishedCount += 1
        publish.yield(CommittedRegions(generation: store.header.generation, ranges: ranges, budgetBytes: 0))
    }

    /// Commits everything noted before this call; returns once it is durable (and published).
    /// With `markComplete`, also records completion (the caller guarantees every region is noted).
    @discardableResult
    package func commit(markComplete: Bool = false) async throws(HydrationError) -> UInt64 {
        if markComplete { completeRequested = true }
        requested += 1
        let ticket = requested
        while completedTicket < ticket {
            if let failure { throw failure }
            if committing {
                await withCheckedContinuation { waiters.append($0) }
                continue
            }
            committing = true
            let upTo = requested
            do {
                try await performCommit()
            } catch {
                committing = false
                resumeWaiters()
                throw error
            }
            completedTicket = upTo
            committing = false
            resumeWaiters()
        }
        if let failure { throw failure }
        return store.header.generation
    }

    /// NBD FLUSH (and FUA): every write completed before this call is durable when it returns, on
    /// the destination and, for regions it hydrated, in the metadata. Runs a full commit, with the
    /// destination's fdatasync even when no region changed.
    package func flush() async throws(HydrationError) {
        syncRequested = true
        try await commit()
    }

    /// Durably records that the destination may hold data where the job never hydrated (before
    /// the first client write lands): a restart then zeroes hole and zero regions when it hydrates
    /// them, instead of trusting the destination to read as zeros there.
    package func recordDestinationWritten() async throws(HydrationError) {
        guard store.header.destZeroed else { return }
        clearDestZeroedRequested = true
        try await commit()
        if store.header.destZeroed {
            throw failure ?? HydrationError(.commitFailed, "could not record that the destination holds client data")
        }
    }

    /// A periodic commit: only when something changed.
    package func commitIfDirty() async throws(HydrationError) {
        if !pending.isEmpty { try await commit() }
    }

    /// Records in the metadata that every release finished so far is done (a metadata-only commit
    /// when the recorded pending list is longer than what is still outstanding). Called once the
    /// discarder has drained: after it, a restart of a paused or complete job releases nothing.
    ///
    /// With `markComplete`, the same commit records completion: a discard_source job is complete
    /// only once its releases were made (so a crash before that leaves it incomplete, and the
    /// restart finishes them; a complete job never touches its source again).
    package func confirmReleases(markComplete: Bool = false) async throws(HydrationError) {
        guard publish != nil else {
            if markComplete { try await commit(markComplete: true) }
            return
        }
        pruneConfirmed()
        let outstanding = coalesce(unconfirmed.flatMap(\.ranges))
        guard store.header.pendingRelease != outstanding || (markComplete && !store.header.complete) else { return }
        confirmRequested = true
        try await commit(markComplete: markComplete)
    }

    private func pruneConfirmed() {
        let done = releasesDone.count
        unconfirmed.removeAll { $0.seq <= done }
    }

    private func resumeWaiters() {
        let w = waiters
        waiters = []
        for c in w { c.resume() }
    }

    private func performCommit() async throws(HydrationError) {
        if let failure { throw failure }
        let ranges = coalesce(pending)
        let budgetBytes = pendingBudgetBytes
        let markComplete = completeRequested && !store.header.complete
        let confirm = confirmRequested
        let syncOnly = syncRequested
        let clearDestZeroed = clearDestZeroedRequested && store.header.destZeroed
        pending = []
        pendingBudgetBytes = 0
        confirmRequested = false
        syncRequested = false
        clearDestZeroedRequested = false
        guard !ranges.isEmpty || markComplete || confirm || clearDestZeroed else {
            // A flush with nothing new to record: the destination's writes still must be durable.
            if syncOnly { try await syncDestination(ranges) }
            return
        }
        self.clearDestZeroed = clearDestZeroed

        let started = monotonicNanos()
        #if DEBUG
            switch fault {
            case .publishBeforeDurable?:
                publishCommitted(generation: store.header.generation + 1, ranges: ranges, budgetBytes: budgetBytes)
                try await syncDestination(ranges)
                let gen = try await writeMetadata(ranges, markComplete: markComplete)
                finishCommit(
                    generation: gen, ranges: ranges, budgetBytes: budgetBytes, started: started, publish: false)
                return
            case .metadataBeforeDestinationSync?:
                let gen = try await writeMetadata(ranges, markComplete: markComplete)
                try await syncDestination(ranges)
                finishCommit(generation: gen, ranges: ranges, budgetBytes: budgetBytes, started: started)
                return
            case nil:
                break
            }
        #endif
        // 1. The destination first: metadata must never record data the destination could lose.
        try await syncDestination(ranges)
        // 2. The metadata, atomically, with its fsyncs (inside MetadataStore.commit).
        let gen = try await writeMetadata(ranges, markComplete: markComplete)
        // 3. Only now may the discarder hear of these regions — unless a writeback error was
        // reported meanwhile (writebackFailed): then nothing more is published.
        finishCommit(
            generation: gen, ranges: ranges, budgetBytes: budgetBytes, started: started, publish: failure == nil)
        if let failure { throw failure }
    }

    /// Set for the metadata write of the commit in progress.
    private var clearDestZeroed = false

    private func syncDestination(_ ranges: [Range<Int>]) async throws(HydrationError) {
        let dest = self.dest
        do {
            try await io.run { try dest.sync() }
        } catch {
            let s = error as? StorageError
            // Name what may be lost: the regions this commit was to record (a writeback error
            // does not say which pages failed).
            var note = ""
            if let lo = ranges.first, let hi = ranges.last {
                let bytes = geometry.byteRange(of: lo.lowerBound..<hi.upperBound)
                note =
                    "; regions \(lo.lowerBound)..<\(hi.upperBound) (bytes \(bytes.lowerBound)..<\(bytes.upperBound)) not committed"
            }
            if s?.isNoSpace == true {
                // A copy-on-write filesystem (btrfs) allocates at writeback: its fdatasync can fail
                // with ENOSPC. Still final for this run (the failed pages may be gone from the
                // cache, and a second fdatasync would not say so), but not for the job: it pauses
                // with NoSpace, and resuming reopens it from its last commit, re-copying
                // everything not committed.
                fail(
                    mode: .ro,
                    HydrationError(
                        .noSpace,
                        "destination fdatasync: out of space; metadata left at its last commit, the job resumes from it once space is freed: \(error)\(note)",
                        errno: s?.errno, region: ranges.first?.lowerBound))
            } else {
                fail(
                    mode: .ro,
                    HydrationError(
                        .commitFailed,
                        "destination fdatasync failed, metadata left at its last commit: \(error)\(note)",
                        errno: s?.errno, region: ranges.first?.lowerBound))
            }
        }
        if let failure { throw failure }
    }

    private func writeMetadata(_ ranges: [Range<Int>], markComplete: Bool) async throws(HydrationError) -> UInt64 {
        let store = self.store
        let now = wallClockMillis()
        // Read before the write: a set the discarder finishes meanwhile stays listed (a superset
        // is safe; the next commit drops it).
        if publish != nil { pruneConfirmed() }
        let pendingRelease: [Range<Int>]? = publish != nil ? unconfirmed.flatMap(\.ranges) + ranges : nil
        let clearDestZeroed = self.clearDestZeroed
        do {
            return try await io.run {
                try store.commit(
                    ranges, complete: markComplete, pendingRelease: pendingRelease,
                    clearDestZeroed: clearDestZeroed, nowMs: now)
            }
        } catch {
            let storageError: StorageError? = {
                if let m = error as? MetadataError, case .io(let s) = m.reason { return s }
                return nil
            }()
            let code: HydrationError.Code = storageError?.isNoSpace == true ? .noSpace : .commitFailed
            let e =
                (error as? MetadataError).map { HydrationError(code, $0.description, errno: storageError?.errno) }
                ?? HydrationError(.commitFailed, "\(error)")
            fail(mode: .fail, e)
            throw e
        }
    }

    private func finishCommit(
        generation: UInt64, ranges: [Range<Int>], budgetBytes: UInt64, started: UInt64, publish: Bool = true
    ) {
        let elapsedMs = Double(monotonicNanos() - started) / 1e6
        let committedCount = store.committedCount
        let committedBytes = geometry.bytes(ofRegionCount: committedCount, includesLast: store.isLastRegionCommitted)
        progress.update { c in
            c.commits += 1
            c.lastCommitUnixMs = wallClockMillis()
            c.lastCommitDurationMs = elapsedMs
            c.commitDurations.record(seconds: elapsedMs / 1000)
            c.committedRegions = committedCount
            c.committedBytes = committedBytes
        }
        ownership?.markCommitted(ranges)
        if publish { publishCommitted(generation: generation, ranges: ranges, budgetBytes: budgetBytes) }
    }

    private func publishCommitted(generation: UInt64, ranges: [Range<Int>], budgetBytes: UInt64) {
        guard let publishStream = self.publish, !ranges.isEmpty else {
            // No discarder: the budget is not in force, nothing to hand over.
            return
        }
        let bytes = ranges.reduce(UInt64(0)) { $0 + geometry.byteLength(of: $1) }
        progress.update { $0.discardPendingBytes += bytes }
        publishedCount += 1
        unconfirmed.append((publishedCount, ranges))
        publishStream.yield(CommittedRegions(generation: generation, ranges: ranges, budgetBytes: budgetBytes))
    }

    /// The copier saw a writeback error on the destination (starting writeback or evicting):
    /// treated exactly like a failed destination fdatasync. Data written since the last commit
    /// may be lost, so nothing more is committed or published; the metadata becomes `ro`.
    package func writebackFailed(_ e: HydrationError) {
        fail(mode: .ro, e)
    }

    private func fail(mode: MetadataMode, _ e: HydrationError) {
        guard failure == nil else { return }
        failure = e
        progress.update { $0.metadataMode = mode }
        ownership?.commitsFailed(destinationDataLost: mode == .ro)
        logger.error(
            "commit failed; metadata is now \(mode.rawValue), copying and discarding stop", metadata: ["error": "\(e)"])
    }

    /// No more sets will be published (the job is closing).
    package func finishStream() { publish?.finish() }
}

/// Region arithmetic for one job.
package struct Geometry: Sendable, Equatable {
    package let regionSize: UInt64
    package let regionCount: Int
    package let targetSize: UInt64

    package func byteRange(of regions: Range<Int>) -> Range<UInt64> {
        let lo = UInt64(regions.lowerBound) * regionSize
        let hi = min(UInt64(regions.upperBound) * regionSize, targetSize)
        return lo..<max(lo, hi)
    }

    package func byteLength(of regions: Range<Int>) -> UInt64 {
        let r = byteRange(of: regions)
        return r.upperBound - r.lowerBound
    }

    /// Bytes covered by `n` regions, counting the last (possibly short) one exactly when it is among them.
    package func bytes(ofRegionCount n: Int, includesLast: Bool) -> UInt64 {
        guard n > 0 else { return 0 }
        if includesLast { return UInt64(n - 1) * regionSize + byteLength(of: regionCount - 1..<regionCount) }
        return UInt64(n) * regionSize
    }
}
