import CNBD
import Dispatch
import HydrationStorage
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

extension RemoteNBDDevice {

    // MARK: StorageDevice

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(StorageError) {
        guard let base = buffer.baseAddress, buffer.count > 0 else { return }
        let end = min(offset + UInt64(buffer.count), info.size)
        let n = offset < end ? Int(end - offset) : 0
        if n < buffer.count {
            // Past the end of the export: zeros, like a short file.
            (base + n).initializeMemory(as: UInt8.self, repeating: 0, count: buffer.count - n)
        }
        guard n > 0 else { return }
        let m = UInt64(max(1, offer.minimumBlock))
        let lo = offset / m * m
        let hi = min(info.size, (end + m - 1) / m * m)
        if lo == offset && hi == end {
            try withConnection(.read, offset: offset, length: UInt64(n)) { (h, snap) throws(Failure) in
                try preadOn(h, base, count: n, at: offset, snap: snap)
            }
            noteRecent(base, count: n, at: offset)
            return
        }
        // Widened to the server's minimum block size, then the asked part copied out.
        let wide = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(hi - lo), alignment: 4096)
        defer { wide.deallocate() }
        try withConnection(.read, offset: offset, length: UInt64(n)) { (h, snap) throws(Failure) in
            try preadOn(h, wide.baseAddress!, count: Int(hi - lo), at: lo, snap: snap)
        }
        base.copyMemory(from: wide.baseAddress! + Int(offset - lo), byteCount: n)
        noteRecent(UnsafeRawPointer(wide.baseAddress!), count: Int(hi - lo), at: lo)
    }

    func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(StorageError) {
        throw StorageError(
            .write, path: uri, errno: EBADF, offset: offset, length: UInt64(buffer.count),
            detail: "a remote source is never written")
    }

    func sync() throws(StorageError) {
        guard offer.canFlush else { return }
        try withConnection(.sync, offset: nil, length: nil, patient: true) { (h, snap) throws(Failure) in
            var err: Int32 = 0
            if let f = Self.outcome(hyd_nbd_flush(h, Self.requestTimeoutMs, cancelGeneration, snap, &err), err, at: nil)
            {
                throw f
            }
        }
    }

    func release(offset: UInt64, length: UInt64) throws(StorageError) {
        guard length > 0 else { return }
        guard offer.canTrim else {
            throw StorageError(
                .release, path: uri, errno: EOPNOTSUPP, offset: offset, length: length,
                detail: "the server does not offer TRIM")
        }
        let end = min(offset + length, info.size)
        guard offset < end else { return }
        // Once released, a block reads differently: it is no witness any more (before the TRIM
        // is sent, so a reconnection running meanwhile does not count it against the server).
        state.withLock { s in s.witnesses.removeAll { $0.overlaps(offset, end) } }
        // NBD requests carry a 32-bit length.
        let step: UInt64 = 1 << 30
        var at = offset
        while at < end {
            let len = min(step, end - at)
            let start = at
            try withConnection(.release, offset: start, length: len, patient: true) { (h, snap) throws(Failure) in
                var err: Int32 = 0
                if let f = Self.outcome(
                    hyd_nbd_trim(h, len, start, Self.requestTimeoutMs, cancelGeneration, snap, &err), err, at: start)
                {
                    throw f
                }
            }
            at += len
        }
    }

    func zeroOut(offset: UInt64, length: UInt64) throws(StorageError) {
        throw StorageError(
            .zeroOut, path: uri, errno: EBADF, offset: offset, length: length,
            detail: "a remote source is never written")
    }

    /// Extents (length, data?) consecutive from `at`, from the cache or one BLOCK_STATUS.
    func extents(at: UInt64) throws(StorageError) -> [(UInt64, Bool)] {
        let cached: [(UInt64, Bool)]? = state.withLock { s in
            var pos = s.extentStart
            for (i, e) in s.extents.enumerated() {
                if at >= pos && at < pos + e.0 {
                    var out = Array(s.extents[i...])
                    out[0].0 = pos + e.0 - at
                    return out
                }
                pos += e.0
            }
            return nil
        }
        if let cached { return cached }
        let want = min(info.size - at, 1 << 30)
        let capacity = 4096
        let found = try withConnection(.seek, offset: at, length: want) {
            (h, snap) throws(Failure) -> [(UInt64, Bool)] in
            var lengths = [UInt64](repeating: 0, count: capacity)
            var flags = [UInt32](repeating: 0, count: capacity)
            var err: Int32 = 0
            var n: Int64 = 0
            let r = lengths.withUnsafeMutableBufferPointer { l in
                flags.withUnsafeMutableBufferPointer { f in
                    hyd_nbd_extents(
                        h, at, want, l.baseAddress, f.baseAddress, capacity, Self.requestTimeoutMs, cancelGeneration,
                        snap, &err, &n)
                }
            }
            if let f = Self.outcome(r, err, at: at) { throw f }
            var out: [(UInt64, Bool)] = []
            for i in 0..<Int(n) where lengths[i] > 0 {
                // Zero extents (holes that read as zeros, and allocated zeros) need no copy.
                out.append((lengths[i], flags[i] & UInt32(LIBNBD_STATE_ZERO) == 0))
            }
            return out
        }
        if found.isEmpty {
            throw StorageError(.seek, path: uri, errno: EIO, offset: at, detail: "BLOCK_STATUS returned no extent")
        }
        state.withLock { s in
            s.extentStart = at; s.extents = found
        }
        return found
    }

    func nextData(from offset: UInt64) throws(StorageError) -> Range<UInt64>? {
        guard offset < info.size else { return nil }
        guard offer.blockStatus else { return offset..<info.size }
        var at = offset
        var dataStart: UInt64? = nil
        while at < info.size {
            for (length, isData) in try extents(at: at) {
                if isData {
                    if dataStart == nil { dataStart = at }
                } else if let s = dataStart {
                    return s..<at
                }
                at = min(info.size, at + length)
                // A long data extent is returned in pieces; the next call goes on from its end.
                if let s = dataStart, at - s >= 1 << 30 { return s..<at }
                if at >= info.size { break }
            }
        }
        return dataStart.map { $0..<info.size }
    }

    func dropCache(offset: UInt64, length: UInt64) {}

    /// One attempt at a working connection (the job's watcher, while the source is down).
    func probeConnection() throws(StorageError) {
        try withConnection(.open, offset: nil, length: nil) { (h, _) throws(Failure) in
            if hyd_nbd_is_usable(h) == 0 { throw .lost(ENOTCONN, "connection not usable") }
        }
    }

    func allocatedBytes() -> UInt64? { nil }

    func close() {
        let conns = state.withLock { s -> [NBDConnection] in
            s.closed = true
            s.waitEpoch += 1
            bumpCancel()
            let c = s.idle
            s.idle = []
            return c
        }
        for c in conns { c.close() }
    }
}
