import Synchronization

/// Why metadata could not be used. Every case names the file.
public struct MetadataError: Error, Sendable, Equatable, CustomStringConvertible {
    public enum Reason: Error, Sendable, Equatable {
        case empty
        case truncated
        case badMagic
        case badChecksum(stored: UInt32, computed: UInt32)
        case unsupportedVersion(UInt32)
        case invalidField(String)
        /// Both superblock slots unusable: what failed in each.
        case noValidSuperblock(slot0: String, slot1: String)
        /// The bitmap pages do not add up to the superblock's hydrated count: a page was lost.
        case bitmapMismatch(expected: UInt64, found: UInt64)
        /// The metadata belongs to other devices, or to another geometry, than the job names.
        case identityMismatch(String)
        case alreadyExists
        /// An earlier commit failed; the store refuses to pretend it did not (no fsync retry).
        case failedEarlier(String)
        case io(StorageError)
    }

    public var path: String
    public var reason: Reason

    public init(path: String, reason: Reason) { self.path = path; self.reason = reason }

    public var description: String { "metadata \(path): \(reason.text)" }

    /// True when the file's contents are unusable (as opposed to an I/O failure reading it).
    public var isCorruption: Bool {
        switch reason {
        case .io, .alreadyExists, .identityMismatch, .failedEarlier: return false
        default: return true
        }
    }
}

extension MetadataError.Reason {
    var text: String {
        switch self {
        case .empty: return "block is empty (all zeros)"
        case .truncated: return "file is truncated"
        case .badMagic: return "bad magic (not hydration metadata)"
        case .badChecksum(let s, let c): return "checksum mismatch (stored \(hex(s)), computed \(hex(c)))"
        case .unsupportedVersion(let v): return "unsupported format version \(v)"
        case .invalidField(let f): return "invalid field: \(f)"
        case .noValidSuperblock(let a, let b): return "no valid superblock (slot 0: \(a); slot 1: \(b))"
        case .bitmapMismatch(let e, let f):
            return
                "bitmap pages hold \(f) hydrated regions but the superblock records \(e): a bitmap page was lost or corrupted"
        case .identityMismatch(let s): return "belongs to another job: \(s)"
        case .alreadyExists: return "already exists"
        case .failedEarlier(let s): return "an earlier commit failed (\(s)); refusing further commits"
        case .io(let e): return e.description
        }
    }
}

private func hex(_ v: UInt32) -> String { "0x" + String(v, radix: 16) }

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
    private let device: any StorageDevice
    private let state: Mutex<State>

    struct State {
        var header: MetadataHeader
        var committed: RegionMap
        /// Slot (0/1) of each page's committed version; -1 when the page was never written.
        var pageSlot: [Int8]
        var superblockSlot: Int
        var failure: String?
    }

    private init(path: String, device: any StorageDevice, state: State) {
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

    // MARK: open

    /// Opens existing metadata and recovers its last committed state (plus adopted page versions
    /// of an interrupted commit). With `readOnly`, nothing is written (offline check); otherwise
    /// a recovery superblock is written when pages were adopted, and the file is synced, so that
    /// everything this returns is durable before the engine acts on it (a killed process can
    /// leave a written-but-unsynced superblock in the page cache).
    public static func open(path: String, storage: any StorageProvider, readOnly: Bool = false) throws(MetadataError)
        -> (MetadataStore, MetadataRecoveryReport)
    {
        let device: any StorageDevice
        do {
            device = try storage.open(path, mode: readOnly ? .readOnly : .metadata(create: false))
        } catch {
            throw MetadataError(path: path, reason: .io(error))
        }
        func readBlock(_ offset: UInt64) throws(MetadataError) -> [UInt8] {
            do {
                return try device.read(count: MetadataFormat.blockSize, at: offset)
            } catch { throw MetadataError(path: path, reason: .io(error)) }
        }
        // Superblocks.
        var candidates: [(slot: Int, header: MetadataHeader)] = []
        var problems = ["", ""]
        let size = device.info.size
        for slot in 0..<2 {
            if size < MetadataFormat.superblockOffset(slot: slot) + UInt64(MetadataFormat.blockSize) {
                problems[slot] = MetadataError.Reason.truncated.text
                continue
            }
            switch MetadataHeader.decode(try readBlock(MetadataFormat.superblockOffset(slot: slot))) {
            case .success(let h): candidates.append((slot, h))
            case .failure(let r): problems[slot] = r.text
            }
        }
        guard let best = candidates.max(by: { $0.header.generation < $1.header.generation }) else {
            if problems[0] == MetadataError.Reason.truncated.text && size == 0 {
                throw MetadataError(path: path, reason: .truncated)
            }
            throw MetadataError(path: path, reason: .noValidSuperblock(slot0: problems[0], slot1: problems[1]))
        }
        let other = 1 - best.slot
        if let o = candidates.first(where: { $0.slot == other }), o.header.jobID != best.header.jobID {
            // Two valid superblocks of different jobs: the file was reused without being wiped.
            problems[other] = "belongs to job \(o.header.jobID)"
        }
        let header = best.header

        // Pages. First the committed view (per page, the newest valid slot not above the
        // superblock's generation), checked against the superblock's count: a page lost in both
        // slots must be refused, never read as "not hydrated".
        let pageCount = Int(header.pageCount)
        var map = RegionMap(count: Int(header.regionCount))
        var pageSlot = [Int8](repeating: -1, count: pageCount)
        var newer: [(page: Int, slot: Int, words: [UInt64])] = []
        var invalid = 0
        var maxGeneration = header.generation
        let idBytes = uuidBytes(header.jobID)
        for page in 0..<pageCount {
            var bestGen: UInt64 = 0
            var bestWords: [UInt64]? = nil
            var newest: (gen: UInt64, slot: Int, words: [UInt64])? = nil
            for slot in 0..<2 {
                let off = MetadataFormat.pageOffset(page: page, slot: slot)
                if off + UInt64(MetadataFormat.blockSize) > size { continue }
                let block = try readBlock(off)
                switch decodePage(block, page: page, jobID: idBytes) {
                case .absent: break
                case .invalid: invalid += 1
                case .valid(let gen, let words):
                    maxGeneration = max(maxGeneration, gen)
                    if gen > header.generation {
                        if newest == nil || gen > newest!.gen { newest = (gen, slot, words) }
                    } else if gen > bestGen {
                        bestGen = gen
                        bestWords = words
                        pageSlot[page] = Int8(slot)
                    }
                }
            }
            if let bestWords { map.load(words: bestWords, at: page * MetadataFormat.wordsPerPage) }
            if let newest { newer.append((page, newest.slot, newest.words)) }
        }
        guard UInt64(map.setCount) == header.hydratedCount else {
            throw MetadataError(
                path: path, reason: .bitmapMismatch(expected: header.hydratedCount, found: UInt64(map.setCount)))
        }
        // Then the page versions of a later commit whose superblock never became valid (a crash
        // between its two fsyncs, or a superblock that rotted). They are adopted, not wiped:
        // pages are written only after the destination's fdatasync, so every bit they hold is
        // durable on the destination — and with discard_source its source range may already be
        // released (if the superblock was durable and later rotted), so forgetting them could
        // re-copy garbage. Bits only ever go 0 -> 1, so a newer version is a superset.
        var adopted = 0
        for (page, slot, words) in newer {
            let base = page * MetadataFormat.wordsPerPage
            let before = map.count(
                in: min(
                    map.count, page * MetadataFormat.regionsPerPage)..<min(
                        map.count, (page + 1) * MetadataFormat.regionsPerPage))
            var merged = Array(map.wordSlice(base..<base + MetadataFormat.wordsPerPage))
            for i in merged.indices where i < words.count { merged[i] |= words[i] }
            map.load(words: merged, at: base)
            let after = map.count(
                in: min(
                    map.count, page * MetadataFormat.regionsPerPage)..<min(
                        map.count, (page + 1) * MetadataFormat.regionsPerPage))
            adopted += after - before
            pageSlot[page] = Int8(slot)
        }
        var current = header
        // The returned header always agrees with the returned map (also read-only).
        current.hydratedCount = UInt64(map.setCount)
        // What a restart must release again: the recorded pending list, plus every page that an
        // interrupted (or rotted) commit wrote (its regions may have been released if that
        // superblock had been durable), or everything committed for a version 1 file. Always
        // intersected with the committed map: nothing uncommitted is ever released.
        if header.discardSource {
            var pending = header.pendingReleaseUnknown ? [0..<map.count] : header.pendingRelease
            for (page, _, _) in newer {
                pending.append(
                    min(
                        map.count, page * MetadataFormat.regionsPerPage)..<min(
                            map.count, (page + 1) * MetadataFormat.regionsPerPage))
            }
            // Exact here (what the discarder will release); only the superblock's copy is bounded.
            current.pendingRelease = coalesce(pending).flatMap { map.setRanges(in: $0) }
            current.pendingReleaseUnknown = false
        } else {
            current.pendingRelease = []
        }
        var sbSlot = best.slot
        if !readOnly {
            do {
                // What this open relies on may exist only in the page cache: a process killed
                // between a write and its fsync, or one whose fsync failed (the pages then stay
                // cached and clean but never reach the disk, and a later fsync does not rewrite
                // them). Rewrite those blocks with the same bytes, so that the fsync below really
                // writes them: the superblock in use and every adopted page, before anything
                // (the recovery superblock, the discarder) depends on them.
                let reDirty =
                    [MetadataFormat.superblockOffset(slot: best.slot)]
                    + newer.map { MetadataFormat.pageOffset(page: $0.page, slot: $0.slot) }
                for offset in reDirty {
                    try device.write(bytes: try device.read(count: MetadataFormat.blockSize, at: offset), at: offset)
                }
                try device.sync()
                if !newer.isEmpty || maxGeneration > header.generation {
                    // A recovery commit: a superblock above every generation seen, recording the
                    // adopted pages (each page's newest valid version now has a generation below
                    // it). Until it is durable the file still reads as before, so a crash here is
                    // harmless; afterwards the next commit can never overwrite an adopted page's
                    // only copy, and no generation is ever reused.
                    current.generation = maxGeneration + 1
                    sbSlot = 1 - best.slot
                    try device.write(bytes: current.encode(), at: MetadataFormat.superblockOffset(slot: sbSlot))
                }
                // Everything returned below is durable before the engine acts on it.
                try device.sync()
            } catch {
                throw MetadataError(path: path, reason: .io(error))
            }
        }
        let report = MetadataRecoveryReport(
            superblockSlot: best.slot, otherSlotProblem: problems[other].isEmpty ? nil : problems[other],
            pagesRead: pageCount, uncommittedPageSlots: newer.count, adoptedRegions: adopted, invalidPageSlots: invalid)
        let st = State(header: current, committed: map, pageSlot: pageSlot, superblockSlot: sbSlot, failure: nil)
        return (MetadataStore(path: path, device: device, state: st), report)
    }

    enum PageDecode { case absent, invalid, valid(UInt64, [UInt64]) }

    static func decodePage(_ block: [UInt8], page: Int, jobID: [UInt8]) -> PageDecode {
        if block.allSatisfy({ $0 == 0 }) { return .absent }
        let r = BlockReader(bytes: block)
        guard r.slice(MetadataFormat.pgMagic, 8) == MetadataFormat.pageMagic else { return .invalid }
        var zeroed = block
        for i in 0..<4 { zeroed[MetadataFormat.pgCRC + i] = 0 }
        guard r.get(UInt32.self, at: MetadataFormat.pgCRC) == CRC32C.checksum(zeroed) else { return .invalid }
        guard r.get(UInt64.self, at: MetadataFormat.pgIndex) == UInt64(page),
            r.slice(MetadataFormat.pgJobID, 16) == jobID
        else { return .invalid }
        let gen = r.get(UInt64.self, at: MetadataFormat.pgGeneration)
        // One generation per commit: anything this large is damage, and must not overflow the
        // recovery generation.
        guard gen > 0, gen <= MetadataFormat.maxGeneration else { return .invalid }
        var words = [UInt64](repeating: 0, count: MetadataFormat.wordsPerPage)
        block.withUnsafeBytes { raw in
            for i in 0..<words.count {
                words[i] = UInt64(
                    littleEndian: raw.loadUnaligned(fromByteOffset: MetadataFormat.pgBitmap + i * 8, as: UInt64.self))
            }
        }
        return .valid(gen, words)
    }

    static func encodePage(page: Int, generation: UInt64, jobID: [UInt8], words: ArraySlice<UInt64>) -> [UInt8] {
        var w = BlockWriter(size: MetadataFormat.blockSize)
        w.put(MetadataFormat.pageMagic, at: MetadataFormat.pgMagic)
        w.put(generation, at: MetadataFormat.pgGeneration)
        w.put(UInt64(page), at: MetadataFormat.pgIndex)
        w.put(jobID, at: MetadataFormat.pgJobID)
        w.bytes.withUnsafeMutableBytes { raw in
            for (i, v) in words.enumerated() {
                raw.storeBytes(of: v.littleEndian, toByteOffset: MetadataFormat.pgBitmap + i * 8, as: UInt64.self)
            }
        }
        w.put(CRC32C.checksum(w.bytes), at: MetadataFormat.pgCRC)
        return w.bytes
    }

    // MARK: commit

    /// Records other device identities (the operator accepted the devices now at the job's
    /// paths): a superblock-only commit, atomic like any other.
    public func recordDevices(source: DeviceRecord, dest: DeviceRecord, nowMs: Int64) throws(MetadataError) {
        try state.withLock { (st: inout State) throws(MetadataError) in
            if let f = st.failure { throw MetadataError(path: path, reason: .failedEarlier(f)) }
            var header = st.header
            header.generation += 1
            header.version = MetadataFormat.version
            header.source = source
            header.dest = dest
            header.committedUnixMs = nowMs
            let sbSlot = 1 - st.superblockSlot
            do throws(StorageError) {
                try device.write(bytes: header.encode(), at: MetadataFormat.superblockOffset(slot: sbSlot))
                try device.sync()
            } catch {
                st.failure = error.description
                throw MetadataError(path: path, reason: .io(error))
            }
            st.superblockSlot = sbSlot
            st.header = header
        }
    }

    /// Durably records `ranges` (region indices) as hydrated, and `complete` when set. Writes
    /// only the pages the ranges touch plus one superblock, with an fsync after each phase.
    /// Returns the new generation. After any failure the store refuses every later commit: a
    /// failed fsync must not be retried as if nothing happened.
    ///
    /// `pendingRelease` (with discard_source) is the set of committed regions whose release has not
    /// been confirmed yet, this commit's ranges included; nil keeps the recorded list plus `ranges`.
    @discardableResult
    public func commit(
        _ ranges: [Range<Int>], complete: Bool = false, pendingRelease: [Range<Int>]? = nil,
        clearDestZeroed: Bool = false, nowMs: Int64
    ) throws(MetadataError) -> UInt64 {
        try state.withLock { (st: inout State) throws(MetadataError) -> UInt64 in
            if let f = st.failure { throw MetadataError(path: path, reason: .failedEarlier(f)) }
            // Only the pages the ranges touch are built: a commit costs O(changed pages), not a
            // copy of the whole bitmap (32 MiB for 1 TiB in 4 KiB regions).
            let rpp = MetadataFormat.regionsPerPage
            var pages: [Int] = []
            for r in ranges where !r.isEmpty {
                precondition(r.lowerBound >= 0 && r.upperBound <= st.committed.count, "range \(r) outside the target")
                for p in (r.lowerBound / rpp)...((r.upperBound - 1) / rpp) { pages.append(p) }
            }
            pages.sort()
            var dirtyPages: [Int] = []
            for p in pages where dirtyPages.last != p { dirtyPages.append(p) }
            var newPages: [(page: Int, words: [UInt64])] = []
            newPages.reserveCapacity(dirtyPages.count)
            var added = 0
            for p in dirtyPages {
                let wordBase = p * MetadataFormat.wordsPerPage
                var words = Array(st.committed.wordSlice(wordBase..<wordBase + MetadataFormat.wordsPerPage))
                if words.count < MetadataFormat.wordsPerPage {
                    words += [UInt64](repeating: 0, count: MetadataFormat.wordsPerPage - words.count)
                }
                let before = words.reduce(0) { $0 + $1.nonzeroBitCount }
                let pageRegions = (p * rpp)..<((p + 1) * rpp)
                for r in ranges {
                    let lo = max(r.lowerBound, pageRegions.lowerBound), hi = min(r.upperBound, pageRegions.upperBound)
                    if lo < hi { setBits(&words, (lo - pageRegions.lowerBound)..<(hi - pageRegions.lowerBound)) }
                }
                added += words.reduce(0) { $0 + $1.nonzeroBitCount } - before
                newPages.append((p, words))
            }
            let newCount = st.committed.setCount + added
            let gen = st.header.generation + 1
            var header = st.header
            header.generation = gen
            header.hydratedCount = UInt64(newCount)
            header.complete = complete || header.complete
            if clearDestZeroed { header.destZeroed = false }
            header.committedUnixMs = nowMs
            header.version = MetadataFormat.version
            if header.discardSource {
                let pending = pendingRelease ?? (header.pendingRelease + ranges)
                header.pendingRelease = coalesce(pending.filter { !$0.isEmpty })
                header.pendingReleaseUnknown = false
            }
            if header.complete && newCount != st.committed.count {
                throw MetadataError(
                    path: path,
                    reason: .invalidField("complete with \(st.committed.count - newCount) regions unhydrated"))
            }
            let idBytes = uuidBytes(header.jobID)
            do throws(StorageError) {
                for (p, words) in newPages {
                    let block = Self.encodePage(page: p, generation: gen, jobID: idBytes, words: words[...])
                    let slot = st.pageSlot[p] == 0 ? 1 : 0
                    try device.write(bytes: block, at: MetadataFormat.pageOffset(page: p, slot: slot))
                }
                // Phase 1 durable before the superblock can point at it.
                if !newPages.isEmpty { try device.sync() }
                let sbSlot = 1 - st.superblockSlot
                try device.write(bytes: header.encode(), at: MetadataFormat.superblockOffset(slot: sbSlot))
                try device.sync()
                for p in dirtyPages { st.pageSlot[p] = st.pageSlot[p] == 0 ? 1 : 0 }
                st.superblockSlot = sbSlot
            } catch {
                st.failure = error.description
                throw MetadataError(path: path, reason: .io(error))
            }
            // Durable: now, and only now, the in-memory committed map changes (in place).
            for r in ranges where !r.isEmpty { st.committed.set(r) }
            st.header = header
            return gen
        }
    }
}

/// Sets bits `range` of a word array.
private func setBits(_ words: inout [UInt64], _ range: Range<Int>) {
    var i = range.lowerBound
    while i < range.upperBound {
        let first = i & 63
        let last = min(64, first + (range.upperBound - i))
        let mask: UInt64 = last - first == 64 ? ~0 : ((UInt64(1) << UInt64(last - first)) - 1) << UInt64(first)
        words[i >> 6] |= mask
        i += last - first
    }
}

// Glibc's EEXIST without importing Glibc into this file's namespace twice.
#if canImport(Glibc)
    import Glibc
    let EEXIST_ = EEXIST
#endif
