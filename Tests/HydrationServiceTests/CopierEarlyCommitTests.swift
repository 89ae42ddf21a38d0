import HydrationTestSupport
import Testing

@testable import HydrationEngine
@testable import HydrationService
@testable import HydrationStorage

#if canImport(Glibc)
    import Glibc
#endif

/// The commit the copier starts early when half the space budget is used (discard_source).
@Suite struct CopierEarlyCommitTests {
    let io = IOExecutor(threads: 2)

    /// An early commit that fails (here the destination's fdatasync) is final for the job: the run
    /// stops at once, failed, and writes nothing more to the destination. It must not wait for
    /// the copier to notice by itself: at the lowest rate limit the next batch is due 256 s later,
    /// and the copier would then still write that batch, which no commit can record.
    @Test func aFailedEarlyCommitStopsTheRunAtOnce() async throws {
        let regionSize: UInt64 = 64 << 10
        let image = TestImage.make(size: 4 << 20, seed: 251)
        let sim = SimulatedStorage()
        sim.addFile("/src", data: image.bytes)
        // 1 MiB batches at 4 KiB/s: the second batch is due 256 s after the first. The budget's
        // half (1 MiB) is reached by the first batch, so the second one starts the early commit.
        let tunables = Tunables(
            batchSize: 16, threshold: 16, rateLimitBytesPerSecond: 4096, spaceBudgetBytes: 2 << 20,
            commitIntervalMs: 3_600_000)
        let cfg = JobConfiguration(
            name: "early", sourcePath: "/src", destPath: "/dst", metadataPath: "/meta",
            regionSize: regionSize, discardSource: true, tunables: tunables)
        let job = try await HydrationJob.create(cfg, storage: sim, io: io, logger: testLogger)
        // From now on every fdatasync of the destination fails: the first is the early commit's.
        sim.setFault { op in op.path == "/dst" && op.kind == .sync ? EIO : nil }
        let started = sim.log.count
        try await job.start()

        let settled = await eventually(60) { await job.currentState != .hydrating }
        let st = await job.status()
        #expect(
            settled,
            "still hydrating 60 s after the early commit failed (\(st.commits.count) commits, \(st.bytes.hydrated) bytes hydrated, metadata \(st.metadata.mode)): the run waits out its rate limit"
        )
        if !settled { await job.pause() }
        #expect(await job.currentState == .failed)
        let error = await job.lastError
        #expect(error?.code == .commitFailed, "\(String(describing: error))")
        let log = sim.log
        let failedSync = try #require(
            log.first { $0.seq >= started && $0.path == "/dst" && $0.kind == .sync }, "no destination sync")
        let later = log.filter { $0.path == "/dst" && $0.kind == .write && $0.seq > failedSync.seq }
        #expect(later.isEmpty, "written to the destination after the failed commit: \(later.prefix(3))")
        await job.close()
    }

    /// The rate limit after an idle gap (a first batch more than a second after the run began, as
    /// on a busy machine): the batch that goes at once still counts, so the next one waits its
    /// time. It was forgotten, and two batches went at once: at 4 KiB/s, 1 MiB that should have
    /// waited 256 s was written at once, after the early commit above had already failed.
    @Test func aBatchAfterAnIdleGapCountsAgainstTheRateLimit() async throws {
        let sim = SimulatedStorage()
        sim.addFile("/src", data: TestImage.make(size: 4 << 20, seed: 252).bytes)
        let tunables = Tunables(
            batchSize: 16, threshold: 16, rateLimitBytesPerSecond: 4096, spaceBudgetBytes: 1 << 30,
            commitIntervalMs: 3_600_000)
        let cfg = JobConfiguration(
            name: "rate", sourcePath: "/src", destPath: "/dst", metadataPath: "/meta", regionSize: 64 << 10,
            discardSource: false, tunables: tunables)
        let job = try await HydrationJob.create(cfg, storage: sim, io: io, logger: testLogger)
        let copier = await job.copier
        // The run began 2 s ago and has issued nothing: the first batch finds the window idle.
        await copier.setRateWindowForTesting(start: monotonicNanos() - 2_000_000_000, bytes: 0)
        await copier.throttle(bytes: 1 << 20, limit: 4096)
        let (start, issued) = (await copier.rateStart, await copier.rateBytes)
        let nextDue = start + UInt64(Double(issued) / 4096 * 1e9)
        #expect(issued == 1 << 20, "the batch that went at once was not counted")
        #expect(nextDue > monotonicNanos() + 200_000_000_000, "the next 1 MiB may go before its 256 s")
        await job.close()
    }
}
