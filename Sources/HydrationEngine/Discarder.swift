import HydrationStorage
import Logging

/// Releases the source's space for regions the committer has made durable: PUNCH_HOLE on a file,
/// BLKDISCARD on a block device. It consumes only `CommittedRegions`, which nothing but the
/// committer can construct, so it cannot release a region whose hydration might still be lost.
///
/// Best effort: a failed or unsupported discard is counted and reported, never fatal, and never
/// blocks hydration (the space budget's bytes are handed back either way, so a source that cannot
/// discard does not stall the copy; the status says how many discards failed).
package actor Discarder {
    private let source: SourceReleaser
    private let io: IOExecutor
    private let progress: JobProgress
    private let geometry: Geometry
    private let logger: Logger
    /// Live-clone reads of the source pin their regions; a region is released only once unpinned.
    private let ownership: RegionOwnership?
    /// Sets released and made durable, for the committer (ReleasesDone).
    private let releasesDone: ReleasesDone
    private var processedGeneration: UInt64 = 0
    private var received = 0
    private var processed = 0
    private var waiters: [(Int, CheckedContinuation<Void, Never>)] = []
    private var loggedFailure = false
    private var finished = false

    /// Largest single discard request: keeps each call short so progress stays visible.
    package static let maxChunk: UInt64 = 1 << 30

    package init(
        source: SourceReleaser, io: IOExecutor, progress: JobProgress, geometry: Geometry, logger: Logger,
        ownership: RegionOwnership? = nil, releasesDone: ReleasesDone = ReleasesDone()
    ) {
        self.releasesDone = releasesDone
        self.source = source; self.io = io; self.progress = progress; self.geometry = geometry; self.logger = logger
        self.ownership = ownership
    }

    /// Runs until the stream finishes.
    package func run(_ stream: AsyncStream<CommittedRegions>) async {
        for await set in stream {
            received += 1
            await release(set)
            processed += 1
            // Syncing the source after every set would put a journal commit per commit on the
            // release path; once a second is enough (the pending list only stays longer), and
            // `drainDurably` syncs at the end of a run.
            if monotonicNanos() &- lastSourceSync >= Self.sourceSyncIntervalNanos {
                await confirmDurable(upTo: processed)
            }
            processedGeneration = max(processedGeneration, set.generation)
            let ready = waiters.filter { $0.0 <= processed }
            waiters.removeAll { $0.0 <= processed }
            for (_, c) in ready { c.resume() }
        }
        finished = true
        for (_, c) in waiters { c.resume() }
        waiters = []
    }

    /// Returns once every set published before this call has been processed (or at once when
    /// the stream has ended: nothing more will be processed).
    package func drain(published: Int) async {
        if processed >= published || finished { return }
        await withCheckedContinuation { waiters.append((published, $0)) }
    }

    package var processedCount: Int { processed }

    /// A punch or discard is a change to the source like any other: until the source is synced,
    /// power loss may undo it. Only synced releases are reported as done (so the committer drops
    /// them from the metadata's pending-release list); after a failed sync none ever is again (its
    /// errors were consumed), and a restart releases those regions again.
    private var sourceSyncFailed = false
    private var lastSourceSync: UInt64 = 0
    package static let sourceSyncIntervalNanos: UInt64 = 1_000_000_000

    /// `drain`, then a source sync covering everything released so far: afterwards every
    /// published set that was released is reported as done (for the committer's final record).
    package func drainDurably(published: Int) async {
        await drain(published: published)
        if releasesDone.count < processed { await confirmDurable(upTo: processed) }
    }

    private func confirmDurable(upTo count: Int) async {
        guard !sourceSyncFailed else { return }
        lastSourceSync = monotonicNanos()
        let source = self.source
        do {
            try await io.run { try source.sync() }
            releasesDone.record(upTo: count)
        } catch {
            sourceSyncFailed = true
            logger.warning(
                "source sync after discards failed; those releases stay pending and are repeated after a restart",
                metadata: ["error": "\(error)"])
        }
    }

    private func release(_ set: CommittedRegions) async {
        let isFile = source.info.identity.kind == .regularFile
        for regions in set.ranges {
            // A read of the source that began before these regions were hydrated may still be in
            // flight (a live-clone client's): its data must not be released under it.
            await ownership?.waitUnpinned(regions)
            var bytes = geometry.byteRange(of: regions)
            if isFile && bytes.upperBound == geometry.targetSize {
                // Punch through the end of the last region: a punch that stops at a file size not
                // on a block boundary leaves the last partial block allocated.
                bytes = bytes.lowerBound..<UInt64(regions.upperBound) * geometry.regionSize
            }
            var offset = bytes.lowerBound
            var allReleased = true
            while offset < bytes.upperBound {
                let length = min(Self.maxChunk, bytes.upperBound - offset)
                let source = self.source
                let at = offset
                let inBounds = geometry.targetSize > at ? min(length, geometry.targetSize - at) : 0
                do {
                    try await io.run {
                        do {
                            try source.release(offset: at, length: length)
                        } catch {
                            // Some filesystems refuse a punch past the end of the file (a FUSE
                            // file over NBD: "request out of bounds"): then only up to the end,
                            // which may leave the last partial block allocated, and nothing more.
                            guard inBounds > 0 && inBounds < length else { throw error }
                            try source.release(offset: at, length: inBounds)
                        }
                    }
                    let counted = min(length, geometry.targetSize > at ? geometry.targetSize - at : 0)
                    progress.update {
                        $0.discardedBytes += counted; $0.discardPendingBytes -= min($0.discardPendingBytes, counted)
                    }
                } catch {
                    allReleased = false
                    progress.update { c in
                        c.discardFailures += 1
                        c.lastDiscardError = "\(error)"
                        c.discardPendingBytes -= min(
                            c.discardPendingBytes, min(length, geometry.targetSize > at ? geometry.targetSize - at : 0))
                    }
                    if !loggedFailure {
                        loggedFailure = true
                        logger.warning(
                            "source discard failed; hydration goes on, failures are counted",
                            metadata: ["error": "\(error)"])
                    }
                }
                offset += length
            }
            if allReleased { ownership?.markReleased(regions) }
        }
        progress.update { $0.budgetReleased += set.budgetBytes }
    }
}
