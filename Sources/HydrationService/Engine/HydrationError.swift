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
    }

    public var description: String { "\(code.rawValue): \(message)" }

    static func from(_ e: MetadataError) -> HydrationError {
        switch e.reason {
        case .io(let s): return HydrationError(.ioError, e.description, errno: s.errno)
        case .identityMismatch: return HydrationError(.metadataMismatch, e.description)
        case .alreadyExists: return HydrationError(.metadataExists, e.description)
        case .failedEarlier: return HydrationError(.commitFailed, e.description)
        default: return HydrationError(.metadataCorrupt, e.description)
        }
    }
}
