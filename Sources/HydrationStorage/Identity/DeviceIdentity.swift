#if canImport(Glibc)
    import Glibc
#endif

/// What kind of object a path names. Discard and zero-out work differently on each.
public enum DeviceKind: String, Sendable, Codable {
    case regularFile = "file"
    case blockDevice = "block"
    /// An export of an NBD server, named by a URI (`RemoteSource`): only ever a source.
    case remote = "remote"
}

/// Enough to recognise the same file or device again, and to refuse two jobs (or source and
/// destination) that would touch the same bytes.
public struct DeviceIdentity: Sendable, Equatable, Hashable, Codable, CustomStringConvertible {
    public var kind: DeviceKind
    /// st_dev of a regular file (the filesystem), 0 for a block device.
    public var device: UInt64
    /// st_ino of a regular file, 0 for a block device.
    public var inode: UInt64
    /// st_rdev of a block device (major:minor), 0 for a regular file.
    public var rdev: UInt64

    public init(kind: DeviceKind, device: UInt64, inode: UInt64, rdev: UInt64) {
        self.kind = kind; self.device = device; self.inode = inode; self.rdev = rdev
    }

    public var description: String {
        switch kind {
        case .regularFile: return "file dev=\(device) ino=\(inode)"
        case .blockDevice: return "block device \(rdev >> 8 & 0xfff):\(rdev & 0xff | (rdev >> 12 & 0xfff00))"
        case .remote: return "NBD export"
        }
    }
}

public struct DeviceInfo: Sendable, Equatable {
    public var path: String
    public var identity: DeviceIdentity
    public var size: UInt64
    /// The smallest unit of I/O the device accepts (BLKSSZGET); 512 for regular files.
    public var logicalBlockSize: Int
    /// An identity that survives reboots and renumbering (device numbers, /dev/loopN, /dev/sdX
    /// change; a loop device's backing file, a dm uuid, a disk's WWN, a file's filesystem and
    /// birth time do not), and differs for any other object. Empty when none can be found: such a
    /// device cannot be confirmed after a restart. `identity` above is only valid while it is open.
    public var stableID: String
    public init(path: String, identity: DeviceIdentity, size: UInt64, logicalBlockSize: Int, stableID: String = "") {
        self.path = path; self.identity = identity; self.size = size; self.logicalBlockSize = logicalBlockSize
        self.stableID = stableID
    }
}
