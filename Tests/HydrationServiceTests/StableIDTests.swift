import Foundation
import HydrationTestSupport
import Testing

@testable import HydrationEngine
@testable import HydrationService
@testable import HydrationStorage

/// Issue 11, part 2: DeviceInfo.stableID, filled by PosixStorage.identify and PosixDevice.open,
/// on real files and loop devices. On the old code stableID was always "": every test here
/// failed there.
@Suite(.serialized) struct StableIDTests {
    static func id(_ path: String) throws -> String {
        try PosixStorage().identify(path)?.stableID ?? "<missing>"
    }

    static func openedID(_ path: String) throws -> String {
        let d = try PosixStorage().open(path, mode: .readOnly)
        defer { d.close() }
        return d.info.stableID
    }

    @Test func regularFile() throws {
        let s = DeviceScratch("sid-file")
        defer { s.teardown() }
        let f = try s.makeFile("a.img", size: 1 << 20)
        let a = try Self.id(f)
        #expect(a.hasPrefix("file:uuid=") || a.hasPrefix("file:fsid="), "\(a)")
        #expect(a.contains(":btime="), "\(a)")
        #expect(try Self.id(f) == a)
        #expect(try Self.openedID(f) == a, "open and identify agree")
        // Renamed: the same object.
        try FileManager.default.moveItem(atPath: f, toPath: s.file("b.img"))
        #expect(try Self.id(s.file("b.img")) == a)
        // Another file of the same size: another id.
        let g = try s.makeFile("c.img", size: 1 << 20)
        #expect(try Self.id(g) != a)
    }

    /// Deleted and re-created under the same name (ext4 tends to hand the same inode number out
    /// again): another id, even when the inode number was reused.
    @Test func recreatedFileGetsAnotherID() throws {
        let s = DeviceScratch("sid-recreate")
        defer { s.teardown() }
        var reused = false
        for i in 0..<5 {
            let f = try s.makeFile("x.img", size: 1 << 20, seed: UInt64(i))
            let ino1 = try PosixStorage().identify(f)!.identity.inode
            let a = try Self.id(f)
            try FileManager.default.removeItem(atPath: f)
            let g = try s.makeFile("x.img", size: 1 << 20, seed: UInt64(i))
            let ino2 = try PosixStorage().identify(g)!.identity.inode
            let b = try Self.id(g)
            #expect(!a.isEmpty && !b.isEmpty && a != b, "\(a) vs \(b)")
            if ino1 == ino2 { reused = true; break }
            try FileManager.default.removeItem(atPath: g)
        }
        print("StableIDTests.recreatedFileGetsAnotherID: inode number reused: \(reused)")
    }

    /// The same backing file on two loop numbers at once, and again after a detach and
    /// re-attach: the same id; a different file of the same size on the same loop number: a
    /// different id; a different offset: a different id.
    @Test(.enabled(if: DeviceScratch.loopSkip == nil, "needs root and loop devices"))
    func loopDevice() throws {
        let s = DeviceScratch("sid-loop")
        defer { s.teardown() }
        let f = try s.makeFile("f.img", size: 8 << 20)
        let g = try s.makeFile("g.img", size: 8 << 20, seed: 9)
        let l1 = try s.attachLoop(f)
        let l2 = try s.attachLoop(f)
        #expect(l1 != l2)
        let a = try Self.id(l1)
        #expect(a.hasPrefix("loop:file:") && a.hasSuffix(":offset=0:sizelimit=0"), "\(a)")
        #expect(a.contains(try Self.id(f)), "the loop's id holds its backing file's: \(a)")
        #expect(try Self.id(l2) == a, "renumbered: same id")
        #expect(try Self.openedID(l1) == a)
        try s.detach(l1)
        try s.detach(l2)
        let l3 = try s.attachLoop(f)
        #expect(try Self.id(l3) == a, "re-attached on \(l3): same id")
        try s.detach(l3)
        // The same number, another file of the same size (another engineer may grab the number
        // in between: then any free one does).
        let l4 = try (try? s.attachLoop(g, device: l3)) ?? s.attachLoop(g)
        let b = try Self.id(l4)
        #expect(!b.isEmpty && b != a, "\(b) vs \(a)")
        let l5 = try s.attachLoop(f, offset: 1 << 20)
        let c = try Self.id(l5)
        #expect(c.hasSuffix(":offset=1048576:sizelimit=0") && c != a, "\(c)")
    }

    /// Partitions: the disk's id + number + start; the same after re-attaching the image on
    /// another loop number; two partitions differ.
    @Test(.enabled(if: DeviceScratch.partitionSkip == nil, "needs root, loop devices and sfdisk"))
    func partitions() throws {
        let s = DeviceScratch("sid-part")
        defer { s.teardown() }
        let img = try s.makePartitionedImage("disk.img")
        let d1 = try s.attachPartitioned(img)
        let disk = try Self.id(d1)
        let p1 = try Self.id(d1 + "p1"), p2 = try Self.id(d1 + "p2")
        #expect(disk.hasPrefix("loop:file:"), "\(disk)")
        #expect(p1 == "part:\(disk):1:2048", "\(p1)")
        #expect(p2.hasPrefix("part:\(disk):2:") && p2 != p1, "\(p2)")
        let d2 = try s.attachPartitioned(img)
        #expect(d2 != d1)
        #expect(try Self.id(d2 + "p1") == p1, "renumbered: same id")
        #expect(try Self.openedID(d2 + "p2") == p2)
    }
}

/// The metadata keeps the first 256 bytes of a stable ID; a device whose ID is longer must still
/// confirm after a restart (it was compared uncut with the cut record and never matched).
@Suite struct LongStableIDTests {
    func info(_ id: String) -> DeviceInfo {
        DeviceInfo(
            path: "/dev/x", identity: DeviceIdentity(kind: .blockDevice, device: 0, inode: 0, rdev: 7),
            size: 1 << 20, logicalBlockSize: 512, stableID: id)
    }

    @Test func anIDLongerThanTheRecordConfirmsItsOwnDevice() throws {
        // 255 ASCII bytes then a 3-byte character: the cut falls inside it.
        let long = String(repeating: "w", count: 255) + "€" + String(repeating: "z", count: 60)
        #expect(long.utf8.count > MetadataFormat.maxStableIDBytes)
        let record = DeviceRecord(info(long))
        #expect(record.stableID.utf8.count <= MetadataFormat.maxStableIDBytes + 2)
        #expect(record.hasStableID(of: info(long)))
        try HydrationJob.confirm(info(long), is: record, what: "destination", metadataPath: "/m", exactSize: true)
        // Another ID that differs inside the recorded part is still refused.
        let other = "v" + long.dropFirst()
        #expect(!record.hasStableID(of: info(String(other))))
        #expect(throws: HydrationError.self) {
            try HydrationJob.confirm(
                info(String(other)), is: record, what: "destination", metadataPath: "/m", exactSize: true)
        }
        // An empty record confirms nothing by ID.
        #expect(!DeviceRecord(info("")).hasStableID(of: info("")))
    }
}
