import Foundation
import HydrationTestSupport
import Testing

@testable import HydrationEngine
@testable import HydrationService
@testable import HydrationStorage

/// Source and destination as real block devices (loop devices over sparse files): exercises
/// BLKDISCARD on the source, BLKZEROOUT on the destination, O_EXCL, BLKGETSIZE64/BLKSSZGET.
@Suite(.serialized) struct LoopDeviceTests {
    static var skipReason: String? {
        if !FileManager.default.fileExists(atPath: "/dev/loop-control") { return "/dev/loop-control is absent" }
        if getuid() != 0 { return "not root: cannot attach loop devices" }
        return nil
    }

    @discardableResult
    static func sh(_ args: [String]) throws -> String {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = args
        let out = Pipe()
        p.standardOutput = out
        p.standardError = FileHandle.nullDevice
        try p.run()
        let data = out.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        guard p.terminationStatus == 0 else {
            throw NSError(
                domain: "sh", code: Int(p.terminationStatus),
                userInfo: [NSLocalizedDescriptionKey: args.joined(separator: " ")])
        }
        return String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// `direct`: source and destination opened with O_DIRECT too (issue 13; block devices do
    /// direct I/O at their logical block size, here at least a page).
    @Test(.enabled(if: Self.skipReason == nil, "needs root and loop devices"), arguments: [false, true])
    func hydratesLoopToLoopWithDiscardAndZeroOut(direct: Bool) async throws {
        let dir = TempDir("loop")
        let size = 64 << 20
        let image = TestImage.make(size: size, seed: 77)
        try image.write(to: dir.file("src.img"))
        // The destination starts full of garbage, so the zero regions must really be zeroed.
        var garbage = [UInt8](repeating: 0, count: size)
        var rng = SeededRandom(seed: 5)
        rng.fill(&garbage, 0..<size)
        try Data(garbage).write(to: URL(fileURLWithPath: dir.file("dst.img")))

        let srcLoop = try Self.sh(["losetup", "--find", "--show", dir.file("src.img")])
        defer { _ = try? Self.sh(["losetup", "-d", srcLoop]) }
        let dstLoop = try Self.sh(["losetup", "--find", "--show", dir.file("dst.img")])
        defer { _ = try? Self.sh(["losetup", "-d", dstLoop]) }
        let allocatedBefore = allocatedBytes(dir.file("src.img"))

        let io = IOExecutor(threads: 4)
        let cfg = JobConfiguration(
            name: "loop", sourcePath: srcLoop, destPath: dstLoop, metadataPath: dir.file("meta"),
            regionSize: 64 << 10, discardSource: true)
        let storage = RecordingPosixStorage(directIO: direct)
        let job = try await HydrationJob.create(cfg, storage: storage, io: io, logger: testLogger)
        #expect(job.sourceIdentity.kind == .blockDevice)
        // O_EXCL: a second exclusive open of the source fails while the job holds it.
        let again = open(srcLoop, O_RDONLY | O_EXCL)
        #expect(again < 0 && errno == EBUSY)
        if again >= 0 { close(again) }
        try await job.start()
        #expect(await job.waitUntilSettled() == .complete)
        let st = await job.status()
        for path in [srcLoop, dstLoop] {
            let d = try #require(storage.device(path))
            #expect(d.directIO.enabled == direct, "\(path): \(d.directIO)")
            if direct {
                #expect(d.directCalls.load(ordering: .relaxed) > 0 && d.directRefused.load(ordering: .relaxed) == 0)
            }
        }
        await job.close()
        #expect(st.discard.failed == 0, "BLKDISCARD failed: \(st)")
        #expect(st.bytes.discarded == UInt64(size))
        // Zero chunks and holes (half the image) were detected, not written.
        #expect(st.bytes.skippedZero >= UInt64(size / 2))

        try Self.sh(["blockdev", "--flushbufs", dstLoop])
        #expect(byteDifference(readFile(dir.file("dst.img")), image.bytes) == nil, "destination differs from the image")
        // The loop driver turns BLKDISCARD into holes in the backing file.
        let after = allocatedBytes(dir.file("src.img"))
        #expect(after < allocatedBefore / 16, "source backing file still holds \(after) of \(allocatedBefore) bytes")
        await io.shutdown()
    }
}
