import Synchronization

extension MetadataStore {
    // MARK: open

    /// Opens existing metadata and recovers its last committed state (plus adopted page versions
    /// of an interrupted commit). With `readOnly`, nothing is written (offline check); otherwise
    /// a recovery superblock is written when pages were adopted, and the file is synced, so that
    /// everything this returns is durable before the engine acts on it (a killed process can
    /// leave a written-but-unsynced superblock in the page cache).
    public static func open(path: String, storage: any StorageProvider, readOnly: Bool = false) throws(MetadataError)
        -> (MetadataStore, MetadataRecoveryReport)
    {
        let device: any StorageDevice
        do {
            device = try storage.open(path, mode: readOnly ? .readOnly : .metadata(create: false))
        } catch {
            throw MetadataError(path: path, reason: .io(error))
        }
        func readBlock(_ offset: UInt64) throws(MetadataError) -> [UInt8] {
            do {
                return try device.read(count: MetadataFormat.blockSize, at: offset)
            } catch { throw MetadataError(path: path, reason: .io(error)) }
        }
        // Superblocks.
        var candidates: [(slot: Int, header: MetadataHeader)] = []
        var problems = ["", ""]
        let size = device.info.size
        for slot in 0..<2 {
            if size < MetadataFormat.superblockOffset(slot: slot) + UInt64(MetadataFormat.blockSize) {
                problems[slot] = MetadataError.Reason.truncated.text
                continue
            }
            switch MetadataHeader.decode(try readBlock(MetadataFormat.superblockOffset(slot: slot))) {
            case .success(let h): candidates.append((slot, h))
            case .failure(let r): problems[slot] = r.text
            }
        }
        guard let best = candidates.max(by: { $0.header.generation < $1.header.generation }) else {
            if problems[0] == MetadataError.Reason.truncated.text && size == 0 {
                throw MetadataError(path: path, reason: .truncated)
            }
            throw MetadataError(path: path, reason: .noValidSuperblock(slot0: problems[0], slot1: problems[1]))
        }
        let other = 1 - best.slot
        if let o = candidates.first(where: { $0.slot == other }), o.header.jobID != best.header.jobID {
            // Two valid superblocks of different jobs: the file was reused without being wiped.
            problems[other] = "belongs to job \(o.header.jobID)"
        }
        let header = best.header

        // Pages. First the committed view (per page, the newest valid slot not above the
        // superblock's generation), checked against the superblock's count: a page lost in both
        // slots must be refused, never read as "not hydrated".
        let pageCount = Int(header.pageCount)
        var map = RegionMap(count: Int(header.regionCount))
        var pageSlot = [Int8](repeating: -1, count: pageCount)
        var newer: [(page: Int, slot: Int, words: [UInt64])] = []
        var invalid = 0
        var maxGeneration = header.generation
        let idBytes = uuidBytes(header.jobID)
        for page in 0..<pageCount {
            var bestGen: UInt64 = 0
            var bestWords: [UInt64]? = nil
            var newest: (gen: UInt64, slot: Int, words: [UInt64])? = nil
            for slot in 0..<2 {
                let off = MetadataFormat.pageOffset(page: page, slot: slot)
                if off + UInt64(MetadataFormat.blockSize) > size { continue }
                let block = try readBlock(off)
                switch decodePage(block, page: page, jobID: idBytes) {
                case .absent: break
                case .invalid: invalid += 1
                case .valid(let gen, let words):
                    maxGeneration = max(maxGeneration, gen)
                    if gen > header.generation {
                        if newest == nil || gen > newest!.gen { newest = (gen, slot, words) }
                    } else if gen > bestGen {
                        bestGen = gen
                        bestWords = words
                        pageSlot[page] = Int8(slot)
                    }
                }
            }
            if let bestWords { map.load(words: bestWords, at: page * MetadataFormat.wordsPerPage) }
            if let newest { newer.append((page, newest.slot, newest.words)) }
        }
        guard UInt64(map.setCount) == header.hydratedCount else {
            throw MetadataError(
                path: path, reason: .bitmapMismatch(expected: header.hydratedCount, found: UInt64(map.setCount)))
        }
        // Then the page versions of a later commit whose superblock never became valid (a crash
        // between its two fsyncs, or a superblock that rotted). They are adopted, not wiped:
        // pages are written only after the destination's fdatasync, so every bit they hold is
        // durable on the destination — and with discard_source its source range may already be
        // released (if the superblock was durable and later rotted), so forgetting them could
        // re-copy garbage. Bits only ever go 0 -> 1, so a newer version is a superset.
        var adopted = 0
        for (page, slot, words) in newer {
            let base = page * MetadataFormat.wordsPerPage
            let before = map.count(
                in: min(
                    map.count, page * MetadataFormat.regionsPerPage)..<min(
                        map.count, (page + 1) * MetadataFormat.regionsPerPage))
            var merged = Array(map.wordSlice(base..<base + MetadataFormat.wordsPerPage))
            for i in merged.indices where i < words.count { merged[i] |= words[i] }
            map.load(words: merged, at: base)
            let after = map.count(
                in: min(
                    map.count, page * MetadataFormat.regionsPerPage)..<min(
                        map.count, (page + 1) * MetadataFormat.regionsPerPage))
            adopted += after - before
            pageSlot[page] = Int8(slot)
        }
        var current = header
        // The returned header always agrees with the returned map (also read-only).
        current.hydratedCount = UInt64(map.setCount)
        // What a restart must release again: the recorded pending list, plus every page that an
        // interrupted (or rotted) commit wrote (its regions may have been released if that
        // superblock had been durable), or everything committed for a version 1 file. Always
        // intersected with the committed map: nothing uncommitted is ever released.
        if header.discardSource {
            var pending = header.pendingReleaseUnknown ? [0..<map.count] : header.pendingRelease
            for (page, _, _) in newer {
                pending.append(
                    min(
                        map.count, page * MetadataFormat.regionsPerPage)..<min(
                            map.count, (page + 1) * MetadataFormat.regionsPerPage))
            }
            // Exact here (what the discarder will release); only the superblock's copy is bounded.
            current.pendingRelease = coalesce(pending).flatMap { map.setRanges(in: $0) }
            current.pendingReleaseUnknown = false
        } else {
            current.pendingRelease = []
        }
        var sbSlot = best.slot
        if !readOnly {
            do {
                // What this open relies on may exist only in the page cache: a process killed
                // between a write and its fsync, or one whose fsync failed (the pages then stay
                // cached and clean but never reach the disk, and a later fsync does not rewrite
                // them). Rewrite those blocks with the same bytes, so that the fsync below really
                // writes them: the superblock in use and every adopted page, before anything
                // (the recovery superblock, the discarder) depends on them.
                let reDirty =
                    [MetadataFormat.superblockOffset(slot: best.slot)]
                    + newer.map { MetadataFormat.pageOffset(page: $0.page, slot: $0.slot) }
                for offset in reDirty {
                    try device.write(bytes: try device.read(count: MetadataFormat.blockSize, at: offset), at: offset)
                }
                try device.sync()
                if !newer.isEmpty || maxGeneration > header.generation {
                    // A recovery commit: a superblock above every generation seen, recording the
                    // adopted pages (each page's newest valid version now has a generation below
                    // it). Until it is durable the file still reads as before, so a crash here is
                    // harmless; afterwards the next commit can never overwrite an adopted page's
                    // only copy, and no generation is ever reused.
                    current.generation = maxGeneration + 1
                    sbSlot = 1 - best.slot
                    try device.write(bytes: current.encode(), at: MetadataFormat.superblockOffset(slot: sbSlot))
                }
                // Everything returned below is durable before the engine acts on it.
                try device.sync()
            } catch {
                throw MetadataError(path: path, reason: .io(error))
            }
        }
        let report = MetadataRecoveryReport(
            superblockSlot: best.slot, otherSlotProblem: problems[other].isEmpty ? nil : problems[other],
            pagesRead: pageCount, uncommittedPageSlots: newer.count, adoptedRegions: adopted, invalidPageSlots: invalid)
        let st = State(header: current, committed: map, pageSlot: pageSlot, superblockSlot: sbSlot, failure: nil)
        return (MetadataStore(path: path, device: device, state: st), report)
    }

    enum PageDecode { case absent, invalid, valid(UInt64, [UInt64]) }

    static func decodePage(_ block: [UInt8], page: Int, jobID: [UInt8]) -> PageDecode {
        if block.allSatisfy({ $0 == 0 }) { return .absent }
        let r = BlockReader(bytes: block)
        guard r.slice(MetadataFormat.pgMagic, 8) == MetadataFormat.pageMagic else { return .invalid }
        var zeroed = block
        for i in 0..<4 { zeroed[MetadataFormat.pgCRC + i] = 0 }
        guard r.get(UInt32.self, at: MetadataFormat.pgCRC) == CRC32C.checksum(zeroed) else { return .invalid }
        guard r.get(UInt64.self, at: MetadataFormat.pgIndex) == UInt64(page),
            r.slice(MetadataFormat.pgJobID, 16) == jobID
        else { return .invalid }
        let gen = r.get(UInt64.self, at: MetadataFormat.pgGeneration)
        // One generation per commit: anything this large is damage, and must not overflow the
        // recovery generation.
        guard gen > 0, gen <= MetadataFormat.maxGeneration else { return .invalid }
        var words = [UInt64](repeating: 0, count: MetadataFormat.wordsPerPage)
        block.withUnsafeBytes { raw in
            for i in 0..<words.count {
                words[i] = UInt64(
                    littleEndian: raw.loadUnaligned(fromByteOffset: MetadataFormat.pgBitmap + i * 8, as: UInt64.self))
            }
        }
        return .valid(gen, words)
    }

    static func encodePage(page: Int, generation: UInt64, jobID: [UInt8], words: ArraySlice<UInt64>) -> [UInt8] {
        var w = BlockWriter(size: MetadataFormat.blockSize)
        w.put(MetadataFormat.pageMagic, at: MetadataFormat.pgMagic)
        w.put(generation, at: MetadataFormat.pgGeneration)
        w.put(UInt64(page), at: MetadataFormat.pgIndex)
        w.put(jobID, at: MetadataFormat.pgJobID)
        w.bytes.withUnsafeMutableBytes { raw in
            for (i, v) in words.enumerated() {
                raw.storeBytes(of: v.littleEndian, toByteOffset: MetadataFormat.pgBitmap + i * 8, as: UInt64.self)
            }
        }
        w.put(CRC32C.checksum(w.bytes), at: MetadataFormat.pgCRC)
        return w.bytes
    }

}
