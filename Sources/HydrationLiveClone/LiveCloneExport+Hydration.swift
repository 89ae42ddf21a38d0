import HydrationEngine
import HydrationStorage
import Logging
import NBDServer
import NIOCore

/// Copying regions from the source for clients: before a partial write, for CACHE, and after
/// reads with `hydrate_on_read`; and the end of a claim.
extension LiveCloneExport {
    /// Ends a claim: progress and the committer hear of the regions it hydrated, then the claim
    /// ends with them marked hydrated (RegionOwnership.finish says why in that order).
    func finishClaim(_ claim: consuming RegionClaim, hydrated: [Range<Int>]) async {
        let (progress, geometry) = (self.progress, self.geometry)
        await claim.finish(hydrated: hydrated, noting: committer) { newly in
            guard !newly.isEmpty else { return }
            let count = newly.reduce(0) { $0 + $1.count }
            let bytes = newly.reduce(UInt64(0)) { $0 + geometry.byteLength(of: $1) }
            progress.update { c in
                c.hydratedRegions += count
                c.hydratedBytes += bytes
                c.liveHydratedRegions += count
            }
        }
    }

    /// Copies the unhydrated regions among `regions` (claimed by the caller) from the source.
    /// Returns the runs copied, to be marked hydrated with the claim's end.
    func hydrate(_ regions: [Int]) async throws(NBDError) -> [Range<Int>] {
        var done: [Range<Int>] = []
        for r in regions where !ownership.isHydrated(r) {
            let job = BatchJob(
                source: source, dest: dest, geometry: geometry, zeroDestination: !ownership.destZeroed,
                retryDelaysMs: [10, 100], logger: logger, buffers: buffers)
            switch await job.execute(.copy(r..<r + 1), io: sourceIO) {
            case .success(let b):
                progress.update {
                    $0.writtenBytes += b.written; $0.skippedZeroBytes += b.zero
                }
                done.append(r..<r + 1)
            case .failure(let e):
                if e.code == .commitFailed { await committer.writebackFailed(e) }
                throw NBDError(e.code == .noSpace ? .ENOSPC : .EIO, "hydrating region \(r) first: \(e.message)")
            }
        }
        return done
    }

    public func cache(offset: UInt64, length: UInt32) async throws(NBDError) {
        try enter()
        defer { leave() }
        try await checkWritable()
        try await hydrate(covering: regions(covering: offset..<offset + UInt64(length)))
    }

    /// `hydrate_on_read`: copies the regions a read just got from the source, after the reply,
    /// in a task of its own (the client does not wait for it). Bounded; skipped while closing.
    func hydrateInBackground(_ runs: [Range<Int>]) {
        let startWorker = readHydrations.withLock { st -> Bool in
            st.queue += runs.prefix(max(0, Self.maxReadHydrationQueue - st.queue.count))
            guard st.workers < Self.maxReadHydrationWorkers else { return false }
            st.workers += 1
            return true
        }
        guard startWorker else { return }
        Task {
            var usable = true
            do throws(NBDError) { try self.enter() } catch { usable = false }
            if usable {
                let failed = await self.committer.failure != nil
                if failed { self.leave(); usable = false }
            }
            while true {
                // A closing export stops here (its shutdown waits for this task).
                let closing = self.gate.withLock { $0.closed }
                if closing && usable { self.leave(); usable = false }
                let next = self.readHydrations.withLock { st -> Range<Int>? in
                    if !usable || st.queue.isEmpty {
                        if !usable { st.queue = [] }
                        st.workers -= 1
                        return nil
                    }
                    return st.queue.removeFirst()
                }
                guard let next else { break }
                do { try await self.hydrate(covering: next) } catch {
                    self.logger.debug(
                        "hydrate on read failed; the copier retries the region", metadata: ["error": "\(error)"])
                }
            }
            if usable { self.leave() }
        }
    }

    /// Copies every unhydrated region of `covered` now, a claim of a few regions at a time.
    func hydrate(covering covered: Range<Int>) async throws(NBDError) {
        var at = covered.lowerBound
        while at < covered.upperBound {
            guard let start = ownership.firstHydrated(false, from: at), start < covered.upperBound else { break }
            let step = start..<min(covered.upperBound, start + Self.cacheStepRegions)
            let claim = await ownership.claim(step)
            var hydrated: [Range<Int>] = []
            do throws(NBDError) {
                hydrated = try await hydrate(Array(step))
            } catch {
                await finishClaim(claim, hydrated: hydrated)
                throw error
            }
            await finishClaim(claim, hydrated: hydrated)
            at = step.upperBound
        }
    }

}
