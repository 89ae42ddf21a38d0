import HydrationEngine
import HydrationStorage
import Logging
import NBDServer
import NIOCore
import Synchronization

#if DEBUG
    /// Deliberately wrong client-write paths, for the live crash explorer to prove it notices them.
    /// Compiled only into debug builds (like `CommitterFault`).
    enum LiveCloneFault: Sendable, Equatable {
        /// The first client write does not record that the destination holds client data.
        case skipRecordDestinationWritten
        /// A write covering an unhydrated region in part does not copy that region first.
        case partialWriteWithoutHydration
    }
#endif

/// A job's clone served over NBD with dm-clone's I/O semantics, while it hydrates
/// (docs/live-clone.md has the full table).
///
/// - READ: hydrated regions from the destination, the others from the source, pinned
///   (`RegionOwnership.withSourcePins`) so the discarder cannot release them under the read.
/// - WRITE: regions already hydrated take the write directly. Otherwise the write claims its
///   regions (waiting for a copy of them to end), hydrates a partially written head or tail
///   region first, writes, and marks every covered region hydrated; the committer records them
///   like copied ones, and the discarder releases them after that commit like any other.
/// - TRIM: whole regions are given back on the destination and marked hydrated without a copy;
///   partial ones are left alone. Never sent to the source. On a block device (BLKDISCARD need
///   not leave zeros) recorded first like a write (`recordDestinationWritten`).
/// - WRITE_ZEROES: zeroes the destination range; a partially covered unhydrated region is hydrated
///   first (FAST_ZERO: refused with ENOTSUP instead).
/// - FLUSH, FUA: a commit with the destination's fdatasync (`Committer.flush`): every write
///   completed before it is durable afterwards, in the data and in the metadata, whichever
///   connection it came from (one destination descriptor, one committer: multi-conn is safe).
/// - CACHE: hydrates the range now.
/// - BLOCK_STATUS: `base:allocation` from whichever side serves each region, and
///   `x-hydrationd:state` (bits `RegionStateBits`) per region.
///
/// Before the first client write lands, the metadata durably records that the destination may
/// hold data the job did not copy (`Committer.recordDestinationWritten`): a write not committed
/// when the daemon crashed leaves its region unhydrated, and that region must then be zeroed, not
/// trusted to read as zeros, when it is hydrated again.
public final class LiveCloneExport: NBDExport {
    public let name: String
    public let size: UInt64
    public let blockSize: NBDBlockSize
    let geometry: Geometry
    /// Read only: the source's space is the discarder's to release.
    let source: SourceReader
    let dest: any StorageDevice
    let io: IOExecutor
    /// Threads for the requests that read the source (reads of unhydrated regions, the
    /// copy-before-write of a partial write, CACHE, `base:allocation` of unhydrated regions): a
    /// source that stops answering holds these, while reads and writes of hydrated regions go on
    /// on `io` (a frozen remote server otherwise held every thread of the export, and a read of a
    /// hydrated region waited for a source read's deadline).
    let sourceIO: IOExecutor
    let ownership: RegionOwnership
    let committer: Committer
    let progress: JobProgress
    let logger: Logger
    let buffers = IOBufferPool(keep: 4)
    let gate = Mutex(Gate())
    /// Reads served by the source also hydrate what they read (Start `hydrate_on_read`).
    let hydrateOnRead: Bool
    /// Regions reads got from the source, waiting to be copied, and the tasks copying them.
    let readHydrations = Mutex(ReadHydrations())
    struct ReadHydrations {
        var queue: [Range<Int>] = []
        var workers = 0
    }
    /// Tasks copying what reads got from the source, at most.
    static let maxReadHydrationWorkers = 2
    /// Runs queued at most; beyond, a read hydrates nothing (the copier gets there anyway).
    static let maxReadHydrationQueue = 4096
    #if DEBUG
        let fault = Mutex<LiveCloneFault?>(nil)
    #endif

    struct Gate {
        var closed = false
        var inFlight = 0
        var drained: [CheckedContinuation<Void, Never>] = []
    }

    /// Client I/O has threads of its own: a request never queues behind the copier's batches.
    /// Each job's export has its own (`threadsPerExport`): a source that stops answering holds
    /// only its own job's clients, never another export's. Complete jobs
    /// served from their destination alone share `clientIO`.
    package static let clientIO = IOExecutor(threads: 4)
    static let threadsPerExport = 3
    /// The executor is this export's own: shut down with it.
    let ownsIO: Bool
    /// Extents per `base:allocation` reply at most.
    static let maxExtents = 1024
    /// Regions per `x-hydrationd:state` reply at most (8 bytes per extent: 64 KiB of reply when
    /// every region differs from the next), and regions pinned at once for `base:allocation`.
    static let maxStateRegions = 8192
    /// Regions one CACHE step hydrates (one claim, one batch).
    static let cacheStepRegions = 32

    init(
        name: String, geometry: Geometry, source: SourceReader, dest: any StorageDevice, io: IOExecutor,
        ownership: RegionOwnership, committer: Committer, progress: JobProgress, logger: Logger,
        hydrateOnRead: Bool = false, ownsIO: Bool = false, sourceIO: IOExecutor? = nil
    ) {
        self.sourceIO = sourceIO ?? io
        self.hydrateOnRead = hydrateOnRead
        self.ownsIO = ownsIO
        self.name = name
        self.size = geometry.targetSize
        self.geometry = geometry
        self.source = source
        self.dest = dest
        self.io = io
        self.ownership = ownership
        self.committer = committer
        self.progress = progress
        self.logger = logger
        var minimum: UInt32 = 1
        for d in [source.info, dest.info] where d.identity.kind == .blockDevice {
            minimum = max(minimum, UInt32(max(1, d.logicalBlockSize)))
        }
        // The export has the source's size, which need not be a multiple of a block device's
        // sector: a client that honours the minimum could then not reach the last partial block
        // (libnbd's strict mode refuses it as unaligned). Any alignment is served (unaligned calls
        // go through the page cache), so the minimum drops to 1 then.
        if geometry.targetSize % UInt64(minimum) != 0 { minimum = 1 }
        let preferred = UInt32(min(geometry.regionSize, UInt64(NBDProtocol.defaultMaxPayload)))
        self.blockSize = NBDBlockSize(
            minimum: minimum, preferred: max(preferred, minimum, 512), maximum: NBDProtocol.defaultMaxPayload)
    }

    public var description: String? { "hydrationd live clone of job \(name)" }
    public var capabilities: NBDExportCapabilities {
        [.flush, .fua, .trim, .writeZeroes, .fastZero, .cache, .multiConn]
    }
    public static let stateContext = "x-hydrationd:state"
    public var metaContexts: [String] { [NBDProtocol.baseAllocation, Self.stateContext] }

    // MARK: lifecycle

    func enter() throws(NBDError) {
        let ok = gate.withLock { g -> Bool in
            if g.closed { return false }
            g.inFlight += 1
            return true
        }
        if !ok { throw NBDError(.ESHUTDOWN, "job \(name) is closing") }
    }

    func leave() {
        let wake = gate.withLock { g -> [CheckedContinuation<Void, Never>] in
            g.inFlight -= 1
            guard g.closed && g.inFlight == 0 else { return [] }
            defer { g.drained = [] }
            return g.drained
        }
        for c in wake { c.resume() }
    }

    /// Refuses new requests and waits for those in flight: after it the job may close.
    package func shutdown() async {
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            let now = gate.withLock { g -> Bool in
                g.closed = true
                if g.inFlight == 0 { return true }
                g.drained.append(c)
                return false
            }
            if now { c.resume() }
        }
        if ownsIO {
            await io.shutdown()
            if sourceIO !== io { await sourceIO.shutdown() }
        }
    }

    func run<T: Sendable>(readsSource: Bool = false, _ body: @escaping @Sendable () throws -> T)
        async throws(NBDError) -> T
    {
        try await (readsSource ? sourceIO : io).runForNBD(body)
    }

    func regions(covering bytes: Range<UInt64>) -> Range<Int> {
        let lo = Int(bytes.lowerBound / geometry.regionSize)
        let hi = Int((bytes.upperBound + geometry.regionSize - 1) / geometry.regionSize)
        return lo..<min(max(hi, lo + 1), geometry.regionCount)
    }

    /// Regions wholly inside `bytes` (the last, short region counts when `bytes` reaches the end).
    func wholeRegions(in bytes: Range<UInt64>) -> Range<Int> {
        let lo = Int((bytes.lowerBound + geometry.regionSize - 1) / geometry.regionSize)
        let hi =
            bytes.upperBound >= geometry.targetSize ? geometry.regionCount : Int(bytes.upperBound / geometry.regionSize)
        return lo..<max(lo, hi)
    }

    func covers(_ bytes: Range<UInt64>, region: Int) -> Bool {
        let r = geometry.byteRange(of: region..<region + 1)
        return bytes.lowerBound <= r.lowerBound && bytes.upperBound >= r.upperBound
    }

    /// Writes need a committer that still works: after a failed commit nothing written could be
    /// made durable, and the client must hear so at once.
    func checkWritable() async throws(NBDError) {
        if let f = await committer.failure {
            throw NBDError(f.code == .noSpace ? .ENOSPC : .EIO, "job \(name) cannot commit: \(f.message)")
        }
    }

    func recordDestinationWritten() async throws(NBDError) {
        guard ownership.destZeroed else { return }
        #if DEBUG
            if fault.withLock({ $0 }) == .skipRecordDestinationWritten { return }
        #endif
        do { try await committer.recordDestinationWritten() } catch {
            throw NBDError(error.code == .noSpace ? .ENOSPC : .EIO, "job \(name): \(error.message)")
        }
        ownership.destinationWritten()
    }

    // MARK: commands

    public func read(offset: UInt64, length: UInt32) async throws(NBDError) -> ByteBuffer {
        try enter()
        defer { leave() }
        let bytes = offset..<offset + UInt64(length)
        let (source, dest, geometry) = (self.source, self.dest, self.geometry)
        // The source runs stay pinned until their bytes are in the buffer.
        let (buffer, fromSource) = try await ownership.withSourcePins(regions(covering: bytes)) {
            pins async throws(NBDError) -> (ByteBuffer, [Range<Int>]) in
            let runs = pins.runs
            // After a failed destination sync or writeback error the destination bytes of a region
            // hydrated since the last commit may be gone (the kernel drops pages whose writeback
            // failed; a read then returns what the disk holds, zeros over a sparse file): refuse them
            // rather than serve wrong data without an error.
            for run in runs where !run.fromSource {
                if let r = ownership.lostRegion(in: run.regions) {
                    throw NBDError(
                        .EIO,
                        "job \(name) failed to commit: region \(r) was not committed and its destination data may be lost"
                    )
                }
            }
            let buffer = try await run(readsSource: pins.readsSource) {
                let n = Int(length)
                var buffer = ByteBufferAllocator().buffer(capacity: n)
                try buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: n) { raw in
                    for run in runs {
                        let r = geometry.byteRange(of: run.regions)
                        let lo = max(r.lowerBound, bytes.lowerBound), hi = min(r.upperBound, bytes.upperBound)
                        guard lo < hi else { continue }
                        let slice = UnsafeMutableRawBufferPointer(rebasing: raw[Int(lo - offset)..<Int(hi - offset)])
                        if run.fromSource {
                            try source.read(into: slice, at: lo)
                        } else {
                            try dest.read(into: slice, at: lo)
                        }
                    }
                    return n
                }
                return buffer
            }
            return (buffer, runs.filter { $0.fromSource }.map { $0.regions })
        }
        progress.update { $0.liveReadBytes += UInt64(length) }
        if hydrateOnRead && !fromSource.isEmpty { hydrateInBackground(fromSource) }
        return buffer
    }

    public func write(offset: UInt64, data: ByteBuffer, fua: Bool) async throws(NBDError) {
        try enter()
        defer { leave() }
        try await checkWritable()
        try await recordDestinationWritten()
        let bytes = offset..<offset + UInt64(data.readableBytes)
        let covered = regions(covering: bytes)
        let dest = self.dest
        let writeData = { @Sendable () throws in
            try data.withUnsafeReadableBytes { raw in try dest.write(raw, at: offset) }
        }
        if ownership.allHydrated(covered) {
            // Hydrated stays hydrated: nothing else writes these regions but clients.
            try await run(writeData)
        } else {
            let claim = await ownership.claim(covered)
            var hydrated: [Range<Int>] = []
            do throws(NBDError) {
                // A region the write covers only in part is copied first: the rest of it must be
                // the source's data, not whatever the destination held.
                var partial = Set([covered.lowerBound, covered.upperBound - 1].filter { !covers(bytes, region: $0) })
                #if DEBUG
                    if fault.withLock({ $0 }) == .partialWriteWithoutHydration { partial = [] }
                #endif
                hydrated = try await hydrate(partial.sorted())
                try await run(writeData)
                hydrated = [covered]
            } catch {
                await finishClaim(claim, hydrated: hydrated)
                throw error
            }
            await finishClaim(claim, hydrated: hydrated)
        }
        progress.update { $0.liveWrittenBytes += UInt64(data.readableBytes) }
        if fua { try await flush() }
    }

    public func flush() async throws(NBDError) {
        try enter()
        defer { leave() }
        // Complete because a region is marked hydrated only after the committer was told of it
        // (Copier.finished, finishClaim): a write into a hydrated region, replied to before this
        // flush, lies in a region this commit records or an earlier one did.
        do { try await committer.flush() } catch {
            throw NBDError(error.code == .noSpace ? .ENOSPC : .EIO, "job \(name): flush failed: \(error.message)")
        }
    }

    public func trim(offset: UInt64, length: UInt32, fua: Bool) async throws(NBDError) {
        try enter()
        defer { leave() }
        let bytes = offset..<offset + UInt64(length)
        let whole = wholeRegions(in: bytes)
        guard !whole.isEmpty else { return }  // a hint: partial regions are left alone
        try await checkWritable()
        if dest.info.identity.kind == .blockDevice {
            // BLKDISCARD need not leave zeros: like a write, the destination may now hold data
            // where the job never hydrated (a trim lost by a crash leaves its region unhydrated).
            try await recordDestinationWritten()
        }
        let claim = await ownership.claim(whole)
        var range = geometry.byteRange(of: whole)
        // A punch that stops at a size not on a block boundary leaves the last partial block
        // allocated: through the last region's end then, but only on a destination that ends with
        // the clone. Nothing past the clone's end is the job's: a larger destination (a
        // pre-allocated image, a reused file) keeps its own bytes there.
        if dest.info.identity.kind == .regularFile && range.upperBound == geometry.targetSize
            && dest.info.size <= geometry.targetSize
        {
            range = range.lowerBound..<UInt64(whole.upperBound) * geometry.regionSize
        }
        let dest = self.dest
        let released: Bool
        let punch = range
        do {
            try await io.run { try dest.release(offset: punch.lowerBound, length: punch.upperBound - punch.lowerBound) }
            released = true
        } catch {
            // A hint the destination cannot take: the regions stay as they were (an unhydrated
            // one still reads from the source).
            released = false
        }
        await finishClaim(claim, hydrated: released ? [whole] : [])
        progress.update {
            $0.liveTrimmedBytes += released ? min(range.upperBound, geometry.targetSize) - range.lowerBound : 0
        }
        if fua { try await flush() }
    }

    public func writeZeroes(offset: UInt64, length: UInt32, noHole: Bool, fastZero: Bool, fua: Bool)
        async throws(NBDError)
    {
        try enter()
        defer { leave() }
        if noHole && fastZero { throw NBDError(.ENOTSUP, "zeroing without a hole means writing zeros") }
        try await checkWritable()
        let bytes = offset..<offset + UInt64(length)
        let covered = regions(covering: bytes)
        let zero = { @Sendable [dest] () throws in
            try Self.zeroRange(dest, bytes, noHole: noHole)
        }
        if ownership.allHydrated(covered) {
            try await run(zero)
        } else {
            let claim = await ownership.claim(covered)
            var hydrated: [Range<Int>] = []
            do throws(NBDError) {
                let partial = [covered.lowerBound, covered.upperBound - 1].filter {
                    !covers(bytes, region: $0) && !ownership.isHydrated($0)
                }
                if fastZero && !partial.isEmpty {
                    throw NBDError(.ENOTSUP, "zeroing part of an unhydrated region needs a copy first")
                }
                hydrated = try await hydrate(Array(Set(partial)).sorted())
                try await run(zero)
                hydrated = [covered]
            } catch {
                await finishClaim(claim, hydrated: hydrated)
                throw error
            }
            await finishClaim(claim, hydrated: hydrated)
        }
        if fua { try await flush() }
    }

    static func zeroRange(_ dest: any StorageDevice, _ bytes: Range<UInt64>, noHole: Bool) throws {
        if !noHole {
            do {
                try dest.zeroOut(offset: bytes.lowerBound, length: bytes.upperBound - bytes.lowerBound)
                return
            } catch {
                // No punch or zero-out here (or not at this alignment): write zeros. (A
                // `catch where` here crashes the 6.3 compiler.)
                if !error.isUnsupported { throw error }
            }
        }
        let zeros = [UInt8](repeating: 0, count: Int(min(UInt64(1 << 20), bytes.upperBound - bytes.lowerBound)))
        var at = bytes.lowerBound
        while at < bytes.upperBound {
            let n = Int(min(UInt64(zeros.count), bytes.upperBound - at))
            try zeros.withUnsafeBytes { raw in try dest.write(UnsafeRawBufferPointer(rebasing: raw[..<n]), at: at) }
            at += UInt64(n)
        }
    }

}
