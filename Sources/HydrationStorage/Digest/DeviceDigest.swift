import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// What `ImageDigest.digest(of:)` found.
public struct DeviceDigestResult: Sendable, Equatable {
    /// The image digest (print with `ImageDigest.format`).
    public var digest: ImageDigest.Hash
    public var size: UInt64
    /// Bytes read from the device (chunks that hold data, as its data map says).
    public var bytesRead: UInt64
    /// Bytes the data map reported as holes: neither read nor hashed.
    public var bytesSkipped: UInt64
    /// Hashing threads used.
    public var threads: Int
}

extension ImageDigest {
    /// Bytes one worker reads and hashes at a time (a node: 256 leaves).
    public static let defaultChunkBytes = 1 << 20

    /// Hashing threads by default: the online CPUs, at most 8.
    public static var defaultThreads: Int {
        let n = sysconf(Int32(_SC_NPROCESSORS_ONLN))
        return max(1, min(8, n > 0 ? n : 1))
    }

    /// The image digest of everything `device` holds (its `info.size` bytes).
    ///
    /// Holes come from the device's data map (`nextData`: SEEK_DATA/SEEK_HOLE on a file, NBD
    /// BLOCK_STATUS on a remote export; a block device reports none) and are inserted as zero
    /// subtrees without reading. The rest is read in aligned chunks of `chunkBytes` (a power of
    /// two >= 4096) by `threads` POSIX threads of their own (blocking reads and hashing stay off
    /// Swift's cooperative pool), each chunk hashed as a subtree (all-zero leaves not hashed)
    /// and inserted into one accumulator in whatever order the chunks finish.
    /// Throws the first error of the device (the other threads stop at their next chunk).
    public static func digest(
        of device: any StorageDevice, threads: Int = defaultThreads, chunkBytes: Int = defaultChunkBytes
    ) throws(StorageError) -> DeviceDigestResult {
        precondition(chunkBytes >= leafSize && chunkBytes & (chunkBytes - 1) == 0, "a power of two >= 4096")
        let size = device.info.size
        let job = DigestJob(device: device, size: size, chunk: UInt64(chunkBytes))
        let workers = max(1, threads)
        var tids = [pthread_t]()
        for _ in 0..<(workers - 1) {
            let box = Unmanaged.passRetained(job).toOpaque()
            var tid = pthread_t()
            let rc = pthread_create(
                &tid, nil,
                { arg in
                    Unmanaged<DigestJob>.fromOpaque(arg!).takeRetainedValue().work()
                    return nil
                }, box)
            if rc != 0 {
                // Fewer threads than asked is still a digest: carry on with those that started.
                Unmanaged<DigestJob>.fromOpaque(box).release()
                break
            }
            tids.append(tid)
        }
        job.work()  // the calling thread is one of the workers
        for tid in tids { pthread_join(tid, nil) }
        return try job.result(threads: tids.count + 1)
    }
}

/// The shared state of one `ImageDigest.digest(of:)`: a cursor over the device's data map that
/// hands out chunks and hole runs, and the accumulator the workers insert into.
private final class DigestJob: Sendable {
    enum Work {
        /// A chunk to hash, and the parts of it the data map says may hold data (the rest are
        /// holes: not read).
        case data(Range<UInt64>, extents: [Range<UInt64>])
        case zeros(Range<UInt64>)
    }

    struct Cursor {
        var next: UInt64 = 0
        /// The data extent at or after `next` (from `nextData`), nil once the rest is a hole.
        var data: Range<UInt64>?
        var mapRead = false
        var restIsHole = false
        var emptyDone = false
    }

    struct Totals {
        var accumulator: ImageDigestAccumulator
        var bytesRead: UInt64 = 0
        var bytesSkipped: UInt64 = 0
        var error: StorageError?
    }

    let device: any StorageDevice
    let size: UInt64
    let chunk: UInt64
    let cursor = Mutex(Cursor())
    let totals: Mutex<Totals>

    init(device: any StorageDevice, size: UInt64, chunk: UInt64) {
        self.device = device
        self.size = size
        self.chunk = chunk
        self.totals = Mutex(Totals(accumulator: ImageDigestAccumulator(size: size)))
    }

    /// The next piece of work, or nil when everything is handed out or a worker failed.
    /// Consults the data map under the lock (one lseek pair or BLOCK_STATUS per extent).
    func next() throws(StorageError) -> Work? {
        if totals.withLock({ $0.error != nil }) { return nil }
        return try cursor.withLock { (c: inout Cursor) throws(StorageError) -> Work? in
            if size == 0 {
                if c.emptyDone { return nil }
                c.emptyDone = true
                return .data(0..<0, extents: [])
            }
            guard c.next < size else { return nil }
            if !c.restIsHole && (!c.mapRead || (c.data.map { $0.upperBound <= c.next } ?? false)) {
                c.data = try device.nextData(from: c.next)
                c.mapRead = true
                if c.data == nil { c.restIsHole = true }
            }
            let start = c.next
            guard !c.restIsHole, let d = c.data else {
                c.next = size
                return .zeros(start..<size)
            }
            let chunkEnd = min(start + chunk, size)
            if d.lowerBound >= chunkEnd {
                // Whole chunks of hole before the extent: one zero run.
                let end = d.lowerBound / chunk * chunk
                c.next = end
                return .zeros(start..<end)
            }
            c.next = chunkEnd
            // Every extent that meets the chunk; the last one looked at stays cached when it
            // reaches past the chunk.
            var extents = [Range<UInt64>]()
            var e = d
            while true {
                let lo = max(e.lowerBound, start)
                let hi = min(e.upperBound, chunkEnd)
                if lo < hi { extents.append(lo..<hi) }
                if e.upperBound >= chunkEnd { break }
                guard let following = try device.nextData(from: e.upperBound) else {
                    c.restIsHole = true
                    break
                }
                e = following
                if e.lowerBound >= chunkEnd { break }
            }
            c.data = c.restIsHole ? nil : e
            return .data(start..<chunkEnd, extents: extents)
        }
    }

    func work() {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(chunk), alignment: 4096)
        defer { buffer.deallocate() }
        while true {
            do {
                guard let w = try next() else { return }
                switch w {
                case .zeros(let r):
                    totals.withLock { t in
                        t.bytesSkipped += UInt64(r.count)
                        do { try t.accumulator.insertZeros(offset: r.lowerBound, length: UInt64(r.count)) } catch {
                            preconditionFailure("digest of \(device.info.path): \(error)")
                        }
                    }
                case .data(let r, let extents):
                    let bytes = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<r.count])
                    let covered = extents.reduce(0) { $0 + $1.count }
                    if covered == r.count {
                        if r.count > 0 { try device.read(into: bytes, at: r.lowerBound) }
                    } else {
                        // Holes inside the chunk read as zeros without asking the device.
                        bytes.initializeMemory(as: UInt8.self, repeating: 0)
                        for e in extents {
                            let at = Int(e.lowerBound - r.lowerBound)
                            try device.read(
                                into: UnsafeMutableRawBufferPointer(rebasing: bytes[at..<(at + e.count)]),
                                at: e.lowerBound)
                        }
                    }
                    let hash = ImageDigest.subtree(of: UnsafeRawBufferPointer(bytes))
                    totals.withLock { t in
                        t.bytesRead += UInt64(covered)
                        t.bytesSkipped += UInt64(r.count - covered)
                        // The cursor hands out nodes only: a refusal here is a bug of this file.
                        do {
                            try t.accumulator.insert(offset: r.lowerBound, length: UInt64(r.count), digest: hash)
                        } catch {
                            preconditionFailure("digest of \(device.info.path): \(error)")
                        }
                    }
                }
            } catch {
                totals.withLock { t in
                    if t.error == nil { t.error = error }
                }
                return
            }
        }
    }

    func result(threads: Int) throws(StorageError) -> DeviceDigestResult {
        let t = totals.withLock { $0 }
        if let e = t.error { throw e }
        do {
            return DeviceDigestResult(
                digest: try t.accumulator.finalize(), size: size, bytesRead: t.bytesRead,
                bytesSkipped: t.bytesSkipped, threads: threads)
        } catch {
            preconditionFailure("digest of \(device.info.path): \(error)")
        }
    }
}
