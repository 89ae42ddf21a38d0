/// The on-disk layout of a job's metadata. `docs/metadata-format.md` is the prose version of this
/// file; change both together.
///
///     offset 0          superblock slot 0  (4 KiB)
///     offset 4096       superblock slot 1  (4 KiB)
///     offset 8192 + (2*p + s) * 4096       bitmap page p, slot s   (4 KiB each)
///
/// All integers little-endian. Every block carries a CRC32C over its 4096 bytes with the CRC field
/// zeroed.
public enum MetadataFormat {
    public static let blockSize = 4096
    public static let superblockMagic: [UInt8] = Array("HYDRMETA".utf8)
    public static let pageMagic: [UInt8] = Array("HYDRPAGE".utf8)
    /// Version written. Version 1 files (no stable identities, no pending-release list) are read
    /// and upgraded by their next commit.
    public static let version: UInt32 = 2
    public static let oldestReadableVersion: UInt32 = 1
    public static let pageHeaderSize = 64
    /// 4032 bytes of bitmap per page: 504 words, 32,256 regions.
    public static let wordsPerPage = (blockSize - pageHeaderSize) / 8
    public static let regionsPerPage = wordsPerPage * 64
    public static let maxPathBytes = 1024
    /// Generations count commits; a value above this is damage (and must not overflow).
    public static let maxGeneration: UInt64 = 1 << 62

    public static func superblockOffset(slot: Int) -> UInt64 { UInt64(slot * blockSize) }
    public static func pageOffset(page: Int, slot: Int) -> UInt64 {
        UInt64(2 * blockSize) + UInt64(2 * page + slot) * UInt64(blockSize)
    }
    public static func pageCount(regions: Int) -> Int { (regions + regionsPerPage - 1) / regionsPerPage }
    public static func fileSize(regions: Int) -> UInt64 { pageOffset(page: pageCount(regions: regions), slot: 0) }

    // Superblock field offsets.
    static let sbMagic = 0, sbVersion = 8, sbCRC = 12, sbGeneration = 16, sbJobID = 24
    static let sbRegionSize = 40, sbTargetSize = 48, sbRegionCount = 56, sbPageCount = 64
    static let sbHydrated = 72, sbFlags = 80
    static let sbSource = 88, sbDest = 128  // 40 bytes each: kind u32, pad u32, dev, ino, rdev, size
    static let sbCreated = 168, sbCommitted = 176, sbSourcePathLen = 184, sbDestPathLen = 186
    static let sbSourcePath = 192, sbDestPath = 192 + 1024
    // Version 2.
    static let sbSourceStableID = 2240, sbDestStableID = 2240 + 256  // 256 bytes each, UTF-8, zero padded
    static let sbPendingCount = 2752  // u32, then u32 reserved
    static let sbPendingRanges = 2760  // count x (u32 first region, u32 region count)
    public static let maxStableIDBytes = 256
    /// Ranges the pending-release list holds at most; a longer list is widened (see
    /// `PendingRelease.bounded`), never cut.
    public static let maxPendingRanges = (blockSize - sbPendingRanges) / 8

    // Page field offsets.
    static let pgMagic = 0, pgCRC = 8, pgGeneration = 16, pgIndex = 24, pgJobID = 32, pgBitmap = 64

    static let flagDiscardSource: UInt32 = 1 << 0
    static let flagDestZeroed: UInt32 = 1 << 1
    static let flagComplete: UInt32 = 1 << 2
}

/// The decoded superblock.
public struct MetadataHeader: Sendable, Equatable, Codable {
    public var version: UInt32
    public var generation: UInt64
    public var jobID: String
    public var regionSize: UInt64
    public var targetSize: UInt64
    public var regionCount: UInt64
    public var pageCount: UInt64
    public var hydratedCount: UInt64
    public var discardSource: Bool
    public var destZeroed: Bool
    public var complete: Bool
    public var source: DeviceRecord
    public var dest: DeviceRecord
    public var createdUnixMs: Int64
    public var committedUnixMs: Int64
    /// With discard_source: committed regions whose release may not have happened yet (sorted,
    /// disjoint). In memory it is exact; the superblock holds at most `maxPendingRanges` of them,
    /// widened over the smallest gaps when there are more (see `PendingRelease.bounded`), and
    /// `MetadataStore.open` intersects what it reads with the committed map. A restart releases
    /// only these. Empty once every release is confirmed.
    public var pendingRelease: [Range<Int>] = []
    /// A version 1 file does not know which releases are pending: all committed regions may be.
    public var pendingReleaseUnknown: Bool = false

    /// Nothing of the source may still need releasing: a complete job in this state never
    /// touches its source again.
    public var releasesSettled: Bool { !discardSource || (pendingRelease.isEmpty && !pendingReleaseUnknown) }
}

/// The bounded pending-release list of the superblock.
enum PendingRelease {
    /// Sorted, coalesced, and at most `MetadataFormat.maxPendingRanges` long: when longer, the
    /// closest neighbours are merged (the gap joins the list). Widening is safe because a
    /// restart releases only `pending ∩ committed`, and every committed region is one whose
    /// release was already allowed.
    static func bounded(_ ranges: [Range<Int>], limit: Int = MetadataFormat.maxPendingRanges) -> [Range<Int>] {
        var r = coalesce(ranges)
        while r.count > limit {
            var best = 0
            var bestGap = Int.max
            for i in 0..<(r.count - 1) {
                let gap = r[i + 1].lowerBound - r[i].upperBound
                if gap < bestGap { bestGap = gap; best = i }
            }
            r[best] = r[best].lowerBound..<r[best + 1].upperBound
            r.remove(at: best + 1)
        }
        return r
    }
}

/// Little-endian encoding into a fixed block.
struct BlockWriter {
    var bytes: [UInt8]
    init(size: Int) { bytes = [UInt8](repeating: 0, count: size) }
    mutating func put<T: FixedWidthInteger>(_ v: T, at o: Int) {
        var le = v.littleEndian
        withUnsafeBytes(of: &le) { raw in
            for i in 0..<MemoryLayout<T>.size { bytes[o + i] = raw[i] }
        }
    }
    mutating func put(_ b: [UInt8], at o: Int) { bytes.replaceSubrange(o..<o + b.count, with: b) }
}

struct BlockReader {
    let bytes: [UInt8]
    func get<T: FixedWidthInteger>(_: T.Type, at o: Int) -> T {
        var v: T = 0
        for i in (0..<MemoryLayout<T>.size).reversed() { v = (v << 8) | T(truncatingIfNeeded: bytes[o + i]) }
        return v
    }
    func slice(_ o: Int, _ n: Int) -> [UInt8] { Array(bytes[o..<o + n]) }
}

extension MetadataHeader {
    func encode() -> [UInt8] {
        var w = BlockWriter(size: MetadataFormat.blockSize)
        w.put(MetadataFormat.superblockMagic, at: MetadataFormat.sbMagic)
        w.put(version, at: MetadataFormat.sbVersion)
        w.put(generation, at: MetadataFormat.sbGeneration)
        w.put(uuidBytes(jobID), at: MetadataFormat.sbJobID)
        w.put(regionSize, at: MetadataFormat.sbRegionSize)
        w.put(targetSize, at: MetadataFormat.sbTargetSize)
        w.put(regionCount, at: MetadataFormat.sbRegionCount)
        w.put(pageCount, at: MetadataFormat.sbPageCount)
        w.put(hydratedCount, at: MetadataFormat.sbHydrated)
        var flags: UInt32 = 0
        if discardSource { flags |= MetadataFormat.flagDiscardSource }
        if destZeroed { flags |= MetadataFormat.flagDestZeroed }
        if complete { flags |= MetadataFormat.flagComplete }
        w.put(flags, at: MetadataFormat.sbFlags)
        for (rec, o) in [(source, MetadataFormat.sbSource), (dest, MetadataFormat.sbDest)] {
            w.put(UInt32(rec.identity.kind == .blockDevice ? 2 : rec.identity.kind == .remote ? 3 : 1), at: o)
            w.put(rec.identity.device, at: o + 8)
            w.put(rec.identity.inode, at: o + 16)
            w.put(rec.identity.rdev, at: o + 24)
            w.put(rec.size, at: o + 32)
        }
        w.put(createdUnixMs, at: MetadataFormat.sbCreated)
        w.put(committedUnixMs, at: MetadataFormat.sbCommitted)
        let sp = Array(source.path.utf8.prefix(MetadataFormat.maxPathBytes))
        let dp = Array(dest.path.utf8.prefix(MetadataFormat.maxPathBytes))
        w.put(UInt16(sp.count), at: MetadataFormat.sbSourcePathLen)
        w.put(UInt16(dp.count), at: MetadataFormat.sbDestPathLen)
        w.put(sp, at: MetadataFormat.sbSourcePath)
        w.put(dp, at: MetadataFormat.sbDestPath)
        w.put(Array(source.stableID.utf8.prefix(MetadataFormat.maxStableIDBytes)), at: MetadataFormat.sbSourceStableID)
        w.put(Array(dest.stableID.utf8.prefix(MetadataFormat.maxStableIDBytes)), at: MetadataFormat.sbDestStableID)
        // Version 2 has no "unknown" flag: an unknown list is written as every committed range's
        // cover, which the store computes; here the list is taken as given.
        let pending = PendingRelease.bounded(pendingRelease)
        w.put(UInt32(pending.count), at: MetadataFormat.sbPendingCount)
        for (i, r) in pending.enumerated() {
            w.put(UInt32(r.lowerBound), at: MetadataFormat.sbPendingRanges + 8 * i)
            w.put(UInt32(r.count), at: MetadataFormat.sbPendingRanges + 8 * i + 4)
        }
        let crc = CRC32C.checksum(w.bytes)
        w.put(crc, at: MetadataFormat.sbCRC)
        return w.bytes
    }

    /// Decodes a superblock, or says exactly why it is not one.
    static func decode(_ bytes: [UInt8]) -> Result<MetadataHeader, MetadataError.Reason> {
        guard bytes.count == MetadataFormat.blockSize else { return .failure(.truncated) }
        let r = BlockReader(bytes: bytes)
        if r.slice(MetadataFormat.sbMagic, 8) != MetadataFormat.superblockMagic {
            return .failure(bytes.allSatisfy { $0 == 0 } ? .empty : .badMagic)
        }
        var zeroed = bytes
        for i in 0..<4 { zeroed[MetadataFormat.sbCRC + i] = 0 }
        let stored = r.get(UInt32.self, at: MetadataFormat.sbCRC)
        let actual = CRC32C.checksum(zeroed)
        guard stored == actual else { return .failure(.badChecksum(stored: stored, computed: actual)) }
        let version = r.get(UInt32.self, at: MetadataFormat.sbVersion)
        guard version >= MetadataFormat.oldestReadableVersion, version <= MetadataFormat.version else {
            return .failure(.unsupportedVersion(version))
        }
        let flags = r.get(UInt32.self, at: MetadataFormat.sbFlags)
        func record(_ o: Int, pathAt po: Int, lenAt lo: Int, stableAt so: Int) -> DeviceRecord? {
            let kindRaw = r.get(UInt32.self, at: o)
            guard kindRaw == 1 || kindRaw == 2 || kindRaw == 3 else { return nil }
            let len = Int(r.get(UInt16.self, at: lo))
            guard len <= MetadataFormat.maxPathBytes else { return nil }
            let stable = version >= 2 ? r.slice(so, MetadataFormat.maxStableIDBytes).prefix { $0 != 0 } : []
            return DeviceRecord(
                path: String(decoding: r.slice(po, len), as: UTF8.self),
                identity: DeviceIdentity(
                    kind: kindRaw == 2 ? .blockDevice : kindRaw == 3 ? .remote : .regularFile,
                    device: r.get(UInt64.self, at: o + 8), inode: r.get(UInt64.self, at: o + 16),
                    rdev: r.get(UInt64.self, at: o + 24)),
                size: r.get(UInt64.self, at: o + 32),
                stableID: String(decoding: stable, as: UTF8.self))
        }
        guard
            let src = record(
                MetadataFormat.sbSource, pathAt: MetadataFormat.sbSourcePath, lenAt: MetadataFormat.sbSourcePathLen,
                stableAt: MetadataFormat.sbSourceStableID),
            let dst = record(
                MetadataFormat.sbDest, pathAt: MetadataFormat.sbDestPath, lenAt: MetadataFormat.sbDestPathLen,
                stableAt: MetadataFormat.sbDestStableID)
        else { return .failure(.invalidField("device record")) }
        var h = MetadataHeader(
            version: version,
            generation: r.get(UInt64.self, at: MetadataFormat.sbGeneration),
            jobID: uuidString(r.slice(MetadataFormat.sbJobID, 16)),
            regionSize: r.get(UInt64.self, at: MetadataFormat.sbRegionSize),
            targetSize: r.get(UInt64.self, at: MetadataFormat.sbTargetSize),
            regionCount: r.get(UInt64.self, at: MetadataFormat.sbRegionCount),
            pageCount: r.get(UInt64.self, at: MetadataFormat.sbPageCount),
            hydratedCount: r.get(UInt64.self, at: MetadataFormat.sbHydrated),
            discardSource: flags & MetadataFormat.flagDiscardSource != 0,
            destZeroed: flags & MetadataFormat.flagDestZeroed != 0,
            complete: flags & MetadataFormat.flagComplete != 0,
            source: src, dest: dst,
            createdUnixMs: r.get(Int64.self, at: MetadataFormat.sbCreated),
            committedUnixMs: r.get(Int64.self, at: MetadataFormat.sbCommitted))
        if version >= 2 {
            let n = Int(r.get(UInt32.self, at: MetadataFormat.sbPendingCount))
            guard n <= MetadataFormat.maxPendingRanges else {
                return .failure(.invalidField("pending release count \(n)"))
            }
            var pending: [Range<Int>] = []
            var last = 0
            for i in 0..<n {
                let first = UInt64(r.get(UInt32.self, at: MetadataFormat.sbPendingRanges + 8 * i))
                let count = UInt64(r.get(UInt32.self, at: MetadataFormat.sbPendingRanges + 8 * i + 4))
                // Sorted, disjoint, non-empty and inside the target: anything else is a writer bug.
                guard count > 0, first >= UInt64(last), first + count <= h.regionCount else {
                    return .failure(.invalidField("pending release range \(i)"))
                }
                pending.append(Int(first)..<Int(first + count))
                last = Int(first + count)
            }
            h.pendingRelease = pending
        } else {
            h.pendingReleaseUnknown = h.discardSource
        }
        // Internal consistency: a checksum protects against bit rot, not against a writer bug.
        guard RegionGeometry.isValidRegionSize(h.regionSize) else {
            return .failure(.invalidField("region size \(h.regionSize)"))
        }
        // Checked without overflow: a crafted size must be refused, not crash the daemon.
        guard h.targetSize > 0, h.regionCount <= RegionGeometry.maxRegions,
            h.targetSize <= RegionGeometry.maxRegions * h.regionSize,
            h.regionCount == h.targetSize / h.regionSize + (h.targetSize % h.regionSize == 0 ? 0 : 1)
        else { return .failure(.invalidField("target size / region count")) }
        guard h.pageCount == UInt64(MetadataFormat.pageCount(regions: Int(h.regionCount))) else {
            return .failure(.invalidField("page count"))
        }
        guard h.hydratedCount <= h.regionCount, !h.complete || h.hydratedCount == h.regionCount else {
            return .failure(.invalidField("hydrated count"))
        }
        guard h.generation > 0, h.generation <= MetadataFormat.maxGeneration else {
            return .failure(.invalidField("generation"))
        }
        return .success(h)
    }
}

func uuidBytes(_ s: String) -> [UInt8] {
    let hex = s.filter { $0 != "-" }
    var out: [UInt8] = []
    var it = hex.makeIterator()
    while let a = it.next(), let b = it.next() {
        out.append(UInt8(String([a, b]), radix: 16) ?? 0)
    }
    return (out + [UInt8](repeating: 0, count: 16)).prefix(16).map { $0 }
}

func uuidString(_ b: [UInt8]) -> String {
    let hex = b.map { String($0, radix: 16).count == 1 ? "0" + String($0, radix: 16) : String($0, radix: 16) }.joined()
    let c = Array(hex)
    return String(c[0..<8]) + "-" + String(c[8..<12]) + "-" + String(c[12..<16]) + "-" + String(c[16..<20]) + "-"
        + String(c[20..<32])
}

func randomUUID() -> String {
    var g = SystemRandomNumberGenerator()
    var b = (0..<16).map { _ in UInt8.random(in: 0...255, using: &g) }
    b[6] = (b[6] & 0x0f) | 0x40
    b[8] = (b[8] & 0x3f) | 0x80
    return uuidString(b)
}

/// Region-size rules, shared by the engine, the daemon's validation and the metadata decoder.
public enum RegionGeometry {
    public static let minRegionSize: UInt64 = 4096
    public static let maxRegionSize: UInt64 = 1 << 30
    public static let defaultRegionSize: UInt64 = 64 * 1024
    public static let maxRegions: UInt64 = 1 << 31

    public static func isValidRegionSize(_ s: UInt64) -> Bool {
        s >= minRegionSize && s <= maxRegionSize && s.nonzeroBitCount == 1
    }

    public static func regionCount(size: UInt64, regionSize: UInt64) -> UInt64 {
        (size + regionSize - 1) / regionSize
    }
}
