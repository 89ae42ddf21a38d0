import Synchronization

/// Reusable, page-aligned I/O buffers. A fresh 1 MiB allocation per batch costs an mmap, 256 page
/// faults and a munmap each time; reusing a few buffers costs none. Buffers are handed out
/// exclusively (take, use on one I/O thread, give back); the pool only keeps their addresses.
final class IOBufferPool: Sendable {
    /// Free buffers as (address, capacity); addresses are plain integers so the pool is Sendable.
    private let free = Mutex<[(UInt, Int)]>([])
    private let keep: Int

    init(keep: Int = 16) { self.keep = keep }

    deinit {
        free.withLock { list in
            for (address, _) in list { UnsafeMutableRawPointer(bitPattern: address)?.deallocate() }
        }
    }

    /// A buffer of at least `count` bytes.
    func take(_ count: Int) -> UnsafeMutableRawBufferPointer {
        let reused: (UInt, Int)? = free.withLock { list in
            if let i = list.firstIndex(where: { $0.1 >= count }) { return list.remove(at: i) }
            return nil
        }
        if let (address, capacity) = reused, let p = UnsafeMutableRawPointer(bitPattern: address) {
            return UnsafeMutableRawBufferPointer(start: p, count: capacity)
        }
        return UnsafeMutableRawBufferPointer.allocate(byteCount: max(count, 1), alignment: 4096)
    }

    func give(_ buffer: UnsafeMutableRawBufferPointer) {
        guard let base = buffer.baseAddress else { return }
        let kept = free.withLock { list -> Bool in
            guard list.count < keep else { return false }
            list.append((UInt(bitPattern: base), buffer.count))
            return true
        }
        if !kept { buffer.deallocate() }
    }
}
