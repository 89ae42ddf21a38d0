import ControlProtocol
import Logging
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// One hydration job: a source, a destination, their metadata, and the three actors that move
/// data between them (Copier -> Committer -> Discarder).
///
/// State machine: idle -> hydrating <-> paused; hydrating -> complete | failed; failed -> hydrating
/// (a retry) only while the metadata is still writable.
public actor HydrationJob {
    public nonisolated let name: String
    /// Paths and options as recorded (for an opened job, the metadata's options win).
    public nonisolated let configuration: JobConfiguration
    public nonisolated let sourceIdentity: DeviceIdentity
    public nonisolated let destIdentity: DeviceIdentity

    private let source: any StorageDevice
    private let dest: any StorageDevice
    private let store: MetadataStore
    private let io: IOExecutor
    private let logger: Logger
    private let progress: JobProgress
    private let geometry: Geometry
    let committer: Committer
    private let discarder: Discarder?
    let copier: Copier
    /// Hydrated, committed and released bits and the claims of every writer (RegionOwnership).
    nonisolated let ownership: RegionOwnership
    /// The clone served over NBD, once asked for (`liveExport`).
    private var export: LiveCloneExport?
    private var liveTicker: Task<Void, Never>?

    private var state: JobStatus.State
    private var error: HydrationError?
    private var tunables: Tunables
    private var runTask: Task<Void, Never>?
    private var tickerTask: Task<Void, Never>?
    private var discardTask: Task<Void, Never>?
    private var stateWaiters: [CheckedContinuation<Void, Never>] = []
    /// Told of every state change (the daemon's status watchers); set once, after open.
    private nonisolated let stateSignal = Mutex<StateChangeSignal?>(nil)
    private var closed = false
    private var closing = false
    private var runID = 0

    /// `io` is this job's own (a remote source's, `remoteIO`): shut down when the job closes.
    private let ownsIO: Bool

    private init(
        configuration: JobConfiguration, source: any StorageDevice, dest: any StorageDevice,
        store: MetadataStore, io: IOExecutor, logger: Logger, ownsIO: Bool = false
    ) {
        self.ownsIO = ownsIO
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
        let committer = Committer(
            store: store, dest: dest, io: io, progress: progress, geometry: geometry,
            logger: logger, publish: continuation, ownership: ownership)
        self.committer = committer
        let discarder =
            header.discardSource
            ? Discarder(
                source: source, io: io, progress: progress, geometry: geometry, logger: logger, ownership: ownership)
            : nil
        self.discarder = discarder
        self.copier = Copier(
            source: source, dest: dest, io: io, committer: committer, discarder: discarder,
            progress: progress, geometry: geometry, ownership: ownership, tunables: configuration.tunables,
            logger: logger)
        self.state = header.complete ? .complete : .idle
        if let discarder, let stream {
            self.discardTask = Task { await discarder.run(stream) }
        }
    }

    // MARK: create / open

    /// Creates a new job: validates the devices, creates (or extends) a file destination, and
    /// writes the first metadata generation. Nothing is copied until `start()`.
    public static func create(
        _ config: JobConfiguration, storage: any StorageProvider = PosixStorage(),
        io: IOExecutor, logger: Logger = Logger(label: "hydration")
    ) async throws(HydrationError) -> HydrationJob {
        let opened: (any StorageDevice, any StorageDevice, MetadataStore)
        let (io, ownsIO) = remoteIO(config, shared: io)
        do {
            opened = try await io.run { try prepareNew(config, storage: storage) }
        } catch {
            if ownsIO { await io.shutdown() }
            throw error as? HydrationError ?? HydrationError(.ioError, "\(error)")
        }
        var cfg = config
        cfg.destZeroed = opened.2.header.destZeroed
        let job = HydrationJob(
            configuration: cfg, source: opened.0, dest: opened.1, store: opened.2, io: io, logger: logger,
            ownsIO: ownsIO)
        await job.watchLease()
        logger.info(
            "job created",
            metadata: [
                "job": "\(config.name)", "source": "\(config.sourcePath)", "dest": "\(config.destPath)",
                "regions": "\(opened.2.header.regionCount)",
                "source_io": "\(opened.0.directIO)", "dest_io": "\(opened.1.directIO)",
            ])
        return job
    }

    /// Opens an existing job from its metadata and resumes from its committed state. The source
    /// and destination must be the very devices the metadata was created for (`confirm`). With
    /// discard_source, the regions the metadata lists as pending release are released again
    /// (idempotent), in the background.
    ///
    /// `acceptDevices`: the operator states that the devices now at the paths are the job's own
    /// (kind and size must still match); their identities are recorded in the metadata anew.
    public static func open(
        _ config: JobConfiguration, storage: any StorageProvider = PosixStorage(),
        io: IOExecutor, logger: Logger = Logger(label: "hydration"),
        acceptDevices: Bool = false
    ) async throws(HydrationError) -> HydrationJob {
        let opened: (any StorageDevice, any StorageDevice, MetadataStore, MetadataRecoveryReport)
        let (io, ownsIO) = remoteIO(config, shared: io)
        do {
            opened = try await io.run { try prepareExisting(config, storage: storage, acceptDevices: acceptDevices) }
        } catch {
            if ownsIO { await io.shutdown() }
            throw error as? HydrationError ?? HydrationError(.ioError, "\(error)")
        }
        var cfg = config
        let h = opened.2.header
        cfg.regionSize = h.regionSize
        cfg.discardSource = h.discardSource
        cfg.destZeroed = h.destZeroed
        let job = HydrationJob(
            configuration: cfg, source: opened.0, dest: opened.1, store: opened.2, io: io, logger: logger,
            ownsIO: ownsIO)
        if !h.complete { await job.watchLease() }
        // A complete job never releases again: its source may be anything by now.
        if !h.complete { await job.committer.publishRecovered() }
        // Releasing what a crash left pending can take long: in the background (the daemon's
        // READY=1 does not wait for it), and a complete job lets go of its devices afterwards.
        if h.complete { await job.settleCompleteInBackground() }
        logger.info(
            "job opened",
            metadata: [
                "job": "\(config.name)", "generation": "\(h.generation)",
                "hydrated": "\(h.hydratedCount)/\(h.regionCount)",
                "adopted_regions": "\(opened.3.adoptedRegions)",
                "source_io": "\(opened.0.directIO)", "dest_io": "\(opened.1.directIO)",
            ])
        return job
    }

    static func validateCommon(_ config: JobConfiguration) throws(HydrationError) {
        for (label, p) in [("source", config.sourcePath), ("dest", config.destPath), ("metadata", config.metadataPath)]
        {
            // Only the source may be remote (an NBD URI, `RemoteSource`).
            if label == "source" && RemoteSource.isURI(p) { continue }
            if label != "source" && RemoteSource.isURI(p) {
                throw HydrationError(
                    .invalidParameter, "\(label) must be a local path: only the source may be an NBD URI (got '\(p)')")
            }
            guard p.hasPrefix("/") else {
                throw HydrationError(.invalidParameter, "\(label) path must be absolute: '\(p)'")
            }
        }
        guard Set([config.sourcePath, config.destPath, config.metadataPath]).count == 3 else {
            throw HydrationError(.sameDevice, "source, destination and metadata must be three different paths")
        }
        try config.tunables.validate(regionSize: config.regionSize)
    }

    static func checkDistinct(source: DeviceInfo, dest: DeviceInfo?, metadata: DeviceInfo?) throws(HydrationError) {
        if let dest, dest.identity == source.identity {
            throw HydrationError(
                .sameDevice, "source \(source.path) and destination \(dest.path) are the same \(source.identity)")
        }
        if let metadata {
            if metadata.identity == source.identity {
                throw HydrationError(.sameDevice, "metadata \(metadata.path) is the source \(source.path)")
            }
            if let dest, metadata.identity == dest.identity {
                throw HydrationError(.sameDevice, "metadata \(metadata.path) is the destination \(dest.path)")
            }
        }
    }

    static func ioName(_ d: DirectIO) -> String { d.enabled ? "direct" : "buffered" }

    static func openDevice(
        _ storage: any StorageProvider, _ path: String, _ mode: OpenMode, what: String,
        io: (direct: Bool, why: String) = (false, "not chosen")
    ) throws(HydrationError) -> any StorageDevice {
        do {
            return try storage.open(path, mode: mode, directIO: io.direct, why: io.why)
        } catch {
            switch error.errno {
            case EBUSY, EWOULDBLOCK:
                var e = HydrationError(
                    .deviceInUse, "\(what) \(path) is in use (mounted, opened exclusively, or locked by another job)",
                    errno: error.errno)
                e.path = path
                throw e
            case ENOENT:
                throw HydrationError(.notFound, "\(what) \(path) does not exist", errno: error.errno)
            case EOPNOTSUPP where mode == .source(discard: true) && RemoteSource.isURI(path):
                // A remote export without TRIM: its space could never be released.
                var e = HydrationError(
                    .discardUnsupported,
                    "\(what) \(path) cannot release space: \(error.detail ?? error.errnoName); create the job without discard_source (--discard-source)",
                    errno: error.errno)
                e.path = path
                throw e
            case EACCES, EPERM, EROFS:
                throw HydrationError(
                    .invalidParameter, "\(what) \(path): permission denied (\(error.errnoName))", errno: error.errno)
            default:
                throw HydrationError(.ioError, "\(what): \(error)", errno: error.errno)
            }
        }
    }

    static func identify(_ storage: any StorageProvider, _ path: String, what: String) throws(HydrationError)
        -> DeviceInfo?
    {
        do {
            return try storage.identify(path)
        } catch {
            if error.errno == EINVAL {
                throw HydrationError(.invalidParameter, "\(what) \(path) is neither a regular file nor a block device")
            }
            throw HydrationError(.ioError, "\(what): \(error)", errno: error.errno)
        }
    }

    static func prepareNew(_ config: JobConfiguration, storage: any StorageProvider) throws(HydrationError) -> (
        any StorageDevice, any StorageDevice, MetadataStore
    ) {
        guard JobConfiguration.isValidRegionSize(config.regionSize) else {
            throw JobConfiguration.regionSizeError(config.regionSize)
        }
        try validateCommon(config)
        guard let srcInfo = try identify(storage, config.sourcePath, what: "source") else {
            throw HydrationError(.notFound, "source \(config.sourcePath) does not exist")
        }
        guard srcInfo.size > 0 else { throw HydrationError(.invalidParameter, "source \(config.sourcePath) is empty") }
        guard RegionGeometry.regionCount(size: srcInfo.size, regionSize: config.regionSize) <= RegionGeometry.maxRegions
        else {
            throw HydrationError(
                .invalidParameter,
                "region size \(config.regionSize) gives more than 2^31 regions for \(srcInfo.size) bytes; choose a larger one"
            )
        }
        let destBefore = try identify(storage, config.destPath, what: "destination")
        if let m = try identify(storage, config.metadataPath, what: "metadata") {
            try checkDistinct(source: srcInfo, dest: destBefore, metadata: m)
            throw HydrationError(
                .metadataExists, "metadata \(config.metadataPath) already exists; open the existing job or remove it")
        }
        try checkDistinct(source: srcInfo, dest: destBefore, metadata: nil)
        try checkPlacement(
            source: config.sourcePath, dest: config.destPath, metadataPath: config.metadataPath, storage: storage)
        if let d = destBefore, !(d.identity.kind == .regularFile && d.size == 0), d.size < srcInfo.size {
            var e = HydrationError(
                .sizeMismatch, "destination \(d.path) has \(d.size) bytes, smaller than the source's \(srcInfo.size)")
            e.sourceBytes = srcInfo.size; e.destBytes = d.size
            throw e
        }
        let io = config.ioMode.choice(
            sourceSize: srcInfo.size, sourceAllocated: storage.allocatedBytes(of: config.sourcePath))
        let source = try openDevice(
            storage, config.sourcePath, .source(discard: config.discardSource), what: "source",
            io: sourceIO(io, discard: config.discardSource, kind: srcInfo.identity.kind))
        let dest = try openDevice(
            storage, config.destPath, .destination(createSize: srcInfo.size), what: "destination", io: io)
        // A destination file this call created is removed again if the job is not created.
        var created = false
        defer {
            if destBefore == nil && !created {
                dest.close()
                storage.removeCreatedFile(config.destPath)
            }
        }
        try checkDistinct(source: source.info, dest: dest.info, metadata: nil)
        if destBefore == nil {
            // The new file's directory entry must be durable before any commit can record data in
            // it (and, with discard_source, release the source behind it).
            do { try storage.syncDirectory(containing: config.destPath) } catch {
                throw HydrationError(.ioError, "destination: \(error)", errno: error.errno)
            }
        }
        for d in [source, dest] where config.regionSize % UInt64(max(1, d.info.logicalBlockSize)) != 0 {
            throw HydrationError(
                .invalidParameter,
                "region size \(config.regionSize) is not a multiple of \(d.info.path)'s logical block size \(d.info.logicalBlockSize)"
            )
        }
        guard dest.info.size >= source.info.size else {
            var e = HydrationError(
                .sizeMismatch,
                "destination \(dest.info.path) has \(dest.info.size) bytes, smaller than the source's \(source.info.size)"
            )
            e.sourceBytes = source.info.size; e.destBytes = dest.info.size
            throw e
        }
        // A destination file this job created (or extended from empty) reads as zeros wherever
        // it has not written, for the whole life of the job (the source does not change, so a
        // region that is a hole or all zeros now never had data written for it): zeroing its
        // hole and zero regions again would only take the inode lock away from the writers.
        let freshDest = destBefore == nil || (destBefore!.identity.kind == .regularFile && destBefore!.size == 0)
        if freshDest {
            // The size ftruncate gave a created or extended file must be durable before metadata
            // recording that size exists (fdatasync flushes a size change, fdatasync(2)):
            // otherwise a crash before the first commit leaves a job that never reopens.
            do { try dest.sync() } catch { throw HydrationError(.ioError, "destination: \(error)", errno: error.errno) }
        }
        if config.discardSource { try holdLease(source) }
        let record = try sourceRecord(source, mayRead: { _ in true })
        try armRemoteIdentity(source, recorded: record, mayRead: { _ in true })
        let options = MetadataCreateOptions(
            regionSize: config.regionSize, source: record, dest: DeviceRecord(dest.info),
            discardSource: config.discardSource, destZeroed: config.destZeroed || freshDest)
        do {
            let store = try MetadataStore.create(
                path: config.metadataPath, options: options, storage: storage, nowMs: wallClockMillis())
            created = true
            return (source, dest, store)
        } catch {
            throw HydrationError.from(error)
        }
    }

    static func prepareExisting(
        _ config: JobConfiguration, storage: any StorageProvider,
        acceptDevices: Bool = false
    ) throws(HydrationError) -> (any StorageDevice, any StorageDevice, MetadataStore, MetadataRecoveryReport) {
        try validateCommon(config)
        let opened: (MetadataStore, MetadataRecoveryReport)
        do {
            opened = try MetadataStore.open(path: config.metadataPath, storage: storage)
        } catch {
            if case .io(let s) = error.reason, s.errno == ENOENT {
                throw HydrationError(.notFound, "metadata \(config.metadataPath) does not exist")
            }
            throw HydrationError.from(error)
        }
        let h = opened.0.header
        // Compare before opening, so a wrong device gets the precise error, not "in use".
        let foundSource = try identify(storage, config.sourcePath, what: "source")
        let foundDest = try identify(storage, config.destPath, what: "destination")
        // Swapped (loop devices attached in the other order): refused even when the operator
        // accepts the devices, since releasing the "source" would then punch the clone.
        for (found, label, other, otherLabel) in [
            (foundSource, "source", h.dest, "destination"), (foundDest, "destination", h.source, "source"),
        ] {
            if let found, !found.stableID.isEmpty, other.hasStableID(of: found) {
                var e = HydrationError(
                    .deviceUnconfirmed,
                    "\(label) \(found.path) is the job's \(otherLabel) (\(found.stableID)): source and destination are swapped; attach them at their own paths"
                )
                e.path = found.path
                throw e
            }
        }
        // A remote source: export name, size and description here; its sampled blocks once open.
        let mayRead = unreleased(opened.0.committedMap, regionSize: h.regionSize, discardSource: h.discardSource)
        if let s = foundSource {
            try confirm(
                confirmedRemote(s, recorded: h.source, device: nil, mayRead: mayRead), is: h.source, what: "source",
                metadataPath: config.metadataPath, exactSize: true, accept: acceptDevices)
        }
        if let d = foundDest {
            try confirm(
                d, is: h.dest, what: "destination", metadataPath: config.metadataPath, exactSize: false,
                accept: acceptDevices)
        }
        try checkPlacement(
            source: config.sourcePath, dest: config.destPath, metadataPath: config.metadataPath, storage: storage)
        let io = config.ioMode.choice(
            sourceSize: h.targetSize, sourceAllocated: storage.allocatedBytes(of: config.sourcePath))
        let source = try openDevice(
            storage, config.sourcePath, .source(discard: h.discardSource), what: "source",
            io: sourceIO(io, discard: h.discardSource, kind: foundSource?.identity.kind))
        let dest = try openDevice(storage, config.destPath, .destination(createSize: nil), what: "destination", io: io)
        // Again on the open descriptors: the path may have been switched in between.
        try confirm(
            confirmedRemote(source.info, recorded: h.source, device: source, mayRead: mayRead), is: h.source,
            what: "source",
            metadataPath: config.metadataPath, exactSize: true, accept: acceptDevices)
        try confirm(
            dest.info, is: h.dest, what: "destination", metadataPath: config.metadataPath, exactSize: false,
            accept: acceptDevices)
        if dest.info.size < h.targetSize {
            throw HydrationError(
                .metadataMismatch,
                "destination \(config.destPath) has \(dest.info.size) bytes, fewer than the \(h.targetSize) that metadata \(config.metadataPath) was created for"
            )
        }
        try checkDistinct(source: source.info, dest: dest.info, metadata: nil)
        var recordedSource = h.source
        if acceptDevices && (DeviceRecord(source.info) != h.source || DeviceRecord(dest.info) != h.dest) {
            let sourceRecord = try sourceRecord(source, mayRead: mayRead)
            do {
                try opened.0.recordDevices(
                    source: sourceRecord, dest: DeviceRecord(dest.info), nowMs: wallClockMillis())
            } catch {
                throw HydrationError.from(error)
            }
            recordedSource = sourceRecord
        }
        // From here on, every reconnection must find this very disk again.
        try armRemoteIdentity(source, recorded: recordedSource, mayRead: mayRead)
        if h.discardSource && !h.complete { try holdLease(source) }
        return (source, dest, opened.0, opened.1)
    }

    /// A file source released as it is copied is read buffered: its write lease (`holdLease`)
    /// would be broken by the second, O_DIRECT, open of the file that direct I/O needs.
    static func sourceIO(_ io: (direct: Bool, why: String), discard: Bool, kind: DeviceKind?) -> (
        direct: Bool, why: String
    ) {
        guard discard, kind == .regularFile, io.direct else { return io }
        return (
            false,
            "\(io.why); but a file source released as it is copied holds a write lease, which a second (O_DIRECT) open would break"
        )
    }

    /// Takes the write lease of a file source released as it is copied, for the job's life: a
    /// process that opens the source later (a late opener, whose reads of released regions
    /// would return zeros) breaks it, and the job stops releasing and pauses (`watchLease`).
    static func holdLease(_ source: any StorageDevice) throws(HydrationError) {
        // A filesystem without leases (EINVAL), or another owner's file without CAP_LEASE
        // (EACCES): the job runs without one, as before leases were used (a late opener is not
        // noticed; docs/reliability.md).
        do {
            try source.holdWriteLease()
        } catch  where error.errno == EAGAIN {
            var e = HydrationError(
                .deviceInUse,
                "source \(source.info.path) is open elsewhere (\(error.detail ?? error.errnoName)); a source whose space is released must be open nowhere else",
                errno: error.errno)
            e.path = source.info.path
            throw e
        } catch {
            return
        }
    }

    /// Is `found` (what the path names now) the device the metadata was created for? Device
    /// numbers and /dev names are reused and renumbered (another disk of the same size can appear
    /// as /dev/sdb after a reboot, a loop number is reused at once): the stable identity decides.
    /// Without one (version 1 metadata, or a device that has none), a regular file is recognised
    /// by filesystem and inode as before, and a block device cannot be confirmed: the job stays
    /// stopped rather than write to or release a device that may be another one.
    static func confirm(
        _ found: DeviceInfo, is recorded: DeviceRecord, what: String, metadataPath: String,
        exactSize: Bool, accept: Bool = false
    ) throws(HydrationError) {
        let kindChanged = found.identity.kind != recorded.identity.kind
        let sizeChanged = exactSize ? found.size != recorded.size : found.size < recorded.size
        if kindChanged || sizeChanged {
            throw HydrationError(
                .metadataMismatch,
                "\(what) \(found.path) (\(found.identity), \(found.size) bytes) is not the device metadata \(metadataPath) was created for (\(recorded.path): \(recorded.identity), \(recorded.size) bytes)"
            )
        }
        // The operator has vouched for the device: kind and size were the checks left.
        if accept { return }
        if !recorded.stableID.isEmpty {
            guard recorded.hasStableID(of: found) else {
                var e = HydrationError(
                    .deviceUnconfirmed,
                    "\(what) \(found.path) is not the device the job was created for: it was \(recorded.stableID), it is now \(found.stableID.isEmpty ? "a device without a stable identity" : found.stableID). Nothing is written or released; put the right device at \(found.path) and resume, or remove the job"
                )
                e.path = found.path
                throw e
            }
            return
        }
        switch recorded.identity.kind {
        case .regularFile where found.identity == recorded.identity:
            return
        case .regularFile:
            throw HydrationError(
                .metadataMismatch,
                "\(what) \(found.path) (\(found.identity)) is not the file metadata \(metadataPath) was created for (\(recorded.path): \(recorded.identity))"
            )
        case .blockDevice, .remote:
            var e = HydrationError(
                .deviceUnconfirmed,
                "\(what) \(found.path) cannot be confirmed to be the device the job was created for (its metadata records no stable identity, and device numbers are reused). Nothing is written or released; check the device and re-create the job"
            )
            e.path = found.path
            throw e
        }
    }

    // MARK: control

    public var currentState: JobStatus.State { state }
    /// A commit ran out of space: this instance commits nothing more (its failed sync may have
    /// dropped pages without a later sync saying so). Resuming means opening the job again from its
    /// durable state, as a restart would (`JobManager.resume` does).
    public private(set) var needsReopen = false
    /// The metadata's job UUID.
    public var jobID: String { store.header.jobID }
    /// The metadata's header as last committed.
    public var metadataHeader: MetadataHeader { store.header }
    public var lastError: HydrationError? { error }

    /// Starts or resumes hydration. A complete job stays complete.
    /// Holds the copier at the regions the gate does not admit yet (see `CopierGate`).
    public func setCopierGate(_ gate: (any CopierGate)?) async {
        await copier.setGate(gate)
    }

    public func start() throws(HydrationError) {
        guard !closed && !closing else { throw HydrationError(.invalidState, "job \(name) is closed") }
        switch state {
        case .hydrating, .complete:
            return
        case .paused where needsReopen, .failed where needsReopen:
            throw HydrationError(
                .invalidState,
                "job \(name) must be opened again from its last commit to resume (\(error?.message ?? "it ran out of space in a commit"))"
            )
        case .failed:
            if progress.snapshot.metadataMode != .rw {
                throw HydrationError(
                    .invalidState,
                    "job \(name) failed with metadata \(progress.snapshot.metadataMode.rawValue); it cannot be resumed: \(error?.message ?? "")"
                )
            }
        case .idle, .paused:
            break
        }
        if discarder != nil && source.info.identity.kind == .regularFile {
            // After a late opener broke the lease: taken again, refused while it is still open.
            try Self.holdLease(source)
            watchLease()
        }
        error = nil
        pauseRequested = false
        stopSourceWatch()
        setState(.hydrating)
        // A remote source's releases wait for its connection while the job hydrates (RemoteNBDDevice).
        source.waitForConnection(true)
        logger.info("hydration started")
        runID += 1
        let id = runID
        runTask = Task { await self.runHydration(id: id) }
    }

    /// Stops issuing copies, finishes those in flight, commits, and waits for the discards of
    /// what was committed. A job that is not hydrating becomes (or stays) paused.
    public func pause() async {
        stopSourceWatch()
        switch state {
        case .hydrating:
            pauseRequested = true
            await copier.requestStop(run: runID)
            // A remote source's releases waiting for the connection give up (they stay pending).
            source.waitForConnection(false)
            await runTask?.value
        case .idle:
            setState(.paused)
        default:
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

    /// Waits until the job is no longer hydrating; returns its state.
    public func waitUntilSettled() async -> JobStatus.State {
        while state == .hydrating {
            await withCheckedContinuation { stateWaiters.append($0) }
        }
        return state
    }

    /// Pauses (with a final commit), stops the discarder after it has drained, and closes the
    /// job. The devices are released when the last reference goes.
    public func close() async {
        guard !closed && !closing else { return }
        // Before the first await: no start() may slip in while the job is closing.
        closing = true
        // A remote source's calls stuck on a server that stopped answering end now (they would
        // hold the clients' shutdown below for a whole request timeout).
        source.waitForConnection(false)
        // Clients first: no request may land after the final commit below.
        await export?.shutdown()
        liveTicker?.cancel()
        leaseWatch?.cancel()
        stopSourceWatch()
        await settleTask?.value
        await pause()
        closed = true
        await committer.finishStream()
        await discardTask?.value
        await releaseDevices()
        if ownsIO { await io.shutdown() }
    }

    /// Nothing is in flight any more: release the source and destination (their locks, and
    /// O_EXCL on block devices) now, so a complete destination can be mounted or used at once.
    private func releaseDevices() async {
        guard !devicesReleased else { return }
        if let export, !closed {
            // The clone is still served: the destination stays open; the source goes once no
            // read of it is in flight (every region is hydrated, so no new one starts).
            _ = export
            guard !sourceReleased else { return }
            sourceReleased = true
            await ownership.waitNoPins()
            source.close()
            return
        }
        devicesReleased = true
        await ownership.waitNoPins()
        if !sourceReleased { source.close() }
        sourceReleased = true
        dest.close()
    }
    private var sourceReleased = false
    private var devicesReleased = false

    /// A complete job keeps nothing open: after the last discards (recorded as done in the
    /// metadata, so a restart never touches the source again) it lets go of its devices.
    private func settleComplete() async {
        await drainAndConfirmReleases()
        await releaseDevices()
    }

    private func settleCompleteInBackground() {
        settleTask = Task { await self.settleComplete() }
    }
    private var settleTask: Task<Void, Never>?

    /// Waits for the discarder to finish every published set, then records that in the metadata.
    /// A failure to record it is harmless (a restart releases those regions again, after
    /// confirming the device) and, if the metadata is failing, already reported by the committer.
    private func drainAndConfirmReleases() async {
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
    private func drainReleasesAndComplete() async throws(HydrationError) {
        if let discarder { await discarder.drainDurably(published: await committer.publishedCount) }
        try await committer.confirmReleases(markComplete: true)
    }

    // MARK: live clone

    /// The job's clone as an NBD export named after the job (the same object on every call), with
    /// dm-clone's semantics (`LiveCloneExport`). From the first call on, regions hydrated by
    /// clients are committed every commit interval even while the copy is paused, and a complete
    /// job keeps its destination open for the export until it is closed.
    /// `hydrateOnRead`: a read the source serves also hydrates the regions it read, in the background.
    /// Another export of this job that reads its source through `source` (tests: a source that
    /// stops answering). Not registered as the job's export.
    func detachedExport(readingSourceThrough source: any StorageDevice, io: IOExecutor, sourceIO: IOExecutor)
        -> LiveCloneExport
    {
        LiveCloneExport(
            name: name, geometry: geometry, source: source, dest: dest, io: io, ownership: ownership,
            committer: committer, progress: progress, logger: logger, sourceIO: sourceIO)
    }

    /// The job's own source device (tests wrap it).
    var sourceDevice: any StorageDevice { source }

    public func liveExport(hydrateOnRead: Bool = false) throws(HydrationError) -> LiveCloneExport {
        if let export { return export }
        guard !closed && !closing else { throw HydrationError(.invalidState, "job \(name) is closed") }
        guard !devicesReleased else {
            throw HydrationError(
                .invalidState,
                "job \(name) is complete and has let go of its destination; its clone is the destination itself")
        }
        let e = LiveCloneExport(
            name: name, geometry: geometry, source: source, dest: dest,
            io: IOExecutor(threads: LiveCloneExport.threadsPerExport),
            ownership: ownership, committer: committer, progress: progress, logger: logger,
            hydrateOnRead: hydrateOnRead, ownsIO: true,
            sourceIO: IOExecutor(threads: LiveCloneExport.threadsPerExport))
        export = e
        let committer = self.committer
        liveTicker = Task { [weak self] in
            while !Task.isCancelled {
                guard let interval = await self?.tunables.commitIntervalMs else { return }
                try? await Task.sleep(nanoseconds: UInt64(interval) * 1_000_000)
                if Task.isCancelled { return }
                try? await committer.commitIfDirty()
            }
        }
        return e
    }

    /// Whether the clone is served (`liveExport` was called).
    public var isExported: Bool { export != nil }

    // MARK: a late opener of a released file source

    private var leaseWatch: Task<Void, Never>?

    /// Polls the source's write lease (`holdLease`) four times a second while the job is open.
    /// A break stops the releases at once (`StorageDevice.release` checks the lease under the
    /// same lock as its punch); this notices it to let the opener through and pause the job.
    private func watchLease() {
        guard discarder != nil, source.info.identity.kind == .regularFile, leaseWatch == nil else { return }
        let source = self.source, io = self.io
        leaseWatch = Task { [weak self] in
            while !Task.isCancelled {
                try? await Task.sleep(nanoseconds: 250_000_000)
                if Task.isCancelled { return }
                // On an I/O thread: the check waits for a punch in flight (the lease's lock).
                guard let broken = try? await io.run({ source.leaseBroken }) else { return }
                if broken {
                    await self?.sourceOpenedElsewhere()
                    return
                }
            }
        }
    }

    /// Another process opened the source: no release is made from now on; the lease is given up
    /// (the opener, blocked in open() until then, proceeds); the job pauses with DeviceInUse
    /// naming the opener, and resumes when the operator says so (`start` takes the lease again).
    private func sourceOpenedElsewhere() async {
        leaseWatch = nil
        guard !closed && !closing else { return }
        let source = self.source, path = configuration.sourcePath
        logger.warning(
            "another process opened the source: releases stopped; the job pauses", metadata: ["source": "\(path)"])
        _ = try? await io.run { source.giveUpLease() }
        func inUse(_ who: String) -> HydrationError {
            var e = HydrationError(
                .deviceInUse,
                "source \(path) was opened by \(who) while the job was releasing it: releases stopped and the job paused (regions released before the open read as zeros there). Resume the job once that process is done with the source"
            )
            e.path = path
            return e
        }
        error = inUse("another process")
        await pause()
        // Its open completes once the lease is given up: name it (this process has the file open too).
        // The opener's open completes when the kernel next runs it: on a loaded machine that can
        // take seconds. Asked again every 100 ms for up to 10 s, sleeping off the I/O threads.
        var holders: [String] = []
        for _ in 0..<100 {
            holders =
                (try? await io.run { () -> [String] in
                    ((try? PosixStorage().usage(of: path))??.holders ?? []).filter { !$0.hasPrefix("this process") }
                }) ?? []
            if !holders.isEmpty || closed || closing { break }
            try? await Task.sleep(nanoseconds: 100_000_000)
        }
        // Unless the operator resumed it meanwhile.
        guard state == .paused, error?.code == .deviceInUse else { return }
        error = inUse(holders.isEmpty ? "another process (gone again)" : holders.joined(separator: ", "))
        if state != .paused { setState(.paused) } else { stateSignal.withLock { $0 }?.signal() }
    }

    // MARK: a remote source that went away

    /// Probes a remote source that went away until it answers (`watchSource`); nil otherwise.
    private var sourceWatch: Task<Void, Never>?
    /// The user paused this run: a source outage that ends it does not resume it by itself.
    private var pauseRequested = false

    private func stopSourceWatch() {
        sourceWatch?.cancel()
        sourceWatch = nil
    }

    /// The watcher found another disk at the source's URI: the job stops (`DeviceUnconfirmed`)
    /// as a reopen would, unless something else happened meanwhile.
    private func sourceIsAnotherDisk(_ e: StorageError) {
        guard state == .paused, error?.code == .sourceUnavailable, !closing, !closed else { return }
        sourceWatch = nil
        var err = HydrationError(
            .deviceUnconfirmed,
            "source \(configuration.sourcePath): \(e.detail ?? "\(e)"); put the job's own export back and resume, or remove the job",
            errno: e.errno)
        err.path = configuration.sourcePath
        logger.error("the source is not the job's disk any more; job stopped", metadata: ["error": "\(err)"])
        error = err
        needsReopen = true
        setState(.failed)
    }

    /// The watcher reached the source again: resume, unless something else happened meanwhile.
    private func sourceIsBack() {
        guard state == .paused, error?.code == .sourceUnavailable, !closing, !closed else { return }
        sourceWatch = nil
        logger.info("source reachable again; resuming")
        do { try start() } catch {
            logger.error("could not resume after the source came back", metadata: ["error": "\(error)"])
        }
    }

    // MARK: the run

    private func setState(_ s: JobStatus.State) {
        let changed = s != state
        if changed { logger.info("state \(state.rawValue) -> \(s.rawValue)") }
        state = s
        let w = stateWaiters
        stateWaiters = []
        for c in w { c.resume() }
        if changed { stateSignal.withLock { $0 }?.signal() }
    }

    /// Bumps `signal` at every change of state from now on.
    public nonisolated func reportStateChanges(to signal: StateChangeSignal) {
        stateSignal.withLock { $0 = signal }
    }

    private func runHydration(id: Int) async {
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
        tickerTask = ticker
        var outcome = await copier.run(id: id)
        ticker.cancel()
        tickerTask = nil

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

        // A remote source's release given up (its connection was down at a pause or close): it
        // counts as done in this instance, so the job is reopened to make it again.
        if source.info.identity.kind == .remote && progress.snapshot.discardFailures > 0 { needsReopen = true }
        if let commitError {
            self.error = commitError
            if commitError.code == .noSpace {
                logger.error(
                    "commit out of space; job paused, it resumes from its last commit once space is freed",
                    metadata: ["error": "\(commitError)"])
                needsReopen = true
                setState(.paused)
            } else {
                setState(.failed)
            }
            return
        }
        // The connection was lost and a reconnection (of a read, or of a release) found another
        // disk at the source's URI: that stops the job, it is no outage to wait out.
        if case .failed(let e) = outcome, e.code == .sourceUnavailable, let u = Self.unconfirmedSourceError(source) {
            outcome = .failed(u)
        }
        switch outcome {
        case .complete:
            logger.info("hydration complete")
            // Clean after the final fdatasync: leave nothing of the destination in the page cache.
            let dest = self.dest
            _ = try? await io.run { dest.dropCache(offset: 0, length: 0) }
            await releaseDevices()
            setState(.complete)
        case .stopped:
            setState(.paused)
        case .noSpace(let e):
            logger.error("destination out of space; job paused until space is freed", metadata: ["error": "\(e)"])
            self.error = e
            setState(.paused)
        case .failed(let e) where e.code == .sourceUnavailable:
            // A remote source went away: paused until it is back, then resumed (RemoteSourceJob.swift),
            // unless the user paused meanwhile, or a release had to be given up (then `resume`
            // reopens the job, which makes the metadata's pending releases again).
            source.waitForConnection(false)
            self.error = e
            setState(.paused)
            if !closing && !pauseRequested && !needsReopen {
                logger.warning(
                    "source unavailable; job paused until it is reachable again", metadata: ["error": "\(e)"])
                sourceWatch = Self.watchSource(
                    source, io: io, logger: logger,
                    back: { [weak self] in await self?.sourceIsBack() },
                    unconfirmed: { [weak self] e in await self?.sourceIsAnotherDisk(e) })
            }
        case .failed(let e) where e.code == .deviceUnconfirmed:
            // A reconnection found another disk at the source's URI: nothing was read from or
            // released on it; this instance's source stays refused, `resume` reopens the job
            // (which confirms the source again against its metadata).
            logger.error("the source is not the job's disk any more; job stopped", metadata: ["error": "\(e)"])
            source.waitForConnection(false)
            self.error = e
            needsReopen = true
            setState(.failed)
        case .failed(let e):
            logger.error("hydration failed", metadata: ["error": "\(e)"])
            self.error = e
            setState(.failed)
        case .halted:
            let failure = await committer.failure ?? HydrationError(.commitFailed, "commit failed")
            self.error = failure
            if failure.code == .noSpace {
                needsReopen = true
                setState(.paused)
            } else {
                setState(.failed)
            }
        }
    }

    // MARK: status

    public func status() -> JobStatus {
        // A remote source whose connection is down: the job is held until it is back.
        let sourceWait = state == .hydrating || error?.code == .sourceUnavailable ? source.availability : nil
        let state = sourceWait == nil ? self.state : .paused
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
                io: RemoteSource.isURI(configuration.sourcePath) ? nil : Self.ioName(source.directIO),
                ioReason: RemoteSource.isURI(configuration.sourcePath) ? nil : source.directIO.reason),
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
            metadata: .init(path: store.path, mode: c.metadataMode),
            error: sourceWait.map { Self.sourceUnavailableInfo($0, path: configuration.sourcePath) }
                ?? error.map {
                    JobStatus.ErrorInfo(code: $0.code.rawValue, message: $0.message, errno: $0.errno, region: $0.region)
                },
            // The URI and clients are the daemon's to fill in (JobManager.status).
            export: export.map { _ in
                JobStatus.Export(
                    uri: "", clients: 0,
                    io: .init(
                        readBytes: c.liveReadBytes, writtenBytes: c.liveWrittenBytes,
                        trimmedBytes: c.liveTrimmedBytes, hydratedRegions: UInt64(c.liveHydratedRegions)))
            })
    }

    /// Internal counters, for tests that check the space budget.
    var budgetOutstanding: UInt64 { progress.budgetOutstanding }
    var hydratedMapForTesting: RegionMap { get async { await copier.hydratedMap } }
}
