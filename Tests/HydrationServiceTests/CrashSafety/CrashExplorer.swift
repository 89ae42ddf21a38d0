import Foundation
import HydrationTestSupport
import Logging
import Synchronization

@testable import HydrationEngine
@testable import HydrationService
@testable import HydrationStorage

/// A small hydration job and the image it moves: 256 regions of 4 KiB (sometimes a short last
/// one) of random data, holes and zero runs, all derived from one seed.
struct CrashScenario: Sendable {
    static let sourcePath = "/src/disk.img"
    static let destPath = "/dst/disk.img"
    static let metadataPath = "/meta/job.meta"
    static let regionSize: UInt64 = 4096

    /// What the destination and source are like. Every variant but `fresh` starts from a
    /// destination full of garbage, so the copier's zeroing paths (holes and zero regions must
    /// read back as zeros) are crash-explored too.
    enum Variant: String, Sendable, CaseIterable {
        /// A destination file the job creates (reads as zeros: nothing is zeroed).
        case fresh
        /// An existing file of garbage: zeroed by punching holes.
        case garbageFile
        /// A block device of garbage: zeroed with BLKZEROOUT.
        case garbageBlockDevice
        /// A file of garbage on a filesystem that can punch nothing: zeros are written.
        case garbageFileNoZeroOut
        /// A garbage file, and a source on a filesystem without SEEK_DATA (holes read as data).
        case garbageFileSourceWithoutSeekData
        /// A garbage file, and a remote (NBD) source: holes from BLOCK_STATUS, releases are TRIMs
        /// (just as irreversible), and its identity's fingerprint is read at creation and
        /// compared at every recovery, only where nothing may have been released.
        case garbageFileRemoteSource
    }

    let seed: UInt64
    let image: [UInt8]
    let holes: [Range<Int>]
    let tunables: Tunables
    var variant: Variant = .fresh
    /// Verified release: every batch reads its range back before it reaches the committer (the
    /// recovery verifies too: the option is the job's).
    var verify = false

    /// Adds the source (and, for a garbage variant, the pre-existing destination) to a new disk.
    func populate(_ storage: CrashableStorage) {
        storage.addFile(
            Self.sourcePath, data: image, kind: variant == .garbageFileRemoteSource ? .remote : .regularFile,
            holes: holes)
        guard variant != .fresh else { return }
        var rng = SeededRandom(seed: seed &* 31 &+ 5)
        var garbage = [UInt8](repeating: 0, count: image.count)
        rng.fill(&garbage, 0..<garbage.count)
        storage.addFile(
            Self.destPath, data: garbage, kind: variant == .garbageBlockDevice ? .blockDevice : .regularFile, holes: [])
        configure(storage)
    }

    /// The variant's device limitations, on a disk built from crashed images too.
    func configure(_ storage: CrashableStorage) {
        storage.state.withLock { s in
            s.zeroOutUnsupported = variant == .garbageFileNoZeroOut ? [Self.destPath] : []
            s.noSeekData = variant == .garbageFileSourceWithoutSeekData ? [Self.sourcePath] : []
        }
    }

    static func make(seed: UInt64, regions: Int = 256) -> CrashScenario {
        var rng = SeededRandom(seed: seed &* 0x9E37_79B9 &+ 1)
        let rs = Int(regionSize)
        let tail = rng.next() % 3 == 0 ? Int(rng.next() % UInt64(rs - 1)) + 1 : 0
        let size = (tail > 0 ? regions - 1 : regions) * rs + tail
        var image = [UInt8](repeating: 0, count: size)
        var holes: [Range<Int>] = []
        var r = 0
        while r * rs < size {
            let len = Int(rng.next() % 12) + 1
            let lo = r * rs, hi = min(size, (r + len) * rs)
            switch rng.next() % 10 {
            case 0, 1:
                holes.append(lo..<hi)
            case 2, 3:
                break  // allocated zeros
            case 4:
                // Data with zero sectors inside (not a zero region: must be written).
                rng.fill(&image, lo..<hi)
                for s in stride(from: lo, to: hi, by: 512) where rng.next() % 2 == 0 {
                    for i in s..<min(hi, s + 512) { image[i] = 0 }
                }
                image[lo] = 1
            default:
                rng.fill(&image, lo..<hi)
            }
            r += len
        }
        // Few regions in flight and a small space budget: commits and discards interleave with
        // copying all along the trace.
        let batch = [1, 1, 2, 4][Int(rng.next() % 4)]
        let threshold = batch * [1, 2, 4][Int(rng.next() % 3)]
        let budget = UInt64([4, 8, 16][Int(rng.next() % 3)]) * regionSize
        let interval = rng.next() % 4 == 0 ? 10 : 3_600_000
        let t = Tunables(
            batchSize: batch, threshold: threshold, rateLimitBytesPerSecond: nil,
            spaceBudgetBytes: budget, commitIntervalMs: interval)
        return CrashScenario(seed: seed, image: image, holes: holes, tunables: t)
    }

    func config(_ t: Tunables? = nil) -> JobConfiguration {
        JobConfiguration(
            name: "crash-\(seed)", sourcePath: Self.sourcePath, destPath: Self.destPath,
            metadataPath: Self.metadataPath, regionSize: Self.regionSize, discardSource: true,
            destZeroed: false, tunables: t ?? tunables, verify: verify)
    }

    /// Recovery runs with larger batches (fast) but still a small budget, so that commits and
    /// discards happen during recovery too (a second crash can land among them).
    var recoveryTunables: Tunables {
        Tunables(
            batchSize: 16, threshold: 32, rateLimitBytesPerSecond: nil, spaceBudgetBytes: 64 * Self.regionSize,
            commitIntervalMs: 3_600_000)
    }
}

/// The committer's deliberately wrong orders (debug builds only), named here so that the harness
/// compiles in release builds too.
enum InjectedCommitFault: Sendable { case publishBeforeDurable, metadataBeforeDestinationSync }

/// One recorded, uncrashed run: where replays begin, and every storage call after it.
struct RecordedRun: Sendable, Codable {
    var seed: UInt64
    var base: CrashSnapshot
    var trace: [CrashOp]
}

let crashLogger: Logger = {
    var l = Logger(label: "crash")
    l.logLevel = .critical
    return l
}()

/// An asynchronous writeback failure of the destination during the recorded run.
struct WritebackFailurePlan: Sendable {
    /// Fires at the first mutation, from this many after the trace begins, at which the
    /// destination has pending writes.
    var afterMutations: Int
    /// The old engine's eviction: waits for writeback and swallows the error.
    var legacyWaitingEvict = false
}

enum CrashHarness {
    /// Creates the job on a fresh simulated disk and runs it to completion, recording every call.
    /// With `writebackFailure`, the destination's writeback fails once during the run: the run
    /// must then end `failed` (CommitFailed, EIO, metadata ro) rather than complete, and its
    /// crash states are explored like any other.
    static func record(
        _ sc: CrashScenario, io: IOExecutor, fault: InjectedCommitFault? = nil,
        writebackFailure: WritebackFailurePlan? = nil
    ) async throws -> (RecordedRun, [String]) {
        let storage = CrashableStorage()
        sc.populate(storage)
        let job = try await HydrationJob.create(sc.config(), storage: storage, io: io, logger: crashLogger)
        if let writebackFailure {
            // Evictions every 16 KiB of progress, so that they interleave with commits.
            await job.copier.setCacheWindowForTesting(16 << 10)
            storage.setLegacyWaitingEvict(writebackFailure.legacyWaitingEvict)
        }
        if let fault {
            #if DEBUG
                await job.committer.injectFault(
                    fault == .publishBeforeDurable ? .publishBeforeDurable : .metadataBeforeDestinationSync)
            #else
                preconditionFailure("committer faults exist only in debug builds")
            #endif
        }
        storage.beginTrace()
        if let writebackFailure {
            storage.failWriteback(afterMutations: writebackFailure.afterMutations, path: CrashScenario.destPath)
        }
        try await job.start()
        let final = await job.waitUntilSettled()
        let st = await job.status()
        await job.close()
        var failures: [String]
        if writebackFailure != nil && storage.writebackFailures > 0 {
            // Lost destination data: the job must fail, and must not have released or read
            // anything it should not have (the crash states below check the rest).
            failures = storage.violations.prefix(3).map { "(b) \($0)" }
            if final != .failed || st.error?.errno != EIO || st.metadata.mode != .ro {
                failures.append(
                    "after a destination writeback error the recording run ended \(final.rawValue) (error \(st.error?.message ?? "none"), metadata \(st.metadata.mode.rawValue)), not failed with EIO and metadata ro"
                )
                failures += check(storage, sc)
            }
        } else {
            failures = check(storage, sc)
            if final != .complete {
                failures.append("recording run ended \(final.rawValue): \(st.error?.message ?? "")")
            }
        }
        return (RecordedRun(seed: sc.seed, base: storage.baseline!, trace: storage.trace), failures)
    }

    /// (a) destination == original, (b) no read of a released source range, source fully
    /// released at the end, (c) the metadata opens and says complete.
    static func check(_ storage: CrashableStorage, _ sc: CrashScenario) -> [String] {
        var failures: [String] = []
        let dest = storage.file(CrashScenario.destPath)?.data ?? []
        if dest.count < sc.image.count || !bytesEqual(dest, sc.image, count: sc.image.count) {
            let firstBad = (0..<min(dest.count, sc.image.count)).first { dest[$0] != sc.image[$0] }
            failures.append(
                "(a) destination differs from the original (first bad byte \(firstBad.map(String.init) ?? "size"), region \(firstBad.map { $0 / 4096 } ?? -1))"
            )
        }
        for v in storage.violations.prefix(3) { failures.append("(b) \(v)") }
        if let src = storage.file(CrashScenario.sourcePath), src.allocatedBlocks != 0 {
            failures.append("source not fully released: \(src.allocatedBlocks) blocks still allocated")
        }
        let after = CrashableStorage(files: storage.state.withLock { $0.files })
        do {
            let (store, _) = try MetadataStore.open(path: CrashScenario.metadataPath, storage: after, readOnly: true)
            if !store.header.complete || !store.committedMap.isComplete {
                failures.append("(c) metadata does not record completion")
            }
        } catch {
            failures.append("(c) metadata does not open after recovery: \(error)")
        }
        return failures
    }

    struct Recovery: Sendable {
        var failures: [String]
        var trace: [CrashOp]
    }

    /// A new process on the rebooted machine: open the job from the crashed images, run it to
    /// completion, close it, check.
    static func recover(_ files: [String: CrashFile], _ sc: CrashScenario, io: IOExecutor) async -> Recovery {
        let storage = CrashableStorage(files: files)
        sc.configure(storage)
        storage.beginTrace()
        let job: HydrationJob
        do {
            job = try await HydrationJob.open(
                sc.config(sc.recoveryTunables), storage: storage, io: io, logger: crashLogger)
        } catch {
            return Recovery(
                failures: ["(c) the job does not open after the crash: \(error)"]
                    + storage.violations.map { "(b) \($0)" }, trace: storage.trace)
        }
        var failures: [String] = []
        do {
            try await job.start()
        } catch {
            failures.append("start after recovery failed: \(error)")
        }
        let final = await job.waitUntilSettled()
        let st = await job.status()
        await job.close()
        if final != .complete { failures.append("recovery ended \(final.rawValue): \(st.error?.message ?? "")") }
        failures += check(storage, sc)
        return Recovery(failures: failures, trace: storage.trace)
    }

    /// The policies tried at each crash point. Seeds derive from (scenario seed, point).
    static func policies(seed: UInt64, point: Int, pending: Int) -> [CrashPolicy] {
        if pending == 0 { return [.dropAll] }
        let s = seed &* 1_000_003 &+ UInt64(point) &* 7919
        var p: [CrashPolicy] = [
            .dropAll, .keepAll, .adversarial(dest: CrashScenario.destPath),
            .random(seed: s &+ 1), .prefix(seed: s &+ 2),
        ]
        if pending > 8 { p.append(.random(seed: s &+ 3)) }
        return p
    }

    struct Finding: Sendable, CustomStringConvertible {
        var seed: UInt64
        var point: Int
        var policy: CrashPolicy
        var second: (point: Int, policy: CrashPolicy)?
        var failures: [String]
        var traceFile: String?
        var description: String {
            var s = "seed \(seed), crash index \(point), policy \(policy)"
            if let second { s += ", then crash index \(second.point) of the recovery with policy \(second.policy)" }
            s += ": " + failures.joined(separator: "; ")
            if let traceFile {
                s +=
                    "\n  replay: HYDRATION_CRASH_REPLAY=\(traceFile):\(point):\(policy.description) swift test --filter crashReplay"
            }
            return s
        }
    }

    struct Stats: Sendable {
        var boundaries = 0
        var states = 0
        var duplicates = 0
        var secondCrashes = 0
        var findings: [Finding] = []
    }

    static func fingerprint(_ files: [String: CrashFile]) -> Int {
        var h = Hasher()
        for k in files.keys.sorted() {
            let f = files[k]!
            h.combine(k)
            f.data.withUnsafeBytes { h.combine(bytes: $0) }
            h.combine(f.allocated)
            h.combine(f.released)
        }
        return h.finalize()
    }

    /// Crashes the recorded run at every mutation boundary under several policies, recovers each
    /// distinct crash state, and (for every `secondCrashEvery`-th state) crashes the recovery
    /// once more at a seeded point and recovers again. Stops early after `stopAfterFindings`.
    static func explore(
        _ sc: CrashScenario, run: RecordedRun, io: IOExecutor, width: Int = 2,
        secondCrashEvery: Int = 8, stopAfterFindings: Int = 3,
        pointFilter: ((Int) -> Bool)? = nil
    ) async -> Stats {
        var stats = Stats()
        var seen = Set<Int>()
        var replayer = TraceReplayer(base: run.base, trace: run.trace)
        var stateIndex = 0
        await withTaskGroup(of: Finding?.self) { group in
            var inFlight = 0
            func collect() async {
                if let r = await group.next() {
                    inFlight -= 1
                    if let f = r { stats.findings.append(f) }
                }
            }
            for point in 0...replayer.count {
                if stats.findings.count >= stopAfterFindings { break }
                if pointFilter?(point) ?? true {
                    stats.boundaries += 1
                    let snap = replayer.snapshot
                    for (pIndex, policy) in policies(seed: sc.seed, point: point, pending: snap.pending.count)
                        .enumerated()
                    {
                        let files = snap.materialize(policy)
                        guard seen.insert(fingerprint(files)).inserted else { stats.duplicates += 1; continue }
                        stats.states += 1
                        stateIndex += 1
                        let second = stateIndex % secondCrashEvery == 0
                        if second { stats.secondCrashes += 1 }
                        while inFlight >= width { await collect() }
                        inFlight += 1
                        let seed = sc.seed
                        group.addTask {
                            let r = await recover(files, sc, io: io)
                            if !r.failures.isEmpty {
                                return Finding(seed: seed, point: point, policy: policy, failures: r.failures)
                            }
                            guard second else { return nil }
                            // Crash the recovery too, at a seeded mutation of its trace.
                            var rep = TraceReplayer(base: CrashSnapshot(durable: files, pending: []), trace: r.trace)
                            guard rep.count > 0 else { return nil }
                            var rng = SeededRandom(seed: seed &+ UInt64(point) &* 31 &+ UInt64(pIndex) &* 131)
                            let j = Int(rng.next() % UInt64(rep.count))
                            for _ in 0..<j { rep.advance() }
                            let p2 = CrashPolicy.random(seed: rng.next())
                            let r2 = await recover(rep.snapshot.materialize(p2), sc, io: io)
                            if !r2.failures.isEmpty {
                                return Finding(
                                    seed: seed, point: point, policy: policy, second: (j, p2), failures: r2.failures)
                            }
                            return nil
                        }
                    }
                }
                if point < replayer.count { replayer.advance() }
            }
            while inFlight > 0 { await collect() }
        }
        if !stats.findings.isEmpty {
            let path = dumpTrace(run)
            for i in stats.findings.indices { stats.findings[i].traceFile = path }
        }
        return stats
    }

    /// Writes the recorded run where a replay can read it.
    static func dumpTrace(_ run: RecordedRun) -> String? {
        let n = dumpCounter.withLock { c -> Int in
            c += 1; return c
        }
        let path = "/tmp/hydration-crash-seed\(run.seed)-\(getpid())-\(n).json"
        guard let data = try? JSONEncoder().encode(run) else { return nil }
        return FileManager.default.createFile(atPath: path, contents: data) ? path : nil
    }

    static func loadTrace(_ path: String) throws -> RecordedRun {
        try JSONDecoder().decode(RecordedRun.self, from: Data(contentsOf: URL(fileURLWithPath: path)))
    }
}

let dumpCounter = Mutex<Int>(0)

/// memcmp: element-wise comparison of large arrays is slow in debug builds.
func bytesEqual(_ a: [UInt8], _ b: [UInt8], count: Int) -> Bool {
    guard a.count >= count, b.count >= count else { return false }
    return a.withUnsafeBytes { pa in
        b.withUnsafeBytes { pb in count == 0 || memcmp(pa.baseAddress!, pb.baseAddress!, count) == 0 }
    }
}
