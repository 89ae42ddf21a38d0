import HydrationStorage
import Logging

#if canImport(Glibc)
    import Glibc
#endif

/// What the engine needs to know of a remote source, given by the service that opened it (the
/// engine knows no NBD): another disk found at a reconnection, and a watcher of an outage.
package struct SourceHooks: Sendable {
    /// `DeviceUnconfirmed` when a reconnection of the source found another disk (nil otherwise).
    package var unconfirmedError: @Sendable (any StorageDevice) -> HydrationError?
    /// Probes a source whose connection is down until it answers, then calls `back` (or
    /// `unconfirmed`, if another disk answers); cancelled by a pause, a start or close.
    package var watch:
        @Sendable (
            _ source: any StorageDevice, _ io: IOExecutor, _ logger: Logger,
            _ back: @escaping @Sendable () async -> Void,
            _ unconfirmed: @escaping @Sendable (StorageError) async -> Void
        ) -> Task<Void, Never>

    package init(
        unconfirmedError: @escaping @Sendable (any StorageDevice) -> HydrationError?,
        watch:
            @escaping @Sendable (
                any StorageDevice, IOExecutor, Logger, @escaping @Sendable () async -> Void,
                @escaping @Sendable (StorageError) async -> Void
            ) -> Task<Void, Never>
    ) {
        self.unconfirmedError = unconfirmedError
        self.watch = watch
    }

    /// A local source: its connection never goes down.
    package static let local = SourceHooks(unconfirmedError: { _ in nil }, watch: { _, _, _, _, _ in Task {} })
}

extension HydrationJob {
    /// What a storage error of the source means for the job: a remote source whose connection
    /// is down pauses it (`SourceUnavailable`); one that turned out to be another disk at a
    /// reconnection (ESTALE) stops it (`DeviceUnconfirmed`); anything else is a read error.
    package static func sourceErrorCode(_ e: StorageError, remote: Bool) -> HydrationError.Code {
        if e.isConnectionLost { return .sourceUnavailable }
        if remote && e.errno == ESTALE { return .deviceUnconfirmed }
        return .sourceReadFailed
    }

    // MARK: a remote source that went away

    func stopSourceWatch() {
        guard case .paused(.sourceUnavailable(let e, let watch?), let resumption) = state.activity else { return }
        watch.cancel()
        state = state.with(activity: .paused(.sourceUnavailable(e, watch: nil), resumption))
    }

    /// The watcher found another disk at the source's URI: the job stops (`DeviceUnconfirmed`)
    /// as a reopen would, unless something else happened meanwhile.
    func sourceIsAnotherDisk(_ e: StorageError) {
        guard !state.isShuttingDown, case .paused(.sourceUnavailable(_, _?), _) = state else { return }
        var err = HydrationError(
            .deviceUnconfirmed,
            "source \(configuration.sourcePath): \(e.detail ?? "\(e)"); put the job's own export back and resume, or remove the job",
            errno: e.errno)
        err.path = configuration.sourcePath
        logger.error("the source is not the job's disk any more; job stopped", metadata: ["error": "\(err)"])
        setState(.failed(err, .reopen))
    }

    /// The watcher reached the source again: resume, unless something else happened meanwhile.
    func sourceIsBack() {
        guard !state.isShuttingDown, case .paused(.sourceUnavailable(let e, _?), let resumption) = state else { return }
        // The watcher is the caller: it ends by itself.
        state = .paused(.sourceUnavailable(e, watch: nil), resumption)
        logger.info("source reachable again; resuming")
        do { try start() } catch {
            logger.error("could not resume after the source came back", metadata: ["error": "\(error)"])
        }
    }

    // MARK: a late opener of a released file source

    /// Takes the write lease of a file source released as it is copied, for the job's life: a
    /// process that opens the source later (a late opener, whose reads of released regions
    /// would return zeros) breaks it, and the job stops releasing and pauses (`watchLease`).
    package static func holdLease(_ source: any StorageDevice) throws(HydrationError) {
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

    /// Polls the source's write lease (`holdLease`) four times a second while the job is open.
    /// A break stops the releases at once (`StorageDevice.release` checks the lease under the
    /// same lock as its punch); this notices it to let the opener through and pause the job.
    package func watchLease() {
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
    func sourceOpenedElsewhere() async {
        leaseWatch = nil
        guard !state.isShuttingDown else { return }
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
        await stop(because: .sourceOpenedElsewhere(inUse("another process")))
        // Its open completes once the lease is given up: name it (this process has the file open too).
        // The opener's open completes when the kernel next runs it: on a loaded machine that can
        // take seconds. Asked again every 100 ms for up to 10 s, sleeping off the I/O threads.
        var holders: [String] = []
        for _ in 0..<100 {
            holders =
                (try? await io.run { () -> [String] in
                    ((try? PosixStorage(remote: nil).usage(of: path))??.holders ?? []).filter {
                        !$0.hasPrefix("this process")
                    }
                }) ?? []
            if !holders.isEmpty || state.isShuttingDown { break }
            try? await Task.sleep(nanoseconds: 100_000_000)
        }
        // Unless the operator resumed it meanwhile (or it is closing).
        guard case .paused(.sourceOpenedElsewhere, let resumption) = state else { return }
        let who = holders.isEmpty ? "another process (gone again)" : holders.joined(separator: ", ")
        state = .paused(.sourceOpenedElsewhere(inUse(who)), resumption)
        notifyStateChange()
    }
}
