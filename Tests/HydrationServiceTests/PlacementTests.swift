import Foundation
import HydrationTestSupport
import Testing

@testable import HydrationEngine
@testable import HydrationService
@testable import HydrationStorage

/// Issue 11, part 3: aliases and devices in use, on real loop devices, filesystems, processes
/// (and, where the kernel has them, partitions and dm devices). Every refusal test here was run
/// against the code before `checkPlacement` and failed there: the job was created (or refused
/// with another code), as its comment says. How: Sources/ checked out from 5dd8ba3 (the parent
/// of this work), DeviceTopologyTests.swift set aside (new API), `swift test --filter
/// 'PlacementTests|StableIDTests'`.
@Suite(.serialized) struct PlacementTests {
    static let regionSize: UInt64 = 64 << 10

    static func config(
        _ s: DeviceScratch, _ source: String, _ dest: String, metadata: String? = nil, discard: Bool = false
    ) -> JobConfiguration {
        JobConfiguration(
            name: "placement", sourcePath: source, destPath: dest, metadataPath: metadata ?? s.file("meta"),
            regionSize: regionSize, discardSource: discard)
    }

    // MARK: loop device vs its backing file

    /// Old code: accepted (different DeviceIdentity: a file and a block device); with
    /// discard_source the release destroyed the destination.
    @Test(.enabled(if: DeviceScratch.loopSkip == nil, "needs root and loop devices"))
    func fileSourceAndLoopOverItAsDestinationRefused() async throws {
        let s = DeviceScratch("alias-f2l")
        defer { s.teardown() }
        let img = try s.makeFile("vm.raw", size: 16 << 20)
        let loop = try s.attachLoop(img)
        let e = await expectRefused(Self.config(s, img, loop, discard: true), .sameDevice)
        #expect(e?.message.contains(img) == true && e?.message.contains(loop) == true, "\(String(describing: e))")
        #expect(!FileManager.default.fileExists(atPath: s.file("meta")), "no metadata left behind")
    }

    /// Old code: accepted.
    @Test(.enabled(if: DeviceScratch.loopSkip == nil, "needs root and loop devices"))
    func loopSourceAndItsBackingFileAsDestinationRefused() async throws {
        let s = DeviceScratch("alias-l2f")
        defer { s.teardown() }
        let img = try s.makeFile("vm.raw", size: 16 << 20)
        let loop = try s.attachLoop(img)
        let e = await expectRefused(Self.config(s, loop, img), .sameDevice)
        #expect(e?.message.contains(img) == true && e?.message.contains(loop) == true, "\(String(describing: e))")
    }

    /// Two loop devices over the same bytes of one file are one device. Old code: accepted.
    /// Over disjoint ranges of the file they are not, and are accepted.
    @Test(.enabled(if: DeviceScratch.loopSkip == nil, "needs root and loop devices"))
    func twoLoopsOverOneFile() async throws {
        let s = DeviceScratch("alias-2l")
        defer { s.teardown() }
        let img = try s.makeFile("disk.raw", size: 32 << 20)
        let a = try s.attachLoop(img, offset: 0, sizeLimit: 16 << 20)
        let b = try s.attachLoop(img, offset: 8 << 20, sizeLimit: 16 << 20)
        let e = await expectRefused(Self.config(s, a, b), .sameDevice)
        #expect(e?.message.contains(a) == true && e?.message.contains(b) == true, "\(String(describing: e))")
        // b still shows bytes of a: a is in use through it.
        let c = try s.attachLoop(img, offset: 16 << 20, sizeLimit: 16 << 20)
        let u = await expectRefused(Self.config(s, a, c), .deviceInUse)
        #expect(u?.holder?.hasPrefix(b) == true, "\(String(describing: u))")
        try s.detach(b)
        await expectAccepted(Self.config(s, a, c))
    }

    // MARK: in use

    /// The second report: a source file backing a loop device with a mounted ext4 is
    /// refused with discard_source (and without). Old code: accepted, and the job punched the
    /// whole file under the mounted filesystem.
    @Test(.enabled(if: DeviceScratch.loopSkip == nil, "needs root and loop devices"))
    func sourceFileBackingMountedLoopRefused() async throws {
        let s = DeviceScratch("inuse-mnt")
        defer { s.teardown() }
        let img = try s.makeFile("fs.img", size: 32 << 20)
        let loop = try s.attachLoop(img)
        let mnt = try s.mkfsAndMount(loop, "mnt")
        try Data("precious".utf8).write(to: URL(fileURLWithPath: mnt + "/data"))
        let e = await expectRefused(Self.config(s, img, s.file("dst.img"), discard: true), .deviceInUse)
        #expect(e?.path == img)
        #expect(e?.holder == loop, "\(String(describing: e))")
        #expect(e?.message.contains("detach the loop device") == true && e?.message.contains(s.file("dst.img")) == true)
        #expect(!FileManager.default.fileExists(atPath: s.file("dst.img")), "the destination file is not created")
        #expect(try String(contentsOfFile: mnt + "/data", encoding: .utf8) == "precious")
    }

    /// A source loop device whose backing file also backs another loop device with a mounted
    /// filesystem (the report, one level down): discarding the source would punch the
    /// file under that filesystem. Old code: accepted.
    @Test(.enabled(if: DeviceScratch.loopSkip == nil, "needs root and loop devices"))
    func sourceLoopWhoseFileBacksAMountedLoopRefused() async throws {
        let s = DeviceScratch("inuse-alias")
        defer { s.teardown() }
        let img = try s.makeFile("fs.img", size: 32 << 20)
        let src = try s.attachLoop(img)
        let other = try s.attachLoop(img)
        _ = try s.mkfsAndMount(other, "mnt")
        let e = await expectRefused(Self.config(s, src, s.file("dst.img"), discard: true), .deviceInUse)
        #expect(e?.path == src)
        #expect(e?.holder?.hasPrefix(other) == true && e?.message.contains(img) == true, "\(String(describing: e))")
    }

    /// A source or destination file another process has open. Old code: accepted (flock is
    /// advisory; the other process took none).
    @Test(.enabled(if: DeviceScratch.loopSkip == nil, "needs root and loop devices"))
    func fileHeldOpenByAnotherProcessRefused() async throws {
        let s = DeviceScratch("inuse-pid")
        defer { s.teardown() }
        let src = try s.makeFile("src.img", size: 8 << 20)
        let dst = try s.makeFile("dst.img", size: 8 << 20, seed: 2)
        let pid = try s.holdOpen(src)
        var e = await expectRefused(Self.config(s, src, dst, discard: true), .deviceInUse)
        #expect(e?.path == src)
        #expect(e?.holder == "pid \(pid) (sleep)", "\(String(describing: e))")
        s.teardown()

        let t = DeviceScratch("inuse-pid-dst")
        defer { t.teardown() }
        let src2 = try t.makeFile("src.img", size: 8 << 20)
        let dst2 = try t.makeFile("dst.img", size: 8 << 20, seed: 2)
        let pid2 = try t.holdOpen(dst2)
        e = await expectRefused(Self.config(t, src2, dst2), .deviceInUse)
        #expect(e?.path == dst2)
        #expect(e?.holder == "pid \(pid2) (sleep)", "\(String(describing: e))")
    }

    /// A destination loop device with a mounted filesystem: refused, naming the mount. Old code:
    /// refused by O_EXCL (EBUSY) but without saying by what (holder nil).
    @Test(.enabled(if: DeviceScratch.loopSkip == nil, "needs root and loop devices"))
    func mountedBlockDeviceNamesTheMount() async throws {
        let s = DeviceScratch("inuse-blk")
        defer { s.teardown() }
        let src = try s.makeFile("src.img", size: 8 << 20)
        let dstImg = try s.makeFile("dst.img", size: 16 << 20)
        let loop = try s.attachLoop(dstImg)
        let mnt = try s.mkfsAndMount(loop, "mnt")
        let e = await expectRefused(Self.config(s, src, loop), .deviceInUse)
        #expect(e?.path == loop)
        #expect(e?.holder == "mount at \(mnt)", "\(String(describing: e))")
    }

    /// A job reopened after a loop device was attached to its source: refused at open too.
    /// Old code: reopened.
    @Test(.enabled(if: DeviceScratch.loopSkip == nil, "needs root and loop devices"))
    func reopenRefusesASourceNowInUse() async throws {
        let s = DeviceScratch("inuse-reopen")
        defer { s.teardown() }
        let src = try s.makeFile("src.img", size: 8 << 20)
        let cfg = Self.config(s, src, s.file("dst.img"), discard: true)
        await expectAccepted(cfg)
        let loop = try s.attachLoop(src)
        let e = await expectRefused(cfg, .deviceInUse, reopen: true)
        #expect(e?.holder == loop, "\(String(describing: e))")
    }

    // MARK: metadata placement

    /// Metadata on a filesystem that lives on the destination file (mounted through a loop
    /// device over it). Old code: accepted; hydration would overwrite the filesystem holding
    /// the metadata.
    @Test(.enabled(if: DeviceScratch.loopSkip == nil, "needs root and loop devices"))
    func metadataOnTheDestinationsStackRefused() async throws {
        let s = DeviceScratch("meta-dst")
        defer { s.teardown() }
        let src = try s.makeFile("src.img", size: 4 << 20)
        let dst = try s.makeFile("dst.img", size: 32 << 20)
        let loop = try s.attachLoop(dst)
        let mnt = try s.mkfsAndMount(loop, "mnt")
        let meta = mnt + "/job.meta"
        let e = await expectRefused(Self.config(s, src, dst, metadata: meta), .sameDevice)
        #expect(e?.path == meta)
        #expect(e?.message.contains(meta) == true && e?.message.contains(dst) == true, "\(String(describing: e))")
    }

    /// Metadata on a filesystem on a second loop device over the source loop's backing file.
    /// Old code: accepted.
    @Test(.enabled(if: DeviceScratch.loopSkip == nil, "needs root and loop devices"))
    func metadataOnAnAliasOfTheSourceRefused() async throws {
        let s = DeviceScratch("meta-src")
        defer { s.teardown() }
        let img = try s.makeFile("src.raw", size: 32 << 20)
        let srcLoop = try s.attachLoop(img)
        let fsLoop = try s.attachLoop(img)
        let mnt = try s.mkfsAndMount(fsLoop, "mnt")
        let meta = mnt + "/job.meta"
        let e = await expectRefused(
            Self.config(s, srcLoop, s.file("dst.img"), metadata: meta, discard: true), .sameDevice)
        #expect(e?.message.contains(meta) == true && e?.message.contains(srcLoop) == true, "\(String(describing: e))")
    }

    /// Metadata on a btrfs spread over two loop devices; the destination is the backing file of
    /// the second device (not the one the mount names). btrfs files have an anonymous st_dev:
    /// the filesystem's devices come from the mount and /sys/fs/btrfs. Old code: accepted.
    @Test(
        .enabled(if: DeviceScratch.loopSkip == nil, "needs root and loop devices"),
        .enabled(if: (try? DeviceScratch.sh(["which", "mkfs.btrfs"])) != nil, "needs mkfs.btrfs (btrfs-progs)"))
    func metadataOnMultiDeviceBtrfsOverTheDestinationRefused() async throws {
        let s = DeviceScratch("meta-btrfs")
        defer { s.teardown() }
        let src = try s.makeFile("src.img", size: 4 << 20)
        let fa = try s.makeFile("fsa.img", size: 128 << 20)
        let fb = try s.makeFile("fsb.img", size: 128 << 20)
        let la = try s.attachLoop(fa)
        let lb = try s.attachLoop(fb)
        let mnt = try s.mkfsAndMount(
            la, "mnt", mkfs: ["mkfs.btrfs", "-q", "-f", "-d", "single", "-m", "single"], more: [lb])
        let meta = mnt + "/job.meta"
        var e = await expectRefused(Self.config(s, src, fb, metadata: meta), .sameDevice)
        #expect(e?.message.contains(meta) == true && e?.message.contains(fb) == true, "\(String(describing: e))")
        e = await expectRefused(Self.config(s, src, fa, metadata: meta), .sameDevice)
        #expect(e?.message.contains(meta) == true && e?.message.contains(fa) == true, "\(String(describing: e))")
        // A file on that btrfs as the source, its device's loop as the destination.
        let inner = mnt + "/vm.raw"
        try Data(count: 1 << 20).write(to: URL(fileURLWithPath: inner))
        e = await expectRefused(Self.config(s, inner, lb), .sameDevice)
        #expect(e?.message.contains(inner) == true && e?.message.contains(lb) == true, "\(String(describing: e))")
    }

    // MARK: partitions (need a kernel that reads partition tables)

    /// A partition and its disk overlap (old code: refused only by O_EXCL as DeviceInUse, not
    /// SameDevice); two partitions of one disk do not.
    @Test(.enabled(if: DeviceScratch.partitionSkip == nil, "needs root, loop devices and sfdisk"))
    func partitionAndItsDisk() async throws {
        let s = DeviceScratch("part")
        defer { s.teardown() }
        let img = try s.makePartitionedImage("disk.img")
        let disk = try s.attachPartitioned(img)
        var e = await expectRefused(Self.config(s, disk + "p1", disk), .sameDevice)
        #expect(e?.message.contains(disk + "p1") == true && e?.message.contains(disk) == true)
        e = await expectRefused(Self.config(s, disk, disk + "p2"), .sameDevice)
        await expectAccepted(Self.config(s, disk + "p1", disk + "p2"))
    }

    // MARK: device-mapper (need dm in the kernel)

    /// dm linear over a loop vs that loop, and vs the loop's backing file: refused (old code: the
    /// loop vs dm refused by O_EXCL as DeviceInUse, the file vs dm accepted). Two dm linears on
    /// one loop at disjoint extents (two LVs on one PV): accepted.
    @Test(.enabled(if: DeviceScratch.dmSkip == nil, "needs root, loop devices and dmsetup"))
    func dmLinearStacks() async throws {
        let s = DeviceScratch("dm")
        defer { s.teardown() }
        let img = try s.makeFile("pv.img", size: 64 << 20)
        let loop = try s.attachLoop(img)
        let half = (32 << 20) / 512
        let a = try s.dmCreate("a", table: "0 \(half) linear \(loop) 0")
        let b = try s.dmCreate("b", table: "0 \(half) linear \(loop) \(half)")
        var e = await expectRefused(Self.config(s, a, loop), .sameDevice)
        #expect(e?.message.contains(a) == true && e?.message.contains(loop) == true)
        e = await expectRefused(Self.config(s, img, a), .sameDevice)
        #expect(e?.message.contains(a) == true && e?.message.contains(img) == true)
        await expectAccepted(Self.config(s, a, b))
    }

    // MARK: overlayfs

    /// One file of an overlay filesystem seen through the merged directory and through its
    /// upper or lower directory has two device numbers. Old code: accepted, and with
    /// `--discard-source` the job copied /upper/u onto /merged/u, the same file, and zeroed it
    /// (found by the round-4 attack). A process holding the upper file keeps the merged file in
    /// use. Two different files of the overlay: accepted.
    @Test(.enabled(if: DeviceScratch.loopSkip == nil, "needs root and loop devices"))
    func overlayMergedFileAndItsLayersAreOneFile() async throws {
        let s = DeviceScratch("ovl")
        defer { s.teardown() }
        let o = try #require(s.mountOverlay(), "cannot mount overlayfs")
        func fill(_ path: String, seed: UInt8) throws {
            try Data((0..<(1 << 20)).map { UInt8(truncatingIfNeeded: $0 &* 7) &+ seed }).write(
                to: URL(fileURLWithPath: path))
            try DeviceScratch.sh(["truncate", "-s", "\(4 << 20)", path])
        }
        try fill(o.upper + "/u", seed: 1)
        try fill(o.lower + "/l", seed: 2)
        var e = await expectRefused(Self.config(s, o.upper + "/u", o.merged + "/u", discard: true), .sameDevice)
        #expect(e?.message.contains("overlay layer") == true, "\(String(describing: e))")
        e = await expectRefused(Self.config(s, o.merged + "/u", o.upper + "/u", discard: true), .sameDevice)
        e = await expectRefused(Self.config(s, o.lower + "/l", o.merged + "/l", discard: true), .sameDevice)
        e = await expectRefused(Self.config(s, o.merged + "/l", o.lower + "/l"), .sameDevice)
        #expect(
            FileManager.default.contents(atPath: o.upper + "/u")?.prefix(2) == Data([1, 8]), "the file is untouched")

        let pid = try s.holdOpen(o.upper + "/u")
        e = await expectRefused(Self.config(s, o.merged + "/u", o.merged + "/copy", discard: true), .deviceInUse)
        #expect(e?.holder?.hasPrefix("pid \(pid) (sleep) (has \(o.upper)/u open") == true, "\(String(describing: e))")
        kill(pid, SIGKILL)
        #expect(await eventually { (try? DeviceTopology().usage(of: o.merged + "/u")) == nil })
        await expectAccepted(Self.config(s, o.merged + "/u", o.merged + "/copy"))
    }

    /// mountinfo's overlay options: both forms of lower directories, escapes.
    @Test func overlayDirectoriesFromMountOptions() {
        #expect(
            DeviceTopology.overlayDirectories("rw,lowerdir=/a:/b,upperdir=/u,workdir=/w,uuid=on") == ["/u", "/a", "/b"])
        #expect(
            DeviceTopology.overlayDirectories("rw,lowerdir+=/a,lowerdir+=/b,datadir+=/d,upperdir=/u,workdir=/w") == [
                "/u", "/a", "/b", "/d",
            ])
        #expect(
            DeviceTopology.overlayDirectories("lowerdir=/with\\:colon:/with\\054comma,upperdir=/sp\\040ace") == [
                "/sp ace", "/with:colon", "/with,comma",
            ])
        #expect(DeviceTopology.overlayDirectories("rw,relatime").isEmpty)
    }

    // MARK: still accepted

    /// Plain file to file (with the metadata beside them), loop to loop, file to a different
    /// loop: accepted as before.
    @Test(.enabled(if: DeviceScratch.loopSkip == nil, "needs root and loop devices"))
    func legitimatePlacementsAccepted() async throws {
        let s = DeviceScratch("legit")
        defer { s.teardown() }
        let src = try s.makeFile("src.img", size: 8 << 20)
        await expectAccepted(Self.config(s, src, s.file("dst.img"), metadata: s.file("m1"), discard: true))
        let a = try s.attachLoop(try s.makeFile("a.img", size: 8 << 20))
        let b = try s.attachLoop(try s.makeFile("b.img", size: 8 << 20))
        await expectAccepted(Self.config(s, a, b, metadata: s.file("m2"), discard: true))
        let src2 = try s.makeFile("src2.img", size: 8 << 20)
        let c = try s.attachLoop(try s.makeFile("c.img", size: 8 << 20))
        await expectAccepted(Self.config(s, src2, c, metadata: s.file("m3")))
        // Metadata on a filesystem on a loop device that is neither source nor destination.
        let m = try s.attachLoop(try s.makeFile("meta.img", size: 32 << 20))
        let mnt = try s.mkfsAndMount(m, "mnt")
        let src3 = try s.makeFile("src3.img", size: 8 << 20)
        await expectAccepted(Self.config(s, src3, s.file("dst3.img"), metadata: mnt + "/job.meta", discard: true))
    }
}
