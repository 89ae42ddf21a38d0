import ControlProtocol
import HydrationEngine
import HydrationStorage

/// The job as the control protocol shows it: its wire status and state, made from the engine's.
extension HydrationJob {
    /// The job's state on the wire.
    public var currentState: JobStatus.State { Self.wireState(phase) }

    static func wireState(_ p: JobPhase) -> JobStatus.State {
        switch p {
        case .idle: return .idle
        case .hydrating: return .hydrating
        case .paused: return .paused
        case .complete: return .complete
        case .failed: return .failed
        }
    }

    /// Waits until the job is no longer hydrating; returns its state.
    public func waitUntilSettled() async -> JobStatus.State {
        Self.wireState(await waitUntilSettledPhase())
    }

    /// Bumps `signal` at every change of state from now on.
    public nonisolated func reportStateChanges(to signal: StateChangeSignal) {
        observeStateChanges { signal.signal() }
    }

    public func status() -> JobStatus {
        let error = state.error
        // A remote source whose connection is down: the job is held until it is back.
        let sourceWait =
            state.phase == .hydrating || error?.code == .sourceUnavailable ? sourceReader.availability : nil
        let state = sourceWait == nil ? currentState : .paused
        let c = progress.snapshot
        let throughput = state == .hydrating ? progress.throughput() : 0
        let total = geometry.targetSize
        let remaining = total > c.hydratedBytes ? total - c.hydratedBytes : 0
        let eta: Double? = state == .complete ? 0 : (throughput > 0 ? Double(remaining) / throughput : nil)
        let discardOn = discarder != nil
        return JobStatus(
            name: name, state: state,
            source: .init(
                path: configuration.sourcePath, sizeBytes: geometry.targetSize,
                io: RemoteSource.isURI(configuration.sourcePath) ? nil : Self.ioName(sourceReader.directIO),
                ioReason: RemoteSource.isURI(configuration.sourcePath) ? nil : sourceReader.directIO.reason),
            dest: .init(path: configuration.destPath, io: Self.ioName(dest.directIO), ioReason: dest.directIO.reason),
            regionSize: geometry.regionSize,
            regions: .init(
                total: UInt64(geometry.regionCount), hydrated: UInt64(c.hydratedRegions),
                hydrating: UInt64(c.hydratingRegions)),
            bytes: .init(
                total: total, hydrated: c.hydratedBytes, committed: c.committedBytes,
                skippedZero: c.skippedZeroBytes, discarded: c.discardedBytes),
            throughputBytesPerSecond: throughput, etaSeconds: eta,
            commits: .init(count: c.commits, lastUnixMs: c.lastCommitUnixMs, lastDurationMs: c.lastCommitDurationMs),
            discard: .init(enabled: discardOn, pendingBytes: c.discardPendingBytes, failed: c.discardFailures),
            spaceBudgetBytes: discardOn ? tunables.spaceBudgetBytes : nil,
            settings: .init(
                threshold: tunables.threshold, batchSize: tunables.batchSize,
                rateLimitBytesPerSecond: tunables.rateLimitBytesPerSecond, commitIntervalMs: tunables.commitIntervalMs),
            metadata: .init(
                path: store.path, mode: JobStatus.Metadata.Mode(rawValue: c.metadataMode.rawValue) ?? .fail),
            error: sourceWait.map { Self.sourceUnavailableInfo($0, path: configuration.sourcePath) }
                ?? error.map {
                    JobStatus.ErrorInfo(
                        code: $0.code.rawValue, message: $0.message, errno: $0.errno, region: $0.region,
                        offset: $0.mismatch?.offset, expectedDigest: $0.mismatch?.expectedDigest,
                        foundDigest: $0.mismatch?.foundDigest)
                },
            // The URI and clients are the daemon's to fill in (JobManager.status).
            export: clients.map { _ in
                JobStatus.Export(
                    uri: "", clients: 0,
                    io: .init(
                        readBytes: c.liveReadBytes, writtenBytes: c.liveWrittenBytes,
                        trimmedBytes: c.liveTrimmedBytes, hydratedRegions: UInt64(c.liveHydratedRegions)))
            },
            verify: .init(
                enabled: configuration.verify, verifiedBytes: c.verifiedBytes, mismatches: c.verifyMismatches,
                readBack: c.readBackPath?.rawValue))
    }

}
