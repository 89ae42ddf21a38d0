// hydration-bench: micro-benchmark of the metadata commit cost.
//
// Creates a job's metadata for a large target (default 1 TiB, 4 KiB regions = 268,435,456
// regions), then commits batches of newly hydrated regions (default 1,000 per commit), once with
// scattered random regions and once with a contiguous run, and reports per commit:
//   total      wall time of MetadataStore.commit
//   prep       time from entering commit to its first write (bitmap copy + set + dirty-page set)
//   encode     the rest of the non-I/O time (page encode + CRC32C + bookkeeping)
//   write      time inside pwrite calls
//   sync       time inside fdatasync calls
// plus open/recovery time of the resulting file (warm page cache, and cold when caches can be
// dropped). Not a test; not run by CI.
//
//   swift build -c release --product hydration-bench
//   .build/release/hydration-bench [--dir DIR] [--size BYTES] [--region-size BYTES]
//       [--dirty N] [--commits N] [--json FILE] [--keep]

import HydrationService
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

// MARK: clock

@inline(__always) func nowNs() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}

func cpuNs() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}

// MARK: timing storage

struct IOStats: Sendable {
    var writes = 0
    var writeNs: UInt64 = 0
    var syncs = 0
    var syncNs: UInt64 = 0
    var reads = 0
    var readNs: UInt64 = 0
    var firstWriteAt: UInt64? = nil
}

/// Shared stats box (a class so the provider and its devices see the same counters).
final class StatsBox: Sendable {
    let m = Mutex(IOStats())
    func take() -> IOStats {
        m.withLock { s in
            let r = s; s = IOStats(); return r
        }
    }
}

struct TimingStorage: StorageProvider {
    let inner: any StorageProvider
    let box: StatsBox
    func open(_ path: String, mode: OpenMode) throws(StorageError) -> any StorageDevice {
        TimingDeviceBox(try inner.open(path, mode: mode), box: box)
    }
    func identify(_ path: String) throws(StorageError) -> DeviceInfo? { try inner.identify(path) }
    func syncDirectory(containing path: String) throws(StorageError) { try inner.syncDirectory(containing: path) }
}

/// Counts and times every call the metadata store makes on its file; counters live in a shared StatsBox.
final class TimingDeviceBox: StorageDevice {
    let inner: any StorageDevice
    let box: StatsBox
    init(_ inner: any StorageDevice, box: StatsBox) { self.inner = inner; self.box = box }
    var info: DeviceInfo { inner.info }
    func close() { inner.close() }
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(StorageError) {
        let t0 = nowNs()
        defer {
            let d = nowNs() - t0;
            box.m.withLock {
                $0.reads += 1; $0.readNs += d
            }
        }
        try inner.read(into: buffer, at: offset)
    }
    func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(StorageError) {
        let t0 = nowNs()
        defer {
            let d = nowNs() - t0
            box.m.withLock {
                if $0.firstWriteAt == nil { $0.firstWriteAt = t0 }
                $0.writes += 1; $0.writeNs += d
            }
        }
        try inner.write(buffer, at: offset)
    }
    func sync() throws(StorageError) {
        let t0 = nowNs()
        defer {
            let d = nowNs() - t0;
            box.m.withLock {
                $0.syncs += 1; $0.syncNs += d
            }
        }
        try inner.sync()
    }
    func release(offset: UInt64, length: UInt64) throws(StorageError) {
        try inner.release(offset: offset, length: length)
    }
    func zeroOut(offset: UInt64, length: UInt64) throws(StorageError) {
        try inner.zeroOut(offset: offset, length: length)
    }
    func nextData(from offset: UInt64) throws(StorageError) -> Range<UInt64>? { try inner.nextData(from: offset) }
    func dropCache(offset: UInt64, length: UInt64) { inner.dropCache(offset: offset, length: length) }
    func startWriteback(offset: UInt64, length: UInt64) throws(StorageError) {
        try inner.startWriteback(offset: offset, length: length)
    }
    func evict(offset: UInt64, length: UInt64) throws(StorageError) { try inner.evict(offset: offset, length: length) }
    func allocatedBytes() -> UInt64? { inner.allocatedBytes() }
}

// MARK: arguments

struct Options {
    var dir = "/work/bench-data/meta-bench"
    var size: UInt64 = 1 << 40
    var regionSize: UInt64 = 4096
    var dirty = 1000
    var commits = 50
    var json: String? = nil
    var keep = false
}

func parseSize(_ s: String) -> UInt64? {
    let units: [(String, UInt64)] = [
        ("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10),
        ("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10),
    ]
    for (u, m) in units where s.hasSuffix(u) {
        return UInt64(s.dropLast(u.count)).map { $0 * m }
    }
    return UInt64(s)
}

func usage() -> Never {
    print(
        """
        usage: hydration-bench [--dir DIR] [--size BYTES|1TiB] [--region-size BYTES] [--dirty N]
                               [--commits N] [--json FILE] [--keep]
        """)
    exit(2)
}

func parseArguments() -> Options {
    var opts = Options()
    var args = CommandLine.arguments.dropFirst()
    func value() -> String { guard let v = args.popFirst() else { usage() }; return v }
    while let a = args.popFirst() {
        switch a {
        case "--dir": opts.dir = value()
        case "--size": guard let v = parseSize(value()) else { usage() }; opts.size = v
        case "--region-size": guard let v = parseSize(value()) else { usage() }; opts.regionSize = v
        case "--dirty": guard let v = Int(value()) else { usage() }; opts.dirty = v
        case "--commits": guard let v = Int(value()) else { usage() }; opts.commits = v
        case "--json": opts.json = value()
        case "--keep": opts.keep = true
        case "-h", "--help": usage()
        default: print("unknown argument \(a)"); usage()
        }
    }
    return opts
}
let opts = parseArguments()

// MARK: helpers

func percentile(_ xs: [Double], _ p: Double) -> Double {
    guard !xs.isEmpty else { return .nan }
    let s = xs.sorted()
    let rank = p / 100 * Double(s.count - 1)
    let lo = Int(rank.rounded(.down)), hi = Int(rank.rounded(.up))
    return s[lo] + (s[hi] - s[lo]) * (rank - Double(lo))
}

func ms(_ ns: UInt64) -> Double { Double(ns) / 1e6 }
func f2(_ x: Double) -> String {
    guard x.isFinite else { return "nan" }
    let c = Int((x * 100).rounded())
    let frac = abs(c % 100)
    return "\(c / 100).\(frac < 10 ? "0" : "")\(frac)"
}

func dropCaches() -> Bool {
    sync()
    let fd = open("/proc/sys/vm/drop_caches", O_WRONLY)
    guard fd >= 0 else { return false }
    defer { close(fd) }
    return write(fd, "3\n", 2) == 2
}

func allocated(_ path: String) -> UInt64 {
    var st = stat()
    return stat(path, &st) == 0 ? UInt64(st.st_blocks) * 512 : 0
}

/// A simple deterministic generator (SplitMix64) so runs are comparable.
struct SplitMix: RandomNumberGenerator {
    var state: UInt64
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

struct CommitSample {
    var totalNs: UInt64, prepNs: UInt64, encodeNs: UInt64, writeNs: UInt64, syncNs: UInt64
    var cpuNs: UInt64, writes: Int, syncs: Int
}

struct PatternResult {
    var name: String
    var samples: [CommitSample]
    var openWarmMs: Double
    var openColdMs: Double?
    var openReads: Int
    var fileAllocated: UInt64
    var createMs: Double
}

// MARK: the benchmark

let regionCount = Int((opts.size + opts.regionSize - 1) / opts.regionSize)
let pageCount = MetadataFormat.pageCount(regions: regionCount)
print("hydration-bench: metadata commit cost")
print(
    "  target \(opts.size) bytes, region \(opts.regionSize) B -> \(regionCount) regions, \(pageCount) bitmap pages (\(MetadataFormat.regionsPerPage) regions/page)"
)
print("  \(opts.dirty) newly hydrated regions per commit, \(opts.commits) commits per pattern, metadata in \(opts.dir)")

mkdir(opts.dir, 0o755)
let box = StatsBox()
let storage = TimingStorage(inner: PosixStorage(), box: box)

func identity(_ n: UInt64) -> DeviceIdentity { DeviceIdentity(kind: .regularFile, device: 1, inode: n, rdev: 0) }

@MainActor func runPattern(_ name: String, next: (inout SplitMix, RegionMap) -> [Range<Int>]) -> PatternResult {
    let path = "\(opts.dir)/\(name).meta"
    unlink(path)
    let options = MetadataCreateOptions(
        regionSize: opts.regionSize,
        source: DeviceRecord(path: "/bench/source-\(name)", identity: identity(1), size: opts.size),
        dest: DeviceRecord(path: "/bench/dest-\(name)", identity: identity(2), size: opts.size),
        discardSource: true, destZeroed: true)
    let c0 = nowNs()
    let store: MetadataStore
    do {
        store = try MetadataStore.create(path: path, options: options, storage: storage, nowMs: 0)
    } catch {
        print("create failed: \(error)"); exit(1)
    }
    let createMs = ms(nowNs() - c0)
    _ = box.take()
    var rng = SplitMix(state: 0x5EED)
    var samples: [CommitSample] = []
    // One warm-up commit (first touch of the bitmap's pages, lazy CRC tables), not counted.
    for i in 0..<(opts.commits + 1) {
        let ranges = next(&rng, store.committedMap)
        _ = box.take()
        let cpu0 = cpuNs()
        let t0 = nowNs()
        do {
            try store.commit(ranges, nowMs: Int64(i + 1))
        } catch {
            print("commit failed: \(error)"); exit(1)
        }
        let t1 = nowNs()
        let cpu1 = cpuNs()
        let s = box.take()
        let total = t1 - t0
        let prep = (s.firstWriteAt ?? t1) - t0
        let io = s.writeNs + s.syncNs
        let encode = total > prep + io ? total - prep - io : 0
        if i > 0 {
            samples.append(
                CommitSample(
                    totalNs: total, prepNs: prep, encodeNs: encode, writeNs: s.writeNs,
                    syncNs: s.syncNs, cpuNs: cpu1 - cpu0, writes: s.writes, syncs: s.syncs))
        }
    }
    let hydrated = store.committedCount
    // Open / recovery: warm, then cold when the page cache can be dropped.
    func timeOpen() -> (Double, Int) {
        _ = box.take()
        let t0 = nowNs()
        do {
            let (s, _) = try MetadataStore.open(path: path, storage: storage)
            precondition(s.committedCount == hydrated, "recovered \(s.committedCount) != committed \(hydrated)")
        } catch {
            print("open failed: \(error)"); exit(1)
        }
        let d = ms(nowNs() - t0)
        return (d, box.take().reads)
    }
    let fileAlloc = allocated(path)
    let (warm, reads) = timeOpen()
    var cold: Double? = nil
    if dropCaches() { cold = timeOpen().0 }
    if !opts.keep { unlink(path) }
    return PatternResult(
        name: name, samples: samples, openWarmMs: warm, openColdMs: cold, openReads: reads,
        fileAllocated: fileAlloc, createMs: createMs)
}

var results: [PatternResult] = []

// Scattered: `dirty` distinct random regions not hydrated yet, each its own range.
results.append(
    runPattern("scattered") { rng, map in
        var picked = Set<Int>()
        while picked.count < opts.dirty {
            let r = Int(rng.next() % UInt64(regionCount))
            if !map[r] { picked.insert(r) }
        }
        return picked.sorted().map { $0..<($0 + 1) }
    })

// Contiguous: the next `dirty` regions after what is hydrated, as one range (a sequential copy).
var cursor = 0
results.append(
    runPattern("contiguous") { _, _ in
        let r = cursor..<min(cursor + opts.dirty, regionCount)
        cursor = r.upperBound
        return [r]
    })

// MARK: report

print("")
print("per commit, ms (p50 / p99 over \(opts.commits) commits):")
print(
    "pattern      total          cpu-part(prep+encode)  prep(bitmap)   encode+crc     pwrite         fsync          writes syncs  proc-cpu"
)
var json: [String] = []
for r in results {
    func col(_ f: (CommitSample) -> Double) -> (Double, Double) {
        let xs = r.samples.map(f)
        return (percentile(xs, 50), percentile(xs, 99))
    }
    let tot = col { ms($0.totalNs) }
    let cpuPart = col { ms($0.prepNs + $0.encodeNs) }
    let prep = col { ms($0.prepNs) }
    let enc = col { ms($0.encodeNs) }
    let wr = col { ms($0.writeNs) }
    let sy = col { ms($0.syncNs) }
    let pc = col { ms($0.cpuNs) }
    let writes = r.samples.map(\.writes).reduce(0, +) / max(1, r.samples.count)
    let syncs = r.samples.map(\.syncs).reduce(0, +) / max(1, r.samples.count)
    func pair(_ p: (Double, Double)) -> String {
        let s = "\(f2(p.0)) / \(f2(p.1))"
        return s + String(repeating: " ", count: max(1, 15 - s.count))
    }
    print(
        r.name.padding(13) + pair(tot) + pair(cpuPart) + "        " + pair(prep) + pair(enc) + pair(wr) + pair(sy)
            + String(writes).padding(7) + String(syncs).padding(7) + pair(pc))
    let cold = r.openColdMs.map { f2($0) } ?? "null"
    print(
        "  create \(f2(r.createMs)) ms; open/recovery \(f2(r.openWarmMs)) ms warm, \(r.openColdMs.map { f2($0) + " ms" } ?? "n/a (cannot drop caches)") cold; \(r.openReads) block reads; metadata file allocated \(r.fileAllocated / 1024) KiB"
    )
    json.append(
        """
        {"pattern":"\(r.name)","commits":\(r.samples.count),\
        "total_ms":{"p50":\(tot.0),"p99":\(tot.1)},"cpu_part_ms":{"p50":\(cpuPart.0),"p99":\(cpuPart.1)},\
        "prep_ms":{"p50":\(prep.0),"p99":\(prep.1)},"encode_crc_ms":{"p50":\(enc.0),"p99":\(enc.1)},\
        "pwrite_ms":{"p50":\(wr.0),"p99":\(wr.1)},"fsync_ms":{"p50":\(sy.0),"p99":\(sy.1)},\
        "process_cpu_ms":{"p50":\(pc.0),"p99":\(pc.1)},"writes_per_commit":\(writes),"syncs_per_commit":\(syncs),\
        "create_ms":\(r.createMs),"open_warm_ms":\(r.openWarmMs),"open_cold_ms":\(cold),"open_block_reads":\(r.openReads),\
        "metadata_allocated_bytes":\(r.fileAllocated)}
        """)
}
let target = 10.0
for r in results {
    let cpuP99 = percentile(r.samples.map { ms($0.prepNs + $0.encodeNs + $0.writeNs) }, 99)
    let verdict = cpuP99 <= target ? "meets" : "MISSES"
    print("  target (commit <= 10 ms + fsync), \(r.name): non-fsync p99 \(f2(cpuP99)) ms -> \(verdict)")
}
if let path = opts.json {
    let doc = """
        {"target_bytes":\(opts.size),"region_size":\(opts.regionSize),"regions":\(regionCount),"pages":\(pageCount),\
        "dirty_per_commit":\(opts.dirty),"patterns":[\(json.joined(separator: ","))]}

        """
    let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
    if fd >= 0 {
        _ = doc.withCString { write(fd, $0, strlen($0)) }
        close(fd)
        print("wrote \(path)")
    }
}

extension String {
    func padding(_ n: Int) -> String { self + String(repeating: " ", count: max(1, n - count)) }
}
