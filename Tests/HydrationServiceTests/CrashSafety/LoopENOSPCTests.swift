import Foundation
import HydrationTestSupport
import Testing

@testable import HydrationEngine
@testable import HydrationService
@testable import HydrationStorage

#if canImport(Glibc)
    import Glibc
#endif

/// A real full filesystem: a 64 MiB ext4 on a loop device, the destination on it, PosixStorage.
enum LoopFS {
    static var unavailableReason: String? {
        if getuid() != 0 { return "not root: cannot mount a loop filesystem" }
        if !FileManager.default.fileExists(atPath: "/dev/loop-control") {
            return "no /dev/loop-control: no loop devices"
        }
        for tool in ["/usr/sbin/mkfs.ext4", "/usr/bin/mount", "/usr/bin/umount"]
        where !FileManager.default.isExecutableFile(atPath: tool) {
            return "\(tool) is missing"
        }
        return nil
    }

    @discardableResult
    static func sh(_ args: [String]) -> (status: Int32, output: String) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: args[0])
        p.arguments = Array(args.dropFirst())
        let pipe = Pipe()
        p.standardOutput = pipe
        p.standardError = pipe
        do { try p.run() } catch { return (-1, "\(error)") }
        let out = pipe.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return (p.terminationStatus, String(decoding: out, as: UTF8.self))
    }
}

@Suite(.serialized) struct CrashSafetyLoopENOSPCTests {
    let io = IOExecutor(threads: 2)

    func randomFile(_ path: String, size: Int, seed: UInt64) throws -> [UInt8] {
        var rng = SeededRandom(seed: seed)
        var b = [UInt8](repeating: 0, count: size)
        rng.fill(&b, 0..<size)
        try TestImage(bytes: b, holes: []).write(to: path)
        return b
    }

    /// The destination fills a real ext4: the job pauses with NoSpace; once space is freed it
    /// resumes and the destination is byte-identical. `metadataOnFullFS` puts the metadata file on
    /// the same full filesystem (its commits must not fail for lack of space either).
    func run(metadataOnFullFS: Bool) async throws {
        let dir = TempDir("enospc")
        let img = dir.file("fs.img"), mnt = dir.file("mnt")
        try FileManager.default.createDirectory(atPath: mnt, withIntermediateDirectories: true)
        #expect(LoopFS.sh(["/usr/bin/truncate", "-s", "64M", img]).status == 0)
        let mk = LoopFS.sh(["/usr/sbin/mkfs.ext4", "-q", "-F", "-m", "0", img])
        try #require(mk.status == 0, "mkfs.ext4: \(mk.output)")
        let m = LoopFS.sh(["/usr/bin/mount", "-o", "loop", img, mnt])
        try #require(m.status == 0, "mount -o loop: \(m.output)")
        defer {
            // Always unmount; the loop device mount created is released with it (autoclear),
            // and any leftover one is detached explicitly.
            LoopFS.sh(["/usr/bin/umount", mnt])
            let left = LoopFS.sh(["/usr/sbin/losetup", "-j", img]).output
            for line in left.split(separator: "\n") {
                if let dev = line.split(separator: ":").first { LoopFS.sh(["/usr/sbin/losetup", "-d", String(dev)]) }
            }
        }
        // Fill most of the filesystem so that the 40 MiB destination cannot fit.
        let filler = mnt + "/filler"
        _ = try randomFile(filler, size: 32 << 20, seed: 2)
        let image = try randomFile(dir.file("src.img"), size: 40 << 20, seed: 1)
        let cfg = JobConfiguration(
            name: "enospc", sourcePath: dir.file("src.img"), destPath: mnt + "/dst.img",
            metadataPath: metadataOnFullFS ? mnt + "/job.meta" : dir.file("job.meta"),
            regionSize: 64 << 10, discardSource: true)
        let job = try await HydrationJob.create(cfg, io: io, logger: crashLogger)
        try await job.start()
        let first = await job.waitUntilSettled()
        let st = await job.status()
        #expect(
            first == .paused, "a full destination pauses the job (got \(first.rawValue): \(st.error?.message ?? ""))")
        #expect(st.error?.code == "NoSpace")
        #expect(await job.lastError?.errno == ENOSPC)
        #expect(st.metadata.mode == .rw)
        #expect(st.regions.hydrated > 0 && st.regions.hydrated < st.regions.total)
        print(
            "real ext4 ENOSPC (metadata \(metadataOnFullFS ? "on the full filesystem" : "elsewhere")): \(first.rawValue) with \(st.error?.code ?? "no error") after \(st.bytes.hydrated >> 20) MiB of 40 MiB; error: \(st.error?.message ?? "")"
        )
        countCrash("faults injected", 1)
        // Free space and resume.
        try FileManager.default.removeItem(atPath: filler)
        do { try await job.start() } catch { Issue.record("resume after freeing space: \(error)") }
        let second = await job.waitUntilSettled()
        let msg = await job.status().error?.message ?? ""
        #expect(second == .complete, "\(msg)")
        await job.close()
        let dest = readFile(mnt + "/dst.img")
        #expect(
            dest.count == image.count && bytesEqual(dest, image, count: image.count),
            "destination byte-identical after resume")
        #expect(allocatedBytes(dir.file("src.img")) == 0, "source fully released")
    }

    @Test(
        .enabled(if: LoopFS.unavailableReason == nil, "needs root, loop devices and mkfs.ext4"), .timeLimit(.minutes(5))
    )
    func realENOSPCPausesAndResumes() async throws {
        try await run(metadataOnFullFS: false)
    }

    @Test(
        .enabled(if: LoopFS.unavailableReason == nil, "needs root, loop devices and mkfs.ext4"), .timeLimit(.minutes(5))
    )
    func realENOSPCWithMetadataOnTheFullFilesystem() async throws {
        try await run(metadataOnFullFS: true)
    }
}
