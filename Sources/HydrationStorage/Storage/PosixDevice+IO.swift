import CLinux
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

extension PosixDevice {
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(StorageError) {
        try using(.read, offset: offset, length: UInt64(buffer.count)) { () throws(StorageError) in
            guard let base = buffer.baseAddress else { return }
            var done = 0
            while done < buffer.count {
                let direct = directLength(base + done, offset + UInt64(done), buffer.count - done)
                let n =
                    direct > 0
                    ? pread(directFD, base + done, direct, off_t(offset) + off_t(done))
                    : pread(fd, base + done, buffer.count - done, off_t(offset) + off_t(done))
                if n < 0 {
                    if errno == EINTR { continue }
                    if direct > 0 && errno == EINVAL { refuseDirect(); continue }
                    throw StorageError(
                        .read, path: info.path, errno: errno, offset: offset + UInt64(done),
                        length: UInt64(buffer.count - done))
                }
                if n == 0 {
                    let at = offset + UInt64(done)
                    // An end of file before the size the job opened: the source or destination shrank
                    // under the job. Zeros here would be copied (or served) as its data and the job
                    // completed without it.
                    if sizeIsFixed && at < info.size {
                        throw shrank(at: at, length: UInt64(buffer.count - done), operation: .read)
                    }
                    // End of file: the rest reads as zeros (past the end of a metadata file).
                    (base + done).initializeMemory(as: UInt8.self, repeating: 0, count: buffer.count - done)
                    return
                }
                if direct > 0 {
                    directCalls.add(1, ordering: .relaxed)
                } else {
                    bufferedCalls.add(1, ordering: .relaxed)
                }
                done += n
            }
        }
    }

    /// The kernel refused an aligned direct call (EINVAL: a filesystem that advertises an
    /// alignment it does not honour, or refuses direct I/O on this file after all). The call is
    /// redone buffered, and so is every later one: nothing was transferred by the refused call.
    func refuseDirect() {
        directRefused.add(1, ordering: .relaxed)
        directBroken.store(true, ordering: .relaxed)
    }

    func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(StorageError) {
        try using(.write, offset: offset, length: UInt64(buffer.count)) { () throws(StorageError) in
            guard let base = buffer.baseAddress else { return }
            var done = 0
            while done < buffer.count {
                // A direct write returns only once the data is on the device (in its write cache
                // until the commit's fdatasync); its failure is returned here, and only its own range
                // is affected (the caller retries it or fails; nothing records it as written).
                let direct = directLength(base + done, offset + UInt64(done), buffer.count - done)
                let n =
                    direct > 0
                    ? pwrite(directFD, base + done, direct, off_t(offset) + off_t(done))
                    : pwrite(fd, base + done, buffer.count - done, off_t(offset) + off_t(done))
                if n < 0 {
                    if errno == EINTR { continue }
                    if direct > 0 && errno == EINVAL { refuseDirect(); continue }
                    throw StorageError(
                        .write, path: info.path, errno: errno, offset: offset + UInt64(done),
                        length: UInt64(buffer.count - done))
                }
                if n == 0 {
                    throw StorageError(
                        .write, path: info.path, errno: ENOSPC, offset: offset + UInt64(done),
                        length: UInt64(buffer.count - done))
                }
                if direct > 0 {
                    directCalls.add(1, ordering: .relaxed)
                } else {
                    bufferedCalls.add(1, ordering: .relaxed)
                }
                done += n
            }
        }
    }

    func sync() throws(StorageError) {
        try using(.sync) { () throws(StorageError) in
            if fdatasync(fd) != 0 { throw StorageError(.sync, path: info.path, errno: errno) }
        }
    }

    func release(offset: UInt64, length: UInt64) throws(StorageError) {
        try using(.release, offset: offset, length: length) { () throws(StorageError) in
            guard length > 0 else { return }
            // The lease is checked, and the punch made, under one lock that `giveUpLease` takes
            // too: a release never runs after the lease was given up. An opener arriving between
            // the check and the punch is blocked in open() until the lease is given up, so it
            // sees the punch as if it had come just after it (unless the punch outlasts the
            // kernel's lease-break-time, 45 s by default, when the kernel revokes the lease).
            try lease.withLock { (state: inout LeaseState) throws(StorageError) in
                if state == .held && hyd_get_lease(fd) != hyd_lease_write() { state = .broken }
                if state == .broken {
                    throw StorageError(
                        .release, path: info.path, errno: EWOULDBLOCK, offset: offset, length: length,
                        detail:
                            "another process opened the source (its write lease was broken): nothing more is released")
                }
                let rc =
                    info.identity.kind == .blockDevice
                    ? hyd_blk_discard(fd, offset, length)
                    : hyd_punch_hole(fd, offset, length)
                if rc != 0 {
                    throw StorageError(.release, path: info.path, errno: errno, offset: offset, length: length)
                }
            }
        }
    }

    func holdWriteLease() throws(StorageError) {
        guard info.identity.kind == .regularFile else { return }
        // Its own O_DIRECT descriptor would break (refuse) the lease: a device opened for direct
        // I/O has none (the job then runs as before leases were used).
        guard directFD < 0 else {
            throw StorageError(
                .lock, path: info.path, errno: EBUSY, detail: "opened twice for direct I/O: no write lease")
        }
        try using(.lock) { () throws(StorageError) in
            try lease.withLock { (state: inout LeaseState) throws(StorageError) in
                if state == .held { return }
                if hyd_take_write_lease(fd) != 0 {
                    throw StorageError(
                        .lock, path: info.path, errno: errno,
                        detail: errno == EAGAIN
                            ? "a write lease is refused: another process has the file open"
                            : "cannot take a write lease")
                }
                state = .held
            }
        }
    }

    var leaseBroken: Bool {
        guard enter() else { return false }
        defer { leave() }
        return lease.withLock { state in
            if state == .held && hyd_get_lease(fd) != hyd_lease_write() { state = .broken }
            return state == .broken
        }
    }

    func giveUpLease() {
        guard enter() else { return }
        defer { leave() }
        lease.withLock { state in
            if state != .none { _ = hyd_drop_lease(fd) }
            if state == .held { state = .none }
        }
    }

    func zeroOut(offset: UInt64, length: UInt64) throws(StorageError) {
        try using(.zeroOut, offset: offset, length: length) { () throws(StorageError) in
            guard length > 0 else { return }
            let rc =
                info.identity.kind == .blockDevice
                ? hyd_blk_zeroout(fd, offset, length)
                : hyd_punch_hole(fd, offset, length)
            if rc != 0 { throw StorageError(.zeroOut, path: info.path, errno: errno, offset: offset, length: length) }
        }
    }

    func nextData(from offset: UInt64) throws(StorageError) -> Range<UInt64>? {
        try using(.seek, offset: offset) { () throws(StorageError) in
            guard offset < info.size else { return nil }
            guard info.identity.kind == .regularFile else { return offset..<info.size }
            let data = lseek(fd, off_t(offset), seekData)
            if data < 0 {
                if errno == ENXIO {
                    // No data after `offset` up to the end of the file, wherever that is now: the rest
                    // counts as a hole only if the file still has the size the job opened.
                    if sizeIsFixed, let now = currentSize(), now < info.size {
                        throw shrank(at: offset, length: info.size - offset, operation: .seek)
                    }
                    return nil
                }
                // A filesystem without SEEK_DATA: everything may be data.
                if errno == EINVAL || errno == EOPNOTSUPP { return offset..<info.size }
                throw StorageError(.seek, path: info.path, errno: errno, offset: offset)
            }
            let hole = lseek(fd, data, seekHole)
            if hole < 0 { throw StorageError(.seek, path: info.path, errno: errno, offset: UInt64(data)) }
            let end = min(UInt64(hole), info.size)
            guard UInt64(data) < end else { return nil }
            return UInt64(data)..<end
        }
    }

    func dropCache(offset: UInt64, length: UInt64) {
        guard enter() else { return }
        defer { leave() }
        _ = hyd_drop_cache(fd, offset, length)
    }

    func startWriteback(offset: UInt64, length: UInt64) throws(StorageError) {
        try using(.writeback, offset: offset, length: length) { () throws(StorageError) in
            // An aligned range was written directly: nothing of it is in the page cache.
            if directFD >= 0 && !directBroken.load(ordering: .relaxed)
                && (offset | length) & UInt64(directIO.alignment - 1) == 0
            {
                return
            }
            if hyd_start_writeback(fd, offset, length) != 0 {
                throw StorageError(.writeback, path: info.path, errno: errno, offset: offset, length: length)
            }
        }
    }

    // Why eviction cannot hide a writeback error (docs/reliability.md, "Writeback errors"):
    // since Linux 4.13 a writeback error is recorded in the mapping's errseq and reported once
    // per open file description, to the first call on it that *waits* and checks it:
    // fsync/fdatasync (file_write_and_wait_range), sync_file_range with WAIT_BEFORE or
    // WAIT_AFTER (file_fdatawait_range -> file_check_and_advance_wb_err), and syncfs. Neither
    // sync_file_range(SYNC_FILE_RANGE_WRITE) alone (__filemap_fdatawrite_range: no wait, no
    // errseq check) nor posix_fadvise(DONTNEED) (starts writeback, then drops only clean,
    // unlocked pages not under writeback) looks at the errseq. So on `fd`, the descriptor the
    // commit fdatasyncs, this path makes no waiting call: fdatasync is the first to see the error.
    // The wait that keeps the page cache bounded runs on `waitFD`, a separate open file
    // description: it consumes the error only for that descriptor, and it is reported (thrown)
    // here too, so the job fails without waiting for its next commit.
    // Verified on this kernel by Scripts/errseq-experiment.sh. The old evict waited on `fd`
    // itself and ignored the result: the error was consumed and the next fdatasync returned 0.
    func evict(offset: UInt64, length: UInt64) throws(StorageError) {
        try using(.writeback, offset: offset, length: length) { () throws(StorageError) in
            if hyd_start_writeback(fd, offset, length) != 0 {
                throw StorageError(.writeback, path: info.path, errno: errno, offset: offset, length: length)
            }
            if waitFD >= 0 && hyd_wait_writeback(waitFD, offset, length) != 0 {
                throw StorageError(.writeback, path: info.path, errno: errno, offset: offset, length: length)
            }
            if hyd_drop_cache(fd, offset, length) != 0 {
                throw StorageError(.writeback, path: info.path, errno: errno, offset: offset, length: length)
            }
        }
    }

    func close() {
        // Mark closed; the descriptors go now if no call is in flight, else when the last leaves.
        if gate.bitwiseOr(1, ordering: .acquiringAndReleasing).oldValue == 0 { closeDescriptors() }
    }

    func allocatedBytes() -> UInt64? {
        guard info.identity.kind == .regularFile else { return nil }
        guard enter() else { return nil }
        defer { leave() }
        var st = stat()
        guard fstat(fd, &st) == 0 else { return nil }
        return UInt64(st.st_blocks) * 512
    }
}

// <unistd.h> defines these only under _GNU_SOURCE, which Swift's Glibc module does not set.
private let seekData: Int32 = 3
private let seekHole: Int32 = 4

extension PosixDevice {
    // Verified release (docs/design.md): what the device holds, not what the page cache does.
    // O_DIRECT reads write the range's dirty pages back and wait for them before reading the
    // device (filemap_write_and_wait_range, which checks the mapping's AS_EIO/AS_ENOSPC flags,
    // not the errseq that the commit's fdatasync on `fd` reports): a page written buffered is
    // read from the device too. Without O_DIRECT (no alignment reported, a buffered job, the
    // unaligned tail), the range is written back on `fd` without waiting, waited for on `waitFD`
    // (as `evict` does, so the fdatasync still sees a writeback error), dropped from the cache
    // and read.
    func readBack(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(StorageError)
        -> ReadBackPath
    {
        try using(.read, offset: offset, length: UInt64(buffer.count)) { () throws(StorageError) -> ReadBackPath in
            guard let base = buffer.baseAddress, buffer.count > 0 else { return .direct }
            var done = 0
            let direct = directLength(base, offset, buffer.count)
            while done < direct {
                let n = pread(directFD, base + done, direct - done, off_t(offset) + off_t(done))
                if n < 0 {
                    if errno == EINTR { continue }
                    // Refused after all: the rest goes the evicting way (the data path keeps its own
                    // fallback, `refuseDirect`).
                    if errno == EINVAL { break }
                    throw StorageError(
                        .read, path: info.path, errno: errno, offset: offset + UInt64(done),
                        length: UInt64(direct - done))
                }
                if n == 0 { throw shrank(at: offset + UInt64(done), length: UInt64(direct - done), operation: .read) }
                done += n
            }
            guard done < buffer.count else { return .direct }
            let lo = offset + UInt64(done)
            let len = UInt64(buffer.count - done)
            if hyd_start_writeback(fd, lo, len) != 0 {
                throw StorageError(.writeback, path: info.path, errno: errno, offset: lo, length: len)
            }
            if waitFD >= 0 && hyd_wait_writeback(waitFD, lo, len) != 0 {
                throw StorageError(.writeback, path: info.path, errno: errno, offset: lo, length: len)
            }
            if hyd_drop_cache(fd, lo, len) != 0 {
                throw StorageError(.writeback, path: info.path, errno: errno, offset: lo, length: len)
            }
            while done < buffer.count {
                let n = pread(fd, base + done, buffer.count - done, off_t(offset) + off_t(done))
                if n < 0 {
                    if errno == EINTR { continue }
                    throw StorageError(
                        .read, path: info.path, errno: errno, offset: offset + UInt64(done),
                        length: UInt64(buffer.count - done))
                }
                if n == 0 {
                    throw shrank(at: offset + UInt64(done), length: UInt64(buffer.count - done), operation: .read)
                }
                done += n
            }
            return .evicted
        }
    }
}
