import HydrationStorage
import Logging

/// The run: the copier until it ends, the final commit and releases, and the state it ends in.
extension HydrationJob {
    func runHydration(id: Int) async {
        let committer = self.committer
        let ticker = Task { [weak self] in
            while !Task.isCancelled {
                guard let interval = await self?.tunables.commitIntervalMs else { return }
                try? await Task.sleep(nanoseconds: UInt64(interval) * 1_000_000)
                if Task.isCancelled { return }
                // A failure here is recorded by the committer and stops the copier.
                try? await committer.commitIfDirty()
            }
        }
        var outcome = await copier.run(id: id)
        ticker.cancel()

        // Whatever happened, commit what was hydrated; then wait for its discards.
        var commitError: HydrationError? = nil
        do {
            // With discard_source, completion is recorded only after the releases (below).
            try await committer.commit(markComplete: outcome == .complete && discarder == nil)
            if outcome == .complete && discarder != nil {
                try await drainReleasesAndComplete()
            }
        } catch {
            commitError = error
        }
        if commitError == nil {
            await drainAndConfirmReleases()
        } else if let discarder {
            await discarder.drain(published: await committer.publishedCount)
        }

        // After the awaits above: how this run was asked to stop, as it is now.
        guard case .hydrating(let run) = state.activity, run.id == id else {
            preconditionFailure("run \(id) ended while the job was \(state.phase.rawValue)")
        }
        // A remote source's release given up (its connection was down at a pause or close): it
        // counts as done in this instance, so the job is reopened to make it again.
        let givenUp = source.info.identity.kind == .remote && progress.snapshot.discardFailures > 0
        let resumption: Resumption = givenUp ? .reopen : .inPlace
        if let commitError {
            if commitError.code == .noSpace {
                logger.error(
                    "commit out of space; job paused, it resumes from its last commit once space is freed",
                    metadata: ["error": "\(commitError)"])
                setState(.paused(.noSpace(commitError), .reopen))
            } else {
                setState(.failed(commitError, resumption))
            }
            return
        }
        // The connection was lost and a reconnection (of a read, or of a release) found another
        // disk at the source's URI: that stops the job, it is no outage to wait out.
        if case .failed(let e) = outcome, e.code == .sourceUnavailable, let u = hooks.unconfirmedError(source) {
            outcome = .failed(u)
        }
        switch outcome {
        case .complete:
            logger.info("hydration complete")
            // Clean after the final fdatasync: leave nothing of the destination in the page cache.
            let dest = self.dest
            _ = try? await io.run { dest.dropCache(offset: 0, length: 0) }
            // The clone still served: the destination stays open; the source goes once no read
            // of it is in flight (every region is hydrated, so no new one starts).
            let keep = clients != nil && !state.isClosed
            var releasing = run
            releasing.releasingDevices = !keep
            state = state.with(activity: .hydrating(releasing))
            await letGo(of: .devices, keepDestination: keep)
            setState(.complete(keep ? .destination : .nothing))
        case .stopped:
            setState(.paused(run.stopReason ?? .requested, resumption))
        case .noSpace(let e):
            logger.error("destination out of space; job paused until space is freed", metadata: ["error": "\(e)"])
            setState(.paused(.noSpace(e), resumption))
        case .failed(let e) where e.code == .sourceUnavailable:
            // A remote source went away: paused until it is back, then resumed (watchSource),
            // unless the user paused meanwhile, or a release had to be given up (then `resume`
            // reopens the job, which makes the metadata's pending releases again).
            source.waitForConnection(false)
            var watch: Task<Void, Never>? = nil
            if !state.isShuttingDown && run.stopReason == nil && !givenUp {
                logger.warning(
                    "source unavailable; job paused until it is reachable again", metadata: ["error": "\(e)"])
                watch = hooks.watch(
                    source, io, logger,
                    { [weak self] in await self?.sourceIsBack() },
                    { [weak self] e in await self?.sourceIsAnotherDisk(e) })
            }
            setState(.paused(.sourceUnavailable(e, watch: watch), resumption))
        case .failed(let e) where e.code == .deviceUnconfirmed:
            // A reconnection found another disk at the source's URI: nothing was read from or
            // released on it; this instance's source stays refused, `resume` reopens the job
            // (which confirms the source again against its metadata).
            logger.error("the source is not the job's disk any more; job stopped", metadata: ["error": "\(e)"])
            source.waitForConnection(false)
            setState(.failed(e, .reopen))
        case .failed(let e):
            logger.error("hydration failed", metadata: ["error": "\(e)"])
            setState(.failed(e, resumption))
        case .halted:
            let failure = await committer.failure ?? HydrationError(.commitFailed, "commit failed")
            if failure.code == .noSpace {
                setState(.paused(.noSpace(failure), .reopen))
            } else {
                setState(.failed(failure, resumption))
            }
        }
    }

    // MARK: the devices

    /// Closes what `hold` has open but the destination when `keepDestination`, once no read of the
    /// source is in flight. The caller has already recorded in the state what stays open.
    func letGo(of hold: CompleteHold, keepDestination: Bool) async {
        guard hold != .nothing else { return }
        await ownership.waitNoPins()
        if hold == .devices { source.close() }
        if !keepDestination { dest.close() }
    }

    /// A closed job lets go of whatever it still has open.
    func releaseDevices() async {
        switch state.activity {
        case .complete(let hold):
            state = state.with(activity: .complete(.nothing))
            await letGo(of: hold, keepDestination: false)
        default:
            await letGo(of: .devices, keepDestination: false)
        }
    }

    /// A complete job keeps nothing open: after the last discards (recorded as done in the
    /// metadata, so a restart never touches the source again) it lets go of its devices, but of
    /// the destination while its clone is served.
    func settleComplete() async {
        await drainAndConfirmReleases()
        guard case .complete(let hold) = state.activity, hold != .nothing else { return }
        let keep = clients != nil && !state.isClosed
        let next: CompleteHold = keep ? .destination : .nothing
        guard next != hold else { return }
        // Recorded before the wait: an export asked for meanwhile finds the destination going.
        state = state.with(activity: .complete(next))
        await letGo(of: hold, keepDestination: keep)
    }

    package func settleCompleteInBackground() {
        settleTask = Task { await self.settleComplete() }
    }

    /// Waits for the discarder to finish every published set, then records that in the metadata.
    /// A failure to record it is harmless (a restart releases those regions again, after
    /// confirming the device) and, if the metadata is failing, already reported by the committer.
    func drainAndConfirmReleases() async {
        guard let discarder else { return }
        await discarder.drainDurably(published: await committer.publishedCount)
        do { try await committer.confirmReleases() } catch {
            logger.warning(
                "could not record finished releases; a restart will release them again", metadata: ["error": "\(error)"]
            )
        }
    }

    /// The end of a complete run with discard_source: every region is committed; wait for the
    /// releases, then record them and completion in one commit. Until that commit the job is not
    /// complete, so a crash in between leaves the releases to the restart.
    func drainReleasesAndComplete() async throws(HydrationError) {
        if let discarder { await discarder.drainDurably(published: await committer.publishedCount) }
        try await committer.confirmReleases(markComplete: true)
    }
}
