import HydrationStorage

#if canImport(Glibc)
    import Glibc
#endif

/// A failure of the engine, with a stable code the control protocol turns into a named error.
public struct HydrationError: Error, Sendable, Equatable, CustomStringConvertible {
    public enum Code: String, Sendable, Codable {
        case invalidParameter = "InvalidParameter"
        case sizeMismatch = "SizeMismatch"
        case deviceInUse = "DeviceInUse"
        case sameDevice = "SameDevice"
        case notFound = "NotFound"
        case metadataExists = "MetadataExists"
        case metadataCorrupt = "MetadataCorrupt"
        case metadataMismatch = "MetadataMismatch"
        /// A device at the recorded path cannot be confirmed to be the one the job was created
        /// for (renumbered, reused, or without a stable identity): the job stays stopped.
        case deviceUnconfirmed = "DeviceUnconfirmed"
        /// The request would destroy the only record of data (see the message).
        case dataAtRisk = "DataAtRisk"
        case sourceReadFailed = "SourceReadFailed"
        /// A remote source's connection is down (status, while the job waits for it).
        case sourceUnavailable = "SourceUnavailable"
        /// discard_source on a remote export whose server does not offer TRIM.
        case discardUnsupported = "DiscardUnsupported"
        case destWriteFailed = "DestWriteFailed"
        case noSpace = "NoSpace"
        case commitFailed = "CommitFailed"
        case ioError = "IOError"
        case invalidState = "InvalidState"
        case noSuchJob = "NoSuchJob"
        case jobExists = "JobExists"
        case jobRunning = "JobRunning"
        case permissionDenied = "PermissionDenied"
        /// Remove of a job whose NBD export has clients connected, without force.
        case exportInUse = "ExportInUse"
        /// A record in the daemon's state directory (a job's, or a kept one) cannot be read: the
        /// message names the file and why. The job stays listed and its devices reserved.
        case jobRecordUnreadable = "JobRecordUnreadable"
        /// The process or the system is out of a resource the operation needed (open files:
        /// EMFILE, ENFILE): nothing about the job or its devices is wrong; retry once it is freed
        /// or the limit raised.
        case resourceExhausted = "ResourceExhausted"
    }

    public var code: Code
    public var message: String
    /// The errno behind it, when there is one.
    public var errno: Int32?
    /// The first region the failure concerns, when there is one.
    public var region: Int?
    /// The file or device concerned, when there is one.
    public var path: String?
    /// For DeviceInUse: what holds the device. The engine names a loop device ("/dev/loop3"), a
    /// process ("pid 1234 (qemu-system-x86)"), a stacked device or a mount; the daemon's
    /// JobManager replaces it with the job's name when one of its own jobs holds it.
    public var holder: String?
    /// For SizeMismatch: the two sizes.
    public var sourceBytes: UInt64?
    public var destBytes: UInt64?
    /// For ExportInUse: the connections using the export.
    public var clients: Int?

    public init(_ code: Code, _ message: String, errno: Int32? = nil, region: Int? = nil) {
        self.code = code; self.message = message; self.errno = errno; self.region = region
        // Named for what it is, wherever an I/O path met it: out of descriptors says nothing about
        // the files or devices concerned.
        if code == .ioError, let e = errno, Self.isResourceExhaustion(e) {
            self.code = .resourceExhausted
            self.message += Self.resourceHint(e)
        }
    }

    /// The process or the system has no descriptor left.
    public static func isResourceExhaustion(_ e: Int32) -> Bool { e == EMFILE || e == ENFILE }

    package static func resourceHint(_ e: Int32) -> String {
        e == EMFILE
            ? " (the daemon has as many files open as its limit allows, RLIMIT_NOFILE: raise LimitNOFILE, or remove jobs)"
            : " (the system's open-file table is full, fs.file-max)"
    }

    public var description: String { "\(code.rawValue): \(message)" }

    package static func from(_ e: MetadataError) -> HydrationError {
        switch e.reason {
        case .io(let s):
            var h = HydrationError(.ioError, e.description, errno: s.errno)
            h.path = e.path
            return h
        case .identityMismatch: return withPath(HydrationError(.metadataMismatch, e.description), e.path)
        case .alreadyExists: return withPath(HydrationError(.metadataExists, e.description), e.path)
        case .failedEarlier: return withPath(HydrationError(.commitFailed, e.description), e.path)
        default: return withPath(HydrationError(.metadataCorrupt, e.description), e.path)
        }
    }

    private static func withPath(_ e: HydrationError, _ path: String) -> HydrationError {
        var e = e
        e.path = path
        return e
    }
}
