import Synchronization
@testable import HydrationService

#if canImport(Glibc)
import Glibc
#endif

/// An in-memory disk for tests: files and "block devices" held as byte arrays, every operation
/// recorded in one global log (so tests can assert on the order of writes, syncs and discards
/// across devices), and faults injectable per operation.
final class SimulatedStorage: StorageProvider {
    enum OpKind: String, Sendable { case read, write, sync, release, zeroOut, nextData }

    struct Op: Sendable, CustomStringConvertible {
        var seq: Int
        var path: String
        var kind: OpKind
        var offset: UInt64
        var length: UInt64
        var description: String { "#\(seq) \(kind.rawValue) \(path) [\(offset), +\(length))" }
    }

    struct FileState {
        var data: [UInt8]
        var kind: DeviceKind
        var inode: UInt64
        /// Byte ranges that are holes (never written or punched), for SEEK_DATA.
        var allocated: [Bool]  // per 4 KiB block
        var locked = false
    }

    struct State {
        var files: [String: FileState] = [:]
        var log: [Op] = []
        var nextInode: UInt64 = 100
        var fault: (@Sendable (Op) -> Int32?)? = nil
        /// Sees every operation, with the files as they are just before it applies.
        var observer: (@Sendable (Op, [String: FileState]) -> Void)? = nil
        /// Called before a sync takes the lock (to slow syncs down without blocking other I/O).
        var syncDelay: (@Sendable (String) -> Void)? = nil
    }

    let state = Mutex(State())
    static let block = 4096

    func addFile(_ path: String, data: [UInt8], kind: DeviceKind = .regularFile, holesWhereZero: Bool = true) {
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
            s.files[path] = FileState(data: data, kind: kind, inode: s.nextInode, allocated: alloc)
        }
    }

    func contents(_ path: String) -> [UInt8]? { state.withLock { $0.files[path]?.data } }
    func allocatedBlocks(_ path: String) -> Int { state.withLock { $0.files[path]?.allocated.filter { $0 }.count ?? 0 } }
    var log: [Op] { state.withLock { $0.log } }
    func setFault(_ f: (@Sendable (Op) -> Int32?)?) { state.withLock { $0.fault = f } }
    func setSyncDelay(_ f: (@Sendable (String) -> Void)?) { state.withLock { $0.syncDelay = f } }
    func setObserver(_ f: (@Sendable (Op, [String: FileState]) -> Void)?) { state.withLock { $0.observer = f } }

    func info(_ path: String, _ f: FileState) -> DeviceInfo {
        DeviceInfo(path: path,
                   identity: f.kind == .regularFile
                       ? DeviceIdentity(kind: .regularFile, device: 1, inode: f.inode, rdev: 0)
                       : DeviceIdentity(kind: .blockDevice, device: 0, inode: 0, rdev: f.inode),
                   size: UInt64(f.data.count), logicalBlockSize: 512)
    }

    func open(_ path: String, mode: OpenMode) throws(StorageError) -> any StorageDevice {
        try state.withLock { (s: inout State) throws(StorageError) -> any StorageDevice in
            if s.files[path] == nil {
                switch mode {
                case .destination(let size?):
                    s.nextInode += 1
                    s.files[path] = FileState(data: [UInt8](repeating: 0, count: Int(size)), kind: .regularFile,
                                              inode: s.nextInode, allocated: [Bool](repeating: false, count: (Int(size) + Self.block - 1) / Self.block))
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
            return SimulatedDevice(storage: self, path: path, info: info(path, s.files[path]!),
                                   locked: { if case .source = mode { return true }; if case .destination = mode { return true }; return false }())
        }
    }

    func identify(_ path: String) throws(StorageError) -> DeviceInfo? {
        state.withLock { s in s.files[path].map { info(path, $0) } }
    }

    func syncDirectory(containing path: String) throws(StorageError) {}

    /// Records an operation and applies an injected fault, if any.
    func record(_ path: String, _ kind: OpKind, _ offset: UInt64, _ length: UInt64, _ s: inout State) throws(StorageError) {
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
            }
            throw StorageError(operation, path: path, errno: e, offset: offset, length: length)
        }
    }

    func unlock(_ path: String) { state.withLock { $0.files[path]?.locked = false } }
}

/// An open simulated file; every call goes through the storage's lock, so it is safe to share.
final class SimulatedDevice: StorageDevice {
    let storage: SimulatedStorage
    let path: String
    let info: DeviceInfo
    let locked: Bool

    init(storage: SimulatedStorage, path: String, info: DeviceInfo, locked: Bool) {
        self.storage = storage; self.path = path; self.info = info; self.locked = locked
    }

    deinit { if locked { storage.unlock(path) } }

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(StorageError) {
        try storage.state.withLock { (s: inout SimulatedStorage.State) throws(StorageError) in
            try storage.record(path, .read, offset, UInt64(buffer.count), &s)
            let data = s.files[path]!.data
            for i in 0..<buffer.count {
                let at = Int(offset) + i
                buffer[i] = at < data.count ? data[at] : 0
            }
        }
    }

    func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(StorageError) {
        try storage.state.withLock { (s: inout SimulatedStorage.State) throws(StorageError) in
            try storage.record(path, .write, offset, UInt64(buffer.count), &s)
            let end = Int(offset) + buffer.count
            if s.files[path]!.data.count < end {
                if info.identity.kind == .blockDevice { throw StorageError(.write, path: path, errno: ENOSPC, offset: offset) }
                s.files[path]!.data += [UInt8](repeating: 0, count: end - s.files[path]!.data.count)
                let blocks = (end + SimulatedStorage.block - 1) / SimulatedStorage.block
                if s.files[path]!.allocated.count < blocks {
                    s.files[path]!.allocated += [Bool](repeating: false, count: blocks - s.files[path]!.allocated.count)
                }
            }
            s.files[path]!.data.replaceSubrange(Int(offset)..<end, with: buffer)
            if buffer.count > 0 {
                for b in Int(offset) / SimulatedStorage.block...(end - 1) / SimulatedStorage.block { s.files[path]!.allocated[b] = true }
            }
        }
    }

    func sync() throws(StorageError) {
        if let delay = storage.state.withLock({ $0.syncDelay }) { delay(path) }
        try storage.state.withLock { (s: inout SimulatedStorage.State) throws(StorageError) in
            try storage.record(path, .sync, 0, 0, &s)
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

    func release(offset: UInt64, length: UInt64) throws(StorageError) { try punch(.release, offset, length) }
    func zeroOut(offset: UInt64, length: UInt64) throws(StorageError) { try punch(.zeroOut, offset, length) }

    func nextData(from offset: UInt64) throws(StorageError) -> Range<UInt64>? {
        try storage.state.withLock { (s: inout SimulatedStorage.State) throws(StorageError) -> Range<UInt64>? in
            try storage.record(path, .nextData, offset, 0, &s)
            let f = s.files[path]!
            guard f.kind == .regularFile else { return offset < UInt64(f.data.count) ? offset..<UInt64(f.data.count) : nil }
            let b0 = Int(offset) / SimulatedStorage.block
            guard let first = (b0..<f.allocated.count).first(where: { f.allocated[$0] }) else { return nil }
            let end = (first..<f.allocated.count).first(where: { !f.allocated[$0] }) ?? f.allocated.count
            let lo = max(offset, UInt64(first * SimulatedStorage.block))
            let hi = min(UInt64(end * SimulatedStorage.block), UInt64(f.data.count))
            return lo < hi ? lo..<hi : nil
        }
    }

    func dropCache(offset: UInt64, length: UInt64) {}

    func close() { if locked { storage.unlock(path) } }

    func allocatedBytes() -> UInt64? {
        UInt64(storage.allocatedBlocks(path) * SimulatedStorage.block)
    }
}
