import Foundation
import HydrationTestSupport
import Testing

@testable import HydrationStorage

/// DeviceTopology's parsing against a fake sysfs tree (dm, md, partitions, disks with a WWN or a
/// serial: this machine's kernel has none of them), and its overlap rule. New API: these tests
/// did not compile on the old code.
@Suite struct DeviceTopologyTests {
    /// /sys/devices/... with dev/block/M:m and block/NAME links, like the real one.
    final class FakeSysfs {
        let dir = TempDir("fakesys")
        var root: String { dir.path + "/sys" }
        var proc: String { dir.path + "/proc" }
        let backing: String

        init() throws {
            backing = dir.file("pv.img")
            try Data(count: 4096).write(to: URL(fileURLWithPath: backing))
            try dev(
                "virtual/block/loop0", "7:0",
                files: ["loop/backing_file": backing + "\n", "loop/offset": "0\n", "loop/sizelimit": "0\n"],
                links: ["holders/dm-0": "virtual/block/dm-0", "holders/dm-1": "virtual/block/dm-1"])
            try dev(
                "virtual/block/dm-0", "253:0", files: ["dm/name": "vg-a\n", "dm/uuid": "LVM-aaaa\n"],
                links: ["slaves/loop0": "virtual/block/loop0"])
            try dev(
                "virtual/block/dm-1", "253:1", files: ["dm/name": "vg-b\n", "dm/uuid": "\n"],
                links: ["slaves/loop0": "virtual/block/loop0"])
            try dev("pci0/host0/block/sda", "8:0", files: ["device/wwid": "naa.5000c500a1b2c3d4\n"])
            try dev("pci0/host0/block/sda/sda1", "8:1", files: ["partition": "1\n", "start": "2048\n"])
            try dev(
                "pci0/host0/block/sda/sda2", "8:2", files: ["partition": "2\n", "start": "34816\n"],
                links: ["holders/md0": "virtual/block/md0"])
            try dev("pci0/host1/block/sdb", "8:16", files: ["serial": "S3Z9NB0K123\n"])
            try dev(
                "pci0/host1/block/sdb/sdb1", "8:17", files: ["partition": "1\n", "start": "2048\n"],
                links: ["holders/md0": "virtual/block/md0"])
            try dev(
                "virtual/block/md0", "9:0", files: ["md/uuid": "a1b2c3d4:e5f60718:293a4b5c:6d7e8f90\n"],
                links: ["slaves/sda2": "pci0/host0/block/sda/sda2", "slaves/sdb1": "pci0/host1/block/sdb/sdb1"])
            try dev("virtual/block/zram0", "252:0", files: [:])
            try FileManager.default.createDirectory(atPath: proc + "/self", withIntermediateDirectories: true)
            try Data(
                """
                22 1 8:17 / /mnt/my\\040disk rw,relatime shared:1 - ext4 /dev/sdb1 rw
                23 1 0:21 / /proc rw - proc proc rw

                """.utf8
            ).write(to: URL(fileURLWithPath: proc + "/self/mountinfo"))
        }

        func dev(_ rel: String, _ number: String, files: [String: String], links: [String: String] = [:]) throws {
            let fm = FileManager.default
            let d = root + "/devices/" + rel
            for sub in ["holders", "slaves"] {
                try fm.createDirectory(atPath: d + "/" + sub, withIntermediateDirectories: true)
            }
            try Data((number + "\n").utf8).write(to: URL(fileURLWithPath: d + "/dev"))
            for (name, text) in files {
                try fm.createDirectory(atPath: parentDirectory(of: d + "/" + name), withIntermediateDirectories: true)
                try Data(text.utf8).write(to: URL(fileURLWithPath: d + "/" + name))
            }
            for (name, target) in links {
                try? fm.removeItem(atPath: d + "/" + name)
                try fm.createSymbolicLink(atPath: d + "/" + name, withDestinationPath: root + "/devices/" + target)
            }
            try fm.createDirectory(atPath: root + "/dev/block", withIntermediateDirectories: true)
            try fm.createSymbolicLink(atPath: root + "/dev/block/" + number, withDestinationPath: d)
            if !files.keys.contains("partition") {
                try fm.createDirectory(atPath: root + "/block", withIntermediateDirectories: true)
                try fm.createSymbolicLink(
                    atPath: root + "/block/" + (rel.split(separator: "/").last.map(String.init) ?? ""),
                    withDestinationPath: d)
            }
        }

        var topology: DeviceTopology { DeviceTopology(sysfs: root, proc: proc) }

        func stack(_ major: UInt64, _ minor: UInt64, _ path: String) -> StorageStack {
            topology.stack(ofBlockDevice: makeDev(major, minor), path: path)
        }
    }

    static func overlap(_ a: StorageStack, _ b: StorageStack) -> String? {
        a.overlap(with: b, as: "source", otherLabel: "destination")
    }

    @Test func dmOverLoopOverFile() throws {
        let f = try FakeSysfs()
        let t = f.topology
        #expect(!t.useDeviceNodes)
        let a = f.stack(253, 0, "/dev/mapper/vg-a")
        let b = f.stack(253, 1, "/dev/mapper/vg-b")
        let loop = f.stack(7, 0, "/dev/loop0")
        let file = try t.stack(of: f.backing)
        #expect(
            a.layers.map(\.object) == [.block(rdev: makeDev(253, 0)), .block(rdev: makeDev(7, 0)), file.top.object])
        // Two LVs on one PV: no overlap, either way round.
        #expect(Self.overlap(a, b) == nil)
        #expect(Self.overlap(b, a) == nil)
        // A dm device and the loop under it, and the loop's backing file: overlap, both ways.
        let why = try #require(Self.overlap(a, loop))
        #expect(why.contains("/dev/mapper/vg-a") && why.contains("/dev/loop0"), "\(why)")
        #expect(Self.overlap(loop, a) != nil)
        let why2 = try #require(Self.overlap(file, a))
        #expect(why2.contains(f.backing) && why2.contains("on /dev/loop0 → backing file \(f.backing)"), "\(why2)")
        #expect(Self.overlap(a, file) != nil)
        #expect(Self.overlap(loop, file) != nil)
    }

    @Test func partitionsDisksAndMD() throws {
        let f = try FakeSysfs()
        let sda = f.stack(8, 0, "/dev/sda"), sda1 = f.stack(8, 1, "/dev/sda1"), sda2 = f.stack(8, 2, "/dev/sda2")
        let sdb = f.stack(8, 16, "/dev/sdb"), sdb1 = f.stack(8, 17, "/dev/sdb1"), md = f.stack(9, 0, "/dev/md0")
        #expect(Self.overlap(sda1, sda) != nil)
        #expect(Self.overlap(sda, sda1) != nil)
        #expect(Self.overlap(sda1, sda2) == nil, "two partitions of one disk")
        #expect(Self.overlap(md, sda) != nil && Self.overlap(sdb, md) != nil && Self.overlap(md, sdb1) != nil)
        #expect(Self.overlap(md, sda1) == nil, "md0 is on sda2 and sdb1, not sda1")
        let why = try #require(Self.overlap(md, sdb))
        #expect(why.contains("/dev/md0 → on /dev/sdb1 → partition of /dev/sdb"), "\(why)")
    }

    @Test func stableIDs() throws {
        let f = try FakeSysfs()
        let t = f.topology
        #expect(t.stableID(ofBlock: makeDev(253, 0)) == "dm:uuid=LVM-aaaa")
        #expect(t.stableID(ofBlock: makeDev(253, 1)) == "dm:name=vg-b")
        #expect(t.stableID(ofBlock: makeDev(9, 0)) == "md:a1b2c3d4:e5f60718:293a4b5c:6d7e8f90")
        #expect(t.stableID(ofBlock: makeDev(8, 0)) == "wwid:naa.5000c500a1b2c3d4")
        #expect(t.stableID(ofBlock: makeDev(8, 1)) == "part:wwid:naa.5000c500a1b2c3d4:1:2048")
        #expect(t.stableID(ofBlock: makeDev(8, 2)) == "part:wwid:naa.5000c500a1b2c3d4:2:34816")
        #expect(t.stableID(ofBlock: makeDev(8, 16)) == "serial:S3Z9NB0K123")
        #expect(t.stableID(ofBlock: makeDev(8, 17)) == "part:serial:S3Z9NB0K123:1:2048")
        #expect(t.stableID(ofBlock: makeDev(252, 0)) == "", "no identity: cannot be confirmed after a restart")
        #expect(t.stableID(ofBlock: makeDev(1, 99)) == "", "unknown device")
        let file = t.stableID(ofFileAt: f.backing)
        #expect(!file.isEmpty)
        #expect(t.stableID(ofBlock: makeDev(7, 0)) == "loop:\(file):offset=0:sizelimit=0")
    }

    @Test func holdersAndMounts() throws {
        let f = try FakeSysfs()
        let t = f.topology
        #expect(t.blockHolders(makeDev(7, 0)) == ["/dev/dm-0", "/dev/dm-1"])
        #expect(t.blockHolders(makeDev(8, 16)) == ["/dev/md0 (on sdb1)", "sdb1 mount at /mnt/my disk"])
        #expect(t.blockHolders(makeDev(8, 17)) == ["/dev/md0", "mount at /mnt/my disk"])
        #expect(t.blockHolders(makeDev(252, 0)) == [])
        var st = stat()
        #expect(stat(f.backing, &st) == 0)
        #expect(t.loopsBacked(by: .file(device: UInt64(st.st_dev), inode: UInt64(st.st_ino))) == ["/dev/loop0"])
    }

    @Test func loopRangesAlias() {
        let file = StorageObject.file(device: 1, inode: 2)
        let a = LoopBacking(file: file, offset: 0, sizeLimit: 1 << 20)
        #expect(a.overlaps(LoopBacking(file: file, offset: 512 << 10, sizeLimit: 1 << 20)))
        #expect(!a.overlaps(LoopBacking(file: file, offset: 1 << 20, sizeLimit: 0)))
        #expect(
            LoopBacking(file: file, offset: 0, sizeLimit: 0).overlaps(
                LoopBacking(file: file, offset: 1 << 30, sizeLimit: 0)))
        #expect(!a.overlaps(LoopBacking(file: .file(device: 1, inode: 3), offset: 0, sizeLimit: 0)))
    }

    /// On the real /sys: a file's stack goes down to its filesystem's device; a path that does
    /// not exist yet lives on its directory's filesystem.
    @Test func realFileStack() throws {
        let dir = TempDir("realstack")
        try Data(count: 10).write(to: URL(fileURLWithPath: dir.file("f")))
        let t = DeviceTopology()
        let s = try t.stack(of: dir.file("f"))
        var st = stat()
        #expect(stat(dir.file("f"), &st) == 0)
        #expect(s.top.object == .file(device: UInt64(st.st_dev), inode: UInt64(st.st_ino)))
        if majorOf(UInt64(st.st_dev)) != 0 {
            #expect(s.layers.count >= 2 && s.layers[1].object == .block(rdev: UInt64(st.st_dev)), "\(s.layers)")
        }
        let n = try t.stack(of: dir.file("new/deeper/x"))
        #expect(n.top.object == .absent(path: dir.file("new/deeper/x")))
        #expect(Array(n.layers.dropFirst().map(\.object)) == Array(s.layers.dropFirst().map(\.object)))
        #expect(try t.usage(of: dir.file("f")) == nil)
        #expect(try t.usage(of: dir.file("missing")) == nil)
    }

    /// The lease probe while another process keeps opening the file: an open during the instant
    /// the lease is held makes the kernel signal the holder (SIGIO by default, which terminates).
    /// Without F_SETSIG in the probe this test process died (of SIGIO, "I/O possible"), checked
    /// by removing it from hyd_probe_write_lease.
    @Test func leaseProbeSurvivesConcurrentOpeners() throws {
        let dir = TempDir("leaserace")
        let f = dir.file("f")
        try Data(count: 4096).write(to: URL(fileURLWithPath: f))
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/sh")
        // The loop ends with its parent: a test process killed by the signal leaves nothing behind.
        p.arguments = ["-c", "while kill -0 $PPID 2>/dev/null; do : < \"$0\"; done", f]
        try p.run()
        defer { kill(p.processIdentifier, SIGKILL); p.waitUntilExit() }
        let t = DeviceTopology()
        var probes = 0, busy = 0
        let end = Date().addingTimeInterval(2)
        while Date() < end {
            for _ in 0..<100 where t.writeLeaseRefused(f) { busy += 1 }
            probes += 100
        }
        print("leaseProbeSurvivesConcurrentOpeners: \(probes) probes, \(busy) saw the opener")
        #expect(probes > 0 && busy > 0, "the opener was seen at least once")
    }

    /// The in-use check's two witnesses: the kernel's write lease and the scans of sysfs and
    /// /proc. Each kind of holder here must be refused the lease, and `usage` must report the
    /// file in use. The last cases are why the scans run even when the lease is granted: a
    /// descriptor opened with O_PATH, or with no access mode (flags 3), does not count for the
    /// lease, yet its holder can open the file again through /proc/PID/fd whenever it likes
    /// (an attack had a job accepted, and its source released, under such a holder).
    @Test func everyKindOfHolderIsRefusedTheLease() throws {
        let t = DeviceTopology()
        let holders: [(String, String)] = [
            ("reader", "f = open(p, 'rb')"),
            ("reader and writer", "f = open(p, 'r+b')"),
            ("writer only", "fd = os.open(p, os.O_WRONLY)"),
            ("shared mapping, descriptor closed", "f = open(p, 'r+b'); m = mmap.mmap(f.fileno(), 0); f.close()"),
            (
                "read-only mapping, descriptor closed",
                "f = open(p, 'rb'); m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ); f.close()"
            ),
            (
                "another name (hard link)",
                "os.link(p, p + '.link'); f = open(p + '.link', 'rb'); os.unlink(p + '.link')"
            ),
        ]
        for (kind, setup) in holders {
            let s = DeviceScratch("lease-holder")
            defer { s.teardown() }
            let f = try s.makeFile("disk.img", size: 1 << 20)
            #expect(t.leaseProbe(f) == .granted, "\(kind): free before the holder starts")
            _ = try s.hold(f, setup)
            #expect(t.leaseProbe(f) == .refused, "\(kind)")
            #expect(try t.usage(of: f) != nil, "\(kind)")
        }

        // This process's own second descriptor (another job's, say).
        let s = DeviceScratch("lease-self")
        defer { s.teardown() }
        let f = try s.makeFile("disk.img", size: 1 << 20)
        let fd = open(f, O_RDONLY)
        #expect(fd >= 0)
        #expect(t.leaseProbe(f) == .refused)
        #expect(try t.usage(of: f)?.holders.first?.hasPrefix("this process") == true)
        close(fd)
        #expect(try t.usage(of: f) == nil)

        // A loop device over the file.
        if DeviceScratch.loopSkip == nil {
            let loop = try s.attachLoop(f)
            #expect(t.leaseProbe(f) == .refused)
            #expect(try t.usage(of: f)?.holders == [loop])
            try s.detach(loop)
        }

        // O_PATH and no access mode: the lease is granted, the scan names the holder.
        for (kind, setup) in [("O_PATH", "fd = os.open(p, os.O_PATH)"), ("flags 3", "fd = os.open(p, 3)")] {
            let o = DeviceScratch("lease-opath")
            defer { o.teardown() }
            let g = try o.makeFile("disk.img", size: 1 << 20)
            let pid = try o.hold(g, setup)
            #expect(t.leaseProbe(g) == .granted, "\(kind)")
            #expect(try t.usage(of: g)?.holders == ["pid \(pid) (python3)"], "\(kind)")
        }
    }

    /// Holders without a descriptor (refused by the lease, invisible in /proc/PID/fd) are named
    /// from /proc/PID/maps and /proc/PID/exe rather than as "another process or the kernel"
    /// after a second of retries (the round-4 attack: an mmap-only holder, a running binary).
    @Test(.enabled(if: getuid() == 0, "needs root"))
    func holdersWithoutDescriptorsAreNamed() async throws {
        let t = DeviceTopology()
        let s = DeviceScratch("nodesc")
        defer { s.teardown() }
        let f = try s.makeFile("disk.img", size: 1 << 20)
        // mmap(2) through ctypes, then close: no descriptor left, only the mapping.
        let pid = try s.hold(
            f,
            "import ctypes\nlibc = ctypes.CDLL(None)\nlibc.mmap.restype = ctypes.c_void_p\nfd = os.open(p, os.O_RDONLY)\naddr = libc.mmap(None, 4096, 1, 1, fd, 0)\nassert addr not in (None, ctypes.c_void_p(-1).value)\nos.close(fd)"
        )
        // The holder really has no descriptor left: only the maps can name it.
        var st = stat()
        #expect(stat(f, &st) == 0)
        #expect(t.processesHolding(.file(device: UInt64(st.st_dev), inode: UInt64(st.st_ino))).isEmpty)
        #expect(try t.usage(of: f)?.holders == ["pid \(pid) (python3) maps it"])

        let exe = s.file("sl")
        try FileManager.default.copyItem(atPath: "/bin/sleep", toPath: exe)
        let p = Process()
        p.executableURL = URL(fileURLWithPath: exe)
        p.arguments = ["60"]
        try p.run()
        defer { kill(p.processIdentifier, SIGKILL); p.waitUntilExit() }
        let want = ["pid \(p.processIdentifier) (sl) runs it"]
        #expect(
            await eventually { (try? t.usage(of: exe))?.holders == want },
            "\(String(describing: try? t.usage(of: exe)))")
    }

    /// A child of this process between fork and exec holds copies of this process's descriptors:
    /// it is not another user of the file (the in-use check refused a file only this process had
    /// open when another thread spawned a program: a full test run failed on it once). Any other
    /// process holding it still is one.
    @Test func aForkedChildNotYetExecedIsNotAHolder() throws {
        let dir = TempDir()
        let fm = FileManager.default
        let target = dir.file("disk")
        _ = fm.createFile(atPath: target, contents: Data([1]))
        let exe = dir.file("hydrationd"), other = dir.file("losetup")
        _ = fm.createFile(atPath: exe, contents: Data())
        _ = fm.createFile(atPath: other, contents: Data())
        let proc = dir.file("proc")
        try fm.createDirectory(atPath: proc + "/self", withIntermediateDirectories: true)
        try fm.createSymbolicLink(atPath: proc + "/self/exe", withDestinationPath: exe)
        func process(_ pid: Int, ppid: Int32, exe: String) throws {
            try fm.createDirectory(atPath: proc + "/\(pid)/fd", withIntermediateDirectories: true)
            try "Name:\tx\nPPid:\t\(ppid)\n".write(toFile: proc + "/\(pid)/status", atomically: true, encoding: .utf8)
            try "x\n".write(toFile: proc + "/\(pid)/comm", atomically: true, encoding: .utf8)
            try fm.createSymbolicLink(atPath: proc + "/\(pid)/exe", withDestinationPath: exe)
            try fm.createSymbolicLink(atPath: proc + "/\(pid)/fd/3", withDestinationPath: target)
        }
        var st = stat()
        #expect(stat(target, &st) == 0)
        let file = StorageObject.file(device: UInt64(st.st_dev), inode: UInt64(st.st_ino))
        try process(900001, ppid: getpid(), exe: exe)  // our child, not exec'd yet
        let topo = DeviceTopology(sysfs: dir.file("sys"), proc: proc)
        #expect(topo.processesHolding(file).isEmpty)
        try process(900002, ppid: getpid(), exe: other)  // our child, exec'd into another program
        try process(900003, ppid: 1, exe: exe)  // another daemon's process
        #expect(topo.processesHolding(file) == ["pid 900002 (x)", "pid 900003 (x)"])
    }
}
