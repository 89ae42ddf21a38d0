import Logging
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
///   (`RegionOwnership.pinForRead`) so the discarder cannot release them under the read.
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
    private let source: any StorageDevice
    private let dest: any StorageDevice
    private let io: IOExecutor
    /// Threads for the requests that read the source (reads of unhydrated regions, the
    /// copy-before-write of a partial write, CACHE, `base:allocation` of unhydrated regions): a
    /// source that stops answering holds these, while reads and writes of hydrated regions go on
    /// on `io` (a frozen remote server otherwise held every thread of the export, and a read of a
    /// hydrated region waited for a source read's deadline).
    private let sourceIO: IOExecutor
    private let ownership: RegionOwnership
    private let committer: Committer
    private let progress: JobProgress
    private let logger: Logger
    private let buffers = IOBufferPool(keep: 4)
    private let gate = Mutex(Gate())
    /// Reads served by the source also hydrate what they read (Start `hydrate_on_read`).
    let hydrateOnRead: Bool
    /// Regions reads got from the source, waiting to be copied, and the tasks copying them.
    private let readHydrations = Mutex(ReadHydrations())
    private struct ReadHydrations {
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

    private struct Gate {
        var closed = false
        var inFlight = 0
        var drained: [CheckedContinuation<Void, Never>] = []
    }

    /// Client I/O has threads of its own: a request never queues behind the copier's batches.
    /// Each job's export has its own (`threadsPerExport`): a source that stops answering holds
    /// only its own job's clients, never another export's (Tests/attacks/l14). Complete jobs
    /// served from their destination alone share `clientIO`.
    static let clientIO = IOExecutor(threads: 4)
    static let threadsPerExport = 3
    /// The executor is this export's own: shut down with it.
    private let ownsIO: Bool
    /// Extents per `base:allocation` reply at most.
    static let maxExtents = 1024
    /// Regions per `x-hydrationd:state` reply at most (8 bytes per extent: 64 KiB of reply when
    /// every region differs from the next), and regions pinned at once for `base:allocation`.
    static let maxStateRegions = 8192
    /// Regions one CACHE step hydrates (one claim, one batch).
    static let cacheStepRegions = 32

    init(
        name: String, geometry: Geometry, source: any StorageDevice, dest: any StorageDevice, io: IOExecutor,
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
        for d in [source, dest] where d.info.identity.kind == .blockDevice {
            minimum = max(minimum, UInt32(max(1, d.info.logicalBlockSize)))
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

    private func enter() throws(NBDError) {
        let ok = gate.withLock { g -> Bool in
            if g.closed { return false }
            g.inFlight += 1
            return true
        }
        if !ok { throw NBDError(.ESHUTDOWN, "job \(name) is closing") }
    }

    private func leave() {
        let wake = gate.withLock { g -> [CheckedContinuation<Void, Never>] in
            g.inFlight -= 1
            guard g.closed && g.inFlight == 0 else { return [] }
            defer { g.drained = [] }
            return g.drained
        }
        for c in wake { c.resume() }
    }

    /// Refuses new requests and waits for those in flight: after it the job may close.
    func shutdown() async {
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

    private func run<T: Sendable>(readsSource: Bool = false, _ body: @escaping @Sendable () throws -> T)
        async throws(NBDError) -> T
    {
        try await (readsSource ? sourceIO : io).runForNBD(body)
    }

    private func regions(covering bytes: Range<UInt64>) -> Range<Int> {
        let lo = Int(bytes.lowerBound / geometry.regionSize)
        let hi = Int((bytes.upperBound + geometry.regionSize - 1) / geometry.regionSize)
        return lo..<min(max(hi, lo + 1), geometry.regionCount)
    }

    /// Regions wholly inside `bytes` (the last, short region counts when `bytes` reaches the end).
    private func wholeRegions(in bytes: Range<UInt64>) -> Range<Int> {
        let lo = Int((bytes.lowerBound + geometry.regionSize - 1) / geometry.regionSize)
        let hi =
            bytes.upperBound >= geometry.targetSize ? geometry.regionCount : Int(bytes.upperBound / geometry.regionSize)
        return lo..<max(lo, hi)
    }

    private func covers(_ bytes: Range<UInt64>, region: Int) -> Bool {
        let r = geometry.byteRange(of: region..<region + 1)
        return bytes.lowerBound <= r.lowerBound && bytes.upperBound >= r.upperBound
    }

    /// Writes need a committer that still works: after a failed commit nothing written could be
    /// made durable, and the client must hear so at once.
    private func checkWritable() async throws(NBDError) {
        if let f = await committer.failure {
            throw NBDError(f.code == .noSpace ? .ENOSPC : .EIO, "job \(name) cannot commit: \(f.message)")
        }
    }

    private func recordDestinationWritten() async throws(NBDError) {
        guard ownership.destZeroed else { return }
        #if DEBUG
            if fault.withLock({ $0 }) == .skipRecordDestinationWritten { return }
        #endif
        do { try await committer.recordDestinationWritten() } catch {
            throw NBDError(error.code == .noSpace ? .ENOSPC : .EIO, "job \(name): \(error.message)")
        }
        ownership.destinationWritten()
    }

    /// Ends a claim: the committer and progress hear of the regions it hydrated, then the claim
    /// ends with them marked hydrated. In that order: once the last region is marked, the copier
    /// may see the job complete and commit completion, and the metadata refuses completion with
    /// a region the committer was never told of.
    private func finishClaim(_ regions: Range<Int>, hydrated: [Range<Int>]) async {
        // Nobody else changes these regions' hydration while the claim holds them.
        let newly = ownership.unhydratedRuns(in: hydrated)
        await recordHydrated(newly)
        ownership.finish(regions, hydrated: hydrated)
    }

    /// Progress and the committer hear of regions a client operation hydrated.
    private func recordHydrated(_ newly: [Range<Int>]) async {
        guard !newly.isEmpty else { return }
        let count = newly.reduce(0) { $0 + $1.count }
        let bytes = newly.reduce(UInt64(0)) { $0 + geometry.byteLength(of: $1) }
        progress.update { c in
            c.hydratedRegions += count
            c.hydratedBytes += bytes
            c.liveHydratedRegions += count
        }
        for r in newly { await committer.noteHydrated(r, budgetBytes: 0) }
    }

    /// Copies the unhydrated regions among `regions` (claimed by the caller) from the source.
    /// Returns the runs copied, to be marked hydrated with the claim's end.
    private func hydrate(_ regions: [Int]) async throws(NBDError) -> [Range<Int>] {
        var done: [Range<Int>] = []
        for r in regions where !ownership.isHydrated(r) {
            let job = BatchJob(
                source: source, dest: dest, geometry: geometry, zeroDestination: !ownership.destZeroed,
                retryDelaysMs: [10, 100], logger: logger, buffers: buffers)
            switch await job.execute(.copy(r..<r + 1), io: sourceIO) {
            case .success(let b):
                progress.update {
                    $0.writtenBytes += b.written; $0.skippedZeroBytes += b.zero
                }
                done.append(r..<r + 1)
            case .failure(let e):
                if e.code == .commitFailed { await committer.writebackFailed(e) }
                throw NBDError(e.code == .noSpace ? .ENOSPC : .EIO, "hydrating region \(r) first: \(e.message)")
            }
        }
        return done
    }

    // MARK: commands

    public func read(offset: UInt64, length: UInt32) async throws(NBDError) -> ByteBuffer {
        try enter()
        defer { leave() }
        let bytes = offset..<offset + UInt64(length)
        let runs = ownership.pinForRead(regions(covering: bytes))
        defer { ownership.unpin(runs) }
        // After a failed destination sync or writeback error the destination bytes of a region
        // hydrated since the last commit may be gone (the kernel drops pages whose writeback
        // failed; a read then returns what the disk holds, zeros over a sparse file): refuse them
        // rather than serve wrong data without an error (found by Tests/attacks/l8).
        for run in runs where !run.fromSource {
            if let r = ownership.lostRegion(in: run.regions) {
                throw NBDError(
                    .EIO,
                    "job \(name) failed to commit: region \(r) was not committed and its destination data may be lost")
            }
        }
        let (source, dest, geometry) = (self.source, self.dest, self.geometry)
        let buffer = try await run(readsSource: runs.contains { $0.fromSource }) {
            let n = Int(length)
            var buffer = ByteBufferAllocator().buffer(capacity: n)
            try buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: n) { raw in
                for run in runs {
                    let r = geometry.byteRange(of: run.regions)
                    let lo = max(r.lowerBound, bytes.lowerBound), hi = min(r.upperBound, bytes.upperBound)
                    guard lo < hi else { continue }
                    let slice = UnsafeMutableRawBufferPointer(rebasing: raw[Int(lo - offset)..<Int(hi - offset)])
                    try (run.fromSource ? source : dest).read(into: slice, at: lo)
                }
                return n
            }
            return buffer
        }
        progress.update { $0.liveReadBytes += UInt64(length) }
        if hydrateOnRead {
            let fromSource = runs.filter(\.fromSource).map(\.regions)
            if !fromSource.isEmpty { hydrateInBackground(fromSource) }
        }
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
            await ownership.claim(covered)
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
                await finishClaim(covered, hydrated: hydrated)
                throw error
            }
            await finishClaim(covered, hydrated: hydrated)
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
        await ownership.claim(whole)
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
        await finishClaim(whole, hydrated: released ? [whole] : [])
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
            await ownership.claim(covered)
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
                await finishClaim(covered, hydrated: hydrated)
                throw error
            }
            await finishClaim(covered, hydrated: hydrated)
        }
        if fua { try await flush() }
    }

    /// Appends an extent, merged into the last one when the flags agree.
    static func append(_ extents: inout [NBDExtent], _ length: UInt64, _ flags: UInt32) {
        if let last = extents.last, last.flags == flags, UInt64(last.length) + length <= UInt64(UInt32.max) {
            extents[extents.count - 1].length += UInt32(length)
        } else {
            extents.append(NBDExtent(length: UInt32(length), flags: flags))
        }
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

    public func cache(offset: UInt64, length: UInt32) async throws(NBDError) {
        try enter()
        defer { leave() }
        try await checkWritable()
        try await hydrate(covering: regions(covering: offset..<offset + UInt64(length)))
    }

    /// `hydrate_on_read`: copies the regions a read just got from the source, after the reply,
    /// in a task of its own (the client does not wait for it). Bounded; skipped while closing.
    private func hydrateInBackground(_ runs: [Range<Int>]) {
        let startWorker = readHydrations.withLock { st -> Bool in
            st.queue += runs.prefix(max(0, Self.maxReadHydrationQueue - st.queue.count))
            guard st.workers < Self.maxReadHydrationWorkers else { return false }
            st.workers += 1
            return true
        }
        guard startWorker else { return }
        Task {
            var usable = true
            do throws(NBDError) { try self.enter() } catch { usable = false }
            if usable {
                let failed = await self.committer.failure != nil
                if failed { self.leave(); usable = false }
            }
            while true {
                // A closing export stops here (its shutdown waits for this task).
                let closing = self.gate.withLock { $0.closed }
                if closing && usable { self.leave(); usable = false }
                let next = self.readHydrations.withLock { st -> Range<Int>? in
                    if !usable || st.queue.isEmpty {
                        if !usable { st.queue = [] }
                        st.workers -= 1
                        return nil
                    }
                    return st.queue.removeFirst()
                }
                guard let next else { break }
                do { try await self.hydrate(covering: next) } catch {
                    self.logger.debug(
                        "hydrate on read failed; the copier retries the region", metadata: ["error": "\(error)"])
                }
            }
            if usable { self.leave() }
        }
    }

    /// Copies every unhydrated region of `covered` now, a claim of a few regions at a time.
    private func hydrate(covering covered: Range<Int>) async throws(NBDError) {
        var at = covered.lowerBound
        while at < covered.upperBound {
            guard let start = ownership.firstHydrated(false, from: at), start < covered.upperBound else { break }
            let step = start..<min(covered.upperBound, start + Self.cacheStepRegions)
            await ownership.claim(step)
            var hydrated: [Range<Int>] = []
            do throws(NBDError) {
                hydrated = try await hydrate(Array(step))
            } catch {
                await finishClaim(step, hydrated: hydrated)
                throw error
            }
            await finishClaim(step, hydrated: hydrated)
            at = step.upperBound
        }
    }

    public func blockStatus(context: String, offset: UInt64, length: UInt32) async throws(NBDError) -> [NBDExtent] {
        try enter()
        defer { leave() }
        let end = min(size, offset + UInt64(length))
        // At most 2 GiB per reply (extent lengths are 32-bit), at least one region.
        let capped = offset..<min(end, offset + max(geometry.regionSize, 1 << 31))
        let covered = regions(covering: capped)
        let (ownership, source, dest, geometry) = (self.ownership, self.source, self.dest, self.geometry)
        // On the export's I/O threads, not the cooperative pool: a flood of block status requests
        // (each up to `maxStateRegions` regions of work) then delays this export's own clients,
        // never another export's or the daemon's handshakes and control calls.
        switch context {
        case Self.stateContext:
            return try await run {
                // One bit array of at most `maxStateRegions` regions per call (the client asks
                // again from where the reply ends).
                let covered = covered.lowerBound..<min(covered.upperBound, covered.lowerBound + Self.maxStateRegions)
                let bits = ownership.stateBits(covered)
                var extents: [NBDExtent] = []
                var i = 0
                while i < bits.count {
                    var j = i + 1
                    while j < bits.count && bits[j] == bits[i] { j += 1 }
                    let r = geometry.byteRange(of: covered.lowerBound + i..<covered.lowerBound + j)
                    let lo = max(r.lowerBound, offset)
                    extents.append(NBDExtent(length: UInt32(r.upperBound - lo), flags: bits[i]))
                    i = j
                }
                return extents
            }
        case NBDProtocol.baseAllocation:
            return try await run(readsSource: !ownership.allHydrated(covered)) {
                var extents: [NBDExtent] = []
                // Pinned a window at a time: regions whose hydration alternates give a run each,
                // and only the first `maxExtents` extents are answered.
                var window = covered.lowerBound
                while window < covered.upperBound && extents.count < Self.maxExtents {
                    let runs = ownership.pinForRead(window..<min(covered.upperBound, window + Self.maxStateRegions))
                    defer { ownership.unpin(runs) }
                    for run in runs where extents.count < Self.maxExtents {
                        let r = geometry.byteRange(of: run.regions)
                        var pos = max(r.lowerBound, capped.lowerBound)
                        let runEnd = min(r.upperBound, capped.upperBound)
                        let device = run.fromSource ? source : dest
                        while pos < runEnd && extents.count < Self.maxExtents {
                            let data = try device.nextData(from: pos)
                            let dataStart = min(data?.lowerBound ?? runEnd, runEnd)
                            if dataStart > pos {
                                Self.append(&extents, dataStart - pos, NBDProtocol.stateHole | NBDProtocol.stateZero)
                                pos = dataStart
                            }
                            if let data, pos < runEnd {
                                let dataEnd = min(data.upperBound, runEnd)
                                Self.append(&extents, dataEnd - pos, 0)
                                pos = dataEnd
                            }
                        }
                    }
                    window += Self.maxStateRegions
                }
                return extents
            }
        default:
            throw NBDError.invalid("unknown context \(context)")
        }
    }
}
