import HydrationTestSupport
import Testing

@testable import HydrationStorage

/// Format version 2: stable device identities and the pending-release list (docs/metadata-format.md).
@Suite struct MetadataV2Tests {
    static let regionSize: UInt64 = 4096

    func options(size: UInt64, discard: Bool = true) -> MetadataCreateOptions {
        MetadataCreateOptions(
            regionSize: Self.regionSize,
            source: DeviceRecord(
                path: "/src", identity: DeviceIdentity(kind: .regularFile, device: 1, inode: 2, rdev: 0), size: size,
                stableID: "file:fsid=abc:ino=2:btime=123.456"),
            dest: DeviceRecord(
                path: "/dst", identity: DeviceIdentity(kind: .blockDevice, device: 0, inode: 0, rdev: 0x0701),
                size: size,
                stableID: "loop:" + String(repeating: "x", count: 300)),
            discardSource: discard, destZeroed: false)
    }

    @Test func stableIdentitiesAndPendingListRoundTrip() throws {
        let sim = SimulatedStorage()
        let store = try MetadataStore.create(
            path: "/meta", options: options(size: 10_000 * Self.regionSize), storage: sim, nowMs: 1)
        try store.commit([0..<100, 500..<600], pendingRelease: [0..<100, 500..<600], nowMs: 2)
        try store.commit([100..<200], pendingRelease: [550..<600, 100..<200], nowMs: 3)
        let (reopened, _) = try MetadataStore.open(path: "/meta", storage: sim, readOnly: true)
        let h = reopened.header
        #expect(h.version == 2)
        #expect(h.source.stableID == "file:fsid=abc:ino=2:btime=123.456")
        // Longer identities are cut at 256 bytes, consistently at create and at every reopen.
        #expect(h.dest.stableID == "loop:" + String(repeating: "x", count: 251))
        #expect(h.pendingRelease == [100..<200, 550..<600])
        #expect(!h.releasesSettled)
        // Without discard_source nothing is ever pending.
        let plain = try MetadataStore.create(
            path: "/plain", options: options(size: 1000 * Self.regionSize, discard: false), storage: sim, nowMs: 1)
        try plain.commit([0..<10], pendingRelease: [0..<10], nowMs: 2)
        #expect(try MetadataStore.open(path: "/plain", storage: sim, readOnly: true).0.header.releasesSettled)
    }

    /// The list is bounded; a longer one is widened over its smallest gaps, and at open it is cut
    /// back to committed regions: nothing uncommitted is ever released because of the widening.
    @Test func longPendingListIsWidenedNeverCutAndIntersectedAtOpen() throws {
        let sim = SimulatedStorage()
        let store = try MetadataStore.create(
            path: "/meta", options: options(size: 100_000 * Self.regionSize), storage: sim, nowMs: 1)
        // 400 separate committed runs, gaps of growing size.
        var ranges: [Range<Int>] = []
        var at = 0
        for i in 0..<400 { ranges.append(at..<at + 3); at += 3 + 1 + i % 7 }
        try store.commit(ranges, pendingRelease: ranges, nowMs: 2)
        let bounded = PendingRelease.bounded(ranges)
        #expect(bounded.count == MetadataFormat.maxPendingRanges)
        for r in ranges {
            #expect(bounded.contains { $0.lowerBound <= r.lowerBound && r.upperBound <= $0.upperBound }, "\(r) dropped")
        }
        let (ro, _) = try MetadataStore.open(path: "/meta", storage: sim, readOnly: true)
        #expect(
            coalesce(ro.header.pendingRelease) == coalesce(ranges),
            "open must intersect the widened list with the committed map")
    }

    /// A version 1 file (written by the previous release) is read; it does not know what is
    /// pending, so everything committed is, and its next commit writes version 2.
    @Test func versionOneFilesAreReadAndUpgraded() throws {
        let sim = SimulatedStorage()
        let store = try MetadataStore.create(
            path: "/meta", options: options(size: 1000 * Self.regionSize), storage: sim, nowMs: 1)
        try store.commit([0..<10, 20..<30], pendingRelease: [], nowMs: 2)
        // Rewrite the current superblock as version 1 would have: no identities, no list.
        var h = store.header
        h.version = 1
        h.pendingRelease = []
        h.source.stableID = ""
        h.dest.stableID = ""
        var block = h.encode()
        for i in 2240..<4096 { block[i] = 0 }
        for i in 12..<16 { block[i] = 0 }
        let crc = CRC32C.checksum(block)
        withUnsafeBytes(of: crc.littleEndian) { for i in 0..<4 { block[12 + i] = $0[i] } }
        let slot = try [0, 1].first {
            MetadataHeader.decode(try sim.open("/meta", mode: .readOnly).read(count: 4096, at: UInt64($0 * 4096))).map(
                \.generation) == .success(h.generation)
        }
        try sim.open("/meta", mode: .metadata(create: false)).write(bytes: block, at: UInt64(try #require(slot) * 4096))

        let (v1, _) = try MetadataStore.open(path: "/meta", storage: sim, readOnly: true)
        #expect(v1.header.version == 1)
        #expect(v1.header.source.stableID.isEmpty)
        #expect(
            v1.header.pendingRelease == [0..<10, 20..<30],
            "a version 1 file must treat every committed region as pending")
        let (rw, _) = try MetadataStore.open(path: "/meta", storage: sim)
        try rw.commit([30..<40], nowMs: 3)
        let up = try MetadataStore.open(path: "/meta", storage: sim, readOnly: true).0.header
        #expect(up.version == 2)
        #expect(up.pendingRelease == [0..<10, 20..<40])
    }

    @Test func invalidPendingRangesAreRefused() throws {
        let sim = SimulatedStorage()
        let store = try MetadataStore.create(
            path: "/meta", options: options(size: 1000 * Self.regionSize), storage: sim, nowMs: 1)
        for (first, count) in [(UInt32(990), UInt32(20)), (5, 0)] {
            var block = store.header.encode()
            func put(_ v: UInt32, _ o: Int) {
                withUnsafeBytes(of: v.littleEndian) { for i in 0..<4 { block[o + i] = $0[i] } }
            }
            put(1, MetadataFormat.sbPendingCount)
            put(first, MetadataFormat.sbPendingRanges)
            put(count, MetadataFormat.sbPendingRanges + 4)
            put(0, MetadataFormat.sbCRC)
            put(CRC32C.checksum(block), MetadataFormat.sbCRC)
            guard case .failure(.invalidField(let f)) = MetadataHeader.decode(block) else {
                Issue.record("pending range \(first)+\(count) accepted"); continue
            }
            #expect(f.contains("pending release"))
        }
    }
}
