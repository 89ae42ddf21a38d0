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
        /// Verified release: the destination did not read back what was written to it. The
        /// region was neither committed nor released; `mismatch` says where and what.
        case destinationMismatch = "DestinationMismatch"
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
    /// The file or device concerned, when there is one. Set where the error is thrown: the wire's
    /// `path` of MetadataCorrupt, MetadataExists, IOError, DeviceInUse and DeviceUnconfirmed.
    public var path: String?
    /// The request parameter the failure concerns (`source`, `dest`, `metadata`, `region_size`,
    /// `name`, a tunable's name...), when there is one: the wire's InvalidParameter `parameter`.
    /// `source` on a failure to open, identify or confirm the source also tells the daemon that a
    /// remote source that did not answer is worth reopening in the background.
    public var parameter: String?
    /// For DeviceInUse: what holds the device. The engine names a loop device ("/dev/loop3"), a
    /// process ("pid 1234 (qemu-system-x86)"), a stacked device or a mount; the daemon's
    /// JobManager replaces it with the job's name when one of its own jobs holds it.
    public var holder: String?
    /// For SizeMismatch: the two sizes.
    public var sourceBytes: UInt64?
    public var destBytes: UInt64?
    /// For ExportInUse: the connections using the export.
    public var clients: Int?
    /// For DestinationMismatch.
    public var mismatch: Mismatch?

    /// Where the destination read back something else than the source gave.
    public struct Mismatch: Sendable, Equatable {
        public var region: Int
        /// The first byte that differs.
        public var offset: UInt64
        /// SHA-256 (hex) of the region as read from the source, and as read back.
        public var expectedDigest: String
        public var foundDigest: String
        public init(region: Int, offset: UInt64, expectedDigest: String, foundDigest: String) {
            self.region = region; self.offset = offset
            self.expectedDigest = expectedDigest; self.foundDigest = foundDigest
        }
    }

    public init(
        _ code: Code, _ message: String, errno: Int32? = nil, region: Int? = nil, path: String? = nil,
        parameter: String? = nil
    ) {
        self.code = code; self.message = message; self.errno = errno; self.region = region
        self.path = path; self.parameter = parameter
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

    /// A metadata failure, with the file it concerns.
    package static func from(_ e: MetadataError) -> HydrationError {
        let code: Code
        var errno: Int32?
        switch e.reason {
        case .io(let s):
            code = .ioError
            errno = s.errno
        case .identityMismatch: code = .metadataMismatch
        case .alreadyExists: code = .metadataExists
        case .failedEarlier: code = .commitFailed
        default: code = .metadataCorrupt
        }
        return HydrationError(code, e.description, errno: errno, path: e.path, parameter: "metadata")
    }

    /// A refusal of the identity module (placement, confirmation), with its fields.
    package static func from(_ e: IdentityError) -> HydrationError {
        let code: Code
        switch e.kind {
        case .mismatch: code = .metadataMismatch
        case .unconfirmed: code = .deviceUnconfirmed
        case .sameDevice: code = .sameDevice
        case .inUse: code = .deviceInUse
        case .io: code = .ioError
        }
        var h = HydrationError(code, e.message, errno: e.errno, path: e.path, parameter: e.parameter)
        h.holder = e.holder
        return h
    }
}
