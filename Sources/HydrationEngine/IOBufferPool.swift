import HydrationStorage
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// Reusable I/O buffers, physically contiguous where the kernel allows it.
///
/// Reuse: a fresh 1 MiB allocation per batch costs an mmap, 256 page faults and a munmap each
/// time; reusing a few buffers costs none. Buffers are handed out exclusively (take, use on one
/// I/O thread, give back); the pool only keeps their addresses.
///
/// Contiguity: a direct read or write goes to the device straight from this
/// memory, and the block layer makes one segment per physically contiguous piece of it. With
/// 4 KiB pages a 1 MiB request is 256 segments, and a virtio-blk device without indirect
/// descriptors (Firecracker's, this machine's) spends one ring descriptor per segment: one such
/// request filled the 256-entry ring, the rest were requeued (`block:block_rq_requeue`: 1,455 of
/// 3,198 requests), and direct reads of the holes image took 0.94 s. From transparent huge pages
/// (2 MiB, `MADV_HUGEPAGE`) a 1 MiB request is one segment: 8 requeues, 0.39 s. So buffers are
/// carved out of 2 MiB-aligned anonymous mappings, and a buffer of 1 MiB or less never crosses
/// a 2 MiB boundary. Where the kernel gives no huge page (THP off, memory fragmented) the
/// mapping is plain pages and nothing is lost but the speed-up.
package final class IOBufferPool: Sendable {
    /// Free buffers as (address, capacity); addresses are plain integers so the pool is Sendable.
    private let free = Mutex<[(UInt, Int)]>([])
    /// Addresses this pool mapped (munmap on release); anything else given to it was allocated
    /// with `UnsafeMutableRawBufferPointer.allocate` (deallocate on release).
    private let mapped = Mutex<Set<UInt>>([])
    private let keep: Int
    /// At most this many bytes are kept free: with 64 MiB regions a batch is 64 MiB, and 16 kept
    /// buffers of that size would hold 816 MiB after the copy.
    private let keepBytes: Int

    /// The huge page size this pool aligns to.
    package static let hugePage = 2 << 20
    /// Buffers are at least this large (smaller requests get one too), so that batches of
    /// different lengths reuse the same buffers.
    package static let minimumCapacity = 1 << 20

    package init(keep: Int = 16, keepBytes: Int = 32 << 20) { self.keep = keep; self.keepBytes = keepBytes }

    deinit {
        let list = free.withLock { $0 }
        for (address, capacity) in list { release(address, capacity) }
    }

    /// The capacity of the buffer `take(count)` hands out: a power of two of at least 1 MiB.
    package static func capacity(for count: Int) -> Int {
        var c = minimumCapacity
        while c < count { c <<= 1 }
        return c
    }

    /// A buffer of at least `count` bytes, aligned to its capacity (at least 1 MiB).
    package func take(_ count: Int) -> UnsafeMutableRawBufferPointer {
        let reused: (UInt, Int)? = free.withLock { list in
            if let i = list.firstIndex(where: { $0.1 >= count }) { return list.remove(at: i) }
            return nil
        }
        if let (address, capacity) = reused, let p = UnsafeMutableRawPointer(bitPattern: address) {
            return UnsafeMutableRawBufferPointer(start: p, count: capacity)
        }
        let capacity = IOBufferPool.capacity(for: count)
        guard let pieces = IOBufferPool.mapAligned(capacity) else {
            return UnsafeMutableRawBufferPointer.allocate(byteCount: capacity, alignment: 4096)
        }
        mapped.withLock { set in for p in pieces { set.insert(UInt(bitPattern: p)) } }
        // A 1 MiB buffer comes from a 2 MiB mapping: the other half waits in the pool.
        for p in pieces.dropFirst() {
            give(UnsafeMutableRawBufferPointer(start: p, count: capacity))
        }
        return UnsafeMutableRawBufferPointer(start: pieces[0], count: capacity)
    }

    package func give(_ buffer: UnsafeMutableRawBufferPointer) {
        guard let base = buffer.baseAddress else { return }
        let kept = free.withLock { list -> Bool in
            guard list.count < keep, list.reduce(buffer.count, { $0 + $1.1 }) <= keepBytes else { return false }
            list.append((UInt(bitPattern: base), buffer.count))
            return true
        }
        if !kept { release(UInt(bitPattern: base), buffer.count) }
    }

    /// Releases every free buffer: a copier calls it when its run ends, so that a finished or
    /// paused job holds no buffers (otherwise about 10 MiB of RSS per finished job stays with
    /// the daemon).
    package func drain() {
        let list = free.withLock { list in
            defer { list = [] }
            return list
        }
        for (address, capacity) in list { release(address, capacity) }
    }

    /// Bytes of free buffers kept (for tests).
    package var keptBytes: Int { free.withLock { $0.reduce(0) { $0 + $1.1 } } }

    /// Whether `buffer` came from a huge-page-aligned mapping of this pool (for tests).
    package func isMapped(_ buffer: UnsafeMutableRawBufferPointer) -> Bool {
        guard let base = buffer.baseAddress else { return false }
        return mapped.withLock { $0.contains(UInt(bitPattern: base)) }
    }

    private func release(_ address: UInt, _ capacity: Int) {
        guard let p = UnsafeMutableRawPointer(bitPattern: address) else { return }
        let wasMapped = mapped.withLock { $0.remove(address) != nil }
        if wasMapped {
            // Unmapping half of a huge page splits it; the other half stays mapped and in place.
            _ = munmap(p, capacity)
        } else {
            p.deallocate()
        }
    }

    /// Maps max(capacity, 2 MiB) bytes at a 2 MiB boundary with `MADV_HUGEPAGE` and splits the
    /// mapping into buffers of `capacity`. Nil if the mapping fails.
    private static func mapAligned(_ capacity: Int) -> [UnsafeMutableRawPointer]? {
        let length = max(capacity, hugePage)
        // Map one huge page more than needed, then cut the head and tail off at 2 MiB boundaries.
        let raw = mmap(nil, length + hugePage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        guard let raw, raw != MAP_FAILED else { return nil }
        let start = UInt(bitPattern: raw)
        let aligned = (start + UInt(hugePage) - 1) & ~UInt(hugePage - 1)
        let head = Int(aligned - start)
        if head > 0 { _ = munmap(raw, head) }
        let tail = hugePage - head
        guard let base = UnsafeMutableRawPointer(bitPattern: aligned) else { return nil }
        if tail > 0 { _ = munmap(base + length, tail) }
        // Advice only: without it (THP "madvise" mode) no huge page is given; a failure leaves
        // plain pages.
        _ = madvise(base, length, MADV_HUGEPAGE)
        return stride(from: 0, to: length, by: capacity).map { base + $0 }
    }
}
