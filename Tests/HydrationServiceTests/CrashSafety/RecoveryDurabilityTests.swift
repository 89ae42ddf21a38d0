import HydrationTestSupport
import Testing

@testable import HydrationEngine
@testable import HydrationService
@testable import HydrationStorage

#if canImport(Glibc)
    import Glibc
#endif

/// Recovery must make durable what it relies on before it writes a superblock that counts it.
@Suite struct CrashSafetyRecoveryDurabilityTests {
    static let path = "/meta/job.meta"

    /// A process whose metadata fsync failed leaves its bitmap page cached, clean and never
    /// written ("fsyncgate"): a later fsync does not write it again. A restarted daemon (same
    /// page cache, no reboot) adopts that page; if it then wrote its recovery superblock without
    /// rewriting the page, a power loss would leave a superblock counting regions that no durable
    /// page holds: the metadata would be refused for good (or worse, after discards).
    @Test func adoptedPagesAreMadeDurableBeforeTheRecoverySuperblock() throws {
        let storage = CrashableStorage()
        let size: UInt64 = 1000 * 4096
        let options = MetadataCreateOptions(
            regionSize: 4096,
            source: DeviceRecord(
                path: "/src", identity: DeviceIdentity(kind: .regularFile, device: 1, inode: 2, rdev: 0), size: size),
            dest: DeviceRecord(
                path: "/dst", identity: DeviceIdentity(kind: .regularFile, device: 1, inode: 3, rdev: 0), size: size),
            discardSource: true, destZeroed: false)
        let store = try MetadataStore.create(path: Self.path, options: options, storage: storage, nowMs: 1)
        try store.commit([0..<10], nowMs: 2)
        // The next commit's page fsync fails: its page stays in the cache, never durable.
        let failed = Counter()
        storage.setFault { op in
            op.path == Self.path && op.kind == .sync && failed.increment() == 1 ? EIO : nil
        }
        #expect(throws: MetadataError.self) { try store.commit([10..<500], nowMs: 3) }
        storage.setFault(nil)
        // Restart without reboot: the cached page is adopted.
        let (recovered, report) = try MetadataStore.open(path: Self.path, storage: storage)
        #expect(report.adoptedRegions == 490)
        #expect(recovered.committedMap.setCount == 500)
        // Power loss now: only what was synced survives, and it must still open, consistently.
        let rebooted = CrashableStorage(files: storage.snapshotNow.materialize(.dropAll))
        let (after, _) = try MetadataStore.open(path: Self.path, storage: rebooted, readOnly: true)
        #expect(after.committedMap.setRanges() == [0..<500])
        countCrash("faults injected", 1)
    }

    /// A destination file the job creates, or an existing empty one it extends (ftruncate), gets
    /// its size in the page cache only. A power loss right after `create`, before any commit,
    /// must still leave a job that reopens (it left an empty file: MetadataMismatch for good).
    @Test(arguments: [false, true]) func crashRightAfterCreateReopens(existingEmptyDestination: Bool) async throws {
        let io = IOExecutor(threads: 1)
        let sc = CrashScenario.make(seed: 7)
        let storage = CrashableStorage()
        storage.addFile(CrashScenario.sourcePath, data: sc.image, holes: sc.holes)
        if existingEmptyDestination { storage.addFile(CrashScenario.destPath, data: []) }
        let job = try await HydrationJob.create(sc.config(), storage: storage, io: io, logger: crashLogger)
        _ = job  // the process dies here: nothing more is issued
        let snap = storage.snapshotNow
        #expect(
            !snap.pending.contains { $0.path == CrashScenario.destPath && $0.kind == .extend },
            "the destination's new size is still only in the page cache")
        for policy in [CrashPolicy.dropAll, .random(seed: 1), .keepAll] {
            let r = await CrashHarness.recover(snap.materialize(policy), sc, io: io)
            #expect(r.failures.isEmpty, "\(policy): \(r.failures)")
        }
        countCrash("crash points", 3)
    }
}
