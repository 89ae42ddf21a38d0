import Synchronization

extension MetadataStore {
    // MARK: commit

    /// Records other device identities (the operator accepted the devices now at the job's
    /// paths): a superblock-only commit, atomic like any other.
    public func recordDevices(source: DeviceRecord, dest: DeviceRecord, nowMs: Int64) throws(MetadataError) {
        try state.withLock { (st: inout State) throws(MetadataError) in
            if let f = st.failure { throw MetadataError(path: path, reason: .failedEarlier(f)) }
            var header = st.header
            header.generation += 1
            header.version = MetadataFormat.version
            header.source = source
            header.dest = dest
            header.committedUnixMs = nowMs
            let sbSlot = 1 - st.superblockSlot
            do throws(StorageError) {
                try device.write(bytes: header.encode(), at: MetadataFormat.superblockOffset(slot: sbSlot))
                try device.sync()
            } catch {
                st.failure = error.description
                throw MetadataError(path: path, reason: .io(error))
            }
            st.superblockSlot = sbSlot
            st.header = header
        }
    }

    /// Durably records `ranges` (region indices) as hydrated, and `complete` when set. Writes
    /// only the pages the ranges touch plus one superblock, with an fsync after each phase.
    /// Returns the new generation. After any failure the store refuses every later commit: a
    /// failed fsync must not be retried as if nothing happened.
    ///
    /// `pendingRelease` (with discard_source) is the set of committed regions whose release has not
    /// been confirmed yet, this commit's ranges included; nil keeps the recorded list plus `ranges`.
    @discardableResult
    public func commit(
        _ ranges: [Range<Int>], complete: Bool = false, pendingRelease: [Range<Int>]? = nil,
        clearDestZeroed: Bool = false, nowMs: Int64
    ) throws(MetadataError) -> UInt64 {
        try state.withLock { (st: inout State) throws(MetadataError) -> UInt64 in
            if let f = st.failure { throw MetadataError(path: path, reason: .failedEarlier(f)) }
            // Only the pages the ranges touch are built: a commit costs O(changed pages), not a
            // copy of the whole bitmap (32 MiB for 1 TiB in 4 KiB regions).
            let rpp = MetadataFormat.regionsPerPage
            var pages: [Int] = []
            for r in ranges where !r.isEmpty {
                precondition(r.lowerBound >= 0 && r.upperBound <= st.committed.count, "range \(r) outside the target")
                for p in (r.lowerBound / rpp)...((r.upperBound - 1) / rpp) { pages.append(p) }
            }
            pages.sort()
            var dirtyPages: [Int] = []
            for p in pages where dirtyPages.last != p { dirtyPages.append(p) }
            var newPages: [(page: Int, words: [UInt64])] = []
            newPages.reserveCapacity(dirtyPages.count)
            var added = 0
            for p in dirtyPages {
                let wordBase = p * MetadataFormat.wordsPerPage
                var words = Array(st.committed.wordSlice(wordBase..<wordBase + MetadataFormat.wordsPerPage))
                if words.count < MetadataFormat.wordsPerPage {
                    words += [UInt64](repeating: 0, count: MetadataFormat.wordsPerPage - words.count)
                }
                let before = words.reduce(0) { $0 + $1.nonzeroBitCount }
                let pageRegions = (p * rpp)..<((p + 1) * rpp)
                for r in ranges {
                    let lo = max(r.lowerBound, pageRegions.lowerBound), hi = min(r.upperBound, pageRegions.upperBound)
                    if lo < hi { setBits(&words, (lo - pageRegions.lowerBound)..<(hi - pageRegions.lowerBound)) }
                }
                added += words.reduce(0) { $0 + $1.nonzeroBitCount } - before
                newPages.append((p, words))
            }
            let newCount = st.committed.setCount + added
            let gen = st.header.generation + 1
            var header = st.header
            header.generation = gen
            header.hydratedCount = UInt64(newCount)
            header.complete = complete || header.complete
            if clearDestZeroed { header.destZeroed = false }
            header.committedUnixMs = nowMs
            header.version = MetadataFormat.version
            if header.discardSource {
                let pending = pendingRelease ?? (header.pendingRelease + ranges)
                header.pendingRelease = coalesce(pending.filter { !$0.isEmpty })
                header.pendingReleaseUnknown = false
            }
            if header.complete && newCount != st.committed.count {
                throw MetadataError(
                    path: path,
                    reason: .invalidField("complete with \(st.committed.count - newCount) regions unhydrated"))
            }
            let idBytes = uuidBytes(header.jobID)
            do throws(StorageError) {
                for (p, words) in newPages {
                    let block = Self.encodePage(page: p, generation: gen, jobID: idBytes, words: words[...])
                    let slot = st.pageSlot[p] == 0 ? 1 : 0
                    try device.write(bytes: block, at: MetadataFormat.pageOffset(page: p, slot: slot))
                }
                // Phase 1 durable before the superblock can point at it.
                if !newPages.isEmpty { try device.sync() }
                let sbSlot = 1 - st.superblockSlot
                try device.write(bytes: header.encode(), at: MetadataFormat.superblockOffset(slot: sbSlot))
                try device.sync()
                for p in dirtyPages { st.pageSlot[p] = st.pageSlot[p] == 0 ? 1 : 0 }
                st.superblockSlot = sbSlot
            } catch {
                st.failure = error.description
                throw MetadataError(path: path, reason: .io(error))
            }
            // Durable: now, and only now, the in-memory committed map changes (in place).
            for r in ranges where !r.isEmpty { st.committed.set(r) }
            st.header = header
            return gen
        }
    }
}

/// Sets bits `range` of a word array.
private func setBits(_ words: inout [UInt64], _ range: Range<Int>) {
    var i = range.lowerBound
    while i < range.upperBound {
        let first = i & 63
        let last = min(64, first + (range.upperBound - i))
        let mask: UInt64 = last - first == 64 ? ~0 : ((UInt64(1) << UInt64(last - first)) - 1) << UInt64(first)
        words[i >> 6] |= mask
        i += last - first
    }
}

// Glibc's EEXIST without importing Glibc into this file's namespace twice.
#if canImport(Glibc)
    import Glibc
    let EEXIST_ = EEXIST
#endif
