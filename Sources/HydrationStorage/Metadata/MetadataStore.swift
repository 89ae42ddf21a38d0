import Synchronization

/// What a job is created with; recorded in the superblock.
public struct MetadataCreateOptions: Sendable, Equatable {
    public var regionSize: UInt64
    public var source: DeviceRecord
    public var dest: DeviceRecord
    public var discardSource: Bool
    public var destZeroed: Bool
    public init(regionSize: UInt64, source: DeviceRecord, dest: DeviceRecord, discardSource: Bool, destZeroed: Bool) {
        self.regionSize = regionSize; self.source = source; self.dest = dest
        self.discardSource = discardSource; self.destZeroed = destZeroed
    }
}

/// A report of what `open` found, for `clonectl check` and logs.
public struct MetadataRecoveryReport: Sendable, Equatable {
    public var superblockSlot: Int
    /// Why the other superblock slot was not used (nil when it was valid but older).
    public var otherSlotProblem: String?
    public var pagesRead: Int
    /// Page slots holding a version newer than the superblock: a commit interrupted by a crash
    /// (or a superblock that failed its checksum). Their regions are adopted (see `open`).
    public var uncommittedPageSlots: Int
    /// Regions recorded only by those newer page versions.
    public var adoptedRegions: Int
    /// Page slots that failed their checksum (torn writes of interrupted commits are expected).
    public var invalidPageSlots: Int
}

/// The persistent record of hydrated regions: A/B superblocks over A/B checksummed bitmap pages.
///
/// Commit protocol (see docs/metadata-format.md): write each changed page into the slot that does
/// not hold its committed version -> fsync -> write the superblock (generation + 1, new hydrated
/// count) into the slot that does not hold the current one -> fsync. A crash at any byte leaves
/// the previous superblock and every page it refers to intact. Recovery takes the valid superblock
/// with the highest generation and, per page, the valid slot with the highest generation not
/// above it, and checks that the pages add up to the recorded hydrated count; it then adopts
/// valid page versions newer than that superblock (always safe: see `open`) with a recovery
/// superblock above every generation seen.
///
/// All methods block (they do I/O); call them from the I/O executor. The lock serialises them.
public final class MetadataStore: Sendable {
    public let path: String
    let device: any StorageDevice
    let state: Mutex<State>

    struct State {
        var header: MetadataHeader
        var committed: RegionMap
        /// Slot (0/1) of each page's committed version; -1 when the page was never written.
        var pageSlot: [Int8]
        var superblockSlot: Int
        var failure: String?
    }

    init(path: String, device: any StorageDevice, state: State) {
        self.path = path
        self.device = device
        self.state = Mutex(state)
    }

    public var header: MetadataHeader { state.withLock { $0.header } }
    public var committedMap: RegionMap { state.withLock { $0.committed } }
    public var failure: String? { state.withLock { $0.failure } }
    public var committedCount: Int { state.withLock { $0.committed.setCount } }
    /// Whether the last (possibly short) region is committed, without copying the map.
    public var isLastRegionCommitted: Bool {
        state.withLock { $0.committed.count > 0 && $0.committed[$0.committed.count - 1] }
    }

    // MARK: create

    /// Creates a new metadata file (refusing to overwrite one) with generation 1 and nothing
    /// hydrated, durably: the file and its directory entry are synced before this returns.
    public static func create(path: String, options: MetadataCreateOptions, storage: any StorageProvider, nowMs: Int64)
        throws(MetadataError) -> MetadataStore
    {
        let regionCount = RegionGeometry.regionCount(size: options.source.size, regionSize: options.regionSize)
        let header = MetadataHeader(
            version: MetadataFormat.version, generation: 1, jobID: randomUUID(),
            regionSize: options.regionSize, targetSize: options.source.size, regionCount: regionCount,
            pageCount: UInt64(MetadataFormat.pageCount(regions: Int(regionCount))), hydratedCount: 0,
            discardSource: options.discardSource, destZeroed: options.destZeroed, complete: false,
            source: options.source, dest: options.dest, createdUnixMs: nowMs, committedUnixMs: nowMs)
        let device: any StorageDevice
        do {
            device = try storage.open(path, mode: .metadata(create: true))
        } catch {
            if error.errno == EEXIST_ { throw MetadataError(path: path, reason: .alreadyExists) }
            throw MetadataError(path: path, reason: .io(error))
        }
        do {
            if device.info.identity.kind == .regularFile {
                // Allocate the whole file now (zeros read as absent pages), so that a later commit
                // never needs new space: ENOSPC at create is a clear error, ENOSPC in the middle
                // of a commit would fail the job.
                let total = MetadataFormat.fileSize(regions: Int(regionCount))
                let chunk = [UInt8](repeating: 0, count: 1 << 20)
                var at: UInt64 = 0
                while at < total {
                    let n = Int(min(UInt64(chunk.count), total - at))
                    try device.write(bytes: n == chunk.count ? chunk : Array(chunk[0..<n]), at: at)
                    at += UInt64(n)
                }
            }
            let sb = header.encode()
            try device.write(bytes: sb, at: MetadataFormat.superblockOffset(slot: 0))
            // Slot 1 is written as zeros so that stale bytes from a reused device cannot pass as a
            // superblock of another job.
            let zero = [UInt8](repeating: 0, count: MetadataFormat.blockSize)
            try device.write(bytes: zero, at: MetadataFormat.superblockOffset(slot: 1))
            try device.sync()
            try storage.syncDirectory(containing: path)
        } catch {
            // A file this call created is removed again: a half-written metadata file (out of
            // space while it was allocated) is no job's, and left behind it would refuse the
            // same create later as "already exists".
            device.close()
            if device.info.identity.kind == .regularFile {
                storage.removeCreatedFile(path)
                try? storage.syncDirectory(containing: path)
            }
            throw MetadataError(path: path, reason: .io(error))
        }
        let st = State(
            header: header, committed: RegionMap(count: Int(regionCount)),
            pageSlot: [Int8](repeating: -1, count: Int(header.pageCount)), superblockSlot: 0, failure: nil)
        return MetadataStore(path: path, device: device, state: st)
    }

}
