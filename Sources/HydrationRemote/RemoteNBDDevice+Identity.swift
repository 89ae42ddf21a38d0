import CNBD
import Dispatch
import HydrationStorage
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

extension RemoteNBDDevice {
    // MARK: identity

    /// What every new connection must find again from now on: the recorded fingerprint's
    /// `recorded` samples (those that may still be read), plus `randomWitnesses` blocks chosen
    /// at random where `mayRead` allows and the source has data, read now. Blocking.
    func armIdentity(recorded: [RemoteIdentity.Sample], mayRead: (Range<UInt64>) -> Bool) throws(StorageError) {
        let block = UInt64(Self.witnessSize)
        var out = recorded.filter { $0.offset + block <= info.size && mayRead($0.offset..<$0.offset + block) }
            .map { Witness(offset: $0.offset, crc: $0.crc, kind: .recorded) }
        let blocks = info.size / block
        var tries = 0
        var added = 0
        var rng = SystemRandomNumberGenerator()
        while blocks > 0 && added < Self.randomWitnesses && tries < Self.randomWitnesses * 4 {
            tries += 1
            var at = UInt64.random(in: 0..<blocks, using: &rng) * block
            // A sparse disk: the next data, so that the witness is not a hole (zeros match any hole).
            if let d = try nextData(from: at) { at = d.lowerBound / block * block } else { continue }
            guard at + block <= info.size, mayRead(at..<at + block), !out.contains(where: { $0.offset == at }) else {
                continue
            }
            let bytes = try read(count: Self.witnessSize, at: at)
            if bytes.allSatisfy({ $0 == 0 }) { continue }
            out.append(Witness(offset: at, crc: bytes.withUnsafeBytes { CRC32C.checksum($0) }, kind: .random))
            added += 1
        }
        state.withLock { s in
            // Recent witnesses taken by the reads above stay.
            s.witnesses =
                out + s.witnesses.filter { w in w.kind == .recent && !out.contains(where: { $0.offset == w.offset }) }
        }
    }

    var witnessesForTesting: [Witness] { state.withLock { $0.witnesses } }

    /// A block of a successful read becomes a witness (not a block of zeros: it would match any hole).
    func noteRecent(_ base: UnsafeRawPointer, count: Int, at offset: UInt64) {
        let block = Self.witnessSize
        let first = (offset + UInt64(block) - 1) / UInt64(block) * UInt64(block)
        guard first + UInt64(block) <= offset + UInt64(count) else { return }
        let n = Int((offset + UInt64(count) - first) / UInt64(block))
        let at = first + UInt64(Int.random(in: 0..<n)) * UInt64(block)
        let p = UnsafeRawBufferPointer(start: base + Int(at - offset), count: block)
        if !p.contains(where: { $0 != 0 }) { return }
        let w = Witness(offset: at, crc: CRC32C.checksum(p), kind: .recent)
        state.withLock { s in
            guard s.unconfirmed == nil, !s.witnesses.contains(where: { $0.offset == at }) else { return }
            s.witnesses.append(w)
            let recent = s.witnesses.indices.filter { s.witnesses[$0].kind == .recent }
            if recent.count > Self.recentWitnesses { s.witnesses.remove(at: recent[0]) }
        }
    }

    /// Is the server behind `c` (a new connection) still this job's export? Returns nil when it
    /// is, the reason when it is another (the caller makes the device unconfirmed); throws when
    /// it could not tell (the connection failed: still down).
    func differences(_ c: NBDConnection, snap: Int32) throws(Failure) -> String? {
        let o = c.offer
        var diffs: [String] = []
        if o.size != offer.size { diffs.append("\(o.size) bytes, was \(offer.size)") }
        if o.exportName != offer.exportName { diffs.append("export name '\(o.exportName)', was '\(offer.exportName)'") }
        if o.description != offer.description {
            diffs.append(
                "description \(o.description.map { "'\($0)'" } ?? "none"), was \(offer.description.map { "'\($0)'" } ?? "none")"
            )
        }
        if o.canTrim != offer.canTrim || o.canFlush != offer.canFlush || o.canMultiConn != offer.canMultiConn
            || o.blockStatus != offer.blockStatus
        {
            diffs.append(
                "flags trim=\(o.canTrim) flush=\(o.canFlush) multi-conn=\(o.canMultiConn) block-status=\(o.blockStatus), were \(offer.canTrim) \(offer.canFlush) \(offer.canMultiConn) \(offer.blockStatus)"
            )
        }
        if o.minimumBlock != offer.minimumBlock || o.maximumRequest != offer.maximumRequest {
            diffs.append(
                "block sizes \(o.minimumBlock)..\(o.maximumRequest), were \(offer.minimumBlock)..\(offer.maximumRequest)"
            )
        }
        if !diffs.isEmpty { return "it now offers another export (" + diffs.joined(separator: "; ") + ")" }
        guard let h = c.handle else { throw .lost(ENOTCONN, "connection closed") }
        let witnesses = state.withLock { $0.witnesses }
        var mismatched: [Witness] = []
        for w in witnesses {
            let crc = try readBlockCRC(h, at: w.offset, snap: snap)
            if crc != w.crc { mismatched.append(Witness(offset: w.offset, crc: crc, kind: w.kind)) }
        }
        // A witness released meanwhile (by another connection) no longer has to match.
        let still = state.withLock { s in mismatched.filter { m in s.witnesses.contains { $0.offset == m.offset } } }
        guard !still.isEmpty else { return nil }
        let shown = still.prefix(4).map { "block at \($0.offset) (\($0.kind))" }.joined(separator: ", ")
        return
            "\(still.count) of \(witnesses.count) witness blocks differ (\(shown)): it serves another disk of the same size"
    }

    /// The CRC32C of the 4 KiB block at `offset` read on `h` (widened to the minimum block size).
    func readBlockCRC(_ h: OpaquePointer, at offset: UInt64, snap: Int32) throws(Failure) -> UInt32 {
        let m = UInt64(max(1, offer.minimumBlock))
        let lo = offset / m * m
        let hi = min(info.size, (offset + UInt64(Self.witnessSize) + m - 1) / m * m)
        let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(hi - lo), alignment: 4096)
        defer { buf.deallocate() }
        try preadOn(h, buf.baseAddress!, count: Int(hi - lo), at: lo, snap: snap)
        return CRC32C.checksum(
            UnsafeRawBufferPointer(rebasing: buf[Int(offset - lo)..<Int(offset - lo) + Self.witnessSize]))
    }
}
