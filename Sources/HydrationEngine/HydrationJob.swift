import HydrationStorage
import Logging
import Synchronization

/// One hydration job: a source, a destination, their metadata, and the three actors that move
/// data between them (Copier -> Committer -> Discarder).
///
/// Its state is one `JobState`; every step that awaits reads it again afterwards. Creating and
/// opening a job (device checks, confirmation, placement, a remote source) are the service's
/// (HydrationService), which then makes the job with `init`.
public actor HydrationJob {
    public nonisolated let name: String
    /// Paths and options as recorded (for an opened job, the metadata's options win).
    public nonisolated let configuration: JobConfiguration
    public nonisolated let sourceIdentity: DeviceIdentity
    public nonisolated let destIdentity: DeviceIdentity

    /// The job's source, the engine's alone: only the discarder releases its space (through a
    /// `SourceReleaser`); everything else, in the engine and above it, reads it (`sourceReader`).
    let source: any StorageDevice
    /// The source as the live clone and the service see it: read, never released.
    package nonisolated var sourceReader: SourceReader { SourceReader(source) }
    package let dest: any StorageDevice
    package let store: MetadataStore
    package let io: IOExecutor
    package let logger: Logger
    package let progress: JobProgress
    package let geometry: Geometry
    package let committer: Committer
    package let discarder: Discarder?
    package let copier: Copier
    /// Hydrated, committed and released bits and the claims of every writer (RegionOwnership).
    package nonisolated let ownership: RegionOwnership
    /// What is particular to a remote source (SourceHooks).
    package let hooks: SourceHooks

    package internal(set) var state: JobState
    package internal(set) var tunables: Tunables
    /// The clients of the job's clone (the service's live export), once attached.
    package internal(set) var clients: (any JobClients)?
    /// Commits what clients hydrated every commit interval, even while the copy is paused.
    var clientTicker: Task<Void, Never>?
    var discardTask: Task<Void, Never>?
    /// A complete job opened from its metadata: its last releases, then its devices let go.
    var settleTask: Task<Void, Never>?
    /// Polls a released file source's write lease (`watchLease`).
    var leaseWatch: Task<Void, Never>?
    var stateWaiters: [CheckedContinuation<Void, Never>] = []
    /// Told of every change of phase (the daemon's status watchers); set once, after open.
    private nonisolated let stateObserver = Mutex<(@Sendable () -> Void)?>(nil)
    var runCount = 0

    /// `io` is this job's own (a remote source's): shut down when the job closes.
    let ownsIO: Bool

    /// The job on devices the service has opened and confirmed, and their metadata.
    package init(
        configuration: JobConfiguration, source: any StorageDevice, dest: any StorageDevice,
        store: MetadataStore, io: IOExecutor, logger: Logger, ownsIO: Bool = false, hooks: SourceHooks = .local
    ) {
        self.ownsIO = ownsIO
        self.hooks = hooks
        self.name = configuration.name
        self.configuration = configuration
        self.source = source
        self.dest = dest
        self.store = store
        self.io = io
        var logger = logger
        logger[metadataKey: "job"] = "\(configuration.name)"
        self.logger = logger
        self.sourceIdentity = source.info.identity
        self.destIdentity = dest.info.identity
        let header = store.header
        let geometry = Geometry(
            regionSize: header.regionSize, regionCount: Int(header.regionCount), targetSize: header.targetSize)
        self.geometry = geometry
        let map = store.committedMap
        let committedBytes = geometry.bytes(
            ofRegionCount: map.setCount, includesLast: map.count > 0 && map[map.count - 1])
        let progress = JobProgress(
            hydratedRegions: map.setCount, hydratedBytes: committedBytes, committedRegions: map.setCount)
        self.progress = progress
        self.tunables = configuration.tunables

        var continuation: AsyncStream<CommittedRegions>.Continuation? = nil
        var stream: AsyncStream<CommittedRegions>? = nil
        if header.discardSource {
            let (s, c) = AsyncStream<CommittedRegions>.makeStream()
            stream = s
            continuation = c
        }
        // Released: committed and not listed as pending (the list is exact since version 2;
        // a superset otherwise, which only under-reports).
        var released = RegionMap(count: map.count)
        if header.discardSource {
            released = map
            for r in header.pendingRelease where r.upperBound <= released.count { released.clear(r) }
        }
        let ownership = RegionOwnership(
            hydrated: map, committed: map, released: released, destZeroed: header.destZeroed)
        self.ownership = ownership
        let releasesDone = ReleasesDone()
        let committer = Committer(
            store: store, dest: dest, io: io, progress: progress, geometry: geometry,
            logger: logger, publish: continuation, ownership: ownership, releasesDone: releasesDone)
        self.committer = committer
        let discarder =
            header.discardSource
            ? Discarder(
                source: SourceReleaser(source), io: io, progress: progress, geometry: geometry, logger: logger,
                ownership: ownership, releasesDone: releasesDone)
            : nil
        self.discarder = discarder
        self.copier = Copier(
            source: SourceReader(source), dest: dest, io: io, committer: committer, discarder: discarder,
            progress: progress, geometry: geometry, ownership: ownership, tunables: configuration.tunables,
            logger: logger, verify: configuration.verify)
        self.state = header.complete ? .complete(.devices) : .idle
        if let discarder, let stream {
            self.discardTask = Task { await discarder.run(stream) }
        }
    }

    // MARK: control

    /// This instance cannot resume: it must be opened again from its durable state, as a restart
    /// would (`JobManager.resume` does). E.g. a commit ran out of space: this instance commits
    /// nothing more (its failed sync may have dropped pages without a later sync saying so).
    public var needsReopen: Bool { state.needsReopen }
    /// The phase the job is in (status maps it to the wire's state).
    public var phase: JobPhase { state.phase }
    /// The metadata's job UUID.
    public var jobID: String { store.header.jobID }
    /// The metadata's header as last committed.
    public var metadataHeader: MetadataHeader { store.header }
    public var lastError: HydrationError? { state.error }

    /// Holds the copier at the regions the gate does not admit yet (see `CopierGate`).
    public func setCopierGate(_ gate: (any CopierGate)?) async {
        await copier.setGate(gate)
    }

    /// Starts or resumes hydration. A complete job stays complete.
    public func start() throws(HydrationError) {
        guard !state.isShuttingDown else { throw HydrationError(.invalidState, "job \(name) is closed") }
        switch state {
        case .hydrating, .complete:
            return
        case .paused(let reason, .reopen):
            throw mustReopen(reason.error)
        case .failed(let e, .reopen):
            throw mustReopen(e)
        case .failed(let e, .inPlace):
            if progress.snapshot.metadataMode != .rw {
                throw HydrationError(
                    .invalidState,
                    "job \(name) failed with metadata \(progress.snapshot.metadataMode.rawValue); it cannot be resumed: \(e.message)"
                )
            }
        case .idle, .paused(_, .inPlace):
            break
        case .closing, .closed:
            return
        }
        if discarder != nil && source.info.identity.kind == .regularFile {
            // After a late opener broke the lease: taken again, refused while it is still open.
            try Self.holdLease(source)
            watchLease()
        }
        stopSourceWatch()
        runCount += 1
        let id = runCount
        // The run starts once this call has returned: the state below is set before it looks.
        let task = Task { await self.runHydration(id: id) }
        setState(.hydrating(HydrationRun(id: id, task: task)))
        // A remote source's releases wait for its connection while the job hydrates (RemoteNBDDevice).
        source.waitForConnection(true)
        logger.info("hydration started")
    }

    private func mustReopen(_ e: HydrationError?) -> HydrationError {
        HydrationError(
            .invalidState,
            "job \(name) must be opened again from its last commit to resume (\(e?.message ?? "it ran out of space in a commit"))"
        )
    }

    /// Stops issuing copies, finishes those in flight, commits, and waits for the discards of
    /// what was committed. A job that is not hydrating becomes (or stays) paused.
    public func pause() async {
        await stop(because: .requested)
    }

    /// Stops the run (it ends paused for `reason`), or records `reason` on a job that is not running.
    func stop(because reason: PauseReason) async {
        stopSourceWatch()
        switch state.activity {
        case .hydrating(var run):
            // A late opener's reason wins over a plain pause: it is what the operator must act on.
            switch (run.stopReason, reason) {
            case (nil, _), (.requested?, .sourceOpenedElsewhere): run.stopReason = reason
            default: break
            }
            state = state.with(activity: .hydrating(run))
            // The run and its task as they are now: both are what this call stops and waits for.
            let (id, task) = (run.id, run.task)
            await copier.requestStop(run: id)
            // A remote source's releases waiting for the connection give up (they stay pending).
            source.waitForConnection(false)
            await task.value
        case .idle:
            setState(.paused(reason, .inPlace))
        case .paused(_, let resumption):
            // Paused already: a late opener's error is what it shows from now on.
            if case .sourceOpenedElsewhere = reason { state = state.with(activity: .paused(reason, resumption)) }
        case .failed(_, let resumption):
            if case .sourceOpenedElsewhere(let inUse) = reason {
                state = state.with(activity: .failed(inUse, resumption))
            }
        case .complete, .closing, .closed:
            break
        }
    }

    /// Commits now; returns once everything hydrated so far is durable (and handed to the
    /// discarder). Returns the metadata generation.
    @discardableResult
    public func commit() async throws(HydrationError) -> UInt64 {
        try await committer.commit()
    }

    public func update(_ t: Tunables) async throws(HydrationError) {
        try t.validate(regionSize: geometry.regionSize)
        tunables = t
        await copier.update(t)
        logger.info(
            "tunables changed",
            metadata: [
                "batch_size": "\(t.batchSize)", "threshold": "\(t.threshold)",
                "commit_interval_ms": "\(t.commitIntervalMs)",
            ])
    }

    public var currentTunables: Tunables { tunables }

    /// Waits until the job is no longer hydrating; returns its phase.
    public func waitUntilSettledPhase() async -> JobPhase {
        while case .hydrating = state.activity {
            await withCheckedContinuation { stateWaiters.append($0) }
        }
        return state.phase
    }

    /// Pauses (with a final commit), stops the discarder after it has drained, and closes the
    /// job, letting go of its devices.
    public func close() async {
        guard !state.isShuttingDown else { return }
        // Before the first await: no start() may slip in while the job is closing.
        state = .closing(state)
        // A remote source's calls stuck on a server that stopped answering end now (they would
        // hold the clients' shutdown below for a whole request timeout).
        source.waitForConnection(false)
        // Clients first: no request may land after the final commit below.
        await clients?.shutdown()
        clientTicker?.cancel()
        leaseWatch?.cancel()
        stopSourceWatch()
        await settleTask?.value
        await stop(because: .requested)
        state = .closed(state.activity)
        await committer.finishStream()
        await discardTask?.value
        await releaseDevices()
        if ownsIO { await io.shutdown() }
    }

    func setState(_ s: JobState) {
        let before = state.phase
        state = state.with(activity: s)
        let changed = state.phase != before
        if changed { logger.info("state \(before.rawValue) -> \(state.phase.rawValue)") }
        let w = stateWaiters
        stateWaiters = []
        for c in w { c.resume() }
        if changed { notifyStateChange() }
    }

    func notifyStateChange() { stateObserver.withLock { $0 }?() }

    /// Calls `observer` at every change of phase from now on.
    package nonisolated func observeStateChanges(_ observer: @escaping @Sendable () -> Void) {
        stateObserver.withLock { $0 = observer }
    }

    // MARK: clients of the clone

    /// Attaches the clients of the job's clone (the service's live export): from now on, regions
    /// they hydrate are committed every commit interval even while the copy is paused, and a
    /// complete job keeps its destination open for them until it is closed.
    package func attachClients(_ c: any JobClients) throws(HydrationError) {
        try checkClientsMayAttach()
        clients = c
        let committer = self.committer
        clientTicker = Task { [weak self] in
            while !Task.isCancelled {
                guard let interval = await self?.tunables.commitIntervalMs else { return }
                try? await Task.sleep(nanoseconds: UInt64(interval) * 1_000_000)
                if Task.isCancelled { return }
                try? await committer.commitIfDirty()
            }
        }
    }

    /// Refuses clients once the job is closing, or complete and without its destination.
    package func checkClientsMayAttach() throws(HydrationError) {
        guard !state.isShuttingDown else { throw HydrationError(.invalidState, "job \(name) is closed") }
        let letGo: Bool
        switch state.activity {
        case .complete(.nothing): letGo = true
        case .hydrating(let run): letGo = run.releasingDevices
        default: letGo = false
        }
        guard !letGo else {
            throw HydrationError(
                .invalidState,
                "job \(name) is complete and has let go of its destination; its clone is the destination itself")
        }
    }

    /// Whether the clone is served (clients were attached).
    public var isExported: Bool { clients != nil }

    /// Internal counters, for tests that check the space budget.
    package var budgetOutstanding: UInt64 { progress.budgetOutstanding }
    package var hydratedMapForTesting: RegionMap { get async { await copier.hydratedMap } }
}

/// The clients of a job's clone, as the job sees them: shut down before its final commit.
package protocol JobClients: AnyObject, Sendable {
    /// Refuses new requests and waits for those in flight.
    func shutdown() async
}
