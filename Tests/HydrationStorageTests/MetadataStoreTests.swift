import ControlProtocol
import HydrationTestSupport
import Testing

@testable import HydrationStorage

@Suite struct MetadataStoreTests {
    static let regionSize: UInt64 = 4096

    func options(size: UInt64, discard: Bool = true) -> MetadataCreateOptions {
        MetadataCreateOptions(
            regionSize: Self.regionSize,
            source: DeviceRecord(
                path: "/src", identity: DeviceIdentity(kind: .regularFile, device: 1, inode: 2, rdev: 0), size: size),
            dest: DeviceRecord(
                path: "/dst", identity: DeviceIdentity(kind: .blockDevice, device: 0, inode: 0, rdev: 0x0701),
                size: size),
            discardSource: discard, destZeroed: false)
    }

    @Test func createOpenCommitReopen() throws {
        let sim = SimulatedStorage()
        // 100,000 regions: 4 bitmap pages.
        let size: UInt64 = 100_000 * Self.regionSize - 100
        let store = try MetadataStore.create(path: "/meta", options: options(size: size), storage: sim, nowMs: 1)
        #expect(store.header.regionCount == 100_000)
        #expect(store.header.pageCount == 4)
        let (fresh, _) = try MetadataStore.open(path: "/meta", storage: sim)
        #expect(fresh.header == store.header)
        #expect(fresh.committedMap.setCount == 0)

        try store.commit([0..<10, 40_000..<40_005, 99_999..<100_000], nowMs: 2)
        try store.commit([10..<20], nowMs: 3)
        let (reopened, report) = try MetadataStore.open(path: "/meta", storage: sim)
        #expect(reopened.header.generation == 3)
        #expect(reopened.committedMap.setRanges() == [0..<20, 40_000..<40_005, 99_999..<100_000])
        #expect(reopened.header.source.path == "/src")
        #expect(reopened.header.dest.identity.rdev == 0x0701)
        #expect(report.uncommittedPageSlots == 0)

        try reopened.commit([20..<100_000], complete: true, nowMs: 4)
        let (done, _) = try MetadataStore.open(path: "/meta", storage: sim)
        #expect(done.header.complete)
        #expect(done.committedMap.isComplete)
    }

    @Test func commitWritesOnlyChangedPages() throws {
        let sim = SimulatedStorage()
        let store = try MetadataStore.create(
            path: "/meta", options: options(size: 200_000 * Self.regionSize), storage: sim, nowMs: 1)
        let before = sim.log.count
        try store.commit([150_000..<150_010], nowMs: 2)
        let ops = sim.log[before...].filter { $0.path == "/meta" }
        // One page, one superblock, two syncs.
        #expect(ops.filter { $0.kind == .write }.count == 2)
        #expect(ops.filter { $0.kind == .sync }.count == 2)
        // Pages first, synced, then the superblock, synced.
        #expect(ops.map(\.kind) == [.write, .sync, .write, .sync])
        #expect(ops[2].offset < UInt64(2 * MetadataFormat.blockSize))
    }

    @Test func refusesToCommitComplete() throws {
        let sim = SimulatedStorage()
        let store = try MetadataStore.create(
            path: "/meta", options: options(size: 10 * Self.regionSize), storage: sim, nowMs: 1)
        #expect(throws: MetadataError.self) { try store.commit([0..<5], complete: true, nowMs: 2) }
    }

    /// A failure (crash) at every operation of a commit leaves either the old or the new state.
    @Test func commitIsAtomicAtEveryOperation() throws {
        let size: UInt64 = 70_000 * Self.regionSize  // 3 pages
        var crashPoints = 0
        for failAt in 0..<16 {
            let sim = SimulatedStorage()
            let store = try MetadataStore.create(path: "/meta", options: options(size: size), storage: sim, nowMs: 1)
            try store.commit([0..<100, 33_000..<33_100], nowMs: 2)
            let old = store.committedMap
            let start = sim.log.count
            sim.setFault { op in op.seq == start + failAt ? 5 : nil }
            let newRanges = [100..<200, 33_100..<33_200, 65_000..<66_000]
            var failed = false
            do { try store.commit(newRanges, nowMs: 3) } catch { failed = true }
            sim.setFault(nil)
            if !failed { break }
            crashPoints += 1
            // No retry as if nothing happened.
            #expect(throws: MetadataError.self) { try store.commit([300..<301], nowMs: 4) }
            let (reopened, _) = try MetadataStore.open(path: "/meta", storage: sim)
            var new = old
            for r in newRanges { new.set(r) }
            let got = reopened.committedMap
            // Never less than the old state, never more than the new one (pages of an interrupted
            // commit are adopted: their regions were synced on the destination first).
            var union = got
            for r in old.setRanges() { union.set(r) }
            #expect(union == got, "fail at op \(failAt): committed regions lost")
            for r in got.setRanges() {
                for i in r { #expect(new[i], "fail at op \(failAt): region \(i) appeared"); if !new[i] { break } }
            }
            // The store stays usable after recovery.
            try reopened.commit([500..<501], nowMs: 5)
        }
        #expect(crashPoints >= 4)
    }

    /// A torn write (half a block old, half new) of the superblock or of a page during a commit.
    @Test(arguments: ["page", "superblock"], [0, 1])
    func tornWritesRecoverToPreviousState(target: String, oldHalf: Int) throws {
        let size: UInt64 = 40_000 * Self.regionSize
        let sim = SimulatedStorage()
        let store = try MetadataStore.create(path: "/meta", options: options(size: size), storage: sim, nowMs: 1)
        try store.commit([0..<10], nowMs: 2)  // gen 2: page 0 -> slot 0, superblock -> slot 1
        let old = store.committedMap
        let image = sim.contents("/meta")! + [UInt8](repeating: 0, count: 8 * MetadataFormat.blockSize)
        // gen 3: page 0 -> slot 1, page 1 -> slot 0, sb -> slot 0
        try store.commit([10..<20, 35_000..<35_001], nowMs: 3)
        let new = store.committedMap
        var torn = sim.contents("/meta")!
        let fresh = torn
        let blockOffset =
            target == "superblock"
            ? Int(MetadataFormat.superblockOffset(slot: 0))
            : Int(MetadataFormat.pageOffset(page: 0, slot: 1))
        let lo = blockOffset + oldHalf * MetadataFormat.blockSize / 2
        for i in lo..<(lo + MetadataFormat.blockSize / 2) { torn[i] = image[i] }
        if target == "page" {
            // The crash came before the superblock was written.
            for i in 0..<MetadataFormat.blockSize { torn[i] = image[i] }
        }
        let sim2 = SimulatedStorage()
        sim2.addFile("/meta", data: torn)
        let (reopened, _) = try MetadataStore.open(path: "/meta", storage: sim2)
        let got = reopened.committedMap
        // Never less than the old state, never more than the new one.
        for r in old.setRanges() { #expect(got.count(in: r) == r.count) }
        for r in got.setRanges() { #expect(new.count(in: r) == r.count) }
        if target == "superblock" {
            // Every page of generation 3 is intact and synced: all adopted, whatever the superblock.
            #expect(got == new)
        } else {
            // The torn page (regions 10..<20) fails its checksum and is not adopted (unless the
            // torn half did not change, and so the page is whole); the intact page of the same
            // commit (region 35,000) is.
            let pageBlock = blockOffset..<(blockOffset + MetadataFormat.blockSize)
            #expect(got[10] == (torn[pageBlock] == fresh[pageBlock]))
            #expect(got[35_000])
        }
    }

    @Test func interruptedCommitPagesAreAdoptedSafely() throws {
        let sim = SimulatedStorage()
        let size: UInt64 = 1000 * Self.regionSize
        let store = try MetadataStore.create(path: "/meta", options: options(size: size), storage: sim, nowMs: 1)
        try store.commit([0..<10], nowMs: 2)
        // Commit 3 writes its page and syncs, then "crashes" before the superblock.
        let start = sim.log.count
        sim.setFault { op in op.seq == start + 2 ? 5 : nil }
        #expect(throws: MetadataError.self) { try store.commit([10..<500], nowMs: 3) }
        sim.setFault(nil)
        // A read-only look sees the committed state and reports the newer page.
        let (ro, roReport) = try MetadataStore.open(path: "/meta", storage: sim, readOnly: true)
        #expect(roReport.uncommittedPageSlots == 1)
        #expect(roReport.adoptedRegions == 490)
        #expect(ro.header.generation == 2)
        // What `clonectl check` and CheckMetadata report of it (one shared construction).
        let checked = ControlProtocol.MetadataReport(path: "/meta", header: ro.header, recovery: roReport)
        #expect(checked.valid && checked.regionsHydrated == 500)
        #expect(
            checked.problems == [
                "1 page slot(s) from an interrupted commit, adding 490 region(s); adopted when the job is opened"
            ])
        let (r1, report) = try MetadataStore.open(path: "/meta", storage: sim)
        #expect(report.adoptedRegions == 490)
        #expect(r1.committedMap.setRanges() == [0..<500])
        #expect(r1.header.generation == 4, "recovery superblock above generation 3")
        // The next commit touches the same page; a crash before its superblock must still find
        // the adopted version (this is what a reused generation or an overwritten slot would break).
        let s2 = sim.log.count
        sim.setFault { op in op.seq == s2 + 2 ? 5 : nil }
        #expect(throws: MetadataError.self) { try r1.commit([500..<600], nowMs: 4) }
        sim.setFault(nil)
        let (r2, _) = try MetadataStore.open(path: "/meta", storage: sim)
        #expect(r2.committedMap.setRanges() == [0..<600])
        try r2.commit([600..<1000], complete: true, nowMs: 5)
        let (r3, _) = try MetadataStore.open(path: "/meta", storage: sim)
        #expect(r3.header.complete && r3.committedMap.isComplete)
    }

    /// The newest superblock rots after its commit (and its discards): falling back to the older
    /// one keeps the newer pages' regions, so they are not re-copied from a released source.
    @Test func rottedNewestSuperblockKeepsNewerPages() throws {
        let sim = SimulatedStorage()
        let store = try MetadataStore.create(
            path: "/meta", options: options(size: 1000 * Self.regionSize), storage: sim, nowMs: 1)
        try store.commit([0..<10], nowMs: 2)  // sb gen 2 -> slot 1
        try store.commit([10..<300], nowMs: 3)  // sb gen 3 -> slot 0
        var bytes = sim.contents("/meta")!
        bytes[40] ^= 0x10  // slot 0 (gen 3) rots
        let rotten = SimulatedStorage()
        rotten.addFile("/meta", data: bytes)
        let (r, report) = try MetadataStore.open(path: "/meta", storage: rotten)
        #expect(report.otherSlotProblem?.contains("checksum") == true)
        #expect(r.committedMap.setRanges() == [0..<300])
    }

    @Test func corruptionIsRefusedWithTheFileNamed() throws {
        let sim = SimulatedStorage()
        let store = try MetadataStore.create(
            path: "/meta", options: options(size: 1000 * Self.regionSize), storage: sim, nowMs: 1)
        try store.commit([0..<10], nowMs: 2)
        try store.commit([10..<20], nowMs: 3)
        var bytes = sim.contents("/meta")!
        // One superblock flipped: the other (older) one is used.
        bytes[100] ^= 0x01
        let a = SimulatedStorage(); a.addFile("/meta", data: bytes)
        let (older, report) = try MetadataStore.open(path: "/meta", storage: a, readOnly: true)
        #expect(older.header.generation == 2)
        #expect(report.otherSlotProblem?.contains("checksum") == true)
        // Both flipped: refused, naming the file.
        bytes[4096 + 100] ^= 0x01
        let b = SimulatedStorage(); b.addFile("/meta", data: bytes)
        do {
            _ = try MetadataStore.open(path: "/meta", storage: b)
            Issue.record("opened corrupt metadata")
        } catch {
            #expect(error.description.contains("/meta"))
            #expect(error.isCorruption)
            if case .noValidSuperblock = error.reason {} else { Issue.record("wrong reason \(error.reason)") }
        }
        // A page lost in both slots: the count no longer adds up.
        var lost = sim.contents("/meta")!
        for slot in 0..<2 {
            let o = Int(MetadataFormat.pageOffset(page: 0, slot: slot))
            lost[o + 200] ^= 0xff
        }
        let c = SimulatedStorage(); c.addFile("/meta", data: lost)
        do {
            _ = try MetadataStore.open(path: "/meta", storage: c)
            Issue.record("opened metadata with a lost page")
        } catch {
            if case .bitmapMismatch(let e, let f) = error.reason {
                #expect(e == 20 && f == 0)
            } else {
                Issue.record("wrong reason \(error.reason)")
            }
        }
        // Not metadata at all.
        let d = SimulatedStorage(); d.addFile("/meta", data: [UInt8](repeating: 7, count: 9000))
        #expect(throws: MetadataError.self) { try MetadataStore.open(path: "/meta", storage: d) }
        // Empty file.
        let e = SimulatedStorage(); e.addFile("/meta", data: [])
        #expect(throws: MetadataError.self) { try MetadataStore.open(path: "/meta", storage: e) }
    }

    @Test func createRefusesExistingFile() throws {
        let sim = SimulatedStorage()
        sim.addFile("/meta", data: [1, 2, 3])
        do {
            _ = try MetadataStore.create(path: "/meta", options: options(size: 4096), storage: sim, nowMs: 1)
            Issue.record("overwrote an existing file")
        } catch {
            #expect(error.reason == .alreadyExists)
        }
        #expect(sim.contents("/meta")! == [1, 2, 3])
    }
}
