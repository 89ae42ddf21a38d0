import Foundation
import HydrationTestSupport
import NIOCore
import Synchronization

@testable import HydrationEngine
@testable import HydrationLiveClone
@testable import HydrationService
@testable import HydrationStorage

// The crash explorer with a live clone: while the job hydrates, a client drives the job's
// LiveCloneExport with a seeded random sequence of writes, write-zeroes, trims, flushes, FUA
// writes, caches and reads. Every crash state of the recorded trace is then checked against what
// a correct block device with a volatile write cache may hold (docs/reliability.md, "Live writes").

/// One request of the live run's client, as it issued it and saw it answered.
struct LiveClientOp: Sendable, Codable, CustomStringConvertible {
    enum Kind: String, Sendable, Codable { case write, zero, trim, flush, cache, read }
    var kind: Kind
    var offset: Int
    var length: Int
    /// A write's payload.
    var data: [UInt8] = []
    var fua = false
    var fastZero = false
    var noHole = false
    /// The trace's length just before the call: the request reached the engine at this trace
    /// position or later (a crash before it cannot hold any of its effects).
    var issued = 0
    /// The trace's length just after the reply: the client had its answer by this position at the
    /// latest (a crash at or after it comes after the reply). Nil: no reply (failed).
    var acked: Int?
    /// Refused without effect (FAST_ZERO that would need a copy: ENOTSUP).
    var refused = false

    var range: Range<Int> { offset..<offset + length }
    /// Whether the request may change the clone's content.
    var mutates: Bool { (kind == .write || kind == .zero || kind == .trim) && !refused }

    var description: String {
        var s = "\(kind.rawValue) [\(offset), +\(length))"
        if fua { s += " fua" }
        if fastZero { s += " fast" }
        if noHole { s += " nohole" }
        if refused { s += " refused" }
        return s
    }
}

/// A recorded live run: the crash explorer's trace plus the client's requests, in program order
/// (one client, each request awaited before the next).
struct LiveRecordedRun: Sendable {
    var run: RecordedRun
    var ops: [LiveClientOp]
}

/// What the clone may read as after a crash at a given trace position.
///
/// For each byte, the requests that changed it, in program order. A request is *durable* at the
/// crash when a FLUSH issued after it was answered before the crash, or when it carried FUA and
/// was answered before the crash. The byte may then hold the value of the latest durable request
/// covering it (the original image's when there is none), or the value of any later request
/// covering it that may have been issued before the crash (a volatile cache keeps any subset of
/// unflushed writes, each torn at any sector). Nothing else: no value from before the latest
/// durable one, no garbage, no byte of a request issued after the crash. A TRIM among those
/// candidates makes the byte unspecified (any value).
struct LiveCrashModel: Sendable {
    let image: [UInt8]
    let ops: [LiveClientOp]
    /// The image cut at every request boundary; per piece, the mutating requests covering it.
    let segments: [(range: Range<Int>, ops: [Int])]
    /// Program indices of the successful flushes.
    let flushes: [Int]

    init(image: [UInt8], ops: [LiveClientOp]) {
        self.image = image
        self.ops = ops
        var cuts = Set([0, image.count])
        for op in ops where op.mutates { cuts.insert(op.offset); cuts.insert(min(image.count, op.offset + op.length)) }
        let sorted = cuts.sorted()
        var segs: [(Range<Int>, [Int])] = []
        for k in 0..<sorted.count - 1 {
            let r = sorted[k]..<sorted[k + 1]
            guard !r.isEmpty else { continue }
            let covering = ops.indices.filter { ops[$0].mutates && ops[$0].range.contains(r.lowerBound) }
            segs.append((r, covering))
        }
        segments = segs
        flushes = ops.indices.filter { ops[$0].kind == .flush && ops[$0].acked != nil }
    }

    enum Candidate { case original, zero, data(Int), anything }

    /// The values a piece may hold after a crash at trace position `crash` (Int.max: after the
    /// whole trace).
    func candidates(_ seg: (range: Range<Int>, ops: [Int]), crash: Int) -> [Candidate] {
        // The latest flush answered before the crash makes every earlier request durable.
        let flushed = flushes.last { ops[$0].acked! <= crash } ?? -1
        func durable(_ j: Int) -> Bool {
            let op = ops[j]
            if j < flushed { return true }
            if op.fua, let a = op.acked, a <= crash { return true }
            return false
        }
        let d = seg.ops.last(where: durable)
        var out: [Candidate] = []
        func candidate(_ j: Int) -> Candidate {
            let op = ops[j]
            if op.acked == nil { return .anything }  // failed: unspecified
            switch op.kind {
            case .write: return .data(j)
            case .zero: return .zero
            default: return .anything
            }
        }
        out.append(d.map(candidate) ?? .original)
        for j in seg.ops where j > (d ?? -1) && ops[j].issued <= crash { out.append(candidate(j)) }
        return out
    }

    /// The first byte of `view` (the clone as a client would read it right after the crash) that
    /// no correct system could show, described; nil when there is none.
    func check(view: [UInt8], crash: Int, geometry: (regionSize: Int, hydrated: (Int) -> Bool)) -> String? {
        guard view.count == image.count else { return "the clone has \(view.count) bytes, not \(image.count)" }
        return view.withUnsafeBytes { v -> String? in
            image.withUnsafeBytes { img -> String? in
                for seg in segments {
                    let cands = candidates(seg, crash: crash)
                    if cands.contains(where: {
                        if case .anything = $0 { return true }; return false
                    }) {
                        continue
                    }
                    let lo = seg.range.lowerBound, n = seg.range.count
                    // Fast path: the whole piece is one candidate.
                    func whole(_ c: Candidate) -> Bool {
                        switch c {
                        case .original: return memcmp(v.baseAddress! + lo, img.baseAddress! + lo, n) == 0
                        case .zero: return isAllZero(UnsafeRawBufferPointer(rebasing: v[lo..<lo + n]))
                        case .data(let j):
                            return ops[j].data.withUnsafeBytes {
                                memcmp(v.baseAddress! + lo, $0.baseAddress! + (lo - ops[j].offset), n) == 0
                            }
                        case .anything: return true
                        }
                    }
                    if cands.contains(where: whole) { continue }
                    // Torn: byte by byte, each one of the candidates.
                    for i in seg.range {
                        let ok = cands.contains { c in
                            switch c {
                            case .original: return view[i] == image[i]
                            case .zero: return view[i] == 0
                            case .data(let j): return view[i] == ops[j].data[i - ops[j].offset]
                            case .anything: return true
                            }
                        }
                        if !ok {
                            let region = i / geometry.regionSize
                            let names = cands.map { c -> String in
                                switch c {
                                case .original: return "original \(image[i])"
                                case .zero: return "zero"
                                case .data(let j): return "op \(j) (\(ops[j])): \(ops[j].data[i - ops[j].offset])"
                                case .anything: return "any"
                                }
                            }
                            let flushed = flushes.last { ops[$0].acked! <= crash }
                            return
                                "byte \(i) (region \(i / geometry.regionSize), \(geometry.hydrated(region) ? "hydrated" : "not hydrated") in the metadata) reads \(view[i]); allowed: \(names.joined(separator: ", ")) (last flush answered before the crash: \(flushed.map { "op \($0)" } ?? "none"))"
                        }
                    }
                }
                return nil
            }
        }
    }
}

/// The seeded client of a live run.
struct LiveClient {
    var rng: SeededRandom
    let size: Int
    let rs: Int

    init(seed: UInt64, size: Int, regionSize: Int) {
        rng = SeededRandom(seed: seed &* 0x2545_F491_4F6C_DD1D &+ 17)
        self.size = size
        rs = regionSize
    }

    mutating func pick(_ n: Int) -> Int { Int(rng.next() % UInt64(max(1, n))) }

    /// A range of one of the shapes: whole regions, inside one region (unaligned), across a region
    /// boundary (unaligned), sector-aligned.
    mutating func range() -> Range<Int> {
        let regions = (size + rs - 1) / rs
        var lo: Int, len: Int
        switch pick(4) {
        case 0:
            lo = pick(regions) * rs
            len = (pick(3) + 1) * rs
        case 1:
            let r = pick(regions)
            let at = pick(rs - 1)
            lo = r * rs + at
            len = pick(rs - at) + 1
        case 2:
            let r = pick(max(1, regions - 1))
            let back = pick(rs / 2) + 1
            lo = (r + 1) * rs - back
            len = back + pick(2 * rs) + 1
        default:
            lo = pick(size / 512) * 512
            len = (pick(16) + 1) * 512
        }
        lo = min(lo, size - 1)
        return lo..<min(size, lo + len)
    }

    mutating func next() -> LiveClientOp {
        let r = pick(100)
        let rr = range()
        var op = LiveClientOp(kind: .write, offset: rr.lowerBound, length: rr.count)
        switch r {
        case 0..<40:
            op.data = [UInt8](repeating: 0, count: rr.count)
            rng.fill(&op.data, 0..<rr.count)
            op.fua = pick(7) == 0
        case 40..<50:
            op.kind = .zero
            op.fastZero = pick(2) == 0
            op.noHole = pick(5) == 0
            op.fua = pick(7) == 0
        case 50..<58:
            op.kind = .trim
            if pick(2) == 0 {  // whole regions, the kind that does something
                op.offset = rr.lowerBound / rs * rs
                op.length = min(size - op.offset, (pick(3) + 1) * rs)
            }
            op.fua = pick(7) == 0
        case 58..<72:
            op = LiveClientOp(kind: .flush, offset: 0, length: 0)
        case 72..<78:
            op.kind = .cache
        default:
            op.kind = .read
        }
        return op
    }
}

/// The client's own view while it runs: the image as it should read, and the bytes a trim left
/// unspecified (until written again).
struct LiveClientView {
    var bytes: [UInt8]
    var unspecified: [Bool]

    init(_ image: [UInt8]) {
        bytes = image
        unspecified = [Bool](repeating: false, count: image.count)
    }

    mutating func apply(_ op: LiveClientOp) {
        guard op.mutates else { return }
        switch op.kind {
        case .write:
            bytes.replaceSubrange(op.range, with: op.data)
            for i in op.range { unspecified[i] = false }
        case .zero:
            for i in op.range { bytes[i] = 0; unspecified[i] = false }
        case .trim:
            for i in op.range { unspecified[i] = true }
        default: break
        }
    }

    /// The first byte of `data` (read at `offset`) that differs from the view, if any.
    func mismatch(_ data: [UInt8], at offset: Int) -> Int? {
        data.indices.first { !unspecified[offset + $0] && data[$0] != bytes[offset + $0] }.map { $0 + offset }
    }
}

/// Deliberately wrong live-clone behaviour the explorer must notice.
enum InjectedLiveFault: Sendable, CustomStringConvertible {
    /// Test-side: the destination fdatasync a FLUSH issues when no region changed is removed
    /// from the recorded trace, exactly as if `Committer.flush` skipped it (a sync changes
    /// nothing but durability, so the engine's later calls are the same).
    case flushWithoutDestinationSync
    /// Engine-side (debug builds): `LiveCloneFault.skipRecordDestinationWritten`.
    case skipRecordDestinationWritten
    /// Engine-side (debug builds): `LiveCloneFault.partialWriteWithoutHydration`.
    case partialWriteWithoutHydration

    var description: String {
        switch self {
        case .flushWithoutDestinationSync: return "flushWithoutDestinationSync"
        case .skipRecordDestinationWritten: return "skipRecordDestinationWritten"
        case .partialWriteWithoutHydration: return "partialWriteWithoutHydration"
        }
    }
}

enum LiveCrashHarness {
    static func tracePosition(_ storage: CrashableStorage) -> Int { storage.state.withLock { $0.trace.count } }

    /// Creates the job, exports it, and runs it to completion while the seeded client issues
    /// `opCount` requests (the first `beforeStart` of them before the copy starts), then a final
    /// FLUSH. Returns the run and the failures of the uncrashed run: reads that disagree with
    /// the client's view, requests that failed, and the final state (destination == the view
    /// outside trimmed bytes, source fully released, no read of a released range, metadata
    /// complete).
    static func record(
        _ sc: CrashScenario, io: IOExecutor, clientSeed: UInt64, opCount: Int = 60,
        beforeStart: Int = 6, fault: InjectedLiveFault? = nil
    ) async throws -> (LiveRecordedRun, [String]) {
        let storage = CrashableStorage()
        sc.populate(storage)
        let job = try await HydrationJob.create(sc.config(), storage: storage, io: io, logger: crashLogger)
        let export = try await job.liveExport()
        switch fault {
        case .skipRecordDestinationWritten?, .partialWriteWithoutHydration?:
            #if DEBUG
                export.fault.withLock {
                    $0 =
                        fault == .skipRecordDestinationWritten
                        ? .skipRecordDestinationWritten : .partialWriteWithoutHydration
                }
            #else
                preconditionFailure("live-clone faults exist only in debug builds")
            #endif
        default: break
        }
        storage.beginTrace()
        var client = LiveClient(seed: clientSeed, size: sc.image.count, regionSize: Int(CrashScenario.regionSize))
        var view = LiveClientView(sc.image)
        var ops: [LiveClientOp] = []
        var failures: [String] = []
        for k in 0...opCount {
            if k == beforeStart { try await job.start() }
            var op = k == opCount ? LiveClientOp(kind: .flush, offset: 0, length: 0) : client.next()
            op.issued = tracePosition(storage)
            do {
                switch op.kind {
                case .write:
                    try await export.write(offset: UInt64(op.offset), data: ByteBuffer(bytes: op.data), fua: op.fua)
                case .zero:
                    try await export.writeZeroes(
                        offset: UInt64(op.offset), length: UInt32(op.length), noHole: op.noHole,
                        fastZero: op.fastZero, fua: op.fua)
                case .trim:
                    try await export.trim(offset: UInt64(op.offset), length: UInt32(op.length), fua: op.fua)
                case .flush:
                    try await export.flush()
                case .cache:
                    try await export.cache(offset: UInt64(op.offset), length: UInt32(op.length))
                case .read:
                    let b = try await export.read(offset: UInt64(op.offset), length: UInt32(op.length))
                    if let bad = view.mismatch(Array(b.readableBytesView), at: op.offset) {
                        failures.append(
                            "request \(ops.count) (\(op)): read \(b.getInteger(at: b.readerIndex + bad - op.offset, as: UInt8.self)!) at byte \(bad), the client wrote \(view.bytes[bad]) there"
                        )
                    }
                }
                op.acked = tracePosition(storage)
            } catch let e as NBDError where e.code == .ENOTSUP && op.kind == .zero && op.fastZero {
                op.refused = true
                op.acked = tracePosition(storage)
            } catch {
                failures.append("request \(ops.count) (\(op)) failed: \(error)")
            }
            view.apply(op)
            ops.append(op)
            // Now and then let the copy run ahead a little.
            if client.pick(4) == 0 { await Task.yield() }
        }
        let final = await job.waitUntilSettled()
        let st = await job.status()
        await job.close()
        if final != .complete { failures.append("recording run ended \(final.rawValue): \(st.error?.message ?? "")") }
        let dest = storage.file(CrashScenario.destPath)?.data ?? []
        if dest.count < view.bytes.count {
            failures.append("destination has \(dest.count) bytes")
        } else if let bad = view.bytes.indices.first(where: { !view.unspecified[$0] && dest[$0] != view.bytes[$0] }) {
            failures.append("destination differs from what the client wrote at byte \(bad) (region \(bad / 4096))")
        }
        failures += finalChecks(storage)
        var trace = storage.trace
        if case .flushWithoutDestinationSync? = fault { trace = dropFlushOnlyDestinationSyncs(trace) }
        let run = RecordedRun(seed: sc.seed, base: storage.baseline!, trace: trace)
        return (LiveRecordedRun(run: run, ops: ops), failures)
    }

    /// The destination syncs not followed by a metadata write before the next destination sync:
    /// those of a FLUSH with nothing new to record (Committer.performCommit's sync-only path).
    static func dropFlushOnlyDestinationSyncs(_ trace: [CrashOp]) -> [CrashOp] {
        var drop = Set<Int>()
        var open: Int? = nil
        for op in trace {
            if op.path == CrashScenario.destPath && op.kind == .sync && op.errno == 0 {
                if let o = open { drop.insert(o) }
                open = op.seq
            } else if op.path == CrashScenario.metadataPath && op.kind == .write {
                open = nil
            }
        }
        if let o = open { drop.insert(o) }
        return trace.filter { !drop.contains($0.seq) }
    }

    /// Source fully released, no read of a released source range, metadata records completion.
    /// (A client's read of a range it trimmed on the destination is no violation: only the
    /// source's released ranges count.)
    static func finalChecks(_ storage: CrashableStorage) -> [String] {
        var failures: [String] = []
        for v in storage.violations.filter({ $0.contains(" \(CrashScenario.sourcePath) ") }).prefix(3) {
            failures.append("(b) \(v)")
        }
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
            failures.append("(c) metadata does not open: \(error)")
        }
        return failures
    }

    /// The clone as a client reconnecting right after the crash would read it (before any
    /// recovery: hydrated regions from the destination, the others from the source), and the
    /// failures of the crashed images themselves: the metadata must open; an unhydrated region's
    /// source must be the original data, never released.
    static func view(_ files: [String: CrashFile], _ sc: CrashScenario) -> (
        view: [UInt8], hydrated: RegionMap?, failures: [String]
    ) {
        let rs = Int(CrashScenario.regionSize)
        let size = sc.image.count
        let storage = CrashableStorage(files: files)
        let map: RegionMap
        do {
            map = try MetadataStore.open(path: CrashScenario.metadataPath, storage: storage, readOnly: true).0
                .committedMap
        } catch {
            return ([], nil, ["(c) the metadata does not open after the crash: \(error)"])
        }
        var failures: [String] = []
        var view = [UInt8](repeating: 0, count: size)
        let dest = files[CrashScenario.destPath]
        let src = files[CrashScenario.sourcePath]!
        for r in 0..<map.count {
            let lo = r * rs, hi = min(size, lo + rs)
            if map[r] {
                guard let dest, dest.data.count >= hi else {
                    failures.append(
                        "region \(r) is hydrated in the metadata but the destination has \(dest?.data.count ?? 0) bytes"
                    )
                    continue
                }
                view.replaceSubrange(lo..<hi, with: dest.data[lo..<hi])
            } else {
                if let s = src.releasedSector(in: lo..<hi) {
                    failures.append(
                        "region \(r) is not hydrated in the metadata, but its source sector \(s) was released")
                }
                if src.data.count < hi
                    || !src.data.withUnsafeBytes({ a in
                        sc.image.withUnsafeBytes { b in memcmp(a.baseAddress! + lo, b.baseAddress! + lo, hi - lo) == 0 }
                    })
                {
                    failures.append(
                        "region \(r) is not hydrated in the metadata, but its source is not the original data")
                }
                view.replaceSubrange(lo..<hi, with: sc.image[lo..<hi])
            }
        }
        return (view, map, failures)
    }

    struct Recovery: Sendable {
        var failures: [String]
        var dest: [UInt8]
        var trace: [CrashOp]
    }

    /// A new process on the rebooted machine, as `CrashHarness.recover`: open, start, run to
    /// completion, close; then the final checks (not the destination's content: the caller's).
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
                    + storage.violations.filter { $0.contains(" \(CrashScenario.sourcePath) ") }.map { "(b) \($0)" },
                dest: [], trace: storage.trace)
        }
        var failures: [String] = []
        do { try await job.start() } catch { failures.append("start after recovery failed: \(error)") }
        let final = await job.waitUntilSettled()
        let st = await job.status()
        await job.close()
        if final != .complete { failures.append("recovery ended \(final.rawValue): \(st.error?.message ?? "")") }
        failures += finalChecks(storage)
        return Recovery(
            failures: failures, dest: storage.file(CrashScenario.destPath)?.data ?? [], trace: storage.trace)
    }

    /// Recovery must not change what the clone reads: the destination afterwards is exactly the
    /// view the crashed images presented (regions hydrated then kept, the others copied from the
    /// intact source), including trimmed bytes.
    static func compare(_ dest: [UInt8], _ view: [UInt8], what: String) -> String? {
        if dest.count >= view.count && bytesEqual(dest, view, count: view.count) { return nil }
        let bad = (0..<min(dest.count, view.count)).first { dest[$0] != view[$0] }
        return
            "\(what) differs from the clone as the crash left it (first bad byte \(bad.map(String.init) ?? "size"), region \(bad.map { $0 / 4096 } ?? -1)): recovery changed the clone's content"
    }

    struct Stats: Sendable {
        var points = 0
        var checked = 0
        var recovered = 0
        var secondCrashes = 0
        var findings: [CrashHarness.Finding] = []
    }

    /// At every boundary of the recorded trace and under every policy: check the crashed images
    /// against the model (before recovery), then (once per distinct image) recover and check that
    /// recovery kept the clone's content; every `secondCrashEvery`-th recovery is crashed again at a
    /// seeded point and must still present, and end with, the same content.
    static func explore(
        _ sc: CrashScenario, live: LiveRecordedRun, io: IOExecutor, width: Int = 2,
        secondCrashEvery: Int = 8, stopAfterFindings: Int = 3, recoverStates: Bool = true,
        pointFilter: ((Int) -> Bool)? = nil
    ) async -> Stats {
        let model = LiveCrashModel(image: sc.image, ops: live.ops)
        let run = live.run
        var stats = Stats()
        var seen = Set<Int>()
        var replayer = TraceReplayer(base: run.base, trace: run.trace)
        var recoveries = 0
        let rs = Int(CrashScenario.regionSize)
        await withTaskGroup(of: CrashHarness.Finding?.self) { group in
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
                    stats.points += 1
                    let crash = point < replayer.count ? replayer.mutations[point].seq : Int.max
                    let snap = replayer.snapshot
                    for (pIndex, policy) in CrashHarness.policies(
                        seed: sc.seed, point: point, pending: snap.pending.count
                    ).enumerated() {
                        let files = snap.materialize(policy)
                        stats.checked += 1
                        // Before recovery: the crashed images against the model at this point.
                        let (v, map, pre) = view(files, sc)
                        var failures = pre
                        if let map, let bad = model.check(view: v, crash: crash, geometry: (rs, { map[$0] })) {
                            failures.append("before recovery: \(bad)")
                        }
                        if !failures.isEmpty {
                            stats.findings.append(
                                CrashHarness.Finding(seed: sc.seed, point: point, policy: policy, failures: failures))
                            break
                        }
                        guard recoverStates, seen.insert(CrashHarness.fingerprint(files)).inserted else { continue }
                        stats.recovered += 1
                        recoveries += 1
                        let second = recoveries % secondCrashEvery == 0
                        if second { stats.secondCrashes += 1 }
                        while inFlight >= width { await collect() }
                        inFlight += 1
                        let seed = sc.seed
                        group.addTask {
                            let r = await recover(files, sc, io: io)
                            var failures = r.failures
                            if r.failures.isEmpty, let bad = compare(r.dest, v, what: "the destination after recovery")
                            {
                                failures.append(bad)
                            }
                            if !failures.isEmpty {
                                return CrashHarness.Finding(
                                    seed: seed, point: point, policy: policy, failures: failures)
                            }
                            guard second else { return nil }
                            var rep = TraceReplayer(base: CrashSnapshot(durable: files, pending: []), trace: r.trace)
                            guard rep.count > 0 else { return nil }
                            var rng = SeededRandom(seed: seed &+ UInt64(point) &* 31 &+ UInt64(pIndex) &* 131)
                            let j = Int(rng.next() % UInt64(rep.count))
                            for _ in 0..<j { rep.advance() }
                            let p2 = CrashPolicy.random(seed: rng.next())
                            let files2 = rep.snapshot.materialize(p2)
                            let (v2, _, pre2) = view(files2, sc)
                            var f2 = pre2
                            if pre2.isEmpty, let bad = compare(v2, v, what: "the clone after a crash during recovery") {
                                f2.append(bad)
                            }
                            if f2.isEmpty {
                                let r2 = await recover(files2, sc, io: io)
                                f2 = r2.failures
                                if f2.isEmpty,
                                    let bad = compare(r2.dest, v, what: "the destination after the second recovery")
                                {
                                    f2.append(bad)
                                }
                            }
                            if !f2.isEmpty {
                                return CrashHarness.Finding(
                                    seed: seed, point: point, policy: policy, second: (j, p2), failures: f2)
                            }
                            return nil
                        }
                    }
                }
                if point < replayer.count { replayer.advance() }
            }
            while inFlight > 0 { await collect() }
        }
        return stats
    }
}
