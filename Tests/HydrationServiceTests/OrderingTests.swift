import ControlProtocol
import Foundation
import HydrationTestSupport
import Synchronization
import Testing

@testable import HydrationEngine
@testable import HydrationService
@testable import HydrationStorage

/// The two orderings the whole design rests on, asserted on every operation of a real engine run
/// through an instrumented storage layer:
///  1. no metadata commit records a region before the destination's fdatasync made it durable;
///  2. no source range is released before metadata recording its hydration is durable.
@Suite(.serialized) struct OrderingTests {
    static let regionSize: UInt64 = 4096

    final class Checker: Sendable {
        struct State {
            var lastDestWrite: [Int: Int] = [:]
            var lastDestSync = -1
            var durable = RegionMap(count: 0)
            var metadataSyncs = 0
            var releases = 0
            /// Regions whose destination data a writeback failure lost (until rewritten).
            var lost: Set<Int> = []
            var violations: [String] = []
        }
        let state: Mutex<State>
        let regions: Int
        init(regions: Int) {
            self.regions = regions
            state = Mutex(State(durable: RegionMap(count: regions)))
        }

        func observe(_ op: SimulatedStorage.Op, _ files: [String: SimulatedStorage.FileState]) {
            let first = Int(op.offset / OrderingTests.regionSize)
            let last = Int((op.offset + max(op.length, 1) - 1) / OrderingTests.regionSize)
            state.withLock { s in
                switch (op.path, op.kind) {
                case ("/dst", .write), ("/dst", .zeroOut):
                    for r in first...last { s.lastDestWrite[r] = op.seq; s.lost.remove(r) }
                case ("/dst", .writebackLost):
                    // Everything written since the last successful sync never reaches the disk.
                    for (r, w) in s.lastDestWrite where w > s.lastDestSync { s.lost.insert(r) }
                case ("/dst", .sync):
                    s.lastDestSync = op.seq
                case ("/meta", .sync):
                    // What this sync makes durable: decode the file as it is now.
                    let copy = SimulatedStorage()
                    copy.addFile("/meta", data: files["/meta"]!.data)
                    guard let (store, _) = try? MetadataStore.open(path: "/meta", storage: copy, readOnly: true) else {
                        s.violations.append("op \(op.seq): metadata does not open at a sync")
                        return
                    }
                    let map = store.committedMap
                    for range in map.setRanges() {
                        for r in range where !s.durable[r] {
                            if s.lost.contains(r) {
                                s.violations.append(
                                    "op \(op.seq): metadata records region \(r), whose destination data a writeback failure lost"
                                )
                            } else if let w = s.lastDestWrite[r], w > s.lastDestSync {
                                s.violations.append(
                                    "op \(op.seq): metadata records region \(r), written at op \(w), before the destination sync"
                                )
                            }
                        }
                    }
                    s.durable = map
                    s.metadataSyncs += 1
                case ("/src", .release):
                    s.releases += 1
                    for r in first...min(last, regions - 1) where !s.durable[r] {
                        s.violations.append(
                            "op \(op.seq): source region \(r) released before its hydration was durable")
                        break
                    }
                default:
                    break
                }
            }
        }
    }

    /// `commitOnlyAtEnd`: no periodic or budget commits, only the one that completes the job, so
    /// that every eviction between a writeback failure and that commit runs before any sync.
    func run(
        fault: CommitterFault?, writebackFailureAtWrite: Int? = nil, legacyWaitingEvict: Bool = false,
        commitOnlyAtEnd: Bool = false, final expected: JobStatus.State? = .complete
    ) async throws -> Checker.State {
        let sim = SimulatedStorage()
        let regions = 512
        let image = TestImage.make(size: regions * Int(Self.regionSize), seed: 11, chunk: 16 * 4096)
        sim.addFile("/src", data: image.bytes)
        let checker = Checker(regions: regions)
        sim.setObserver { op, files in checker.observe(op, files) }
        if let n = writebackFailureAtWrite { sim.setWritebackFailure(path: "/dst", atWrite: n) }
        sim.setLegacyWaitingEvict(legacyWaitingEvict)
        // Slow destination syncs a little, so that a wrongly early publication reaches the
        // discarder well before the metadata is written.
        sim.setSyncDelay { path in if path == "/dst" { usleep(3000) } }
        var t = Tunables.defaults(regionSize: Self.regionSize)
        t.batchSize = 4
        t.threshold = 8
        t.spaceBudgetBytes = 64 * 1024  // forces a commit every few batches
        t.commitIntervalMs = 20
        if commitOnlyAtEnd {
            t.spaceBudgetBytes = 64 << 20
            t.commitIntervalMs = 3_600_000
        }
        let cfg = JobConfiguration(
            name: "o", sourcePath: "/src", destPath: "/dst", metadataPath: "/meta",
            regionSize: Self.regionSize, discardSource: true, tunables: t)
        let io = IOExecutor(threads: 4)
        let job = try await HydrationJob.create(cfg, storage: sim, io: io, logger: testLogger)
        if let fault { await job.committer.injectFault(fault) }
        if writebackFailureAtWrite != nil { await job.copier.setCacheWindowForTesting(16 << 10) }
        try await job.start()
        let final = await job.waitUntilSettled()
        let st = await job.status()
        await job.close()
        await io.shutdown()
        if expected == .complete {
            #expect(final == .complete, "\(st.state) \(st.error?.message ?? "") \(st.regions)")
            #expect(byteDifference(sim.contents("/dst"), image.bytes) == nil, "destination differs")
        } else if let expected {
            #expect(final == expected, "\(st.state) \(st.error?.message ?? "")")
            #expect(
                st.error?.code == "CommitFailed" && st.error?.errno == EIO && st.metadata.mode == .ro,
                "\(st.error?.message ?? "none"), metadata \(st.metadata.mode.rawValue)")
        }
        return checker.state.withLock { $0 }
    }

    @Test func engineKeepsBothOrderings() async throws {
        let s = try await run(fault: nil)
        #expect(s.violations.isEmpty, "\(s.violations.prefix(5))")
        #expect(s.metadataSyncs >= 10)
        #expect(s.releases >= 10)
        print("ordering: \(s.metadataSyncs) metadata syncs and \(s.releases) source releases checked, 0 violations")
    }

    /// The checker is not vacuous: a committer that publishes before the metadata is durable is caught.
    @Test func checkerCatchesPublishBeforeDurable() async throws {
        let s = try await run(fault: .publishBeforeDurable)
        #expect(s.violations.contains { $0.contains("released before") }, "\(s.violations.prefix(3))")
    }

    /// A destination writeback failure (data since the last sync lost, the error reported once
    /// per open device to the first waiting call): the job fails, and no commit records a lost
    /// region nor releases its source.
    @Test(arguments: [3, 15, 30]) func writebackFailureKeepsBothOrderings(atWrite: Int) async throws {
        let s = try await run(fault: nil, writebackFailureAtWrite: atWrite, final: .failed)
        #expect(s.violations.isEmpty, "\(s.violations.prefix(5))")
    }

    /// The checker catches the old eviction, which waited on the synced descriptor and ignored
    /// the error: the next fdatasync succeeded and lost regions were committed and released.
    /// With the only commit at the end, an eviction is always the first to see the error (a
    /// periodic commit's fdatasync could otherwise report it first and hide the mutation), so
    /// every injection point must catch it.
    @Test(arguments: [3, 15, 30]) func checkerCatchesSwallowedWritebackError(atWrite: Int) async throws {
        let s = try await run(
            fault: nil, writebackFailureAtWrite: atWrite, legacyWaitingEvict: true,
            commitOnlyAtEnd: true, final: nil)
        #expect(
            s.violations.contains { $0.contains("writeback failure lost") },
            "the swallowed writeback error at write \(atWrite) went unnoticed: \(s.violations.prefix(3))")
    }

    /// The same run without the mutation: the error fails the job and the checker sees nothing.
    @Test(arguments: [3, 15, 30]) func writebackFailureBeforeTheOnlyCommitKeepsBothOrderings(atWrite: Int) async throws
    {
        let s = try await run(fault: nil, writebackFailureAtWrite: atWrite, commitOnlyAtEnd: true, final: .failed)
        #expect(s.violations.isEmpty, "\(s.violations.prefix(5))")
    }

    /// ... and so is one that writes the metadata before the destination's fdatasync.
    @Test func checkerCatchesMetadataBeforeDestinationSync() async throws {
        let s = try await run(fault: .metadataBeforeDestinationSync)
        #expect(s.violations.contains { $0.contains("before the destination sync") }, "\(s.violations.prefix(3))")
    }
}
