import ControlProtocol
import HydrationEngine

/// A request to create a job (the engine-level form of the control protocol's Start).
public struct CreateJobRequest: Sendable, Equatable {
    public var name: String
    public var source: String
    public var dest: String
    public var metadata: String?
    public var regionSize: UInt64?
    public var discardSource: Bool
    public var destZeroed: Bool
    public var noHydration: Bool
    public var tunables: TunablesUpdate
    /// Serve the job's clone as NBD export `name`.
    public var export: Bool
    /// With `export`: reads served by the source hydrate what they read.
    public var hydrateOnRead: Bool
    /// Direct or buffered I/O.
    public var io: IOMode
    /// Read copied regions back and compare them before they are committed.
    public var verify: Bool

    public init(
        name: String, source: String, dest: String, metadata: String? = nil, regionSize: UInt64? = nil,
        discardSource: Bool = false, destZeroed: Bool = false, noHydration: Bool = false,
        tunables: TunablesUpdate = TunablesUpdate(), export: Bool = false, hydrateOnRead: Bool = false,
        io: IOMode = .auto, verify: Bool = false
    ) {
        self.io = io
        self.verify = verify
        self.name = name; self.source = source; self.dest = dest; self.metadata = metadata; self.regionSize = regionSize
        self.discardSource = discardSource; self.destZeroed = destZeroed; self.noHydration = noHydration;
        self.tunables = tunables
        self.export = export
        self.hydrateOnRead = hydrateOnRead
    }
}

/// A partial change of tunables: nil fields are left as they are.
public struct TunablesUpdate: Sendable, Equatable {
    public var threshold: Int?
    public var batchSize: Int?
    /// `.some(nil)` removes the limit.
    public var rateLimitBytesPerSecond: UInt64??
    public var spaceBudgetBytes: UInt64?
    public var commitIntervalMs: Int?

    public init(
        threshold: Int? = nil, batchSize: Int? = nil, rateLimitBytesPerSecond: UInt64?? = nil,
        spaceBudgetBytes: UInt64? = nil, commitIntervalMs: Int? = nil
    ) {
        self.threshold = threshold; self.batchSize = batchSize; self.rateLimitBytesPerSecond = rateLimitBytesPerSecond
        self.spaceBudgetBytes = spaceBudgetBytes; self.commitIntervalMs = commitIntervalMs
    }

    func applied(to t: Tunables) -> Tunables {
        var t = t
        if let v = threshold { t.threshold = v }
        if let v = batchSize { t.batchSize = v }
        if let v = rateLimitBytesPerSecond { t.rateLimitBytesPerSecond = v == 0 ? nil : v }
        if let v = spaceBudgetBytes { t.spaceBudgetBytes = v }
        if let v = commitIntervalMs { t.commitIntervalMs = v }
        return t
    }

    public var isEmpty: Bool {
        threshold == nil && batchSize == nil && rateLimitBytesPerSecond == nil && spaceBudgetBytes == nil
            && commitIntervalMs == nil
    }
}
