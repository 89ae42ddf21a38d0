import HydrationStorage

/// Tunables that may change while a job runs (dm-clone's hydration_threshold and
/// hydration_batch_size, plus ours).
public struct Tunables: Sendable, Equatable, Codable {
    /// Regions per I/O: contiguous unhydrated regions copied by one read and one write.
    public var batchSize: Int
    /// Regions in flight at once, across all batches.
    public var threshold: Int
    /// Bytes per second, nil for unlimited.
    public var rateLimitBytesPerSecond: UInt64?
    /// With discard_source: bytes hydrated but not yet released from the source never exceed this.
    public var spaceBudgetBytes: UInt64
    public var commitIntervalMs: Int

    public static let defaultSpaceBudget: UInt64 = 128 << 20
    public static let defaultCommitIntervalMs = 1000

    /// Defaults for throughput: 1 MiB per I/O and 8 MiB in flight, whatever the region size
    /// (dm-clone's 1/1 keeps a disk mostly idle); at least one region each. (Eight batches in
    /// flight, the old threshold, was 512 MiB of buffers with 64 MiB regions.)
    public static func defaults(regionSize: UInt64) -> Tunables {
        let batch = max(1, Int((1 << 20) / regionSize))
        let threshold = max(batch, Int((8 << 20) / regionSize))
        return Tunables(
            batchSize: batch, threshold: threshold, rateLimitBytesPerSecond: nil,
            spaceBudgetBytes: defaultSpaceBudget, commitIntervalMs: defaultCommitIntervalMs)
    }

    public init(
        batchSize: Int, threshold: Int, rateLimitBytesPerSecond: UInt64?, spaceBudgetBytes: UInt64,
        commitIntervalMs: Int
    ) {
        self.batchSize = batchSize; self.threshold = threshold; self.rateLimitBytesPerSecond = rateLimitBytesPerSecond
        self.spaceBudgetBytes = spaceBudgetBytes; self.commitIntervalMs = commitIntervalMs
    }

    /// Checks every field; the message names the field and what is accepted.
    public func validate(regionSize: UInt64) throws(HydrationError) {
        guard batchSize >= 1, UInt64(batchSize) * regionSize <= 64 << 20 else {
            throw HydrationError(
                .invalidParameter, "batch_size must be at least 1 and at most 64 MiB of regions (got \(batchSize))",
                parameter: "batch_size")
        }
        guard threshold >= 1, threshold <= 1 << 20 else {
            throw HydrationError(
                .invalidParameter, "threshold must be between 1 and 1048576 regions (got \(threshold))",
                parameter: "threshold")
        }
        if let r = rateLimitBytesPerSecond, r < 4096 {
            throw HydrationError(
                .invalidParameter, "rate_limit_bytes_per_second must be at least 4096 (got \(r))",
                parameter: "rate_limit_bytes_per_second")
        }
        guard commitIntervalMs >= 10, commitIntervalMs <= 3_600_000 else {
            throw HydrationError(
                .invalidParameter, "commit_interval_ms must be between 10 and 3600000 (got \(commitIntervalMs))",
                parameter: "commit_interval_ms")
        }
        guard spaceBudgetBytes >= regionSize else {
            throw HydrationError(
                .invalidParameter, "space_budget_bytes must be at least one region (\(regionSize) bytes)",
                parameter: "space_budget_bytes")
        }
    }
}

/// How a job reads its source and writes its destination (measurements: docs/benchmarks-history.md,
/// "Round 3" and "Round 5").
public enum IOMode: String, Sendable, Equatable, Codable, CaseIterable {
    /// Direct I/O for a regular-file source, buffered otherwise (a block device or NBD source,
    /// whose allocation is unknown). On the benchmark machine, with I/O buffers of huge pages
    /// (IOBufferPool), direct I/O copied the dense and the zeros images as fast as buffered I/O
    /// and the holes image in 0.80x the time, for 0.17-0.42x the CPU and no page cache.
    /// (A rule of direct I/O only up to a third allocated came from measurements with buffers of
    /// 4 KiB pages, which a virtio-blk ring without indirect descriptors turned into requeues.)
    case auto
    /// Through the page cache (evicted behind the copy).
    case buffered
    /// O_DIRECT wherever the filesystem or device supports it (the unaligned tail and tmpfs stay
    /// buffered; status says which).
    case direct

    /// Direct I/O or not for a job's source and destination, and why (shown in status).
    public func choice(sourceSize: UInt64, sourceAllocated: UInt64?) -> (direct: Bool, why: String) {
        switch self {
        case .buffered: return (false, "io=buffered")
        case .direct: return (true, "io=direct")
        case .auto:
            guard let a = sourceAllocated, sourceSize > 0 else {
                return (false, "io=auto: the source's allocation is unknown (not a regular file)")
            }
            // Allocation is in whole blocks: a file smaller than a block is "100 %", not 409600.
            let pct = (min(1, Double(a) / Double(sourceSize)) * 1000).rounded() / 10
            return (true, "io=auto: file source, \(pct) % allocated")
        }
    }
}

/// Everything needed to create a job.
public struct JobConfiguration: Sendable, Equatable, Codable {
    /// The largest region a job may have. The metadata format allows 1 GiB, but a batch reads at
    /// least one whole region into memory and batches are limited to 64 MiB (Tunables.validate),
    /// so a larger region could never be copied.
    public static let maxRegionSize: UInt64 = 64 << 20
    /// A region size a job can be created with: a power of two from 4 KiB to 64 MiB.
    public static func isValidRegionSize(_ s: UInt64) -> Bool {
        RegionGeometry.isValidRegionSize(s) && s <= maxRegionSize
    }
    package static func regionSizeError(_ s: UInt64) -> HydrationError {
        HydrationError(
            .invalidParameter,
            "region_size must be a power of two from 4 KiB to 64 MiB (a batch reads at least one whole region into memory; got \(s))",
            parameter: "region_size"
        )
    }

    public var name: String
    public var sourcePath: String
    public var destPath: String
    public var metadataPath: String
    public var regionSize: UInt64
    public var discardSource: Bool
    public var destZeroed: Bool
    public var tunables: Tunables
    /// Direct or buffered I/O; chosen again each time the job's devices are opened.
    public var ioMode: IOMode = .auto
    /// Verified release: every region a batch copies (or zeroes) is read back from the destination,
    /// bypassing the page cache, and compared with the bytes read from the source before the
    /// region is handed to the committer (docs/design.md, "Verified release").
    public var verify: Bool = false

    public init(
        name: String, sourcePath: String, destPath: String, metadataPath: String,
        regionSize: UInt64 = RegionGeometry.defaultRegionSize, discardSource: Bool = false,
        destZeroed: Bool = false, tunables: Tunables? = nil, ioMode: IOMode = .auto, verify: Bool = false
    ) {
        self.ioMode = ioMode
        self.verify = verify
        self.name = name; self.sourcePath = sourcePath; self.destPath = destPath; self.metadataPath = metadataPath
        self.regionSize = regionSize; self.discardSource = discardSource; self.destZeroed = destZeroed
        self.tunables = tunables ?? .defaults(regionSize: regionSize)
    }
}
