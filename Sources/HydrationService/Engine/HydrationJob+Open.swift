import HydrationEngine
import HydrationStorage
import Logging

#if canImport(Glibc)
    import Glibc
#endif

/// Creating and opening a job: the devices validated, confirmed against the metadata and placed,
/// a remote source's identity, then the engine's job on them.
extension HydrationJob {
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
            ownsIO: ownsIO, hooks: sourceHooks(config))
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
            ownsIO: ownsIO, hooks: sourceHooks(config))
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
                    .invalidParameter, "\(label) must be a local path: only the source may be an NBD URI (got '\(p)')",
                    parameter: label)
            }
            guard p.hasPrefix("/") else {
                throw HydrationError(.invalidParameter, "\(label) path must be absolute: '\(p)'", parameter: label)
            }
        }
        guard Set([config.sourcePath, config.destPath, config.metadataPath]).count == 3 else {
            throw HydrationError(
                .sameDevice, "source, destination and metadata must be three different paths", parameter: "source")
        }
        try config.tunables.validate(regionSize: config.regionSize)
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
                throw HydrationError(
                    .deviceInUse, "\(what) \(path) is in use (mounted, opened exclusively, or locked by another job)",
                    errno: error.errno, path: path, parameter: DeviceRole(label: what)?.parameter)
            case ENOENT:
                throw HydrationError(
                    .notFound, "\(what) \(path) does not exist", errno: error.errno, path: path,
                    parameter: DeviceRole(label: what)?.parameter)
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
                    .invalidParameter, "\(what) \(path): permission denied (\(error.errnoName))", errno: error.errno,
                    path: path, parameter: DeviceRole(label: what)?.parameter)
            default:
                throw HydrationError(
                    .ioError, "\(what): \(error)", errno: error.errno, path: path,
                    parameter: DeviceRole(label: what)?.parameter)
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
                throw HydrationError(
                    .invalidParameter, "\(what) \(path) is neither a regular file nor a block device", path: path,
                    parameter: DeviceRole(label: what)?.parameter)
            }
            throw HydrationError(
                .ioError, "\(what): \(error)", errno: error.errno, path: path,
                parameter: DeviceRole(label: what)?.parameter)
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
            throw HydrationError(
                .notFound, "source \(config.sourcePath) does not exist", path: config.sourcePath, parameter: "source")
        }
        guard srcInfo.size > 0 else {
            throw HydrationError(
                .invalidParameter, "source \(config.sourcePath) is empty", path: config.sourcePath, parameter: "source")
        }
        guard RegionGeometry.regionCount(size: srcInfo.size, regionSize: config.regionSize) <= RegionGeometry.maxRegions
        else {
            throw HydrationError(
                .invalidParameter,
                "region size \(config.regionSize) gives more than 2^31 regions for \(srcInfo.size) bytes; choose a larger one",
                parameter: "region_size")
        }
        let destBefore = try identify(storage, config.destPath, what: "destination")
        if let m = try identify(storage, config.metadataPath, what: "metadata") {
            try checkDistinct(source: srcInfo, dest: destBefore, metadata: m)
            throw HydrationError(
                .metadataExists, "metadata \(config.metadataPath) already exists; open the existing job or remove it",
                path: config.metadataPath, parameter: "metadata")
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
                throw HydrationError(
                    .ioError, "destination: \(error)", errno: error.errno, path: config.destPath, parameter: "dest")
            }
        }
        for d in [source, dest] where config.regionSize % UInt64(max(1, d.info.logicalBlockSize)) != 0 {
            throw HydrationError(
                .invalidParameter,
                "region size \(config.regionSize) is not a multiple of \(d.info.path)'s logical block size \(d.info.logicalBlockSize)",
                parameter: "region_size")
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
            do { try dest.sync() } catch {
                throw HydrationError(
                    .ioError, "destination: \(error)", errno: error.errno, path: config.destPath, parameter: "dest")
            }
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
                throw HydrationError(
                    .notFound, "metadata \(config.metadataPath) does not exist", path: config.metadataPath,
                    parameter: "metadata")
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
                "destination \(config.destPath) has \(dest.info.size) bytes, fewer than the \(h.targetSize) that metadata \(config.metadataPath) was created for",
                path: config.metadataPath, parameter: "dest")
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
}
