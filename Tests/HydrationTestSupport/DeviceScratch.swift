import Foundation
import HydrationStorage
import Testing

/// Real devices for a test: files in a temp dir, loop devices, mounts, dm devices and helper
/// processes, all undone by `teardown()` (also run on deinit) in reverse order, whatever the
/// test's outcome.
package final class DeviceScratch {
    package let dir: TempDir
    private var undo: [() -> Void] = []

    package init(_ tag: String) { dir = TempDir(tag) }
    deinit { teardown() }

    package func teardown() {
        while let u = undo.popLast() { u() }
    }

    package func file(_ name: String) -> String { dir.file(name) }

    /// Runs a command; throws with its stderr when it fails.
    @discardableResult
    package static func sh(_ args: [String]) throws -> String {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = args
        let out = Pipe(), err = Pipe()
        p.standardOutput = out
        p.standardError = err
        try p.run()
        let data = out.fileHandleForReading.readDataToEndOfFile()
        let edata = err.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        guard p.terminationStatus == 0 else {
            throw NSError(
                domain: "sh", code: Int(p.terminationStatus),
                userInfo: [
                    NSLocalizedDescriptionKey: args.joined(separator: " ") + ": "
                        + String(decoding: edata, as: UTF8.self)
                ])
        }
        return String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// A sparse file of `size` bytes with a little data at its start (so it is not all holes).
    @discardableResult
    package func makeFile(_ name: String, size: Int, seed: UInt64 = 1) throws -> String {
        let path = file(name)
        var head = [UInt8](repeating: 0, count: 1 << 20)
        var rng = SeededRandom(seed: seed)
        rng.fill(&head, 0..<head.count)
        try Data(head).write(to: URL(fileURLWithPath: path))
        try Self.sh(["truncate", "-s", "\(size)", path])
        return path
    }

    package func attachLoop(_ path: String, offset: UInt64? = nil, sizeLimit: UInt64? = nil, device: String? = nil)
        throws
        -> String
    {
        var args = ["losetup"]
        if let offset { args += ["--offset", "\(offset)"] }
        if let sizeLimit { args += ["--sizelimit", "\(sizeLimit)"] }
        let loop: String
        if let device {
            try Self.sh(args + [device, path])
            loop = device
        } else {
            loop = try Self.sh(args + ["--find", "--show", path])
        }
        let backing = path
        undo.append { DeviceScratch.detachIfOurs(loop, backing) }
        return loop
    }

    /// Detaches now (the undo entry then finds nothing to do).
    package func detach(_ loop: String) throws {
        try Self.sh(["losetup", "-d", loop])
    }

    /// Detaches `loop` only while it is still bound to `backing`: once detached, its number may
    /// belong to another test or another user.
    package static func detachIfOurs(_ loop: String, _ backing: String) {
        let name = loop.split(separator: "/").last.map(String.init) ?? loop
        guard var bound = try? String(contentsOfFile: "/sys/block/\(name)/loop/backing_file", encoding: .utf8) else {
            return
        }
        bound = bound.trimmingCharacters(in: .whitespacesAndNewlines)
        if bound.hasSuffix(" (deleted)") { bound.removeLast(" (deleted)".count) }
        let mine = URL(fileURLWithPath: backing).resolvingSymlinksInPath().path
        guard bound == backing || bound == mine else { return }
        _ = try? sh(["losetup", "-d", loop])
    }

    /// mkfs.ext4 on `device` and mounts it on a new directory; returns the mount point.
    /// `mkfs` (a command taking the devices last) over `device` and `more`, mounted from `device`.
    package func mkfsAndMount(
        _ device: String, _ name: String, mkfs: [String] = ["mkfs.ext4", "-q", "-F"], more: [String] = []
    ) throws -> String {
        try Self.sh(mkfs + [device] + more)
        if mkfs.first == "mkfs.btrfs" {
            undo.append {
                for d in [device] + more { _ = try? DeviceScratch.sh(["btrfs", "device", "scan", "--forget", d]) }
            }
        }
        let mnt = file(name)
        try FileManager.default.createDirectory(atPath: mnt, withIntermediateDirectories: true)
        try Self.sh(["mount", device, mnt])
        undo.append {
            if (try? DeviceScratch.sh(["umount", mnt])) == nil { _ = try? DeviceScratch.sh(["umount", "-l", mnt]) }
        }
        return mnt
    }

    /// A process (sleep) holding `path` open read-only on fd 3; killed by PID at teardown.
    package func holdOpen(_ path: String) throws -> Int32 {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/sh")
        p.arguments = ["-c", "exec 3<\"$0\"; exec sleep 60", path]
        try p.run()
        let pid = p.processIdentifier
        undo.append {
            kill(pid, SIGKILL)
            p.waitUntilExit()
        }
        // Wait until sh has exec'd sleep (fd 3 is open by then).
        for _ in 0..<500 {
            if let c = try? String(contentsOfFile: "/proc/\(pid)/comm", encoding: .utf8), c.hasPrefix("sleep") { break }
            usleep(10_000)
        }
        return pid
    }

    /// A python3 process that runs `setup` (with `p` the path) and keeps what it opened or mapped
    /// until killed by PID at teardown; returns once `setup` has run.
    package func hold(_ path: String, _ setup: String) throws -> Int32 {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/python3")
        p.arguments = [
            "-I", "-c",
            "import os, sys, mmap, time\np = sys.argv[1]\n\(setup)\nprint('ready', flush=True)\ntime.sleep(120)", path,
        ]
        let out = Pipe()
        p.standardOutput = out
        try p.run()
        let pid = p.processIdentifier
        undo.append {
            kill(pid, SIGKILL)
            p.waitUntilExit()
        }
        let line = String(decoding: out.fileHandleForReading.availableData, as: UTF8.self)
        guard line.hasPrefix("ready") else {
            throw NSError(
                domain: "hold", code: 1,
                userInfo: [NSLocalizedDescriptionKey: "holder '\(setup)' did not start: \(line)"])
        }
        return pid
    }

    /// An overlay filesystem over new `lower`, `upper` and `work` directories, mounted on
    /// `merged`; unmounted at teardown. Nil when this kernel cannot mount one.
    package func mountOverlay() -> (lower: String, upper: String, merged: String)? {
        let (l, u, w, m) = (file("ovl-lower"), file("ovl-upper"), file("ovl-work"), file("ovl-merged"))
        for d in [l, u, w, m] { try? FileManager.default.createDirectory(atPath: d, withIntermediateDirectories: true) }
        do {
            try Self.sh(["mount", "-t", "overlay", "overlay", "-o", "lowerdir=\(l),upperdir=\(u),workdir=\(w)", m])
        } catch {
            print("overlay mount failed: \(error)")
            return nil
        }
        undo.append {
            if (try? DeviceScratch.sh(["umount", m])) == nil { _ = try? DeviceScratch.sh(["umount", "-l", m]) }
        }
        return (l, u, m)
    }

    /// A dm device; removed at teardown.
    package func dmCreate(_ suffix: String, table: String) throws -> String {
        let name = "hydtest-\(getpid())-\(UInt16.random(in: 0...UInt16.max))-\(suffix)"
        try Self.sh(["dmsetup", "create", name, "--table", table])
        undo.append { _ = try? DeviceScratch.sh(["dmsetup", "remove", "--retry", name]) }
        return "/dev/mapper/" + name
    }

    // MARK: what this machine offers

    package static let loopSkip: String? = {
        if !FileManager.default.fileExists(atPath: "/dev/loop-control") { return "/dev/loop-control is absent" }
        if getuid() != 0 { return "not root: cannot attach loop devices" }
        if (try? sh(["which", "mkfs.ext4"])) == nil { return "mkfs.ext4 is missing" }
        return nil
    }()

    package static let dmSkip: String? = {
        if let r = loopSkip { return r }
        if (try? sh(["dmsetup", "version"])) == nil {
            return "device-mapper is not available (dmsetup version fails: no dm in this kernel)"
        }
        return nil
    }()

    /// Whether partitions of a loop device can be made (losetup -P, or partx --add on kernels
    /// without partition table parsers, like this one).
    package static let partitionSkip: String? = {
        if let r = loopSkip { return r }
        if (try? sh(["which", "sfdisk"])) == nil { return "sfdisk is missing (apt-get install fdisk)" }
        if (try? sh(["which", "partx"])) == nil { return "partx is missing" }
        let s = DeviceScratch("partprobe")
        defer { s.teardown() }
        guard let img = try? s.makePartitionedImage("probe.img"),
            let loop = try? s.attachPartitioned(img)
        else { return "cannot attach a partitioned loop device" }
        if !FileManager.default.fileExists(atPath: loop + "p1") {
            return "no partitions appear on a partitioned loop device (losetup -P, partx --add)"
        }
        return nil
    }()

    /// A 64 MiB image with two 16 MiB GPT partitions.
    package func makePartitionedImage(_ name: String) throws -> String {
        let path = try makeFile(name, size: 64 << 20)
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = ["sfdisk", "-q", path]
        let input = Pipe()
        p.standardInput = input
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        try p.run()
        input.fileHandleForWriting.write(Data("label: gpt\n,16M,L\n,16M,L\n".utf8))
        try input.fileHandleForWriting.close()
        p.waitUntilExit()
        guard p.terminationStatus == 0 else { throw NSError(domain: "sfdisk", code: Int(p.terminationStatus)) }
        return path
    }

    package func attachPartitioned(_ path: String) throws -> String {
        let loop = try Self.sh(["losetup", "--partscan", "--find", "--show", path])
        undo.append { DeviceScratch.detachIfOurs(loop, path) }
        for _ in 0..<50 where !FileManager.default.fileExists(atPath: loop + "p1") { usleep(10_000) }
        if !FileManager.default.fileExists(atPath: loop + "p1") {
            // A kernel without partition table parsers: partx reads the table in userspace and
            // adds the partitions with BLKPG.
            // partx has been seen to fail to read the table of a loop device attached a moment
            // before (under load): retry after dropping its buffers.
            var attempt = 0
            while true {
                do { try Self.sh(["partx", "--add", loop]); break } catch {
                    attempt += 1
                    if attempt == 10 { throw error }
                    _ = try? Self.sh(["blockdev", "--flushbufs", loop])
                    usleep(100_000)
                }
            }
            for _ in 0..<100 where !FileManager.default.fileExists(atPath: loop + "p1") { usleep(10_000) }
        }
        return loop
    }
}
