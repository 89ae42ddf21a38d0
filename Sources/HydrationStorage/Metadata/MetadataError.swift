/// Why metadata could not be used. Every case names the file.
public struct MetadataError: Error, Sendable, Equatable, CustomStringConvertible {
    public enum Reason: Error, Sendable, Equatable {
        case empty
        case truncated
        case badMagic
        case badChecksum(stored: UInt32, computed: UInt32)
        case unsupportedVersion(UInt32)
        case invalidField(String)
        /// Both superblock slots unusable: what failed in each.
        case noValidSuperblock(slot0: String, slot1: String)
        /// The bitmap pages do not add up to the superblock's hydrated count: a page was lost.
        case bitmapMismatch(expected: UInt64, found: UInt64)
        /// The metadata belongs to other devices, or to another geometry, than the job names.
        case identityMismatch(String)
        case alreadyExists
        /// An earlier commit failed; the store refuses to pretend it did not (no fsync retry).
        case failedEarlier(String)
        case io(StorageError)
    }

    public var path: String
    public var reason: Reason

    public init(path: String, reason: Reason) { self.path = path; self.reason = reason }

    public var description: String { "metadata \(path): \(reason.text)" }

    /// True when the file's contents are unusable (as opposed to an I/O failure reading it).
    public var isCorruption: Bool {
        switch reason {
        case .io, .alreadyExists, .identityMismatch, .failedEarlier: return false
        default: return true
        }
    }
}

extension MetadataError.Reason {
    var text: String {
        switch self {
        case .empty: return "block is empty (all zeros)"
        case .truncated: return "file is truncated"
        case .badMagic: return "bad magic (not hydration metadata)"
        case .badChecksum(let s, let c): return "checksum mismatch (stored \(hex(s)), computed \(hex(c)))"
        case .unsupportedVersion(let v): return "unsupported format version \(v)"
        case .invalidField(let f): return "invalid field: \(f)"
        case .noValidSuperblock(let a, let b): return "no valid superblock (slot 0: \(a); slot 1: \(b))"
        case .bitmapMismatch(let e, let f):
            return
                "bitmap pages hold \(f) hydrated regions but the superblock records \(e): a bitmap page was lost or corrupted"
        case .identityMismatch(let s): return "belongs to another job: \(s)"
        case .alreadyExists: return "already exists"
        case .failedEarlier(let s): return "an earlier commit failed (\(s)); refusing further commits"
        case .io(let e): return e.description
        }
    }
}

private func hex(_ v: UInt32) -> String { "0x" + String(v, radix: 16) }
