import CLinux
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// The real storage layer: POSIX and Linux calls on files and block devices.
public struct PosixStorage: StorageProvider {
    /// Where device topology and identities are read from (sysfs, /proc).
    public var topology: DeviceTopology
    /// Direct I/O for sources and destinations, when set, whatever the job chose (`IOMode`):
    /// from the constructor (tests) or `HYDRATION_DIRECT_IO` (experiments, the benchmark's
    /// variants). Nil: each job's choice (`open(_:mode:directIO:why:)`), buffered for callers
    /// that do not choose.
    public var directOverride: (source: Bool, destination: Bool, why: String)?
    /// How `RemoteSource` URIs are opened; nil: they are refused (EPROTONOSUPPORT). The engine's
    /// `PosixStorage()` (HydrationService) plugs in libnbd's client.
    public var remote: (any RemoteDevices)?

    public init(topology: DeviceTopology = DeviceTopology(), directIO: Bool? = nil, remote: (any RemoteDevices)?) {
        self.topology = topology
        self.remote = remote
        if let directIO {
            self.directOverride = (directIO, directIO, "set by the storage provider")
        } else {
            self.directOverride = PosixStorage.directIOFromEnvironment
        }
    }

    /// From `HYDRATION_DIRECT_IO`: `1` (or on, yes, true, both) both sides, `source` or `dest`
    /// only that side, `0` (or anything else) neither; unset: nil, each job decides.
    public static var directIOFromEnvironment: (source: Bool, destination: Bool, why: String)? {
        guard let raw = getenv("HYDRATION_DIRECT_IO").map({ String(cString: $0) }) else { return nil }
        let v = raw.lowercased()
        let why = "HYDRATION_DIRECT_IO=\(raw)"
        if ["1", "on", "yes", "true", "both"].contains(v) { return (true, true, why) }
        if v == "source" { return (true, false, why) }
        if v == "dest" || v == "destination" { return (false, true, why) }
        return (false, false, why)
    }

    public func stack(of path: String) throws(StorageError) -> StorageStack? {
        // A remote export lives on another machine: it shares no local storage with anything.
        if RemoteSource.isURI(path) { return nil }
        return try topology.stack(of: path)
    }

    public func usage(of path: String) throws(StorageError) -> DeviceUsage? {
        // Who else uses a remote export is the server's business (its own clients).
        if RemoteSource.isURI(path) { return nil }
        return try topology.usage(of: path)
    }

    public func open(_ path: String, mode: OpenMode) throws(StorageError) -> any StorageDevice {
        try open(path, mode: mode, directIO: false, why: "not chosen by the caller")
    }

    public func open(_ path: String, mode: OpenMode, directIO: Bool, why: String) throws(StorageError)
        -> any StorageDevice
    {
        if RemoteSource.isURI(path) { return try remoteDevices(for: path).open(path, mode: mode) }
        var direct = false
        var reason = why
        switch mode {
        case .source, .destination:
            direct = directIO
            if let o = directOverride {
                if case .source = mode { direct = o.source } else { direct = o.destination }
                reason = o.why
            }
        default: break
        }
        return try PosixDevice.open(path, mode: mode, topology: topology, directIO: direct, why: reason)
    }

    /// Bytes a regular file has allocated (st_blocks), nil for anything else.
    public func allocatedBytes(of path: String) -> UInt64? {
        if RemoteSource.isURI(path) { return nil }
        var st = stat()
        guard stat(path, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG else { return nil }
        return UInt64(st.st_blocks) * 512
    }

    public func identify(_ path: String) throws(StorageError) -> DeviceInfo? {
        if RemoteSource.isURI(path) { return try remoteDevices(for: path).identify(path) }
        var st = stat()
        if stat(path, &st) != 0 {
            if errno == ENOENT { return nil }
            throw StorageError(.stat, path: path, errno: errno)
        }
        switch st.st_mode & S_IFMT {
        case S_IFREG:
            return DeviceInfo(
                path: path,
                identity: DeviceIdentity(
                    kind: .regularFile, device: UInt64(st.st_dev), inode: UInt64(st.st_ino), rdev: 0),
                size: UInt64(st.st_size), logicalBlockSize: 512, stableID: try topology.checkedStableID(ofFileAt: path))
        case S_IFBLK:
            // The size of a block device needs an open descriptor.
            let fd = Glibc.open(path, O_RDONLY | O_CLOEXEC)
            if fd < 0 { throw StorageError(.open, path: path, errno: errno) }
            defer { Glibc.close(fd) }
            var size: UInt64 = 0
            var lbs: Int32 = 512
            if hyd_blk_getsize64(fd, &size) != 0 { throw StorageError(.stat, path: path, errno: errno) }
            _ = hyd_blk_sszget(fd, &lbs)
            return DeviceInfo(
                path: path,
                identity: DeviceIdentity(kind: .blockDevice, device: 0, inode: 0, rdev: UInt64(st.st_rdev)),
                size: size, logicalBlockSize: Int(lbs),
                stableID: try topology.checkedStableID(ofBlock: UInt64(st.st_rdev), path: path))
        default:
            throw StorageError(.stat, path: path, errno: EINVAL)
        }
    }

    private func remoteDevices(for uri: String) throws(StorageError) -> any RemoteDevices {
        guard let remote else {
            throw StorageError(
                .open, path: uri, errno: EPROTONOSUPPORT,
                detail: "this program has no NBD client; only the daemon opens NBD sources")
        }
        return remote
    }

    public func removeCreatedFile(_ path: String) {
        _ = unlink(path)
    }

    public func syncDirectory(containing path: String) throws(StorageError) {
        let dir = parentDirectory(of: path)
        let fd = Glibc.open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if fd < 0 { throw StorageError(.syncDirectory, path: dir, errno: errno) }
        defer { Glibc.close(fd) }
        if fsync(fd) != 0 { throw StorageError(.syncDirectory, path: dir, errno: errno) }
    }
}

func parentDirectory(of path: String) -> String {
    guard let slash = path.lastIndex(of: "/") else { return "." }
    let dir = String(path[..<slash])
    return dir.isEmpty ? "/" : dir
}
