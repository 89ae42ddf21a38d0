import Foundation
import HydrationTestSupport
import Testing

@testable import HydrationEngine
@testable import HydrationService
@testable import HydrationStorage

/// Simulated power loss at every step of a hydration with discard_source: record a run, crash it
/// at every mutation boundary under several survival policies (plus seeded second crashes during
/// recovery, and live crashes at random points), recover, finish, check.
@Suite(.serialized) struct CrashSafetyExplorerTests {
    let io = IOExecutor(threads: 2)

    /// Distinct crash states the normal run must recover from.
    static let targetStates = 10_000
    /// Never more than this many scenarios, whatever the count per scenario.
    static let maxScenarios = 40

    @Test func everyCrashPointRecovers() async throws {
        let started = Date()
        var total = CrashHarness.Stats()
        var scenarios = 0
        var mutations = 0
        var seed: UInt64 = 1
        while total.states < Self.targetStates && scenarios < Self.maxScenarios {
            let sc = CrashScenario.make(seed: seed)
            let (run, failures) = try await CrashHarness.record(sc, io: io)
            #expect(failures.isEmpty, "recording run of seed \(seed): \(failures)")
            let stats = await CrashHarness.explore(sc, run: run, io: io)
            total.boundaries += stats.boundaries
            total.states += stats.states
            total.duplicates += stats.duplicates
            total.secondCrashes += stats.secondCrashes
            total.findings += stats.findings
            mutations += run.trace.filter { $0.kind.isMutation }.count
            scenarios += 1
            seed += 1
            if !total.findings.isEmpty { break }
        }
        let elapsed = Date().timeIntervalSince(started)
        let points = total.states + total.secondCrashes
        print(
            "crash explorer: \(scenarios) scenarios (seeds 1...\(seed - 1)), \(mutations) recorded mutations, \(total.boundaries) op boundaries, \(total.states) distinct crash states recovered (+\(total.duplicates) duplicates skipped), \(total.secondCrashes) second crashes during recovery: \(points) crash points explored in \(String(format: "%.1f", elapsed)) s"
        )
        countCrash("crash points", points)
        for f in total.findings { Issue.record("crash-safety violation: \(f)") }
        #expect(total.states >= Self.targetStates)
    }

    /// Verified release: power loss at every boundary of runs whose batches read their ranges
    /// back, so also between a batch's read-back and the commit that records it (the process
    /// dies there with the region verified, not yet committed): recovery copies and verifies it
    /// again, and nothing is released that the durable metadata does not record. A fresh and a
    /// garbage destination (whose holes and zero regions are zeroed, then read back).
    @Test func verifiedRunsRecoverAtEveryCrashPoint() async throws {
        var total = CrashHarness.Stats()
        var readBacks = 0
        for (i, variant) in [CrashScenario.Variant.fresh, .garbageFile].enumerated() {
            var sc = CrashScenario.make(seed: 501 + UInt64(i), regions: 96)
            sc.variant = variant
            sc.verify = true
            let (run, failures) = try await CrashHarness.record(sc, io: io)
            #expect(failures.isEmpty, "recording run of \(variant): \(failures)")
            // The read-backs are in the trace: reads of the destination.
            let r = run.trace.filter { $0.kind == .read && $0.path == CrashScenario.destPath }.count
            #expect(r > 0, "\(variant): no read-back of the destination in the trace")
            readBacks += r
            let stats = await CrashHarness.explore(sc, run: run, io: io)
            total.states += stats.states
            total.secondCrashes += stats.secondCrashes
            total.findings += stats.findings
        }
        print(
            "verified runs: \(readBacks) read-backs, \(total.states) crash states recovered, \(total.secondCrashes) second crashes"
        )
        for f in total.findings { Issue.record("crash-safety violation with verify: \(f)") }
        #expect(total.states > 0)
    }

    /// Pre-existing garbage destinations (file: punch; block device: BLKZEROOUT; no zero-out:
    /// zeros written) and a source without SEEK_DATA: the zeroing paths the fresh-destination
    /// scenarios never take, crashed at every boundary. Holes and zero regions must read back
    /// as zeros after recovery.
    @Test func garbageDestinationsAndSourceWithoutSeekData() async throws {
        let started = Date()
        var total = CrashHarness.Stats()
        for (i, variant) in CrashScenario.Variant.allCases.filter({ $0 != .fresh }).enumerated() {
            var sc = CrashScenario.make(seed: 301 + UInt64(i))
            sc.variant = variant
            let (run, failures) = try await CrashHarness.record(sc, io: io)
            #expect(failures.isEmpty, "\(variant) recording run: \(failures)")
            let zeroing = run.trace.filter {
                $0.path == CrashScenario.destPath && ($0.kind == .zeroOut || $0.kind == .write)
            }.count
            #expect(zeroing > 0)
            if variant == .garbageFileNoZeroOut {
                #expect(
                    !run.trace.contains { $0.path == CrashScenario.destPath && $0.kind == .zeroOut && $0.errno == 0 })
            } else {
                #expect(
                    run.trace.contains { $0.path == CrashScenario.destPath && $0.kind == .zeroOut },
                    "\(variant): nothing zeroed")
            }
            if variant == .garbageFileSourceWithoutSeekData {
                #expect(run.trace.filter { $0.path == CrashScenario.sourcePath && $0.kind == .read }.count > 0)
            }
            // Every third boundary: zeroing makes these traces long, and seconds matter.
            let stats = await CrashHarness.explore(sc, run: run, io: io, pointFilter: { $0 % 3 == 0 })
            total.states += stats.states
            total.secondCrashes += stats.secondCrashes
            total.findings += stats.findings.map {
                var f = $0; f.failures.insert("\(variant)", at: 0); return f
            }
            if !total.findings.isEmpty { break }
        }
        print(
            "garbage destinations / source without SEEK_DATA: \(total.states) crash states recovered (+\(total.secondCrashes) second crashes) in \(String(format: "%.1f", Date().timeIntervalSince(started))) s"
        )
        countCrash("crash points", total.states + total.secondCrashes)
        for f in total.findings { Issue.record("crash-safety violation: \(f)") }
    }

    /// Live crashes: the engine really dies at a seeded mutation (every later call fails, its
    /// tasks are abandoned), and recovery starts from the frozen cache under several policies.
    /// The frozen state must equal the one the trace replayer derives for the same point.
    @Test func liveCrashesAtRandomPoints() async throws {
        var crashes = 0
        var states = 0
        for seed in UInt64(101)...UInt64(124) {
            let sc = CrashScenario.make(seed: seed)
            var rng = SeededRandom(seed: seed)
            let storage = CrashableStorage()
            storage.addFile(CrashScenario.sourcePath, data: sc.image, holes: sc.holes)
            let job = try await HydrationJob.create(sc.config(), storage: storage, io: io, logger: crashLogger)
            storage.beginTrace()
            let n = Int(rng.next() % 400) + 1
            storage.armCrash(afterMutations: n)
            try await job.start()
            let died = await eventually(10) {
                if storage.crashedSnapshot != nil { return true }
                return await job.currentState != .hydrating
            }
            #expect(died)
            guard let snap = storage.crashedSnapshot else {
                // The run finished before its n-th mutation: nothing to crash.
                #expect(await job.currentState == .complete)
                continue
            }
            crashes += 1
            // The replayer, fed the same trace, reaches the same durable images and pending ops.
            var rep = TraceReplayer(base: storage.baseline!, trace: storage.trace)
            while rep.position < rep.count { rep.advance() }
            let derived = rep.snapshot
            #expect(derived.durable == snap.durable, "seed \(seed): replayed durable state differs from the live one")
            #expect(derived.pending.map(\.seq) == snap.pending.map(\.seq), "seed \(seed): replayed pending set differs")
            for policy in CrashHarness.policies(seed: seed, point: n, pending: snap.pending.count) {
                let r = await CrashHarness.recover(snap.materialize(policy), sc, io: io)
                states += 1
                #expect(
                    r.failures.isEmpty, "live crash seed \(seed) after \(n) mutations, policy \(policy): \(r.failures)")
            }
            // The dead job is abandoned, as a killed process would be.
        }
        print("live crashes: \(crashes) engine runs killed at a random mutation, \(states) crash states recovered")
        countCrash("crash points", states)
        #expect(crashes >= 15)
    }

    /// Asynchronous writeback failures of the destination at random points (issue 11): dirty
    /// data is lost and the error is reported once, to the first call that waits. The run must
    /// end failed (EIO, metadata ro) and every crash state of it must recover.
    @Test func writebackFailuresAtRandomPoints() async throws {
        let started = Date()
        var total = CrashHarness.Stats()
        var fired = 0
        for seed in UInt64(201)...UInt64(204) {
            let sc = CrashScenario.make(seed: seed)
            var rng = SeededRandom(seed: seed &* 7)
            let plan = WritebackFailurePlan(afterMutations: Int(rng.next() % 150) + 1)
            let (run, failures) = try await CrashHarness.record(sc, io: io, writebackFailure: plan)
            #expect(
                failures.isEmpty, "seed \(seed), writeback failure after \(plan.afterMutations) mutations: \(failures)")
            if run.trace.contains(where: { $0.kind == .writebackError }) { fired += 1 }
            let stats = await CrashHarness.explore(sc, run: run, io: io)
            total.states += stats.states
            total.secondCrashes += stats.secondCrashes
            total.findings += stats.findings
            if !total.findings.isEmpty { break }
        }
        print(
            "writeback failures: \(fired) runs lost destination writeback, \(total.states) crash states recovered (+\(total.secondCrashes) second crashes) in \(String(format: "%.1f", Date().timeIntervalSince(started))) s"
        )
        countCrash("crash points", total.states + total.secondCrashes)
        countCrash("faults injected", fired)
        for f in total.findings { Issue.record("crash-safety violation after a writeback failure: \(f)") }
        #expect(fired >= 3)
    }

    /// The harness must notice the old eviction, which waited for writeback (consuming the
    /// error) and ignored the result, so that the next fdatasync succeeded.
    @Test func detectsSwallowedWritebackError() async throws {
        var explored = 0
        var found: String?
        for seed in UInt64(201)...UInt64(210) {
            let sc = CrashScenario.make(seed: seed)
            var rng = SeededRandom(seed: seed &* 7)
            let plan = WritebackFailurePlan(afterMutations: Int(rng.next() % 150) + 1, legacyWaitingEvict: true)
            let (run, failures) = try await CrashHarness.record(sc, io: io, writebackFailure: plan)
            if !failures.isEmpty { found = "seed \(seed), recording run: \(failures)" }
            let stats = await CrashHarness.explore(sc, run: run, io: io, stopAfterFindings: 1)
            explored += stats.states
            if let f = stats.findings.first {
                found = "after \(explored) crash states: \(f)" + (found.map { "; \($0)" } ?? "")
                break
            }
        }
        countCrash("crash points", explored)
        #expect(found != nil, "the explorer did not notice an eviction that swallows writeback errors")
        if let found { print("swallowed writeback error detected: \(found)") }
    }

    #if DEBUG
        /// The harness must notice a committer that lets the discarder release regions before their
        /// metadata is durable (the seed thread's scenario).
        @Test func detectsPublishBeforeDurable() async throws {
            let found = try await findViolation(.publishBeforeDurable)
            #expect(found != nil, "the explorer did not notice discards of uncommitted regions")
            if let found { print("injected fault publishBeforeDurable detected: \(found)") }
        }

        /// ... and one that writes the metadata before the destination's fdatasync (dm-clone's 2019 bug).
        @Test func detectsMetadataBeforeDestinationSync() async throws {
            let found = try await findViolation(.metadataBeforeDestinationSync)
            #expect(found != nil, "the explorer did not notice metadata committed before the destination sync")
            if let found { print("injected fault metadataBeforeDestinationSync detected: \(found)") }
        }

        /// Explores scenarios with the faulty committer until the first violation; nil when the
        /// budget (3 scenarios) runs out without one.
        func findViolation(_ fault: InjectedCommitFault) async throws -> String? {
            var explored = 0
            for seed in UInt64(1)...UInt64(3) {
                let sc = CrashScenario.make(seed: seed)
                let (run, _) = try await CrashHarness.record(sc, io: io, fault: fault)
                let stats = await CrashHarness.explore(sc, run: run, io: io, stopAfterFindings: 1)
                explored += stats.states
                if let f = stats.findings.first {
                    countCrash("crash points", explored)
                    return "after \(explored) crash states: \(f)"
                }
            }
            return nil
        }
    #endif

    /// Replays one crash state from a dumped trace:
    /// HYDRATION_CRASH_REPLAY=/tmp/hydration-crash-seedS-PID-N.json:INDEX:POLICY
    @Test(.enabled(if: ProcessInfo.processInfo.environment["HYDRATION_CRASH_REPLAY"] != nil))
    func crashReplay() async throws {
        let spec = ProcessInfo.processInfo.environment["HYDRATION_CRASH_REPLAY"]!.split(separator: ":").map(String.init)
        try #require(spec.count == 3, "expected FILE:INDEX:POLICY")
        let run = try CrashHarness.loadTrace(spec[0])
        let point = try #require(Int(spec[1]))
        let sc = CrashScenario.make(seed: run.seed)
        var rep = TraceReplayer(base: run.base, trace: run.trace)
        for _ in 0..<point { rep.advance() }
        let snap = rep.snapshot
        let policy = try #require(
            CrashHarness.policies(seed: run.seed, point: point, pending: snap.pending.count)
                .first { $0.description == spec[2] })
        print("replaying seed \(run.seed) crash index \(point) policy \(policy): \(snap.summary)")
        let r = await CrashHarness.recover(snap.materialize(policy), sc, io: io)
        #expect(r.failures.isEmpty, "\(r.failures)")
    }
}

/// The simulated disk itself: the model the explorer relies on must behave as documented.
@Suite struct CrashSafetyStorageModelTests {
    func fresh() throws -> (CrashableStorage, any StorageDevice) {
        let s = CrashableStorage()
        s.addFile("/f", data: [UInt8](repeating: 7, count: 8192))
        return (s, try s.open("/f", mode: .destination(createSize: nil)))
    }

    @Test func unsyncedWritesAreLostAndSyncedOnesKept() throws {
        let (s, d) = try fresh()
        try d.write(bytes: [UInt8](repeating: 1, count: 512), at: 0)
        try d.sync()
        try d.write(bytes: [UInt8](repeating: 2, count: 512), at: 512)
        let snap = s.snapshotNow
        #expect(snap.pending.count == 1)
        let lost = snap.materialize(.dropAll)["/f"]!.data
        #expect(lost[0] == 1 && lost[512] == 7)
        let kept = snap.materialize(.keepAll)["/f"]!.data
        #expect(kept[0] == 1 && kept[512] == 2)
    }

    @Test func tornWritesAreSectorGranular() throws {
        let (s, d) = try fresh()
        try d.write(bytes: [UInt8](repeating: 9, count: 4096), at: 0)
        var mixed = 0
        for seed in UInt64(0)..<200 {
            let data = s.snapshotNow.materialize(.random(seed: seed))["/f"]!.data
            for sector in 0..<8 {
                let bytes = Set(data[sector * 512..<(sector + 1) * 512])
                #expect(bytes.count == 1, "a sector is all old or all new")
            }
            if Set(stride(from: 0, to: 4096, by: 512).map { data[$0] }).count == 2 { mixed += 1 }
        }
        #expect(mixed > 0, "some seeds tear the 4 KiB write")
    }

    @Test func failedSyncLosesThePagesForGood() throws {
        let (s, d) = try fresh()
        try d.write(bytes: [UInt8](repeating: 3, count: 512), at: 0)
        s.setFault { $0.kind == .sync ? EIO : nil }
        #expect(throws: StorageError.self) { try d.sync() }
        s.setFault(nil)
        try d.sync()  // "succeeds", as a second fsync does after a writeback error
        #expect(s.snapshotNow.materialize(.keepAll)["/f"]!.data[0] == 7, "the failed sync's pages never became durable")
        #expect(s.file("/f")!.data[0] == 3, "while the cache still shows them")
    }

    @Test func writebackErrorIsReportedOnceToEachOpenDeviceThatWaits() throws {
        let (s, d) = try fresh()
        let other = try s.open("/f", mode: .metadata(create: false))
        try d.write(bytes: [UInt8](repeating: 1, count: 512), at: 0)
        s.failWriteback(afterMutations: 0, path: "/f")
        try d.evict(offset: 0, length: 8192)
        #expect(s.writebackFailures == 0, "fires at the next mutation (the sync)")
        #expect(throws: StorageError.self) { try d.sync() }
        #expect(s.writebackFailures == 1)
        try d.sync()  // reported once per open device
        // evict waits on a description of its own: it is told too, and consuming it there
        // does not hide it from sync.
        try d.write(bytes: [UInt8](repeating: 4, count: 512), at: 1024)
        s.failWriteback(afterMutations: 0, path: "/f")
        try d.write(bytes: [UInt8](repeating: 5, count: 512), at: 2048)  // fires before this write
        #expect(throws: StorageError.self) { try d.evict(offset: 0, length: 8192) }
        try d.evict(offset: 0, length: 8192)
        #expect(throws: StorageError.self) { try d.sync() }
        try d.sync()
        #expect(throws: StorageError.self) { try other.sync() }  // ... and to every open device
        try other.sync()
        #expect(s.file("/f")!.data[1024] == 7 && s.file("/f")!.data[2048] == 5)
        #expect(s.file("/f")!.data[0] == 7, "the lost write is gone from the cache too")
        #expect(s.snapshotNow.materialize(.keepAll)["/f"]!.data[0] == 7)
    }

    @Test func legacyWaitingEvictSwallowsTheError() throws {
        let (s, d) = try fresh()
        s.setLegacyWaitingEvict(true)
        try d.write(bytes: [UInt8](repeating: 1, count: 512), at: 0)
        s.failWriteback(afterMutations: 0, path: "/f")
        try d.write(bytes: [UInt8](repeating: 2, count: 512), at: 512)  // fires before this write
        #expect(s.writebackFailures == 1)
        try d.evict(offset: 0, length: 8192)  // waits, is told, ignores it
        try d.sync()  // then "succeeds": the bug
        #expect(s.snapshotNow.materialize(.dropAll)["/f"]!.data[0] == 7, "the first write was lost")
        #expect(s.snapshotNow.materialize(.dropAll)["/f"]!.data[512] == 2)
    }

    @Test func extensionOfAnEmptyDestinationIsPendingUntilItsSync() throws {
        let s = CrashableStorage()
        s.addFile("/d", data: [])
        let d = try s.open("/d", mode: .destination(createSize: 8192))
        #expect(d.info.size == 8192)
        #expect(s.snapshotNow.materialize(.dropAll)["/d"]!.data.count == 0)
        #expect(s.snapshotNow.materialize(.keepAll)["/d"]!.data.count == 8192)
        try d.sync()
        #expect(s.snapshotNow.materialize(.dropAll)["/d"]!.data.count == 8192)
    }

    @Test func keptReleaseMarksSourceAndLaterReadsAreFlagged() throws {
        let s = CrashableStorage()
        s.addFile("/src", data: [UInt8](repeating: 5, count: 16384))
        let src = try s.open("/src", mode: .source(discard: true))
        try src.release(offset: 4096, length: 4096)
        let crashed = CrashableStorage(files: s.snapshotNow.materialize(.keepAll))
        let again = try crashed.open("/src", mode: .source(discard: true))
        _ = try again.read(count: 4096, at: 0)
        #expect(crashed.violations.isEmpty)
        _ = try again.read(count: 4096, at: 4096)
        #expect(crashed.violations.count == 1)
        #expect(crashed.file("/src")!.allocatedBlocks == 3)
        // A dropped release leaves the data (and no mark).
        let dropped = CrashableStorage(files: s.snapshotNow.materialize(.dropAll))
        #expect(dropped.file("/src")!.data[4096] == 5)
        #expect(dropped.file("/src")!.released.allSatisfy { !$0 })
    }

    @Test func deadProcessCannotWrite() throws {
        let (s, d) = try fresh()
        s.armCrash(afterMutations: 1)
        try d.write(bytes: [1], at: 0)
        #expect(throws: StorageError.self) { try d.write(bytes: [2], at: 1) }
        #expect(throws: StorageError.self) { _ = try d.read(count: 1, at: 0) }
        #expect(s.crashedSnapshot?.pending.count == 1)
    }
}
