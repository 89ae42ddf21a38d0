import HydrationStorage
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// An in-memory disk for tests: files and "block devices" held as byte arrays, every operation
/// recorded in one global log (so tests can assert on the order of writes, syncs and discards
/// across devices), and faults injectable per operation.
///
/// Asynchronous writeback failure (`setWritebackFailure`): before the n-th write to a file, the
/// file's data written since its last successful sync is lost (it reads back as it was then) and
/// the error goes into the file's errseq, reported once per open device to the first call that
/// waits: `sync` (logged as `syncFailed`), or `evict`, which waits on a second description of its
/// own as PosixDevice does (it throws; `sync` still reports it). `legacyWaitingEvict` models the
/// old engine: the wait ran on the synced description and its result was ignored.
package final class SimulatedStorage: StorageProvider {
    package enum OpKind: String, Sendable {
        case read, write, sync, release, zeroOut, nextData, writebackLost, syncFailed
    }

    package struct Op: Sendable, CustomStringConvertible {
        package var seq: Int
        package var path: String
        package var kind: OpKind
        package var offset: UInt64
        package var length: UInt64
        package var description: String { "#\(seq) \(kind.rawValue) \(path) [\(offset), +\(length))" }
    }

    package struct FileState {
        package var data: [UInt8]
        package var kind: DeviceKind
        package var inode: UInt64
        /// Byte ranges that are holes (never written or punched), for SEEK_DATA.
        package var allocated: [Bool]  // per 4 KiB block
        package var locked = false
        /// The data as of the last successful sync (what a writeback failure reverts to).
        package var synced: [UInt8] = []
        /// errseq: writeback errors so far, and whether the latest was reported to anyone.
        package var wbErrors = 0
        package var wbSeen = true
    }

    package struct State {
        package var files: [String: FileState] = [:]
        package var log: [Op] = []
        package var nextInode: UInt64 = 100
        package var fault: (@Sendable (Op) -> Int32?)? = nil
        /// Sees every operation, with the files as they are just before it applies.
        package var observer: (@Sendable (Op, [String: FileState]) -> Void)? = nil
        /// Called before a sync takes the lock (to slow syncs down without blocking other I/O).
        package var syncDelay: (@Sendable (String) -> Void)? = nil
        /// Writeback failure of `path` before its `atWrite`-th write (1-based).
        package var writebackFailure: (path: String, atWrite: Int, writes: Int)? = nil
        package var legacyWaitingEvict = false
        /// Per open description: the errseq count it has been told about.
        package var errseqSample: [Int: Int] = [:]
        package var nextOpenID = 0
    }

    package let state = Mutex(State())

    package init() {}
    package static let block = 4096

    package func addFile(_ path: String, data: [UInt8], kind: DeviceKind = .regularFile, holesWhereZero: Bool = true) {
        state.withLock { s in
            let blocks = (data.count + Self.block - 1) / Self.block
            var alloc = [Bool](repeating: true, count: blocks)
            if holesWhereZero {
                for b in 0..<blocks {
                    let lo = b * Self.block, hi = min(data.count, lo + Self.block)
                    alloc[b] = data[lo..<hi].contains { $0 != 0 }
                }
            }
            s.nextInode += 1
            s.files[path] = FileState(data: data, kind: kind, inode: s.nextInode, allocated: alloc, synced: data)
        }
    }

    package func setWritebackFailure(path: String, atWrite n: Int) {
        state.withLock { $0.writebackFailure = (path, n, 0) }
    }
    package func setLegacyWaitingEvict(_ on: Bool) { state.withLock { $0.legacyWaitingEvict = on } }

    package func contents(_ path: String) -> [UInt8]? { state.withLock { $0.files[path]?.data } }
    package func allocatedBlocks(_ path: String) -> Int {
        state.withLock { $0.files[path]?.allocated.filter { $0 }.count ?? 0 }
    }
    package var log: [Op] { state.withLock { $0.log } }
    package func setFault(_ f: (@Sendable (Op) -> Int32?)?) { state.withLock { $0.fault = f } }
    package func setSyncDelay(_ f: (@Sendable (String) -> Void)?) { state.withLock { $0.syncDelay = f } }
    package func setObserver(_ f: (@Sendable (Op, [String: FileState]) -> Void)?) { state.withLock { $0.observer = f } }

    package func info(_ path: String, _ f: FileState) -> DeviceInfo {
        DeviceInfo(
            path: path,
            identity: f.kind == .regularFile
                ? DeviceIdentity(kind: .regularFile, device: 1, inode: f.inode, rdev: 0)
                : DeviceIdentity(kind: .blockDevice, device: 0, inode: 0, rdev: f.inode),
            // Simulated devices keep their inode through a crash and a reopen: a stable identity.
            size: UInt64(f.data.count), logicalBlockSize: 512, stableID: "sim:\(f.inode)")
    }

    package func open(_ path: String, mode: OpenMode) throws(StorageError) -> any StorageDevice {
        try state.withLock { (s: inout State) throws(StorageError) -> any StorageDevice in
            if s.files[path] == nil {
                switch mode {
                case .destination(let size?):
                    s.nextInode += 1
                    s.files[path] = FileState(
                        data: [UInt8](repeating: 0, count: Int(size)), kind: .regularFile,
                        inode: s.nextInode,
                        allocated: [Bool](repeating: false, count: (Int(size) + Self.block - 1) / Self.block),
                        synced: [UInt8](repeating: 0, count: Int(size)))
                case .metadata(create: true):
                    s.nextInode += 1
                    s.files[path] = FileState(data: [], kind: .regularFile, inode: s.nextInode, allocated: [])
                default:
                    throw StorageError(.open, path: path, errno: ENOENT)
                }
            } else if case .metadata(create: true) = mode {
                throw StorageError(.create, path: path, errno: EEXIST)
            }
            if case .destination(let size?) = mode, s.files[path]!.data.isEmpty, size > 0 {
                s.files[path]!.data = [UInt8](repeating: 0, count: Int(size))
                s.files[path]!.allocated = [Bool](repeating: false, count: (Int(size) + Self.block - 1) / Self.block)
            }
            switch mode {
            case .source, .destination:
                if s.files[path]!.locked { throw StorageError(.lock, path: path, errno: EBUSY) }
                s.files[path]!.locked = true
            default: break
            }
            s.nextOpenID += 1
            let f = s.files[path]!
            s.errseqSample[s.nextOpenID] = f.wbSeen ? f.wbErrors : f.wbErrors - 1
            s.errseqSample[-s.nextOpenID] = s.errseqSample[s.nextOpenID]  // evict's own description
            return SimulatedDevice(
                storage: self, path: path, info: info(path, s.files[path]!),
                locked: {
                    if case .source = mode { return true }; if case .destination = mode { return true }; return false
                }(),
                openID: s.nextOpenID)
        }
    }

    package func identify(_ path: String) throws(StorageError) -> DeviceInfo? {
        state.withLock { s in s.files[path].map { info(path, $0) } }
    }

    package func syncDirectory(containing path: String) throws(StorageError) {}

    /// Records an operation and applies an injected fault, if any.
    package func record(_ path: String, _ kind: OpKind, _ offset: UInt64, _ length: UInt64, _ s: inout State)
        throws(StorageError)
    {
        if kind == .write, var wf = s.writebackFailure, wf.path == path {
            wf.writes += 1
            s.writebackFailure = wf.writes >= wf.atWrite ? nil : wf
            if wf.writes >= wf.atWrite {
                // The writeback of everything written since the last sync fails: lost.
                s.log.append(Op(seq: s.log.count, path: path, kind: .writebackLost, offset: 0, length: 0))
                s.observer?(s.log.last!, s.files)
                s.files[path]!.data = s.files[path]!.synced
                s.files[path]!.wbErrors += 1
                s.files[path]!.wbSeen = false
            }
        }
        let op = Op(seq: s.log.count, path: path, kind: kind, offset: offset, length: length)
        s.log.append(op)
        s.observer?(op, s.files)
        if let fault = s.fault, let e = fault(op) {
            let operation: StorageError.Operation
            switch kind {
            case .read: operation = .read
            case .write: operation = .write
            case .sync: operation = .sync
            case .release: operation = .release
            case .zeroOut: operation = .zeroOut
            case .nextData: operation = .seek
            case .writebackLost, .syncFailed: operation = .writeback
            }
            throw StorageError(operation, path: path, errno: e, offset: offset, length: length)
        }
    }

    package func unlock(_ path: String) { state.withLock { $0.files[path]?.locked = false } }

    /// A waiting call on description `id`: the writeback error it was not told about, consumed.
    package func consumeWritebackError(_ path: String, id: Int, _ s: inout State) -> Bool {
        guard let f = s.files[path], f.wbErrors > (s.errseqSample[id] ?? 0) else { return false }
        s.errseqSample[id] = f.wbErrors
        s.files[path]!.wbSeen = true
        return true
    }
}

/// An open simulated file; every call goes through the storage's lock, so it is safe to share.
package final class SimulatedDevice: StorageDevice {
    package let storage: SimulatedStorage
    package let path: String
    package let info: DeviceInfo
    package let locked: Bool
    package let openID: Int

    package init(storage: SimulatedStorage, path: String, info: DeviceInfo, locked: Bool, openID: Int) {
        self.storage = storage; self.path = path; self.info = info; self.locked = locked; self.openID = openID
    }

    deinit { if locked { storage.unlock(path) } }

    package func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(StorageError) {
        try storage.state.withLock { (s: inout SimulatedStorage.State) throws(StorageError) in
            try storage.record(path, .read, offset, UInt64(buffer.count), &s)
            let data = s.files[path]!.data
            for i in 0..<buffer.count {
                let at = Int(offset) + i
                buffer[i] = at < data.count ? data[at] : 0
            }
        }
    }

    package func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(StorageError) {
        try storage.state.withLock { (s: inout SimulatedStorage.State) throws(StorageError) in
            try storage.record(path, .write, offset, UInt64(buffer.count), &s)
            let end = Int(offset) + buffer.count
            if s.files[path]!.data.count < end {
                if info.identity.kind == .blockDevice {
                    throw StorageError(.write, path: path, errno: ENOSPC, offset: offset)
                }
                s.files[path]!.data += [UInt8](repeating: 0, count: end - s.files[path]!.data.count)
                let blocks = (end + SimulatedStorage.block - 1) / SimulatedStorage.block
                if s.files[path]!.allocated.count < blocks {
                    s.files[path]!.allocated += [Bool](repeating: false, count: blocks - s.files[path]!.allocated.count)
                }
            }
            s.files[path]!.data.replaceSubrange(Int(offset)..<end, with: buffer)
            if buffer.count > 0 {
                for b in Int(offset) / SimulatedStorage.block...(end - 1) / SimulatedStorage.block {
                    s.files[path]!.allocated[b] = true
                }
            }
        }
    }

    package func sync() throws(StorageError) {
        if let delay = storage.state.withLock({ $0.syncDelay }) { delay(path) }
        try storage.state.withLock { (s: inout SimulatedStorage.State) throws(StorageError) in
            if storage.consumeWritebackError(path, id: openID, &s) {
                s.log.append(SimulatedStorage.Op(seq: s.log.count, path: path, kind: .syncFailed, offset: 0, length: 0))
                s.observer?(s.log.last!, s.files)
                throw StorageError(.sync, path: path, errno: EIO)
            }
            try storage.record(path, .sync, 0, 0, &s)
            s.files[path]!.synced = s.files[path]!.data
        }
    }

    package func evict(offset: UInt64, length: UInt64) throws(StorageError) {
        try storage.state.withLock { (s: inout SimulatedStorage.State) throws(StorageError) in
            if s.legacyWaitingEvict {
                _ = storage.consumeWritebackError(path, id: openID, &s)  // waited, told, ignored
            } else if storage.consumeWritebackError(path, id: -openID, &s) {
                throw StorageError(.writeback, path: path, errno: EIO, offset: offset, length: length)
            }
        }
    }

    private func punch(_ kind: SimulatedStorage.OpKind, _ offset: UInt64, _ length: UInt64) throws(StorageError) {
        try storage.state.withLock { (s: inout SimulatedStorage.State) throws(StorageError) in
            try storage.record(path, kind, offset, length, &s)
            let end = min(Int(offset + length), s.files[path]!.data.count)
            guard Int(offset) < end else { return }
            for i in Int(offset)..<end { s.files[path]!.data[i] = 0 }
            // Whole blocks inside the range become holes.
            let first = (Int(offset) + SimulatedStorage.block - 1) / SimulatedStorage.block
            let last = end / SimulatedStorage.block + (end == s.files[path]!.data.count ? 1 : 0)
            if first < last {
                for b in first..<min(last, s.files[path]!.allocated.count) { s.files[path]!.allocated[b] = false }
            }
        }
    }

    package func release(offset: UInt64, length: UInt64) throws(StorageError) { try punch(.release, offset, length) }
    package func zeroOut(offset: UInt64, length: UInt64) throws(StorageError) { try punch(.zeroOut, offset, length) }

    package func nextData(from offset: UInt64) throws(StorageError) -> Range<UInt64>? {
        try storage.state.withLock { (s: inout SimulatedStorage.State) throws(StorageError) -> Range<UInt64>? in
            try storage.record(path, .nextData, offset, 0, &s)
            let f = s.files[path]!
            guard f.kind == .regularFile else {
                return offset < UInt64(f.data.count) ? offset..<UInt64(f.data.count) : nil
            }
            let b0 = Int(offset) / SimulatedStorage.block
            guard let first = (b0..<f.allocated.count).first(where: { f.allocated[$0] }) else { return nil }
            let end = (first..<f.allocated.count).first(where: { !f.allocated[$0] }) ?? f.allocated.count
            let lo = max(offset, UInt64(first * SimulatedStorage.block))
            let hi = min(UInt64(end * SimulatedStorage.block), UInt64(f.data.count))
            return lo < hi ? lo..<hi : nil
        }
    }

    package func dropCache(offset: UInt64, length: UInt64) {}

    package func close() { if locked { storage.unlock(path) } }

    package func allocatedBytes() -> UInt64? {
        UInt64(storage.allocatedBlocks(path) * SimulatedStorage.block)
    }
}
