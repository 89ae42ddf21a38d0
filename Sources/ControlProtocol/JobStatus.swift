/// The status of one hydration job, as the daemon reports it and `clonectl status --json` prints it.
///
/// This is a public, versioned schema (`JobStatus.schemaVersion`): scripts poll it. Field names are
/// snake_case on the wire. Add fields only; never rename or remove one without bumping the version.
public struct JobStatus: Codable, Sendable, Equatable {
    public static let schemaVersion = 1

    public enum State: String, Codable, Sendable, CaseIterable {
        case idle, hydrating, paused, complete, failed
    }

    public struct Source: Codable, Sendable, Equatable {
        public var path: String
        public var sizeBytes: UInt64
        /// "direct" or "buffered" while the job has the source open (nil for a remote source).
        public var io: String?
        /// What chose `io` (the job's `io` setting, `auto`'s reason, or why direct I/O fell back).
        public var ioReason: String?
        public init(path: String, sizeBytes: UInt64, io: String? = nil, ioReason: String? = nil) {
            self.path = path; self.sizeBytes = sizeBytes; self.io = io; self.ioReason = ioReason
        }
        enum CodingKeys: String, CodingKey { case path, io; case sizeBytes = "size_bytes"; case ioReason = "io_reason" }
    }

    public struct Dest: Codable, Sendable, Equatable {
        public var path: String
        /// As `Source.io`.
        public var io: String?
        public var ioReason: String?
        public init(path: String, io: String? = nil, ioReason: String? = nil) {
            self.path = path; self.io = io; self.ioReason = ioReason
        }
        enum CodingKeys: String, CodingKey { case path, io; case ioReason = "io_reason" }
    }

    public struct Regions: Codable, Sendable, Equatable {
        public var total: UInt64
        public var hydrated: UInt64
        public var hydrating: UInt64
        public init(total: UInt64, hydrated: UInt64, hydrating: UInt64) {
            self.total = total; self.hydrated = hydrated; self.hydrating = hydrating
        }
    }

    public struct Bytes: Codable, Sendable, Equatable {
        public var total: UInt64
        public var hydrated: UInt64
        public var committed: UInt64
        public var skippedZero: UInt64
        public var discarded: UInt64
        public init(total: UInt64, hydrated: UInt64, committed: UInt64, skippedZero: UInt64, discarded: UInt64) {
            self.total = total; self.hydrated = hydrated; self.committed = committed
            self.skippedZero = skippedZero; self.discarded = discarded
        }
        enum CodingKeys: String, CodingKey {
            case total, hydrated, committed, discarded
            case skippedZero = "skipped_zero"
        }
    }

    public struct Commits: Codable, Sendable, Equatable {
        public var count: UInt64
        public var lastUnixMs: Int64?
        public var lastDurationMs: Double?
        public init(count: UInt64, lastUnixMs: Int64?, lastDurationMs: Double?) {
            self.count = count; self.lastUnixMs = lastUnixMs; self.lastDurationMs = lastDurationMs
        }
        enum CodingKeys: String, CodingKey {
            case count
            case lastUnixMs = "last_unix_ms"
            case lastDurationMs = "last_duration_ms"
        }
    }

    public struct Discard: Codable, Sendable, Equatable {
        public var enabled: Bool
        public var pendingBytes: UInt64
        public var failed: UInt64
        public init(enabled: Bool, pendingBytes: UInt64, failed: UInt64) {
            self.enabled = enabled; self.pendingBytes = pendingBytes; self.failed = failed
        }
        enum CodingKeys: String, CodingKey {
            case enabled, failed
            case pendingBytes = "pending_bytes"
        }
    }

    public struct Settings: Codable, Sendable, Equatable {
        public var threshold: Int
        public var batchSize: Int
        public var rateLimitBytesPerSecond: UInt64?
        public var commitIntervalMs: Int
        public init(threshold: Int, batchSize: Int, rateLimitBytesPerSecond: UInt64?, commitIntervalMs: Int) {
            self.threshold = threshold; self.batchSize = batchSize
            self.rateLimitBytesPerSecond = rateLimitBytesPerSecond; self.commitIntervalMs = commitIntervalMs
        }
        enum CodingKeys: String, CodingKey {
            case threshold
            case batchSize = "batch_size"
            case rateLimitBytesPerSecond = "rate_limit_bytes_per_second"
            case commitIntervalMs = "commit_interval_ms"
        }
    }

    public struct Metadata: Codable, Sendable, Equatable {
        public enum Mode: String, Codable, Sendable { case rw, ro, fail }
        public var path: String
        public var mode: Mode
        public init(path: String, mode: Mode) { self.path = path; self.mode = mode }
    }

    public struct ErrorInfo: Codable, Sendable, Equatable {
        /// A stable, machine-readable name, e.g. `SourceReadFailed`, `NoSpace`, `CommitFailed`.
        public var code: String
        public var message: String
        /// The errno behind it (e.g. 5 for EIO), when there is one.
        public var errno: Int32?
        /// The first region concerned, when there is one.
        public var region: Int?
        /// `DestinationMismatch` only: the byte offset of the first byte that differs, and the
        /// SHA-256 (hex) of the region as read from the source and as read back from the destination.
        public var offset: UInt64?
        public var expectedDigest: String?
        public var foundDigest: String?
        public init(
            code: String, message: String, errno: Int32? = nil, region: Int? = nil, offset: UInt64? = nil,
            expectedDigest: String? = nil, foundDigest: String? = nil
        ) {
            self.code = code; self.message = message; self.errno = errno; self.region = region
            self.offset = offset; self.expectedDigest = expectedDigest; self.foundDigest = foundDigest
        }
        enum CodingKeys: String, CodingKey {
            case code, message, errno, region, offset
            case expectedDigest = "expected_digest"
            case foundDigest = "found_digest"
        }
        public func encode(to encoder: any Encoder) throws {
            var c = encoder.container(keyedBy: CodingKeys.self)
            try c.encode(code, forKey: .code)
            try c.encode(message, forKey: .message)
            try c.encode(errno, forKey: .errno)
            try c.encode(region, forKey: .region)
            try c.encode(offset, forKey: .offset)
            try c.encode(expectedDigest, forKey: .expectedDigest)
            try c.encode(foundDigest, forKey: .foundDigest)
        }
    }

    /// Verified release (`Start` `verify`): what was read back from the destination and compared.
    public struct Verify: Codable, Sendable, Equatable {
        /// The job verifies.
        public var enabled: Bool
        /// Bytes read back and found equal to what the source gave (since the job was opened).
        public var verifiedBytes: UInt64
        /// Regions found different (the job failed with DestinationMismatch).
        public var mismatches: UInt64
        /// How the read-back bypassed the page cache: `direct` (O_DIRECT), `evicted` (written
        /// back, waited for and dropped from the cache, then read: weaker, see docs/reliability.md),
        /// `device` (a device without a page cache); nil until something was read back.
        public var readBack: String?
        public init(enabled: Bool, verifiedBytes: UInt64, mismatches: UInt64, readBack: String?) {
            self.enabled = enabled; self.verifiedBytes = verifiedBytes; self.mismatches = mismatches
            self.readBack = readBack
        }
        enum CodingKeys: String, CodingKey {
            case enabled, mismatches
            case verifiedBytes = "verified_bytes"
            case readBack = "read_back"
        }
        public func encode(to encoder: any Encoder) throws {
            var c = encoder.container(keyedBy: CodingKeys.self)
            try c.encode(enabled, forKey: .enabled)
            try c.encode(verifiedBytes, forKey: .verifiedBytes)
            try c.encode(mismatches, forKey: .mismatches)
            try c.encode(readBack, forKey: .readBack)
        }
    }

    /// How the job's clone is served over NBD (`clonectl start --export`), nil when it is not.
    public struct Export: Codable, Sendable, Equatable {
        /// `nbd+unix:///NAME?socket=PATH`: what any NBD client connects to.
        public var uri: String
        /// Connections using the export now (in transmission, past the handshake).
        public var clients: Int
        /// Reads the source serves also hydrate what they read, in the background.
        public var hydrateOnRead: Bool
        /// What clients did through the export since the job was opened (nil for a complete job
        /// served from its destination alone).
        public var io: IO?
        public init(uri: String, clients: Int, hydrateOnRead: Bool = false, io: IO? = nil) {
            self.uri = uri; self.clients = clients; self.hydrateOnRead = hydrateOnRead; self.io = io
        }
        enum CodingKeys: String, CodingKey { case uri, clients, io; case hydrateOnRead = "hydrate_on_read" }
        public init(from decoder: any Decoder) throws {
            let c = try decoder.container(keyedBy: CodingKeys.self)
            self.init(
                uri: try c.decode(String.self, forKey: .uri), clients: try c.decode(Int.self, forKey: .clients),
                hydrateOnRead: try c.decodeIfPresent(Bool.self, forKey: .hydrateOnRead) ?? false,
                io: try c.decodeIfPresent(IO.self, forKey: .io))
        }

        public struct IO: Codable, Sendable, Equatable {
            public var readBytes: UInt64
            public var writtenBytes: UInt64
            public var trimmedBytes: UInt64
            /// Regions clients hydrated (by writing, trimming, zeroing or caching them) rather than the copier.
            public var hydratedRegions: UInt64
            public init(readBytes: UInt64, writtenBytes: UInt64, trimmedBytes: UInt64, hydratedRegions: UInt64) {
                self.readBytes = readBytes; self.writtenBytes = writtenBytes; self.trimmedBytes = trimmedBytes
                self.hydratedRegions = hydratedRegions
            }
            enum CodingKeys: String, CodingKey {
                case readBytes = "read_bytes", writtenBytes = "written_bytes", trimmedBytes = "trimmed_bytes"
                case hydratedRegions = "hydrated_regions"
            }
        }
    }

    public var version: Int
    public var name: String
    public var state: State
    public var source: Source
    public var dest: Dest
    public var regionSize: UInt64
    public var regions: Regions
    public var bytes: Bytes
    public var throughputBytesPerSecond: Double
    public var etaSeconds: Double?
    public var commits: Commits
    public var discard: Discard
    public var spaceBudgetBytes: UInt64?
    public var settings: Settings
    public var metadata: Metadata
    public var error: ErrorInfo?
    /// The job's NBD export, nil when the job is not exported (or cannot be served now).
    public var export: Export?
    /// Verified release; nil only from a daemon that predates it.
    public var verify: Verify?

    public init(
        name: String, state: State, source: Source, dest: Dest, regionSize: UInt64, regions: Regions,
        bytes: Bytes, throughputBytesPerSecond: Double, etaSeconds: Double?, commits: Commits,
        discard: Discard, spaceBudgetBytes: UInt64?, settings: Settings, metadata: Metadata, error: ErrorInfo?,
        export: Export? = nil, verify: Verify? = nil
    ) {
        self.verify = verify
        self.version = Self.schemaVersion
        self.name = name; self.state = state; self.source = source; self.dest = dest
        self.regionSize = regionSize; self.regions = regions; self.bytes = bytes
        self.throughputBytesPerSecond = throughputBytesPerSecond; self.etaSeconds = etaSeconds
        self.commits = commits; self.discard = discard; self.spaceBudgetBytes = spaceBudgetBytes
        self.settings = settings; self.metadata = metadata; self.error = error; self.export = export
    }

    enum CodingKeys: String, CodingKey {
        case version, name, state, source, dest, regions, bytes, commits, discard, settings, metadata, error, export,
            verify
        case regionSize = "region_size"
        case throughputBytesPerSecond = "throughput_bytes_per_second"
        case etaSeconds = "eta_seconds"
        case spaceBudgetBytes = "space_budget_bytes"
    }

    // Optionals are encoded as explicit nulls: a script can rely on every key being present.
    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(version, forKey: .version)
        try c.encode(name, forKey: .name)
        try c.encode(state, forKey: .state)
        try c.encode(source, forKey: .source)
        try c.encode(dest, forKey: .dest)
        try c.encode(regionSize, forKey: .regionSize)
        try c.encode(regions, forKey: .regions)
        try c.encode(bytes, forKey: .bytes)
        try c.encode(throughputBytesPerSecond, forKey: .throughputBytesPerSecond)
        try c.encode(etaSeconds, forKey: .etaSeconds)
        try c.encode(commits, forKey: .commits)
        try c.encode(discard, forKey: .discard)
        try c.encode(spaceBudgetBytes, forKey: .spaceBudgetBytes)
        try c.encode(settings, forKey: .settings)
        try c.encode(metadata, forKey: .metadata)
        try c.encode(error, forKey: .error)
        try c.encode(export, forKey: .export)
        try c.encode(verify, forKey: .verify)
    }
}

extension JobStatus.Commits {
    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(count, forKey: .count)
        try c.encode(lastUnixMs, forKey: .lastUnixMs)
        try c.encode(lastDurationMs, forKey: .lastDurationMs)
    }
}

extension JobStatus.Settings {
    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(threshold, forKey: .threshold)
        try c.encode(batchSize, forKey: .batchSize)
        try c.encode(rateLimitBytesPerSecond, forKey: .rateLimitBytesPerSecond)
        try c.encode(commitIntervalMs, forKey: .commitIntervalMs)
    }
}
