import HydrationStorage
import Logging

#if canImport(Glibc)
    import Glibc
#endif

/// One batch's I/O, run on an I/O thread: read, zero check, write or zero-out, with retries.
package struct BatchJob: Sendable {
    package let source: SourceReader
    package let dest: any StorageDevice
    package let geometry: Geometry
    package let zeroDestination: Bool
    package let retryDelaysMs: [UInt64]
    package let logger: Logger
    package let buffers: IOBufferPool
    /// Verified release: once written, the batch's range is read back from the device (bypassing
    /// the page cache) and compared with what was read from the source, zeros for hole and zero
    /// regions, before the batch reports success, hence before its claim ends and the committer
    /// hears of its regions.
    package let verify: Bool

    package init(
        source: SourceReader, dest: any StorageDevice, geometry: Geometry, zeroDestination: Bool,
        retryDelaysMs: [UInt64], logger: Logger, buffers: IOBufferPool, verify: Bool = false
    ) {
        self.source = source; self.dest = dest; self.geometry = geometry; self.zeroDestination = zeroDestination
        self.retryDelaysMs = retryDelaysMs; self.logger = logger; self.buffers = buffers
        self.verify = verify
    }

    package func execute(_ work: Copier.Work, io: IOExecutor) async -> Result<Copier.BatchResult, HydrationError> {
        var attempt = 0
        while true {
            do {
                let r = try await io.run { try self.perform(work) }
                return .success(r)
            } catch let e as BatchFailure {
                // Out of space is not retried: the job pauses until space is freed. Nor is a
                // writeback error: it is final, like a failed fdatasync.
                if e.error.code == .noSpace || e.error.code == .commitFailed || e.error.code == .sourceUnavailable
                    || e.error.code == .deviceUnconfirmed || e.error.code == .destinationMismatch
                    || attempt >= retryDelaysMs.count
                {
                    if attempt > 0 {
                        logger.error("giving up after \(attempt) retries", metadata: ["error": "\(e.error)"])
                    }
                    return .failure(e.error)
                }
                logger.warning("I/O failed, retrying", metadata: ["error": "\(e.error)", "attempt": "\(attempt + 1)"])
                try? await Task.sleep(nanoseconds: retryDelaysMs[attempt] * 1_000_000)
                attempt += 1
            } catch {
                return .failure(HydrationError(.ioError, "\(error)", region: work.regions.lowerBound))
            }
        }
    }

    package struct BatchFailure: Error { var error: HydrationError }

    package func perform(_ work: Copier.Work) throws(BatchFailure) -> Copier.BatchResult {
        let bytes = geometry.byteRange(of: work.regions)
        let length = Int(bytes.upperBound - bytes.lowerBound)
        switch work {
        case .hole(let regions):
            if zeroDestination {
                try zero(bytes.lowerBound, UInt64(length), region: regions.lowerBound)
            }
            var result = Copier.BatchResult(regions: regions, written: 0, zero: UInt64(length))
            if verify { try verifyZeros(regions, into: &result) }
            return result
        case .copy(let regions):
            let whole = buffers.take(length)
            defer { buffers.give(whole) }
            let buffer = UnsafeMutableRawBufferPointer(rebasing: whole[0..<length])
            // Only the data extents are read (a batch may span small holes of a file); the
            // regions wholly inside a hole are known zero without reading or scanning them.
            let holes: [Range<Int>]
            do {
                holes = try readData(into: buffer, bytes: bytes)
            } catch {
                let region = regionOf(error.offset, default: regions.lowerBound)
                // A remote source whose connection is down: the job pauses itself (HydrationJob); one
                // that is another disk now: it stops (DeviceUnconfirmed).
                let code = HydrationJob.sourceErrorCode(error, remote: source.info.identity.kind == .remote)
                throw BatchFailure(
                    error: HydrationError(code, "region \(region): \(error)", errno: error.errno, region: region))
            }
            let isZero = { (r: Int) -> Bool in
                holes.contains { $0.contains(r) } || regionIsZero(r, in: buffer, base: bytes.lowerBound)
            }

            // Split the batch into runs of data regions (written) and zero regions (not written).
            var written: UInt64 = 0
            var zeroBytes: UInt64 = 0
            var i = regions.lowerBound
            while i < regions.upperBound {
                let zeroRun = isZero(i)
                var j = i + 1
                while j < regions.upperBound && isZero(j) == zeroRun { j += 1 }
                let run = geometry.byteRange(of: i..<j)
                let lo = Int(run.lowerBound - bytes.lowerBound)
                let hi = Int(run.upperBound - bytes.lowerBound)
                if zeroRun {
                    if zeroDestination { try zero(run.lowerBound, run.upperBound - run.lowerBound, region: i) }
                    zeroBytes += run.upperBound - run.lowerBound
                } else {
                    do {
                        try dest.write(UnsafeRawBufferPointer(rebasing: buffer[lo..<hi]), at: run.lowerBound)
                    } catch {
                        let code: HydrationError.Code = error.isNoSpace ? .noSpace : .destWriteFailed
                        let region = regionOf(error.offset, default: i)
                        throw BatchFailure(
                            error: HydrationError(
                                code, "region \(region): \(error)", errno: error.errno, region: region))
                    }
                    written += run.upperBound - run.lowerBound
                    do {
                        try dest.startWriteback(offset: run.lowerBound, length: run.upperBound - run.lowerBound)
                    } catch {
                        // Not retried: data already written may be lost (BatchJob.execute).
                        let region = regionOf(error.offset, default: i)
                        throw BatchFailure(
                            error: HydrationError(
                                .commitFailed,
                                "destination writeback failed at region \(region), metadata left at its last commit: \(error)",
                                errno: error.errno, region: region))
                    }
                }
                i = j
            }
            var result = Copier.BatchResult(regions: regions, written: written, zero: zeroBytes)
            if verify {
                try verifyCopy(
                    regions, expected: UnsafeRawBufferPointer(buffer), isZero: isZero, into: &result)
            }
            return result
        }
    }

    // MARK: verified release

    /// Reads the batch's range back and compares each region with the source's bytes (zeros for
    /// a zero or hole region: the batch zeroed it, or the job was told the destination reads as
    /// zeros). Byte for byte: the source's bytes are still in memory, so no digest is needed to
    /// compare; digests are computed only to report a mismatch.
    private func verifyCopy(
        _ regions: Range<Int>, expected: UnsafeRawBufferPointer, isZero: (Int) -> Bool,
        into result: inout Copier.BatchResult
    ) throws(BatchFailure) {
        let bytes = geometry.byteRange(of: regions)
        let length = Int(bytes.upperBound - bytes.lowerBound)
        let whole = buffers.take(length)
        defer { buffers.give(whole) }
        let found = UnsafeMutableRawBufferPointer(rebasing: whole[0..<length])
        let path = try readBack(into: found, at: bytes.lowerBound, region: regions.lowerBound)
        for r in regions {
            let rb = geometry.byteRange(of: r..<r + 1)
            let lo = Int(rb.lowerBound - bytes.lowerBound)
            let hi = Int(rb.upperBound - bytes.lowerBound)
            let got = UnsafeRawBufferPointer(rebasing: found[lo..<hi])
            if isZero(r) {
                if !isAllZero(got) { throw mismatch(region: r, start: rb.lowerBound, expected: nil, found: got) }
            } else {
                let want = UnsafeRawBufferPointer(rebasing: expected[lo..<hi])
                if memcmp(want.baseAddress!, got.baseAddress!, hi - lo) != 0 {
                    throw mismatch(region: r, start: rb.lowerBound, expected: want, found: got)
                }
            }
        }
        result.verified = UInt64(length)
        result.readBack = path
    }

    /// A hole batch (up to 1 GiB): read back in pieces of whole regions, each must be zeros.
    private func verifyZeros(_ regions: Range<Int>, into result: inout Copier.BatchResult) throws(BatchFailure) {
        let perPiece = max(1, Int((8 << 20) / geometry.regionSize))
        var weakest: ReadBackPath = .direct
        var verified: UInt64 = 0
        var r = regions.lowerBound
        while r < regions.upperBound {
            let piece = r..<min(regions.upperBound, r + perPiece)
            let bytes = geometry.byteRange(of: piece)
            let length = Int(bytes.upperBound - bytes.lowerBound)
            let whole = buffers.take(length)
            defer { buffers.give(whole) }
            let found = UnsafeMutableRawBufferPointer(rebasing: whole[0..<length])
            weakest = max(weakest, try readBack(into: found, at: bytes.lowerBound, region: piece.lowerBound))
            if !isAllZero(UnsafeRawBufferPointer(found)) {
                for k in piece {
                    let rb = geometry.byteRange(of: k..<k + 1)
                    let got = UnsafeRawBufferPointer(
                        rebasing: found[Int(rb.lowerBound - bytes.lowerBound)..<Int(rb.upperBound - bytes.lowerBound)])
                    if !isAllZero(got) { throw mismatch(region: k, start: rb.lowerBound, expected: nil, found: got) }
                }
            }
            verified += UInt64(length)
            r = piece.upperBound
        }
        result.verified = verified
        result.readBack = weakest
    }

    private func readBack(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, region: Int)
        throws(BatchFailure) -> ReadBackPath
    {
        do {
            return try dest.readBack(into: buffer, at: offset)
        } catch {
            let r = regionOf(error.offset, default: region)
            if error.operation == .writeback {
                // The evicting read-back's writeback wait reported a writeback error: data written
                // since the last commit may be lost, final like a failed fdatasync (not retried).
                throw BatchFailure(
                    error: HydrationError(
                        .commitFailed,
                        "destination writeback failed at region \(r) (seen reading it back), metadata left at its last commit: \(error)",
                        errno: error.errno, region: r))
            }
            // A failed read: retried like a failed write (the batch is written again, read again).
            throw BatchFailure(
                error: HydrationError(
                    .destWriteFailed, "region \(r): reading the destination back: \(error)", errno: error.errno,
                    region: r))
        }
    }

    /// The failure for region `region` (starting at byte `start`) read back as `found` where
    /// `expected` (nil: zeros) was written.
    private func mismatch(region: Int, start: UInt64, expected: UnsafeRawBufferPointer?, found: UnsafeRawBufferPointer)
        -> BatchFailure
    {
        var first = 0
        while first < found.count && found[first] == (expected?[first] ?? 0) { first += 1 }
        let want = expected.map { RegionDigest.sha256Hex($0) } ?? RegionDigest.zerosSHA256Hex(count: found.count)
        let got = RegionDigest.sha256Hex(found)
        let offset = start + UInt64(first)
        var e = HydrationError(
            .destinationMismatch,
            "region \(region): the destination \(dest.info.path) read back other bytes than were written, first at byte \(offset) (source sha256 \(want), destination sha256 \(got)); the region is neither committed nor released, the job resumes by copying it again",
            region: region)
        e.mismatch = HydrationError.Mismatch(region: region, offset: offset, expectedDigest: want, foundDigest: got)
        return BatchFailure(error: e)
    }

    /// Reads the batch's bytes from the source. On a file only its data extents are read
    /// (SEEK_DATA/SEEK_HOLE, asked only from positions inside the batch: its regions are claimed
    /// and unhydrated, hence never released), each widened to the source's direct-I/O alignment
    /// (at least 4 KiB) within the batch; a gap between them is zero-filled only inside regions
    /// that also hold data. Returns the regions wholly inside gaps: their bytes in `buffer` are
    /// not set, and they read as zeros.
    private func readData(into buffer: UnsafeMutableRawBufferPointer, bytes: Range<UInt64>) throws(StorageError)
        -> [Range<Int>]
    {
        guard source.info.identity.kind == .regularFile else {
            try source.read(into: buffer, at: bytes.lowerBound)
            return []
        }
        let align = UInt64(max(4096, source.directIO.alignment))
        var reads: [Range<UInt64>] = []
        var at = bytes.lowerBound
        while at < bytes.upperBound, let e = try source.nextData(from: at), e.lowerBound < bytes.upperBound {
            // bytes.lowerBound is a region boundary, hence aligned.
            let lo = max(bytes.lowerBound, max(e.lowerBound, at) & ~(align - 1))
            let hi = min(bytes.upperBound, (e.upperBound + align - 1) & ~(align - 1))
            if let last = reads.last, last.upperBound >= lo {
                reads[reads.count - 1] = last.lowerBound..<hi
            } else {
                reads.append(lo..<hi)
            }
            at = hi
        }
        var holes: [Range<Int>] = []
        var gapStart = bytes.lowerBound
        let rs = geometry.regionSize
        for r in reads + [bytes.upperBound..<bytes.upperBound] {
            if gapStart < r.lowerBound {
                // A gap: its head and tail lie in regions that hold data (zero-filled), the
                // regions between are holes. The end of the target counts as a region boundary.
                let g = gapStart..<r.lowerBound
                let headEnd = min(g.upperBound, (g.lowerBound + rs - 1) / rs * rs)
                let tailStart = max(
                    headEnd, g.upperBound == geometry.targetSize ? g.upperBound : g.upperBound / rs * rs)
                for z in [g.lowerBound..<headEnd, tailStart..<g.upperBound] where !z.isEmpty {
                    let lo = Int(z.lowerBound - bytes.lowerBound)
                    UnsafeMutableRawBufferPointer(rebasing: buffer[lo..<lo + Int(z.upperBound - z.lowerBound)])
                        .initializeMemory(as: UInt8.self, repeating: 0)
                }
                if headEnd < tailStart { holes.append(Int(headEnd / rs)..<Int((tailStart + rs - 1) / rs)) }
            }
            if !r.isEmpty {
                let lo = Int(r.lowerBound - bytes.lowerBound)
                try source.read(
                    into: UnsafeMutableRawBufferPointer(rebasing: buffer[lo..<lo + Int(r.upperBound - r.lowerBound)]),
                    at: r.lowerBound)
            }
            gapStart = max(gapStart, r.upperBound)
        }
        return holes
    }

    private func zero(_ offset: UInt64, _ length: UInt64, region: Int) throws(BatchFailure) {
        do {
            try dest.zeroOut(offset: offset, length: length)
        } catch {
            if error.isUnsupported {
                // No punch/zero-out support: write zeros instead, in 1 MiB pieces.
                try writeZeros(offset, length, region: region)
                return
            }
            let code: HydrationError.Code = error.isNoSpace ? .noSpace : .destWriteFailed
            throw BatchFailure(
                error: HydrationError(code, "region \(region): \(error)", errno: error.errno, region: region))
        }
    }

    private func writeZeros(_ offset: UInt64, _ length: UInt64, region: Int) throws(BatchFailure) {
        let chunk = Int(min(length, 1 << 20))
        let zeros = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: 4096)
        defer { zeros.deallocate() }
        zeros.initializeMemory(as: UInt8.self, repeating: 0)
        var at = offset
        while at < offset + length {
            let n = Int(min(UInt64(chunk), offset + length - at))
            do {
                try dest.write(UnsafeRawBufferPointer(rebasing: zeros[0..<n]), at: at)
            } catch {
                let code: HydrationError.Code = error.isNoSpace ? .noSpace : .destWriteFailed
                throw BatchFailure(
                    error: HydrationError(code, "region \(region): \(error)", errno: error.errno, region: region))
            }
            at += UInt64(n)
        }
    }

    private func regionOf(_ offset: UInt64?, default d: Int) -> Int {
        offset.map { Int($0 / geometry.regionSize) } ?? d
    }

    private func regionIsZero(_ region: Int, in buffer: UnsafeMutableRawBufferPointer, base: UInt64) -> Bool {
        let r = geometry.byteRange(of: region..<region + 1)
        let lo = Int(r.lowerBound - base)
        let hi = Int(r.upperBound - base)
        return isAllZero(UnsafeRawBufferPointer(rebasing: buffer[lo..<hi]))
    }
}

/// True when every byte is zero; 8 bytes at a time.
package func isAllZero(_ b: UnsafeRawBufferPointer) -> Bool {
    guard let base = b.baseAddress else { return true }
    let n = b.count
    var i = 0
    // Fast path over aligned words.
    while i < n && (Int(bitPattern: base + i) & 7) != 0 {
        if b[i] != 0 { return false }
        i += 1
    }
    var acc: UInt64 = 0
    while i + 64 <= n {
        let p = (base + i).assumingMemoryBound(to: UInt64.self)
        acc = p[0] | p[1] | p[2] | p[3] | p[4] | p[5] | p[6] | p[7]
        if acc != 0 { return false }
        i += 64
    }
    while i < n {
        if b[i] != 0 { return false }
        i += 1
    }
    return true
}
