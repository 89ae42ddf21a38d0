import Foundation
import HydrationTestSupport
import Logging
import Synchronization
import Testing

@testable import HydrationEngine
@testable import HydrationService
@testable import HydrationStorage

#if canImport(Glibc)
    import Glibc
#endif

/// PosixStorage, remembering every device it opened (to look at its direct-I/O counters).
final class RecordingPosixStorage: StorageProvider {
    let inner: PosixStorage
    let opened = Mutex<[String: PosixDevice]>([:])
    /// `directIO` nil: each job's choice (`IOMode`), as in the daemon.
    init(directIO: Bool? = true) { inner = PosixStorage(directIO: directIO) }

    func open(_ path: String, mode: OpenMode) throws(StorageError) -> any StorageDevice {
        let d = try inner.open(path, mode: mode)
        if let p = d as? PosixDevice { opened.withLock { $0[path] = p } }
        return d
    }
    func open(_ path: String, mode: OpenMode, directIO: Bool, why: String) throws(StorageError) -> any StorageDevice {
        let d = try inner.open(path, mode: mode, directIO: directIO, why: why)
        if let p = d as? PosixDevice { opened.withLock { $0[path] = p } }
        return d
    }
    func allocatedBytes(of path: String) -> UInt64? { inner.allocatedBytes(of: path) }
    func identify(_ path: String) throws(StorageError) -> DeviceInfo? { try inner.identify(path) }
    func syncDirectory(containing path: String) throws(StorageError) { try inner.syncDirectory(containing: path) }
    func removeCreatedFile(_ path: String) { inner.removeCreatedFile(path) }
    func device(_ path: String) -> PosixDevice? { opened.withLock { $0[path] } }
    func stack(of path: String) throws(StorageError) -> StorageStack? { try inner.stack(of: path) }
    func usage(of path: String) throws(StorageError) -> DeviceUsage? { try inner.usage(of: path) }
}

/// Direct I/O (issue 13): where it is used, where it falls back to buffered I/O, and that the
/// data is right either way.
@Suite(.serialized) struct DirectIOTests {
    let io = IOExecutor(threads: 4)

    /// True when `dir` is on a filesystem that does direct I/O (ext4, XFS, btrfs): there, a
    /// fallback to buffered I/O is a bug.
    static func supportsDirectIO(_ dir: String) -> Bool {
        // stat -f names ext4 "ext2/ext3" (one magic number for all three).
        let r = LoopFS.sh(["/usr/bin/stat", "-f", "-c", "%T", dir])
        let type = r.output.trimmingCharacters(in: .whitespacesAndNewlines)
        return r.status == 0 && ["ext2/ext3", "xfs", "btrfs"].contains(type)
    }

    /// Resident page-cache pages of `path` (mincore over a mapping).
    static func residentPages(_ path: String) -> Int {
        let fd = open(path, O_RDONLY)
        guard fd >= 0 else { return -1 }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0, st.st_size > 0 else { return 0 }
        let len = Int(st.st_size)
        guard let map = mmap(nil, len, PROT_READ, MAP_SHARED, fd, 0), Int(bitPattern: map) != -1 else { return -1 }
        defer { munmap(map, len) }
        var vec = [UInt8](repeating: 0, count: (len + 4095) / 4096)
        guard mincore(map, len, &vec) == 0 else { return -1 }
        return vec.filter { $0 & 1 != 0 }.count
    }

    static func aligned(_ count: Int, fill seed: UInt64) -> UnsafeMutableRawBufferPointer {
        let b = UnsafeMutableRawBufferPointer.allocate(byteCount: count, alignment: 4096)
        var rng = SeededRandom(seed: seed)
        var i = 0
        while i < count {
            var v = rng.next()
            for _ in 0..<8 where i < count { b[i] = UInt8(truncatingIfNeeded: v); v >>= 8; i += 1 }
        }
        return b
    }

    /// On ext4/XFS/btrfs: aligned calls go direct (and leave nothing in the page cache), an
    /// unaligned tail or buffer goes buffered, and everything reads back right.
    @Test func alignedCallsGoDirectTheRestBuffered() throws {
        let dir = TempDir("dio")
        try #require(Self.supportsDirectIO(dir.path), "\(dir.path) is not on ext4/XFS/btrfs")
        let path = dir.file("dst.img")
        let size = (4 << 20) + 1234  // an unaligned tail
        let d = try PosixDevice.open(path, mode: .destination(createSize: UInt64(size)), directIO: true)
        #expect(d.directIO.enabled, "direct I/O fell back on a filesystem that supports it: \(d.directIO)")
        #expect(d.directIO.alignment >= 4096 && d.directIO.alignment & (d.directIO.alignment - 1) == 0)

        let data = Self.aligned(size, fill: 5)
        defer { data.deallocate() }
        // 4 MiB aligned: direct. Then the tail: 1234 bytes, buffered.
        try d.write(UnsafeRawBufferPointer(rebasing: data[0..<(4 << 20)]), at: 0)
        #expect(d.directCalls.load(ordering: .relaxed) == 1)
        #expect(d.bufferedCalls.load(ordering: .relaxed) == 0)
        #expect(Self.residentPages(path) == 0, "a direct write left pages in the page cache")
        try d.write(UnsafeRawBufferPointer(rebasing: data[(4 << 20)..<size]), at: 4 << 20)
        #expect(d.bufferedCalls.load(ordering: .relaxed) == 1)
        // One call with an aligned start and an unaligned end: its aligned part direct, the rest
        // buffered.
        try d.write(UnsafeRawBufferPointer(rebasing: data[(3 << 20)..<size]), at: 3 << 20)
        #expect(d.directCalls.load(ordering: .relaxed) == 2)
        #expect(d.bufferedCalls.load(ordering: .relaxed) == 2)
        #expect(d.directRefused.load(ordering: .relaxed) == 0)
        try d.sync()
        #expect(byteDifference(readFile(path), [UInt8](UnsafeRawBufferPointer(data))) == nil)

        // Reads: an aligned one direct (the tail past the end of file reads as zeros), one into a
        // misaligned buffer buffered; both right.
        let back = UnsafeMutableRawBufferPointer.allocate(byteCount: 8 << 20, alignment: 4096)
        defer { back.deallocate() }
        let before = d.directCalls.load(ordering: .relaxed)
        try d.read(into: UnsafeMutableRawBufferPointer(rebasing: back[0..<(5 << 20)]), at: 0)
        #expect(d.directCalls.load(ordering: .relaxed) > before)
        #expect(
            byteDifference(
                [UInt8](UnsafeRawBufferPointer(rebasing: back[0..<size])), [UInt8](UnsafeRawBufferPointer(data))) == nil
        )
        #expect(!back[size..<(5 << 20)].contains { $0 != 0 }, "bytes past the end of file must read as zeros")
        let buffered = d.bufferedCalls.load(ordering: .relaxed)
        try d.read(into: UnsafeMutableRawBufferPointer(rebasing: back[1..<(1 + 65536)]), at: 4096)
        #expect(d.bufferedCalls.load(ordering: .relaxed) == buffered + 1)
        #expect(
            byteDifference(
                [UInt8](UnsafeRawBufferPointer(rebasing: back[1..<(1 + 65536)])),
                [UInt8](UnsafeRawBufferPointer(rebasing: data[4096..<(4096 + 65536)]))) == nil)
        d.close()
    }

    /// tmpfs accepts O_DIRECT at open but does no direct I/O: buffered, with the reason.
    @Test(.enabled(if: FileManager.default.fileExists(atPath: "/dev/shm"), "needs a tmpfs at /dev/shm"))
    func tmpfsIsBuffered() throws {
        let path = "/dev/shm/hyd-dio-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).img"
        defer { unlink(path) }
        let d = try PosixDevice.open(path, mode: .destination(createSize: 1 << 20), directIO: true)
        #expect(!d.directIO.enabled)
        #expect(d.directIO.reason.contains("STATX_DIOALIGN") || d.directIO.reason.contains("O_DIRECT"), "\(d.directIO)")
        let data = Self.aligned(1 << 20, fill: 6)
        defer { data.deallocate() }
        try d.write(UnsafeRawBufferPointer(data), at: 0)
        try d.sync()
        #expect(d.directCalls.load(ordering: .relaxed) == 0)
        #expect(d.bufferedCalls.load(ordering: .relaxed) == 1)
        #expect(byteDifference(readFile(path), [UInt8](UnsafeRawBufferPointer(data))) == nil)
        d.close()
    }

    @Test func turnedOffMeansBuffered() throws {
        let dir = TempDir("dio-off")
        let d = try PosixDevice.open(
            dir.file("d.img"), mode: .destination(createSize: 1 << 20), directIO: false,
            why: "io=buffered")
        #expect(!d.directIO.enabled)
        #expect(d.directIO.reason == "io=buffered")
        // No HYDRATION_DIRECT_IO in the test environment: each job chooses, and a caller that does
        // not choose gets buffered I/O.
        if getenv("HYDRATION_DIRECT_IO") == nil {
            let p = PosixStorage()
            #expect(p.directOverride == nil)
            let e = try p.open(dir.file("e.img"), mode: .destination(createSize: 1 << 20))
            #expect(!e.directIO.enabled)
            e.close()
        }
        // Metadata is never opened direct.
        let m = try PosixDevice.open(dir.file("m"), mode: .metadata(create: true), directIO: true)
        #expect(!m.directIO.enabled)
        d.close(); m.close()
    }

    /// BatchJob on a sparse source reads only the data extents of a batch that spans holes:
    /// regions wholly inside holes are not read and count as zero; the parts of a hole inside a
    /// region that also holds data are zero-filled — even when the pool hands out a buffer full
    /// of stale bytes.
    @Test func batchReadsOnlyDataExtentsAndZeroFillsTheRest() throws {
        let regionSize: UInt64 = 64 << 10
        let size = 16 * Int(regionSize) + 5000  // a short last region
        var image = [UInt8](repeating: 0, count: size)
        var rng = SeededRandom(seed: 8)
        // Data: [4 KiB, 12 KiB) in region 0; region 3 whole; [200 KiB, 264 KiB) across regions 3-4;
        // the last 3000 bytes of the file. Everything else is a hole.
        let data: [Range<Int>] = [4096..<12288, 192 << 10..<256 << 10, 200 << 10..<264 << 10, (size - 3000)..<size]
        for r in data { rng.fill(&image, r) }
        let sim = SimulatedStorage()
        sim.addFile("/src", data: image)
        sim.addFile("/dst", data: [UInt8](repeating: 0, count: size))
        let src = try sim.open("/src", mode: .source(discard: false))
        let dst = try sim.open("/dst", mode: .destination(createSize: nil))
        let geometry = Geometry(regionSize: regionSize, regionCount: 17, targetSize: UInt64(size))
        let pool = IOBufferPool()
        let stale = UnsafeMutableRawBufferPointer.allocate(byteCount: 2 << 20, alignment: 4096)
        stale.initializeMemory(as: UInt8.self, repeating: 0xA5)
        pool.give(stale)
        let job = BatchJob(
            source: SourceReader(src), dest: dst, geometry: geometry, zeroDestination: false, retryDelaysMs: [],
            logger: testLogger, buffers: pool)
        let result = try job.perform(.copy(0..<17))
        #expect(byteDifference(sim.contents("/dst"), image) == nil)
        // Data in regions 0, 3, 4 and 16: 4 regions written (the last one short).
        #expect(result.written == 3 * regionSize + 5000)
        // Reads: only of data (widened to 4 KiB), never of a region wholly inside a hole.
        let reads = sim.log.filter { $0.path == "/src" && $0.kind == .read }
        let readBytes = reads.reduce(UInt64(0)) { $0 + $1.length }
        #expect(readBytes <= 8192 + 128 * 1024 + 8192, "read \(readBytes) bytes: \(reads)")
        for r in reads {
            let regions = Int(r.offset / regionSize)...Int((r.offset + r.length - 1) / regionSize)
            #expect(regions.allSatisfy { [0, 3, 4, 16].contains($0) }, "read of a hole region: \(r)")
        }
    }

    /// Buffered (direct I/O off), a sparse image: its large holes are recorded without I/O
    /// while data batches are in flight (Copier.run); the data lands where it belongs.
    /// Data 2 MiB every 64 MiB over 6 GiB: 192 MiB of data.
    @Test func bufferedSparseCopy() async throws {
        let dir = TempDir("dio-sparse")
        let src = dir.file("src.img"), dst = dir.file("dst.img")
        let size = 6 << 30
        let fd = open(src, O_RDWR | O_CREAT, 0o600)
        try #require(fd >= 0)
        var rng = SeededRandom(seed: 61)
        var chunk = [UInt8](repeating: 0, count: 2 << 20)
        var expected: [(Int, [UInt8])] = []
        var at = 5 << 20
        while at + chunk.count <= size {
            rng.fill(&chunk, 0..<chunk.count)
            #expect(pwrite(fd, chunk, chunk.count, off_t(at)) == chunk.count)
            expected.append((at, chunk))
            at += 64 << 20
        }
        #expect(ftruncate(fd, off_t(size)) == 0)
        fsync(fd)
        close(fd)
        let storage = RecordingPosixStorage(directIO: false)
        let cfg = JobConfiguration(
            name: "sparse", sourcePath: src, destPath: dst, metadataPath: dir.file("meta"),
            regionSize: 64 << 10, discardSource: false)
        let job = try await HydrationJob.create(cfg, storage: storage, io: io, logger: testLogger)
        try await job.start()
        #expect(await job.waitUntilSettled() == .complete)
        #expect(storage.device(dst)?.directIO.enabled == false)
        await job.close()
        let out = open(dst, O_RDONLY)
        defer { close(out) }
        var back = [UInt8](repeating: 0, count: 2 << 20)
        for (off, data) in expected {
            #expect(pread(out, &back, back.count, off_t(off)) == back.count)
            if back != data { Issue.record("destination differs at \(off)"); break }
        }
    }

    /// End to end on real files with direct I/O: a sparse image with small holes inside batches,
    /// zero runs and an unaligned tail, with and without discard; destination byte-identical, the
    /// copier's I/O direct except the tail.
    @Test(arguments: [false, true]) func engineCopiesDirect(discard: Bool) async throws {
        let dir = TempDir("dio-e2e")
        try #require(Self.supportsDirectIO(dir.path), "\(dir.path) is not on ext4/XFS/btrfs")
        let size = (24 << 20) + 12345
        let image = TestImage.make(size: size, seed: discard ? 51 : 52, chunk: 20 << 10)
        try image.write(to: dir.file("src.img"))
        let storage = RecordingPosixStorage(directIO: true)
        let cfg = JobConfiguration(
            name: "dio", sourcePath: dir.file("src.img"), destPath: dir.file("dst.img"),
            metadataPath: dir.file("meta"), regionSize: 64 << 10, discardSource: discard)
        let job = try await HydrationJob.create(cfg, storage: storage, io: io, logger: testLogger)
        try await job.start()
        #expect(await job.waitUntilSettled() == .complete)
        let src = try #require(storage.device(dir.file("src.img")))
        let dst = try #require(storage.device(dir.file("dst.img")))
        #expect(src.directIO.enabled && dst.directIO.enabled)
        #expect(dst.directCalls.load(ordering: .relaxed) >= 20)  // about one write per 1 MiB batch
        // Only the unaligned tail goes through the page cache (12345 % 4096 bytes: one call).
        #expect(dst.bufferedCalls.load(ordering: .relaxed) <= 1)
        #expect(src.directCalls.load(ordering: .relaxed) > 50)
        #expect(src.bufferedCalls.load(ordering: .relaxed) <= 2)
        #expect(dst.directRefused.load(ordering: .relaxed) == 0 && src.directRefused.load(ordering: .relaxed) == 0)
        await job.close()
        #expect(byteDifference(readFile(dir.file("dst.img")), image.bytes) == nil)
        if discard { #expect(allocatedBytes(dir.file("src.img")) == 0) }
    }

    /// IOMode.auto: direct for a regular-file source however much of it is allocated (round 5),
    /// buffered when the allocation is unknown (a block device, NBD); buffered and direct as asked.
    @Test func autoRule() {
        let G: UInt64 = 1 << 30
        // A regular file (its allocation known): direct, however much of it is allocated.
        #expect(IOMode.auto.choice(sourceSize: 100 * G, sourceAllocated: G).direct)
        #expect(IOMode.auto.choice(sourceSize: 100 * G, sourceAllocated: 50 * G).direct)
        #expect(IOMode.auto.choice(sourceSize: 2 * G, sourceAllocated: 2 * G).direct)
        #expect(IOMode.auto.choice(sourceSize: 2 * G, sourceAllocated: 0).direct)
        // A block device or NBD source: buffered.
        #expect(!IOMode.auto.choice(sourceSize: 2 * G, sourceAllocated: nil).direct)
        #expect(
            IOMode.auto.choice(sourceSize: 100 * G, sourceAllocated: G).why == "io=auto: file source, 1.0 % allocated")
        #expect(
            IOMode.auto.choice(sourceSize: 2 * G, sourceAllocated: 2 * G).why
                == "io=auto: file source, 100.0 % allocated")
        // A file smaller than a block has a whole block allocated: still 100 % (the round-5
        // attack saw "409600.0 % allocated" for a 1-byte file).
        #expect(
            IOMode.auto.choice(sourceSize: 1, sourceAllocated: 4096).why == "io=auto: file source, 100.0 % allocated")
        #expect(
            IOMode.auto.choice(sourceSize: 4097, sourceAllocated: 8192).why == "io=auto: file source, 100.0 % allocated"
        )
        #expect(IOMode.direct.choice(sourceSize: 2 * G, sourceAllocated: 2 * G) == (true, "io=direct"))
        #expect(IOMode.buffered.choice(sourceSize: 100 * G, sourceAllocated: 0) == (false, "io=buffered"))
    }

    /// A job's `io` on real files: `auto` copies a sparse source (3 % data) and a dense one direct,
    /// `direct` and `buffered` override it, a reopened job chooses again from its own
    /// setting; status says which and why, and every copy is exact.
    @Test func jobIOModeChoosesDirectOrBuffered() async throws {
        let dir = TempDir("dio-mode")
        try #require(Self.supportsDirectIO(dir.path), "\(dir.path) is not on ext4/XFS/btrfs")
        // Sparse: 2 MiB of data in 64 MiB. Dense: 4 MiB of random bytes.
        let sparse = dir.file("sparse.img"), dense = dir.file("dense.img")
        var rng = SeededRandom(seed: 71)
        var data = [UInt8](repeating: 0, count: 2 << 20)
        rng.fill(&data, 0..<data.count)
        var fd = open(sparse, O_RDWR | O_CREAT, 0o600)
        #expect(pwrite(fd, data, data.count, off_t(20 << 20)) == data.count)
        #expect(ftruncate(fd, off_t(64 << 20)) == 0)
        fsync(fd); close(fd)
        var denseBytes = [UInt8](repeating: 0, count: 4 << 20)
        rng.fill(&denseBytes, 0..<denseBytes.count)
        fd = open(dense, O_RDWR | O_CREAT, 0o600)
        #expect(pwrite(fd, denseBytes, denseBytes.count, 0) == denseBytes.count)
        fsync(fd); close(fd)
        var expectedSparse = [UInt8](repeating: 0, count: 64 << 20)
        expectedSparse.replaceSubrange((20 << 20)..<(22 << 20), with: data)

        let cases: [(String, String, IOMode, Bool, String)] = [
            ("a", sparse, .auto, true, "io=auto: file source, 3.1 % allocated"),
            ("b", dense, .auto, true, "io=auto: file source, 100.0 % allocated"),
            ("c", dense, .direct, true, "io=direct"),
            ("d", sparse, .buffered, false, "io=buffered"),
            ("e", dense, .buffered, false, "io=buffered"),
        ]
        for (name, src, mode, direct, why) in cases {
            let storage = RecordingPosixStorage(directIO: nil)
            let dst = dir.file("\(name).dst"), meta = dir.file("\(name).meta")
            let cfg = JobConfiguration(
                name: name, sourcePath: src, destPath: dst, metadataPath: meta,
                regionSize: 64 << 10, ioMode: mode)
            let job = try await HydrationJob.create(cfg, storage: storage, io: io, logger: testLogger)
            let st = await job.status()
            #expect(st.source.io == (direct ? "direct" : "buffered"), "\(name): \(st.source)")
            #expect(st.dest.io == (direct ? "direct" : "buffered"), "\(name): \(st.dest)")
            #expect(st.source.ioReason?.hasPrefix(why) == true, "\(name): \(st.source)")
            try await job.start()
            #expect(await job.waitUntilSettled() == .complete)
            let d = try #require(storage.device(dst))
            #expect(d.directIO.enabled == direct)
            #expect(
                (d.directCalls.load(ordering: .relaxed) > 0) == direct,
                "\(name): \(d.directCalls.load(ordering: .relaxed)) direct writes")
            await job.close()
            #expect(byteDifference(readFile(dst), src == sparse ? expectedSparse : denseBytes) == nil, "\(name)")
        }
        // Reopened with another setting: chosen again.
        let storage = RecordingPosixStorage(directIO: nil)
        let again = JobConfiguration(
            name: "a", sourcePath: sparse, destPath: dir.file("a.dst"), metadataPath: dir.file("a.meta"),
            regionSize: 64 << 10, ioMode: .buffered)
        let job = try await HydrationJob.open(again, storage: storage, io: io, logger: testLogger)
        let st = await job.status()
        #expect(st.source.io == "buffered" && st.source.ioReason == "io=buffered")
        await job.close()
    }

    /// A source or destination that shrinks under the job (`truncate`) reads as an error before
    /// its size at open, never as zeros; SEEK_DATA finding no more data checks the size too. A
    /// metadata file still reads past its end as zeros.
    @Test func shrunkSourceOrDestinationIsAnErrorNotZeros() throws {
        let dir = TempDir("dio-shrink")
        var rng = SeededRandom(seed: 81)
        var data = [UInt8](repeating: 0, count: 4 << 20)
        rng.fill(&data, 0..<data.count)
        for (mode, direct) in [
            (OpenMode.source(discard: false), false), (.source(discard: false), true),
            (.destination(createSize: nil), false),
        ] {
            let path = dir.file("f-\(direct)-\(mode == .source(discard: false)).img")
            var fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0o600)
            #expect(pwrite(fd, data, data.count, 0) == data.count)
            #expect(ftruncate(fd, 8 << 20) == 0)  // 4 MiB data, then a 4 MiB hole
            close(fd)
            let d = try PosixDevice.open(path, mode: mode, directIO: direct)
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 4096)
            defer { buffer.deallocate(); d.close() }
            try d.read(into: buffer, at: 1 << 20)
            #expect(try d.nextData(from: 5 << 20) == nil, "the trailing hole")
            fd = open(path, O_RDWR)
            #expect(ftruncate(fd, 2 << 20) == 0)
            close(fd)
            do {
                try d.read(into: buffer, at: 3 << 20)
                Issue.record("a read past the new end of a shrunk \(mode) returned zeros")
            } catch {
                #expect(
                    error.errno == EIO && error.detail?.contains("truncated or resized under the job") == true,
                    "\(error)")
                #expect(error.detail?.contains("ends at 2097152 bytes, before the 8388608") == true, "\(error)")
            }
            do {
                _ = try d.nextData(from: 3 << 20)
                Issue.record("SEEK_DATA past the new end of a shrunk \(mode) reported a hole")
            } catch {
                #expect(error.operation == .seek && error.errno == EIO, "\(error)")
            }
            // Before the new end: fine.
            try d.read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<4096]), at: 4096)
        }
        // Metadata: past its end reads as zeros, as before.
        let m = try PosixDevice.open(dir.file("m"), mode: .metadata(create: true), directIO: false)
        defer { m.close() }
        var page = [UInt8](repeating: 0xff, count: 4096)
        try page.withUnsafeMutableBytes { try m.read(into: $0, at: 0) }
        #expect(page.allSatisfy { $0 == 0 })
    }

    /// The attack of round 3 (6a) on the engine: the source is truncated while the job copies it.
    /// The job fails with SourceReadFailed naming the truncation, is never recorded complete, and
    /// the metadata records nothing past the new end as hydrated from zeros.
    @Test(arguments: [IOMode.buffered, .direct]) func sourceTruncatedMidJobFailsTheJob(io mode: IOMode) async throws {
        let dir = TempDir("dio-trunc")
        try #require(Self.supportsDirectIO(dir.path), "\(dir.path) is not on ext4/XFS/btrfs")
        let src = dir.file("src.img"), dst = dir.file("dst.img")
        var rng = SeededRandom(seed: 83)
        var chunk = [UInt8](repeating: 0, count: 1 << 20)
        let fd = open(src, O_RDWR | O_CREAT, 0o600)
        for at in stride(from: 0, to: 64 << 20, by: 4 << 20) {  // 1 MiB of data every 4 MiB
            rng.fill(&chunk, 0..<chunk.count)
            #expect(pwrite(fd, chunk, chunk.count, off_t(at)) == chunk.count)
        }
        #expect(ftruncate(fd, 64 << 20) == 0)
        fsync(fd)
        close(fd)  // nothing else may hold it open (DeviceInUse): truncated by path below, as truncate(1) does
        let storage = RecordingPosixStorage(directIO: nil)
        var t = Tunables.defaults(regionSize: 64 << 10)
        t.rateLimitBytesPerSecond = 8 << 20
        let cfg = JobConfiguration(
            name: "trunc", sourcePath: src, destPath: dst, metadataPath: dir.file("meta"),
            regionSize: 64 << 10, tunables: t, ioMode: mode)
        let job = try await HydrationJob.create(cfg, storage: storage, io: io, logger: testLogger)
        try await job.start()
        try await Task.sleep(for: .milliseconds(400))
        #expect(truncate(src, 16 << 20) == 0)
        t.rateLimitBytesPerSecond = nil
        try await job.update(t)
        #expect(await job.waitUntilSettled() == .failed)
        let st = await job.status()
        #expect(st.error?.code == "SourceReadFailed", "\(String(describing: st.error))")
        #expect(
            st.error?.message.contains("truncated or resized under the job") == true, "\(String(describing: st.error))")
        #expect(st.regions.hydrated < st.regions.total)
        await job.close()
        let (store, _) = try MetadataStore.open(path: dir.file("meta"), storage: PosixStorage(), readOnly: true)
        #expect(!store.header.complete)
    }
}
