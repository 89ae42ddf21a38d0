import HydrationTestSupport
import Testing

@testable import HydrationEngine
@testable import HydrationService
@testable import HydrationStorage

#if canImport(Glibc)
    import Glibc
#endif

/// The release of the last, partial region of a file source.
@Suite struct DiscarderTests {
    let io = IOExecutor(threads: 2)

    /// The last release punches through the end of the last region (on ext4 that frees the file's
    /// last partial block). A filesystem that refuses a punch past the end of the file (a FUSE
    /// file over NBD: nbdfuse answers "request out of bounds") gets the same range up to the end
    /// instead: the round-5 attack found up to a whole batch (37 MiB of a 100 MiB + 777 B file)
    /// left unreleased, the job complete with `discard.failed` 1.
    @Test func aPunchPastTheEndThatIsRefusedIsRetriedUpToTheEnd() async throws {
        let size = (4 << 20) + 777
        let image = TestImage.make(size: size, seed: 91)
        let sim = SimulatedStorage()
        sim.addFile("/src", data: image.bytes)
        sim.setFault { op in
            op.path == "/src" && op.kind == .release && op.offset + op.length > UInt64(size) ? EINVAL : nil
        }
        let cfg = JobConfiguration(
            name: "tail", sourcePath: "/src", destPath: "/dst", metadataPath: "/meta",
            regionSize: 64 << 10, discardSource: true)
        let job = try await HydrationJob.create(cfg, storage: sim, io: io, logger: testLogger)
        try await job.start()
        #expect(await job.waitUntilSettled() == .complete)
        let st = await job.status()
        await job.close()
        #expect(byteDifference(sim.contents("/dst"), image.bytes) == nil)
        #expect(st.discard.failed == 0, "\(st.discard)")
        #expect(st.bytes.discarded == UInt64(size), "\(st.bytes)")
        // Everything released but, at most, the block holding the end of the file.
        #expect(sim.allocatedBlocks("/src") <= 1, "\(sim.allocatedBlocks("/src")) blocks left")
        let releases = sim.log.filter { $0.path == "/src" && $0.kind == .release }
        #expect(releases.contains { $0.offset + $0.length == UInt64(size) }, "no release up to the end: \(releases)")
    }

    /// Where the punch past the end is accepted (ext4), it is the one made: no second call.
    @Test func aPunchPastTheEndIsTriedFirst() async throws {
        let size = (1 << 20) + 777
        let image = TestImage.make(size: size, seed: 92)
        let sim = SimulatedStorage()
        sim.addFile("/src", data: image.bytes)
        let cfg = JobConfiguration(
            name: "tail2", sourcePath: "/src", destPath: "/dst", metadataPath: "/meta",
            regionSize: 64 << 10, discardSource: true)
        let job = try await HydrationJob.create(cfg, storage: sim, io: io, logger: testLogger)
        try await job.start()
        #expect(await job.waitUntilSettled() == .complete)
        await job.close()
        let releases = sim.log.filter { $0.path == "/src" && $0.kind == .release }
        #expect(releases.contains { $0.offset + $0.length == UInt64(17 << 16) }, "\(releases)")
        #expect(!releases.contains { $0.offset + $0.length == UInt64(size) }, "\(releases)")
        #expect(sim.allocatedBlocks("/src") == 0)
    }
}
