/// Typed parameters and replies of `org.hydrationd.Control` (see `ControlInterface.description`).
///
/// Wire names are snake_case. Optional parameters may be omitted or null; they are omitted when
/// encoding. A parameter a type does not declare is rejected by the server
/// (`org.varlink.service.InvalidParameter`), so a misspelt tunable never goes unnoticed.

/// Parameters of a Varlink method: Codable, plus the list of parameter names it accepts.
public protocol VarlinkParameters: Codable, Sendable {
    static var parameterNames: Set<String> { get }
}

extension VarlinkParameters where Self: Codable {
    /// Convenience for types whose `CodingKeys` are `CaseIterable`.
    static func names<K: CodingKey & CaseIterable>(_ keys: K.Type) -> Set<String> {
        Set(K.allCases.map(\.stringValue))
    }
}

/// The methods of `org.hydrationd.Control`.
public enum ControlMethod: String, CaseIterable, Sendable {
    case start = "Start"
    case pause = "Pause"
    case resume = "Resume"
    case getStatus = "GetStatus"
    case list = "List"
    case set = "Set"
    case commit = "Commit"
    case remove = "Remove"
    case checkMetadata = "CheckMetadata"

    public static let interfaceName = "org.hydrationd.Control"

    /// `org.hydrationd.Control.Start` etc.
    public var qualifiedName: String { "\(Self.interfaceName).\(rawValue)" }

    /// Methods that change no state. Anyone who can connect may call them; the others need root,
    /// the daemon's own user, or membership in the socket group.
    public var isReadOnly: Bool {
        switch self {
        case .getStatus, .list, .checkMetadata: return true
        case .start, .pause, .resume, .set, .commit, .remove: return false
        }
    }

    /// Methods any peer that can connect may call: those that report the daemon's own jobs.
    /// `CheckMetadata` changes nothing but reads a file the peer names with the daemon's rights
    /// (whether an arbitrary path exists, what its first bytes are), so it needs a privileged peer.
    public var isOpenToAnyPeer: Bool {
        switch self {
        case .getStatus, .list: return true
        case .checkMetadata, .start, .pause, .resume, .set, .commit, .remove: return false
        }
    }
}

/// An empty parameter or reply object `{}`.
public struct EmptyParameters: VarlinkParameters, Equatable {
    public static let parameterNames: Set<String> = []
    public init() {}
}

public typealias EmptyReply = EmptyParameters

// MARK: Start

/// `Start`: with `source` and `dest`, creates a job (and starts hydrating unless `no_hydration`);
/// with only `name`, resumes the existing job of that name.
public struct StartParameters: VarlinkParameters, Equatable {
    public var name: String
    public var source: String?
    public var dest: String?
    public var metadata: String?
    public var regionSize: UInt64?
    public var discardSource: Bool?
    public var destZeroed: Bool?
    public var noHydration: Bool?
    public var threshold: Int?
    public var batchSize: Int?
    public var commitIntervalMs: Int?
    public var spaceBudgetBytes: UInt64?
    public var rateLimitBytesPerSecond: UInt64?
    /// Serve the job's clone as NBD export `name` on the daemon's NBD socket (persisted with the job).
    public var export: Bool?
    /// With `export`: a read served by the source also hydrates the regions it read, in the
    /// background (dm-clone lacks this).
    public var hydrateOnRead: Bool?
    /// `auto` (the default), `buffered` or `direct`: how the source is read and the destination
    /// written (docs/design.md, "Direct I/O").
    public var io: String?
    /// Read each copied region back from the destination, bypassing the page cache, and compare
    /// it with what was read from the source before the region may be committed (and released):
    /// a difference fails the job with `DestinationMismatch` (docs/design.md, "Verified release").
    public var verify: Bool?

    public init(
        name: String, source: String? = nil, dest: String? = nil, metadata: String? = nil,
        regionSize: UInt64? = nil, discardSource: Bool? = nil, destZeroed: Bool? = nil, noHydration: Bool? = nil,
        threshold: Int? = nil, batchSize: Int? = nil, commitIntervalMs: Int? = nil,
        spaceBudgetBytes: UInt64? = nil, rateLimitBytesPerSecond: UInt64? = nil, export: Bool? = nil,
        hydrateOnRead: Bool? = nil, io: String? = nil, verify: Bool? = nil
    ) {
        self.io = io
        self.verify = verify
        self.name = name; self.source = source; self.dest = dest; self.metadata = metadata
        self.regionSize = regionSize; self.discardSource = discardSource; self.destZeroed = destZeroed
        self.noHydration = noHydration; self.threshold = threshold; self.batchSize = batchSize
        self.commitIntervalMs = commitIntervalMs; self.spaceBudgetBytes = spaceBudgetBytes
        self.rateLimitBytesPerSecond = rateLimitBytesPerSecond
        self.export = export
        self.hydrateOnRead = hydrateOnRead
    }

    /// True when only `name` is given: resume an existing job rather than create one.
    public var isResumeOnly: Bool {
        source == nil && dest == nil && metadata == nil && regionSize == nil && discardSource == nil
            && destZeroed == nil && noHydration == nil && threshold == nil && batchSize == nil
            && commitIntervalMs == nil && spaceBudgetBytes == nil && rateLimitBytesPerSecond == nil && export == nil
            && hydrateOnRead == nil && io == nil && verify == nil
    }

    enum CodingKeys: String, CodingKey, CaseIterable {
        case name, source, dest, metadata, threshold, export, io, verify
        case regionSize = "region_size"
        case discardSource = "discard_source"
        case destZeroed = "dest_zeroed"
        case noHydration = "no_hydration"
        case batchSize = "batch_size"
        case commitIntervalMs = "commit_interval_ms"
        case spaceBudgetBytes = "space_budget_bytes"
        case rateLimitBytesPerSecond = "rate_limit_bytes_per_second"
        case hydrateOnRead = "hydrate_on_read"
    }

    public static let parameterNames = names(CodingKeys.self)

    /// A parameter that is given but cannot take effect with the others, and why. The daemon
    /// refuses such a `Start` with `InvalidParameter` instead of ignoring the parameter.
    public var inapplicableParameter: (name: String, reason: String)? {
        if spaceBudgetBytes != nil && discardSource != true {
            return (
                "space_budget_bytes",
                "applies only with discard_source: true (a job that does not discard its source releases nothing, so there is nothing to budget)"
            )
        }
        if hydrateOnRead == true && export != true {
            return (
                "hydrate_on_read",
                "applies only with export: true (only reads through the job's NBD export can hydrate)"
            )
        }
        return nil
    }
}

public struct StartReply: Codable, Sendable, Equatable {
    public var job: JobStatus
    /// True when the call created the job, false when it resumed an existing one.
    public var created: Bool
    public init(job: JobStatus, created: Bool) { self.job = job; self.created = created }
}

// MARK: Pause, Resume, Commit

/// Parameters naming one job: `Pause`, `Resume`, `Commit`.
public struct JobNameParameters: VarlinkParameters, Equatable {
    public var name: String
    public init(name: String) { self.name = name }
    enum CodingKeys: String, CodingKey, CaseIterable { case name }
    public static let parameterNames = names(CodingKeys.self)
}

public typealias PauseParameters = JobNameParameters
public struct ResumeParameters: VarlinkParameters, Equatable {
    public var name: String
    /// For a job whose devices could not be confirmed (`DeviceUnconfirmed`): the operator states
    /// that the devices now at the job's paths are its own (same kind and size are still
    /// required); their identities are recorded anew in the metadata.
    public var acceptDevices: Bool?
    public init(name: String, acceptDevices: Bool? = nil) { self.name = name; self.acceptDevices = acceptDevices }
    enum CodingKeys: String, CodingKey, CaseIterable { case name, acceptDevices = "accept_devices" }
    public static let parameterNames = names(CodingKeys.self)
}
public typealias CommitParameters = JobNameParameters

/// Reply carrying one job's status: `Pause`, `Resume`, `Set`, `Commit`.
public struct JobReply: Codable, Sendable, Equatable {
    public var job: JobStatus
    public init(job: JobStatus) { self.job = job }
}

// MARK: GetStatus

public struct GetStatusParameters: VarlinkParameters, Equatable {
    /// One job, or every job when nil.
    public var name: String?
    public init(name: String? = nil) { self.name = name }
    enum CodingKeys: String, CodingKey, CaseIterable { case name }
    public static let parameterNames = names(CodingKeys.self)
}

public struct GetStatusReply: Codable, Sendable, Equatable {
    public var jobs: [JobStatus]
    public init(jobs: [JobStatus]) { self.jobs = jobs }
}

/// One element of a streamed `GetStatus` (`more: true`).
public struct StatusUpdate: Sendable, Equatable {
    public var jobs: [JobStatus]
    /// The last update of the stream: the server sends it without `continues` and ends the call.
    public var isFinal: Bool

    public init(jobs: [JobStatus], isFinal: Bool) { self.jobs = jobs; self.isFinal = isFinal }

    /// Final when every job in it has ended (complete or failed), or when there are none.
    public init(jobs: [JobStatus]) {
        self.init(jobs: jobs, isFinal: jobs.allSatisfy { $0.state == .complete || $0.state == .failed })
    }
}

// MARK: List

public struct JobSummary: Codable, Sendable, Equatable {
    public var name: String
    public var state: JobStatus.State
    public var sourcePath: String
    public var destPath: String
    public var regionsTotal: UInt64
    public var regionsHydrated: UInt64
    public var discardEnabled: Bool

    public init(
        name: String, state: JobStatus.State, sourcePath: String, destPath: String,
        regionsTotal: UInt64, regionsHydrated: UInt64, discardEnabled: Bool
    ) {
        self.name = name; self.state = state; self.sourcePath = sourcePath; self.destPath = destPath
        self.regionsTotal = regionsTotal; self.regionsHydrated = regionsHydrated; self.discardEnabled = discardEnabled
    }

    public init(_ status: JobStatus) {
        self.init(
            name: status.name, state: status.state, sourcePath: status.source.path, destPath: status.dest.path,
            regionsTotal: status.regions.total, regionsHydrated: status.regions.hydrated,
            discardEnabled: status.discard.enabled
        )
    }

    enum CodingKeys: String, CodingKey {
        case name, state
        case sourcePath = "source_path"
        case destPath = "dest_path"
        case regionsTotal = "regions_total"
        case regionsHydrated = "regions_hydrated"
        case discardEnabled = "discard_enabled"
    }
}

public typealias ListParameters = EmptyParameters

public struct ListReply: Codable, Sendable, Equatable {
    public var jobs: [JobSummary]
    public init(jobs: [JobSummary]) { self.jobs = jobs }
}

// MARK: Set

/// `Set`: changes the given tunables of a running or paused job; omitted ones keep their value.
/// `rate_limit_bytes_per_second: 0` and `space_budget_bytes: 0` mean "no limit".
public struct SetParameters: VarlinkParameters, Equatable {
    public var name: String
    public var threshold: Int?
    public var batchSize: Int?
    public var rateLimitBytesPerSecond: UInt64?
    public var spaceBudgetBytes: UInt64?
    public var commitIntervalMs: Int?

    public init(
        name: String, threshold: Int? = nil, batchSize: Int? = nil, rateLimitBytesPerSecond: UInt64? = nil,
        spaceBudgetBytes: UInt64? = nil, commitIntervalMs: Int? = nil
    ) {
        self.name = name; self.threshold = threshold; self.batchSize = batchSize
        self.rateLimitBytesPerSecond = rateLimitBytesPerSecond; self.spaceBudgetBytes = spaceBudgetBytes
        self.commitIntervalMs = commitIntervalMs
    }

    enum CodingKeys: String, CodingKey, CaseIterable {
        case name, threshold
        case batchSize = "batch_size"
        case rateLimitBytesPerSecond = "rate_limit_bytes_per_second"
        case spaceBudgetBytes = "space_budget_bytes"
        case commitIntervalMs = "commit_interval_ms"
    }

    public static let parameterNames = names(CodingKeys.self)
}

// MARK: Remove

public struct RemoveParameters: VarlinkParameters, Equatable {
    public var name: String
    /// Stop (pause with a final commit) an active job before removing it; without it, removing a
    /// hydrating job fails with `JobRunning`.
    public var force: Bool?
    public init(name: String, force: Bool? = nil) { self.name = name; self.force = force }
    enum CodingKeys: String, CodingKey, CaseIterable { case name, force }
    public static let parameterNames = names(CodingKeys.self)
}

public struct RemoveReply: VarlinkParameters, Equatable {
    /// Where the metadata of a removed incomplete discard_source job was kept (it is the only
    /// record of which source regions were released); nil when nothing was kept.
    public var keptMetadata: String?
    public init(keptMetadata: String? = nil) { self.keptMetadata = keptMetadata }
    enum CodingKeys: String, CodingKey, CaseIterable { case keptMetadata = "kept_metadata" }
    public static let parameterNames = names(CodingKeys.self)
}

// MARK: CheckMetadata

public struct CheckMetadataParameters: VarlinkParameters, Equatable {
    /// Absolute path of a metadata file.
    public var path: String
    public init(path: String) { self.path = path }
    enum CodingKeys: String, CodingKey, CaseIterable { case path }
    public static let parameterNames = names(CodingKeys.self)
}

/// What `CheckMetadata` found in a metadata file. Fields that could not be read are null;
/// `problems` lists every inconsistency (empty when `valid`).
public struct MetadataReport: Codable, Sendable, Equatable {
    public var path: String
    public var valid: Bool
    public var version: Int?
    public var generation: UInt64?
    public var jobId: String?
    public var regionSize: UInt64?
    public var targetSizeBytes: UInt64?
    public var regionsTotal: UInt64?
    public var regionsHydrated: UInt64?
    public var discardSource: Bool?
    public var destZeroed: Bool?
    public var complete: Bool?
    public var sourcePath: String?
    public var destPath: String?
    public var createdUnixMs: Int64?
    public var committedUnixMs: Int64?
    public var problems: [String]

    public init(
        path: String, valid: Bool, version: Int? = nil, generation: UInt64? = nil, jobId: String? = nil,
        regionSize: UInt64? = nil, targetSizeBytes: UInt64? = nil, regionsTotal: UInt64? = nil,
        regionsHydrated: UInt64? = nil, discardSource: Bool? = nil, destZeroed: Bool? = nil, complete: Bool? = nil,
        sourcePath: String? = nil, destPath: String? = nil, createdUnixMs: Int64? = nil,
        committedUnixMs: Int64? = nil, problems: [String] = []
    ) {
        self.path = path; self.valid = valid; self.version = version; self.generation = generation
        self.jobId = jobId; self.regionSize = regionSize; self.targetSizeBytes = targetSizeBytes
        self.regionsTotal = regionsTotal; self.regionsHydrated = regionsHydrated
        self.discardSource = discardSource; self.destZeroed = destZeroed; self.complete = complete
        self.sourcePath = sourcePath; self.destPath = destPath; self.createdUnixMs = createdUnixMs
        self.committedUnixMs = committedUnixMs; self.problems = problems
    }

    enum CodingKeys: String, CodingKey {
        case path, valid, version, generation, complete, problems
        case jobId = "job_id"
        case regionSize = "region_size"
        case targetSizeBytes = "target_size_bytes"
        case regionsTotal = "regions_total"
        case regionsHydrated = "regions_hydrated"
        case discardSource = "discard_source"
        case destZeroed = "dest_zeroed"
        case sourcePath = "source_path"
        case destPath = "dest_path"
        case createdUnixMs = "created_unix_ms"
        case committedUnixMs = "committed_unix_ms"
    }
}

public struct CheckMetadataReply: Codable, Sendable, Equatable {
    public var report: MetadataReport
    public init(report: MetadataReport) { self.report = report }
}

// MARK: org.varlink.service

public struct VarlinkServiceInfo: Codable, Sendable, Equatable {
    public var vendor: String
    public var product: String
    public var version: String
    public var url: String
    public var interfaces: [String]
    public init(vendor: String, product: String, version: String, url: String, interfaces: [String]) {
        self.vendor = vendor; self.product = product; self.version = version; self.url = url
        self.interfaces = interfaces
    }
}

public struct GetInterfaceDescriptionParameters: VarlinkParameters, Equatable {
    public var interface: String
    public init(interface: String) { self.interface = interface }
    enum CodingKeys: String, CodingKey, CaseIterable { case interface }
    public static let parameterNames = names(CodingKeys.self)
}

public struct GetInterfaceDescriptionReply: Codable, Sendable, Equatable {
    public var description: String
    public init(description: String) { self.description = description }
}
