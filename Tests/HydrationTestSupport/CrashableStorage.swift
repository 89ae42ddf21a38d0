import HydrationStorage
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

// A simulated disk with a volatile write cache, for the crash-safety harness.
//
// Model (see docs/reliability.md, "The crash model"):
// - Each file has a *durable image* and the list of mutating operations (writes, punches,
//   discards) issued since that file's last completed sync: its *pending* operations. Reads see
//   the current view (durable + pending, as a page cache would show them).
// - A completed `sync` of a file makes its pending operations durable. A *failed* sync drops them
//   from the pending list without making them durable (the kernel marks the pages clean after a
//   writeback error), so a later sync that succeeds does not rescue them ("fsyncgate").
// - A power loss keeps any subset of the pending operations (of all files) chosen by a
//   `CrashPolicy`; kept writes may be torn at 512-byte granularity, kept punches at 4 KiB.
//   Kept operations are applied in program order: for operations on different sectors that is the
//   same as any reordering; for the same sector it yields every version the sector could hold.
// - The source never receives writes from the engine, only releases (punches); a released sector
//   is remembered (a ghost bit carried through crashes), and any later read that touches one is
//   recorded as a violation: the engine read data it had already given away.
// - File creation and sizes: files exist durably from creation (directory entries are not
//   modelled); a dropped write past the end of file leaves the file shorter. The size a
//   destination gets at open (ftruncate of a new or empty file) is a pending `extend` until the
//   file's next sync: a crash before it leaves the file empty.
// - Asynchronous writeback failure (`failWriteback`): at a chosen point the file's pending
//   writes are lost (never durable; reads see the durable image again) and the error is recorded
//   in the file's errseq. As on Linux >= 4.13 it is reported once per open device (file
//   description) to the first call on it that waits: `sync`, or `evict`, which (like
//   PosixDevice) waits on a second description of its own, so it reports the error (throws)
//   without consuming it for `sync`. `legacyWaitingEvict` models the old engine instead: the
//   wait ran on the synced description itself and its result was ignored, so the error was
//   swallowed. `startWriteback` never waits.

/// One file as the simulated disk holds it.
package struct CrashFile: Sendable, Equatable, Codable {
    package var data: [UInt8]
    package var kind: DeviceKind
    package var inode: UInt64
    /// Per 4 KiB block: allocated (for SEEK_DATA/SEEK_HOLE and space accounting).
    package var allocated: [Bool]
    /// Per 512-byte sector: a release (discard/punch) of this sector has reached this image.
    package var released: [Bool]
    /// A discard that does not zero (a block device without deterministic read-after-TRIM):
    /// released sectors read as this byte instead of zeros.
    package var discardFill: UInt8? = nil

    package static let block = 4096
    package static let sector = 512

    package init(data: [UInt8], kind: DeviceKind = .regularFile, inode: UInt64, holesWhereZero: Bool = true) {
        self.data = data
        self.kind = kind
        self.inode = inode
        let blocks = (data.count + Self.block - 1) / Self.block
        allocated = (0..<blocks).map { b in
            let lo = b * Self.block, hi = min(data.count, lo + Self.block)
            return !holesWhereZero || data[lo..<hi].contains { $0 != 0 }
        }
        released = [Bool](repeating: false, count: (data.count + Self.sector - 1) / Self.sector)
    }

    package var allocatedBlocks: Int { allocated.reduce(0) { $0 + ($1 ? 1 : 0) } }

    package mutating func grow(to size: Int) {
        guard size > data.count else { return }
        data.append(contentsOf: [UInt8](repeating: 0, count: size - data.count))
        let blocks = (size + Self.block - 1) / Self.block
        if allocated.count < blocks {
            allocated.append(contentsOf: [Bool](repeating: false, count: blocks - allocated.count))
        }
        let sectors = (size + Self.sector - 1) / Self.sector
        if released.count < sectors {
            released.append(contentsOf: [Bool](repeating: false, count: sectors - released.count))
        }
    }

    /// `keep[i]` says whether chunk i (aligned to `granularity`) of the operation reaches the image.
    package mutating func apply(_ op: CrashOp, keep: [Bool]? = nil) {
        switch op.kind {
        case .write:
            for (i, c) in chunks(offset: op.offset, length: op.length, granularity: UInt64(Self.sector)).enumerated()
            where keep?[i] ?? true {
                let lo = Int(c.lowerBound), hi = Int(c.upperBound)
                grow(to: hi)
                let plo = lo - Int(op.offset), phi = hi - Int(op.offset)
                data.withUnsafeMutableBytes { dst in
                    op.payload.withUnsafeBytes { src in
                        (dst.baseAddress! + lo).copyMemory(from: src.baseAddress! + plo, byteCount: phi - plo)
                    }
                }
                for b in lo / Self.block...(hi - 1) / Self.block { allocated[b] = true }
            }
        case .extend:
            if keep?.contains(true) ?? true { grow(to: Int(op.length)) }
        case .release, .zeroOut:
            for (i, c) in chunks(offset: op.offset, length: op.length, granularity: UInt64(Self.block)).enumerated()
            where keep?[i] ?? true {
                let lo = Int(c.lowerBound), hi = min(Int(c.upperBound), data.count)
                guard lo < hi else { continue }
                let fill = op.kind == .release ? Int32(discardFill ?? 0) : 0
                data.withUnsafeMutableBytes { raw in _ = memset(raw.baseAddress! + lo, fill, hi - lo) }
                if lo % Self.block == 0
                    && (c.upperBound - c.lowerBound == UInt64(Self.block) || Int(c.upperBound) >= data.count)
                {
                    allocated[lo / Self.block] = false
                }
                if op.kind == .release {
                    for s in lo / Self.sector...(hi - 1) / Self.sector { released[s] = true }
                }
            }
        default:
            break
        }
    }

    /// Sectors in `range` that were released, if any.
    package func releasedSector(in range: Range<Int>) -> Int? {
        let hi = min(range.upperBound, data.count)
        guard range.lowerBound < hi else { return nil }
        for s in range.lowerBound / Self.sector...(hi - 1) / Self.sector where released[s] { return s }
        return nil
    }
}

/// `offset..<offset+length` split at multiples of `granularity`.
package func chunks(offset: UInt64, length: UInt64, granularity: UInt64) -> [Range<UInt64>] {
    var out: [Range<UInt64>] = []
    var at = offset
    let end = offset + length
    while at < end {
        let next = min(end, (at / granularity + 1) * granularity)
        out.append(at..<next)
        at = next
    }
    return out
}

package enum CrashOpKind: String, Sendable, Codable {
    case read, write, sync, release, zeroOut, nextData, syncDirectory
    /// The file grows to `length` bytes (ftruncate of a new or empty destination at open).
    case extend
    /// Asynchronous writeback failure: the file's pending operations are lost (see the header).
    case writebackError
    /// An eviction that waited for writeback (only with `legacyWaitingEvict`).
    case waitWriteback
    /// The engine's non-waiting calls (recorded so that faults can be injected into them).
    case startWriteback, evict
    package var isMutation: Bool {
        self == .write || self == .release || self == .zeroOut || self == .sync || self == .extend
    }
}

/// One storage call as the simulated disk saw it. Mutations carry their payload so that a trace
/// can be replayed to any point.
package struct CrashOp: Sendable, Codable, CustomStringConvertible {
    package var seq: Int
    package var path: String
    package var kind: CrashOpKind
    package var offset: UInt64
    package var length: UInt64
    package var payload: [UInt8] = []
    /// Non-zero when the call failed (injected fault or dead process); it had no effect.
    package var errno: Int32 = 0

    package var description: String {
        "#\(seq) \(kind.rawValue) \(path) [\(offset), +\(length))" + (errno != 0 ? " -> \(errnoSymbol(errno))" : "")
    }
}

/// What a power loss has to work with: each file's durable image and every pending mutation.
package struct CrashSnapshot: Sendable, Codable {
    package var durable: [String: CrashFile]
    /// Pending writes/punches of every file, in issue order.
    package var pending: [CrashOp]

    package init(durable: [String: CrashFile], pending: [CrashOp]) {
        self.durable = durable
        self.pending = pending
    }
}

/// Which pending operations survive a power loss.
package enum CrashPolicy: Sendable, Codable, Hashable, CustomStringConvertible {
    /// Only what was synced survives (RocksDB's fault-injection env).
    case dropAll
    /// Everything issued survives (a process kill without power loss: the page cache is written back).
    case keepAll
    /// The worst case of the seed thread: every source discard and metadata write survives,
    /// every unsynced destination write is lost.
    case adversarial(dest: String)
    /// A seeded subset: each operation kept with a seeded probability, some kept writes torn.
    case random(seed: UInt64)
    /// In-order write-back: a seeded prefix of the pending operations survives, the next one torn.
    case prefix(seed: UInt64)

    package var description: String {
        switch self {
        case .dropAll: return "dropAll"
        case .keepAll: return "keepAll"
        case .adversarial: return "adversarial"
        case .random(let s): return "random(\(s))"
        case .prefix(let s): return "prefix(\(s))"
        }
    }
}

extension CrashSnapshot {
    /// The files after a power loss under `policy`.
    package func materialize(_ policy: CrashPolicy) -> [String: CrashFile] {
        var files = durable
        func tearMask(_ op: CrashOp, _ rng: inout SeededRandom) -> [Bool] {
            let g = UInt64(op.kind == .write ? CrashFile.sector : CrashFile.block)
            let n = chunks(offset: op.offset, length: op.length, granularity: g).count
            switch rng.next() % 3 {
            case 0:  // a prefix reached the media
                let k = Int(rng.next() % UInt64(n + 1))
                return (0..<n).map { $0 < k }
            case 1:  // a suffix
                let k = Int(rng.next() % UInt64(n + 1))
                return (0..<n).map { $0 >= k }
            default:  // any sectors
                return (0..<n).map { _ in rng.next() & 1 == 0 }
            }
        }
        switch policy {
        case .dropAll:
            break
        case .keepAll:
            for op in pending { files[op.path]?.apply(op) }
        case .adversarial(let dest):
            for op in pending where op.path != dest { files[op.path]?.apply(op) }
        case .random(let seed):
            var rng = SeededRandom(seed: seed)
            let p = [0.2, 0.5, 0.8, 0.95][Int(rng.next() % 4)]
            for op in pending {
                guard Double(rng.next() % 1_000_000) / 1_000_000 < p else { continue }
                if rng.next() % 5 == 0 {
                    files[op.path]?.apply(op, keep: tearMask(op, &rng))
                } else {
                    files[op.path]?.apply(op)
                }
            }
        case .prefix(let seed):
            var rng = SeededRandom(seed: seed)
            let k = pending.isEmpty ? 0 : Int(rng.next() % UInt64(pending.count + 1))
            for op in pending[0..<k] { files[op.path]?.apply(op) }
            if k < pending.count { files[pending[k].path]?.apply(pending[k], keep: tearMask(pending[k], &rng)) }
        }
        return files
    }

    /// A short fingerprint of the pending set, for messages.
    package var summary: String {
        var byPath: [String: Int] = [:]
        for op in pending { byPath[op.path, default: 0] += 1 }
        return byPath.sorted { $0.key < $1.key }.map { "\($0.key): \($0.value) pending" }.joined(separator: ", ")
    }
}

/// Rebuilds the crash snapshot at every point of a recorded trace (dm-log-writes style replay):
/// start from the snapshot taken when recording began, then apply mutations one at a time.
package struct TraceReplayer {
    package private(set) var durable: [String: CrashFile]
    package private(set) var pending: [String: [CrashOp]]
    package let mutations: [CrashOp]
    package private(set) var position = 0

    package init(base: CrashSnapshot, trace: [CrashOp]) {
        durable = base.durable
        pending = [:]
        for op in base.pending { pending[op.path, default: []].append(op) }
        mutations = trace.filter {
            $0.kind.isMutation && $0.errno == 0 || $0.kind == .sync || $0.kind == .writebackError
        }
    }

    package var count: Int { mutations.count }

    /// Applies mutation `position` (the crash point moves past it).
    package mutating func advance() {
        let op = mutations[position]
        position += 1
        if op.kind == .writebackError {
            // Lost: neither durable nor pending any more.
            pending[op.path] = []
        } else if op.kind == .sync {
            let ops = pending[op.path] ?? []
            pending[op.path] = []
            // A failed sync drops the pending pages without making them durable.
            if op.errno == 0 { for o in ops { durable[op.path]?.apply(o) } }
        } else {
            pending[op.path, default: []].append(op)
        }
    }

    /// The snapshot if the power failed just before mutation `position`.
    package var snapshot: CrashSnapshot {
        CrashSnapshot(durable: durable, pending: pending.values.flatMap { $0 }.sorted { $0.seq < $1.seq })
    }
}

/// What a lying device does with a write it acknowledges.
package enum CrashLie: Sendable, Equatable {
    /// Keeps nothing (a device or filesystem that acknowledges and drops).
    case drop
    /// Keeps the write with its first byte flipped (a bit flip on the way).
    case corrupt
    /// Writes it at this offset instead (a misdirected write).
    case misdirect(UInt64)
}

/// The simulated disk. Thread-safe; every call is linearised by one lock, which gives the total
/// order of the trace.
package final class CrashableStorage: StorageProvider {
    package struct State {
        package var files: [String: CrashFile] = [:]
        package var durable: [String: CrashFile] = [:]
        package var pending: [String: [CrashOp]] = [:]
        package var trace: [CrashOp] = []
        package var traceStart = 0
        package var baseline: CrashSnapshot? = nil
        package var mutations = 0
        package var violations: [String] = []
        package var locked: Set<String> = []
        package var nextInode: UInt64 = 100
        package var closed: Set<ObjectIdentifier> = []
        /// Live crash: the process dies when this many mutations have been issued.
        package var crashAtMutation: Int? = nil
        package var crashSnapshot: CrashSnapshot? = nil
        package var fault: (@Sendable (CrashOp) -> Int32?)? = nil
        package var faultsInjected = 0
        /// Writeback failure armed at this mutation count, on this path (fires at the first
        /// mutation from then on at which the file has pending writes).
        package var writebackFailure: (atMutation: Int, path: String)? = nil
        package var writebackFailures = 0
        /// Per path: the errseq counter (writeback errors so far) and whether the latest was seen.
        package var errseq: [String: (count: Int, seen: Bool)] = [:]
        /// Per open device: the errseq count it has already been told about.
        package var errseqSample: [Int: Int] = [:]
        package var nextOpenID = 0
        /// The old engine's eviction: waits for writeback (consuming the error) and ignores it.
        package var legacyWaitingEvict = false
        /// Paths whose zeroOut fails with EOPNOTSUPP (no punch / zero-out support).
        package var zeroOutUnsupported: Set<String> = []
        /// Paths on a filesystem without SEEK_DATA: every range may be data.
        package var noSeekData: Set<String> = []
        /// Paths written with O_DIRECT (issue 13): `directIO` says so, and a write that fails
        /// (an injected fault) has reached the device in part, like a failed direct write: its
        /// first half (whole sectors) is applied, pending like any write until the next sync.
        package var directWrites: Set<String> = []
        /// A device that lies about writes (verified release): asked for each write (path, offset,
        /// length), it may acknowledge the write and keep nothing, keep it with its first byte
        /// flipped, or put it at another offset (a misdirected write).
        package var lie: (@Sendable (String, UInt64, Int) -> CrashLie?)? = nil
        package var liesTold = 0
    }

    package let state = Mutex(State())

    package init() {}

    /// A fresh disk holding crashed images: everything durable, nothing pending (the machine rebooted).
    package init(files: [String: CrashFile]) {
        state.withLock { s in
            s.files = files
            s.durable = files
            s.nextInode = (files.values.map(\.inode).max() ?? 100) + 1
        }
    }

    package func addFile(_ path: String, data: [UInt8], kind: DeviceKind = .regularFile, holes: [Range<Int>]? = nil) {
        state.withLock { s in
            s.nextInode += 1
            var f = CrashFile(data: data, kind: kind, inode: s.nextInode, holesWhereZero: holes == nil)
            if let holes {
                for h in holes where !h.isEmpty {
                    for b in h.lowerBound / CrashFile.block...(h.upperBound - 1) / CrashFile.block
                    where b * CrashFile.block >= h.lowerBound
                        && min((b + 1) * CrashFile.block, data.count) <= h.upperBound
                    {
                        f.allocated[b] = false
                    }
                }
            }
            s.files[path] = f
            s.durable[path] = f
        }
    }

    // MARK: inspection

    package func file(_ path: String) -> CrashFile? { state.withLock { $0.files[path] } }
    package var trace: [CrashOp] { state.withLock { Array($0.trace[$0.traceStart...]) } }
    package var fullTrace: [CrashOp] { state.withLock { $0.trace } }
    package var violations: [String] { state.withLock { $0.violations } }
    package var faultsInjected: Int { state.withLock { $0.faultsInjected } }
    package var mutationCount: Int { state.withLock { $0.mutations } }
    package func setFault(_ f: (@Sendable (CrashOp) -> Int32?)?) { state.withLock { $0.fault = f } }
    /// An asynchronous writeback failure of `path` at its first pending write once `n` more
    /// mutations have been issued.
    package func failWriteback(afterMutations n: Int, path: String) {
        state.withLock { $0.writebackFailure = ($0.mutations + n, path) }
    }
    package var writebackFailures: Int { state.withLock { $0.writebackFailures } }
    /// Makes `evict` behave as the old engine's did: wait for writeback and swallow its error.
    package func setLegacyWaitingEvict(_ on: Bool) { state.withLock { $0.legacyWaitingEvict = on } }

    /// The current durable images and pending operations.
    package var snapshotNow: CrashSnapshot {
        state.withLock { s in
            CrashSnapshot(durable: s.durable, pending: s.pending.values.flatMap { $0 }.sorted { $0.seq < $1.seq })
        }
    }

    /// Starts the trace here: `baseline` is the snapshot replays begin from.
    package func beginTrace() {
        state.withLock { s in
            s.traceStart = s.trace.count
            s.baseline = CrashSnapshot(
                durable: s.durable, pending: s.pending.values.flatMap { $0 }.sorted { $0.seq < $1.seq })
        }
    }

    package var baseline: CrashSnapshot? { state.withLock { $0.baseline } }

    /// Live crash: the process dies just before its `n`-th mutation (counted from now). Every later
    /// call fails; `crashedSnapshot` holds the state at that moment.
    package func armCrash(afterMutations n: Int) { state.withLock { $0.crashAtMutation = $0.mutations + n } }
    package var crashedSnapshot: CrashSnapshot? { state.withLock { $0.crashSnapshot } }

    /// Kills the process now.
    package func crashNow() {
        state.withLock { s in
            if s.crashSnapshot == nil {
                s.crashSnapshot = CrashSnapshot(
                    durable: s.durable, pending: s.pending.values.flatMap { $0 }.sorted { $0.seq < $1.seq })
            }
        }
    }

    // MARK: StorageProvider

    package func info(_ path: String, _ f: CrashFile) -> DeviceInfo {
        DeviceInfo(
            path: path,
            identity: f.kind == .regularFile
                ? DeviceIdentity(kind: .regularFile, device: 1, inode: f.inode, rdev: 0)
                : f.kind == .remote
                    // A remote export (issue 15): no local identity; BLOCK_STATUS finds holes.
                    ? DeviceIdentity(kind: .remote, device: 0, inode: 0, rdev: 0)
                    : DeviceIdentity(kind: .blockDevice, device: 0, inode: 0, rdev: f.inode),
            // Simulated devices keep their inode through a crash and a reopen: a stable identity.
            size: UInt64(f.data.count), logicalBlockSize: 512, stableID: "sim:\(f.inode)")
    }

    package func open(_ path: String, mode: OpenMode) throws(StorageError) -> any StorageDevice {
        try state.withLock { (s: inout State) throws(StorageError) -> any StorageDevice in
            if s.crashSnapshot != nil { throw StorageError(.open, path: path, errno: EIO) }
            if s.files[path] == nil {
                switch mode {
                case .destination(_?):
                    // Created empty (durably: directory entries are not modelled); the size
                    // comes from the extension below.
                    s.nextInode += 1
                    let f = CrashFile(data: [], inode: s.nextInode)
                    s.files[path] = f
                    s.durable[path] = f
                case .metadata(create: true):
                    s.nextInode += 1
                    let f = CrashFile(data: [], inode: s.nextInode)
                    s.files[path] = f
                    s.durable[path] = f
                default:
                    throw StorageError(.open, path: path, errno: ENOENT)
                }
            } else if case .metadata(create: true) = mode {
                throw StorageError(.create, path: path, errno: EEXIST)
            }
            if case .destination(let size?) = mode, s.files[path]!.data.isEmpty, size > 0 {
                // ftruncate: the new size is in the page cache (pending) until the file's sync.
                let seq = try record(path, .extend, 0, size, [], &s)
                s.files[path]!.apply(s.trace[seq])
                s.pending[path, default: []].append(s.trace[seq])
            }
            var exclusive = false
            switch mode {
            case .source, .destination:
                if s.locked.contains(path) { throw StorageError(.lock, path: path, errno: EBUSY) }
                s.locked.insert(path)
                exclusive = true
            default: break
            }
            s.nextOpenID += 1
            // Like errseq_sample: an error nobody has seen yet is reported to a new opener too.
            let e = s.errseq[path] ?? (0, true)
            s.errseqSample[s.nextOpenID] = e.seen ? e.count : e.count - 1
            // The second description PosixDevice opens for evict's wait (key: -openID).
            s.errseqSample[-s.nextOpenID] = s.errseqSample[s.nextOpenID]
            return CrashableDevice(
                storage: self, path: path, info: info(path, s.files[path]!), exclusive: exclusive,
                openID: s.nextOpenID)
        }
    }

    package func identify(_ path: String) throws(StorageError) -> DeviceInfo? {
        state.withLock { s in s.files[path].map { info(path, $0) } }
    }

    package func syncDirectory(containing path: String) throws(StorageError) {
        try state.withLock { (s: inout State) throws(StorageError) in
            _ = try record(path, .syncDirectory, 0, 0, [], &s)
        }
    }

    package func unlock(_ path: String) { state.withLock { _ = $0.locked.remove(path) } }

    /// Records a call and decides its fate: the process may be dead, or a fault injected. Returns
    /// the recorded op's index in the trace.
    package func record(
        _ path: String, _ kind: CrashOpKind, _ offset: UInt64, _ length: UInt64, _ payload: [UInt8],
        _ s: inout State
    ) throws(StorageError) -> Int {
        let operation: StorageError.Operation
        switch kind {
        case .read: operation = .read
        case .write: operation = .write
        case .sync: operation = .sync
        case .release: operation = .release
        case .zeroOut: operation = .zeroOut
        case .nextData: operation = .seek
        case .syncDirectory: operation = .syncDirectory
        case .extend: operation = .truncate
        case .writebackError, .waitWriteback, .startWriteback, .evict: operation = .writeback
        }
        var op = CrashOp(
            seq: s.trace.count, path: path, kind: kind, offset: offset, length: length,
            payload: kind == .write ? payload : [])
        if s.crashSnapshot == nil, kind.isMutation, let at = s.crashAtMutation, s.mutations >= at {
            s.crashSnapshot = CrashSnapshot(
                durable: s.durable, pending: s.pending.values.flatMap { $0 }.sorted { $0.seq < $1.seq })
        }
        if s.crashSnapshot != nil {
            // The process is dead: nothing reaches the disk any more.
            throw StorageError(operation, path: path, errno: EIO, offset: offset, length: length)
        }
        if kind.isMutation, let wf = s.writebackFailure, s.mutations >= wf.atMutation,
            s.pending[wf.path]?.contains(where: { $0.kind == .write }) ?? false
        {
            s.writebackFailure = nil
            failWritebackNow(wf.path, &s)
            op.seq = s.trace.count
        }
        if let fault = s.fault, let e = fault(op) {
            if kind == .write, s.directWrites.contains(path), payload.count >= 2 * CrashFile.sector {
                // The part of a failed direct write that landed before the error.
                let half = payload.count / 2 / CrashFile.sector * CrashFile.sector
                let landed = CrashOp(
                    seq: s.trace.count, path: path, kind: .write, offset: offset, length: UInt64(half),
                    payload: Array(payload[0..<half]))
                s.trace.append(landed)
                s.files[path]!.apply(landed)
                s.pending[path, default: []].append(landed)
                s.mutations += 1
                op.seq = s.trace.count
            }
            op.errno = e
            op.payload = []
            s.trace.append(op)
            s.faultsInjected += 1
            if kind == .sync {
                // The kernel drops the dirty pages after a writeback error: they never become
                // durable, and a later sync will not bring them back.
                s.pending[path] = []
            }
            if kind == .evict {
                // An eviction fails on its writeback wait: a writeback error, like any other. The
                // pages are dropped, and the error goes into the file's errseq, so the next
                // fdatasync of the commit's descriptor reports it too (as on Linux, where the
                // eviction waits on a descriptor of its own).
                s.pending[path] = []
                let q = s.errseq[path] ?? (0, true)
                s.errseq[path] = (q.count + 1, false)
            }
            throw StorageError(operation, path: path, errno: e, offset: offset, length: length)
        }
        if kind.isMutation { s.mutations += 1 }
        s.trace.append(op)
        return op.seq
    }

    /// The asynchronous writeback of `path` failed: its pending operations are lost (the view
    /// shows the durable image again) and the error goes into the file's errseq.
    package func failWritebackNow(_ path: String, _ s: inout State) {
        s.trace.append(CrashOp(seq: s.trace.count, path: path, kind: .writebackError, offset: 0, length: 0, errno: EIO))
        s.pending[path] = []
        if let d = s.durable[path] {
            // Released sectors stay released (a ghost bit), whatever the data.
            var f = d
            if let cur = s.files[path] { f.released = cur.released }
            s.files[path] = f
        }
        let e = s.errseq[path] ?? (0, true)
        s.errseq[path] = (e.count + 1, false)
        s.writebackFailures += 1
    }

    /// A call that waits for writeback on device `openID`: the writeback error it has not been
    /// told about yet, if any, consumed (reported once per open device).
    package func consumeWritebackError(_ path: String, openID: Int, _ s: inout State) -> Bool {
        guard let e = s.errseq[path], e.count > (s.errseqSample[openID] ?? 0) else { return false }
        s.errseqSample[openID] = e.count
        s.errseq[path] = (e.count, true)
        return true
    }
}

/// An open simulated file.
package final class CrashableDevice: StorageDevice {
    package let storage: CrashableStorage
    package let path: String
    package let info: DeviceInfo
    package let exclusive: Bool
    /// This open file description (errseq is reported once per open device).
    package let openID: Int
    private let isClosed = Atomic<Bool>(false)

    package init(storage: CrashableStorage, path: String, info: DeviceInfo, exclusive: Bool, openID: Int) {
        self.storage = storage; self.path = path; self.info = info; self.exclusive = exclusive; self.openID = openID
    }

    deinit { if exclusive && !isClosed.load(ordering: .relaxed) { storage.unlock(path) } }

    private func checkOpen(_ op: StorageError.Operation) throws(StorageError) {
        if isClosed.load(ordering: .relaxed) { throw StorageError(op, path: path, errno: EBADF) }
    }

    package func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(StorageError) {
        try checkOpen(.read)
        try storage.state.withLock { (s: inout CrashableStorage.State) throws(StorageError) in
            let seq = try storage.record(path, .read, offset, UInt64(buffer.count), [], &s)
            let f = s.files[path]!
            if let sector = f.releasedSector(in: Int(offset)..<Int(offset) + buffer.count) {
                s.violations.append(
                    "op #\(seq): read of \(path) [\(offset), +\(buffer.count)) touches released sector \(sector) (byte \(sector * CrashFile.sector), region of 4 KiB #\(sector * CrashFile.sector / 4096))"
                )
            }
            let n = max(0, min(buffer.count, f.data.count - Int(offset)))
            if n > 0 {
                f.data.withUnsafeBytes { src in
                    buffer.baseAddress!.copyMemory(from: src.baseAddress! + Int(offset), byteCount: n)
                }
            }
            if n < buffer.count {
                (buffer.baseAddress! + n).initializeMemory(as: UInt8.self, repeating: 0, count: buffer.count - n)
            }
        }
    }

    private func mutate(_ kind: CrashOpKind, _ offset: UInt64, _ length: UInt64, _ payload: [UInt8])
        throws(StorageError)
    {
        try storage.state.withLock { (s: inout CrashableStorage.State) throws(StorageError) in
            if kind == .write && info.identity.kind == .blockDevice && Int(offset + length) > s.files[path]!.data.count
            {
                throw StorageError(.write, path: path, errno: ENOSPC, offset: offset)
            }
            let seq = try storage.record(path, kind, offset, length, payload, &s)
            let op = s.trace[seq]
            s.files[path]!.apply(op)
            s.pending[path, default: []].append(op)
        }
    }

    package func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(StorageError) {
        try checkOpen(.write)
        var payload = [UInt8](buffer)
        var at = offset
        let lie = storage.state.withLock { s -> CrashLie? in
            guard let l = s.lie?(path, offset, buffer.count) else { return nil }
            s.liesTold += 1
            return l
        }
        switch lie {
        case .drop?: return
        case .corrupt?: if !payload.isEmpty { payload[0] ^= 0xFF }
        case .misdirect(let to)?: at = to
        case nil: break
        }
        try mutate(.write, at, UInt64(payload.count), payload)
    }

    package func sync() throws(StorageError) {
        try checkOpen(.sync)
        try storage.state.withLock { (s: inout CrashableStorage.State) throws(StorageError) in
            // (record may itself fire an armed writeback failure: the sync then waits for it.)
            let seq = try storage.record(path, .sync, 0, 0, [], &s)
            if storage.consumeWritebackError(path, openID: openID, &s) {
                // fdatasync reports the writeback error; what was pending is dropped (lost),
                // exactly as after an injected sync failure.
                s.trace[seq].errno = EIO
                s.pending[path] = []
                throw StorageError(.sync, path: path, errno: EIO)
            }
            let ops = s.pending[path] ?? []
            s.pending[path] = []
            for o in ops { s.durable[path]!.apply(o) }
        }
    }

    package func release(offset: UInt64, length: UInt64) throws(StorageError) {
        try checkOpen(.release)
        try mutate(.release, offset, length, [])
    }

    package func zeroOut(offset: UInt64, length: UInt64) throws(StorageError) {
        try checkOpen(.zeroOut)
        if storage.state.withLock({ $0.zeroOutUnsupported.contains(path) }) {
            throw StorageError(.zeroOut, path: path, errno: EOPNOTSUPP, offset: offset, length: length)
        }
        try mutate(.zeroOut, offset, length, [])
    }

    package func nextData(from offset: UInt64) throws(StorageError) -> Range<UInt64>? {
        try checkOpen(.seek)
        return try storage.state.withLock { (s: inout CrashableStorage.State) throws(StorageError) -> Range<UInt64>? in
            let seq = try storage.record(path, .nextData, offset, 0, [], &s)
            let f = s.files[path]!
            // The copier asks where data is from the start of a region it is about to hydrate:
            // if that region was released, it would take the punched range for a hole.
            if let sector = f.releasedSector(in: Int(offset)..<Int(offset) + 1) {
                s.violations.append(
                    "op #\(seq): SEEK_DATA of \(path) from \(offset), inside released sector \(sector) (4 KiB region #\(sector * CrashFile.sector / 4096)): a released range would be taken for a hole"
                )
            }
            guard offset < UInt64(f.data.count) else { return nil }
            guard f.kind != .blockDevice, !s.noSeekData.contains(path) else { return offset..<UInt64(f.data.count) }
            let b0 = Int(offset) / CrashFile.block
            guard let first = (b0..<f.allocated.count).first(where: { f.allocated[$0] }) else { return nil }
            let end = (first..<f.allocated.count).first(where: { !f.allocated[$0] }) ?? f.allocated.count
            let lo = max(offset, UInt64(first * CrashFile.block))
            let hi = min(UInt64(end * CrashFile.block), UInt64(f.data.count))
            return lo < hi ? lo..<hi : nil
        }
    }

    package func dropCache(offset: UInt64, length: UInt64) {}

    package var directIO: DirectIO {
        storage.state.withLock { $0.directWrites.contains(path) }
            ? DirectIO(enabled: true, alignment: 4096, reason: "") : .off("no page cache")
    }

    /// Never waits (sync_file_range WRITE), so it never consumes the errseq.
    package func startWriteback(offset: UInt64, length: UInt64) throws(StorageError) {
        try checkOpen(.writeback)
        try storage.state.withLock { (s: inout CrashableStorage.State) throws(StorageError) in
            _ = try storage.record(path, .startWriteback, offset, length, [], &s)
        }
    }

    /// Waits for writeback on the device's second description (as PosixDevice does): a
    /// writeback error is reported (thrown) and consumed for that description only, so the next
    /// `sync` reports it too. With `legacyWaitingEvict` (the old engine) the wait consumes it on
    /// this description and the result is ignored.
    package func evict(offset: UInt64, length: UInt64) throws(StorageError) {
        try checkOpen(.writeback)
        try storage.state.withLock { (s: inout CrashableStorage.State) throws(StorageError) in
            let seq = try storage.record(path, .evict, offset, length, [], &s)
            if s.legacyWaitingEvict {
                if storage.consumeWritebackError(path, openID: openID, &s) {
                    s.trace.append(
                        CrashOp(
                            seq: s.trace.count, path: path, kind: .waitWriteback, offset: offset, length: length,
                            errno: EIO))
                }
            } else if storage.consumeWritebackError(path, openID: -openID, &s) {
                s.trace[seq].errno = EIO
                throw StorageError(.writeback, path: path, errno: EIO, offset: offset, length: length)
            }
        }
    }

    package func allocatedBytes() -> UInt64? {
        storage.file(path).map { UInt64($0.allocatedBlocks * CrashFile.block) }
    }

    package func close() {
        if !isClosed.exchange(true, ordering: .relaxed), exclusive { storage.unlock(path) }
    }
}
