import ControlProtocol
import HydrationEngine
import HydrationStorage
import Logging

#if canImport(Glibc)
    import Glibc
#endif

/// A job whose source is an NBD export: identity with a fingerprint, confirmation at
/// reopen, and the status of a source whose connection is down. The storage layer does the I/O
/// (`RemoteNBDDevice`); these are the job's hooks into it.
extension HydrationJob {
    /// The source's metadata record. A remote source's stable ID gets a fingerprint of sampled
    /// blocks (`RemoteIdentity`), read only where `mayRead` allows: everywhere for a new job, only
    /// outside committed regions when a discard_source job's devices are accepted anew.
    static func sourceRecord(_ source: any StorageDevice, mayRead: (Range<UInt64>) -> Bool) throws(HydrationError)
        -> DeviceRecord
    {
        var record = DeviceRecord(source.info)
        guard source.info.identity.kind == .remote else { return record }
        do {
            let samples = try RemoteIdentity.chooseSamples(source, mayRead: mayRead)
            var id = RemoteIdentity.format(base: source.info.stableID, samples: samples)
            var kept = samples
            while id.utf8.count > MetadataFormat.maxStableIDBytes && !kept.isEmpty {
                kept.removeLast()
                id = RemoteIdentity.format(base: source.info.stableID, samples: kept)
            }
            record.stableID = id
        } catch {
            throw HydrationError(
                .ioError, "source: reading samples of \(source.info.path) for its identity: \(error)",
                errno: error.errno, path: source.info.path, parameter: "source")
        }
        return record
    }

    /// What a storage error of the source means for the job: a remote source whose connection
    /// is down pauses it (`SourceUnavailable`); one that turned out to be another disk at a
    /// reconnection stops it (`DeviceUnconfirmed`); anything else is a read error.
    static func sourceErrorCode(_ e: StorageError) -> HydrationError.Code {
        if e.isConnectionLost { return .sourceUnavailable }
        if e.isUnconfirmedSource { return .deviceUnconfirmed }
        return .sourceReadFailed
    }

    /// `DeviceUnconfirmed` when a reconnection of the remote `source` found another disk.
    static func unconfirmedSourceError(_ source: any StorageDevice) -> HydrationError? {
        guard let why = (source as? any RemoteSourceDevice)?.unconfirmedReason else { return nil }
        var e = HydrationError(
            .deviceUnconfirmed,
            "source \(source.info.path): \(why). Nothing more is read from or released on it; put the job's own export back and resume, or remove the job",
            errno: ESTALE)
        e.path = source.info.path
        return e
    }

    /// A job with a remote source runs its blocking calls on I/O threads of its own: waits on
    /// the remote (a connection attempt, a request until its deadline, a release waiting for the
    /// connection) never hold a thread other jobs need.
    static let remoteIOThreads = 6

    /// What the engine is told of the source: for a remote one, how to tell another disk at a
    /// reconnection; for every source, how to watch an outage (a local file can lose its
    /// connection too, ENOTCONN from a FUSE filesystem whose server died: it is probed and
    /// resumed the same way, its probe a no-op).
    static func sourceHooks(_ config: JobConfiguration) -> SourceHooks {
        guard RemoteSource.isURI(config.sourcePath) else {
            return SourceHooks(
                unconfirmedError: { _ in nil },
                watch: { watchSource($0, io: $1, logger: $2, back: $3, unconfirmed: $4) })
        }
        return SourceHooks(
            unconfirmedError: { unconfirmedSourceError($0) },
            watch: { watchSource($0, io: $1, logger: $2, back: $3, unconfirmed: $4) })
    }

    static func remoteIO(_ config: JobConfiguration, shared: IOExecutor) -> (IOExecutor, owned: Bool) {
        RemoteSource.isURI(config.sourcePath) ? (IOExecutor(threads: remoteIOThreads), true) : (shared, false)
    }

    /// From now on every reconnection of a remote source must find the disk `recorded` describes:
    /// its fingerprint's samples that may still be read, plus witnesses the device picks
    /// (`RemoteNBDDevice.armIdentity`). Blocking (reads the source).
    static func armRemoteIdentity(
        _ source: any StorageDevice, recorded: DeviceRecord,
        mayRead: (Range<UInt64>) -> Bool
    ) throws(HydrationError) {
        guard let remote = source as? any RemoteSourceDevice else { return }
        do {
            try remote.armIdentity(recorded: RemoteIdentity.parse(recorded.stableID).samples, mayRead: mayRead)
        } catch {
            throw HydrationError(
                .ioError, "source: reading \(source.info.path) for its identity: \(error)", errno: error.errno,
                path: source.info.path, parameter: "source")
        }
    }

    /// Which source bytes may still be read: all of them, except (with discard_source) the
    /// committed regions, whose source range may be released already.
    static func unreleased(_ committed: RegionMap, regionSize: UInt64, discardSource: Bool)
        -> @Sendable (Range<UInt64>) -> Bool
    {
        guard discardSource else { return { _ in true } }
        return { range in
            guard !range.isEmpty else { return true }
            let first = Int(range.lowerBound / regionSize)
            let last = Int((range.upperBound - 1) / regionSize)
            return committed.count(in: first..<min(last + 1, committed.count)) == 0
        }
    }

    /// What status shows while a remote source's connection is down and the job waits for it:
    /// `paused`, with a `SourceUnavailable` error saying since when and the last error.
    static func sourceUnavailableInfo(_ a: SourceAvailability, path: String) -> JobStatus.ErrorInfo {
        JobStatus.ErrorInfo(
            code: HydrationError.Code.sourceUnavailable.rawValue,
            message:
                "source \(path) unavailable since \(isoTime(a.sinceUnixMs)): \(a.lastError); reconnecting (\(a.attempts) attempt\(a.attempts == 1 ? "" : "s") so far), the job resumes by itself",
            errno: ENOTCONN)
    }

    static func isoTime(_ ms: Int64) -> String {
        var t = time_t(ms / 1000)
        var tmv = tm()
        gmtime_r(&t, &tmv)
        func two(_ v: Int32) -> String { v < 10 ? "0\(v)" : "\(v)" }
        return
            "\(tmv.tm_year + 1900)-\(two(tmv.tm_mon + 1))-\(two(tmv.tm_mday))T\(two(tmv.tm_hour)):\(two(tmv.tm_min)):\(two(tmv.tm_sec))Z"
    }
}

extension HydrationJob {
    /// While a remote source is unreachable: probes it (one connection attempt on an I/O
    /// thread, confirmed as every reconnection is) with backoff, 100 ms doubling to 2 s, and
    /// calls `back` once it answers, `unconfirmed` if another disk answers instead. Cancelled
    /// by a pause, a start or close. Occupies no I/O thread between attempts.
    static func watchSource(
        _ source: any StorageDevice, io: IOExecutor, logger: Logger,
        back: @escaping @Sendable () async -> Void,
        unconfirmed: @escaping @Sendable (StorageError) async -> Void
    ) -> Task<Void, Never> {
        Task {
            var delayMs: UInt64 = 100
            while !Task.isCancelled {
                try? await Task.sleep(nanoseconds: delayMs * 1_000_000)
                if Task.isCancelled { return }
                do {
                    try await io.run { try source.probeConnection() }
                    if Task.isCancelled { return }
                    await back()
                    return
                } catch let e as StorageError where e.isUnconfirmedSource {
                    if Task.isCancelled { return }
                    await unconfirmed(e)
                    return
                } catch {
                    delayMs = min(delayMs * 2, 2000)
                }
            }
        }
    }
}

extension StorageError {
    /// A remote source whose reconnection found another disk (`RemoteNBDDevice`, ESTALE).
    var isUnconfirmedSource: Bool { errno == ESTALE && RemoteSource.isURI(path) }
}
