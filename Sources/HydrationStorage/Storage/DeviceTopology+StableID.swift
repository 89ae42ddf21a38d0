import CLinux

#if canImport(Glibc)
    import Glibc
#endif

extension DeviceTopology {
    // MARK: stable identity

    /// An identity of the file open on `fd` that survives reboots and renumbering:
    /// `file:uuid=<fs uuid>:ino=<n>:btime=<s>.<ns>` (FS_IOC_GETFSUUID), or `file:fsid=<hex>:…`
    /// (statfs f_fsid) when the filesystem gives no UUID; "" without a filesystem id or a birth
    /// time (an inode number alone is reused after a delete).
    public func stableID(ofFileDescriptor fd: Int32) -> String {
        var ino: UInt64 = 0, sec: Int64 = 0, nsec: UInt32 = 0, hasBtime: Int32 = 0
        guard hyd_statx_btime(fd, nil, &ino, &sec, &nsec, &hasBtime) == 0, hasBtime != 0 else { return "" }
        let fs = filesystemID(fd)
        guard !fs.isEmpty else { return "" }
        return StableID.file(filesystem: fs, inode: ino, birthSeconds: sec, birthNanoseconds: nsecString(nsec)).text
    }

    /// The same for a file named by path. The file itself is not opened (an open would break,
    /// or with O_NONBLOCK fail on, someone's lease): the filesystem id comes from its directory,
    /// unless the file is a mount of its own.
    public func stableID(ofFileAt path: String) -> String {
        stableID(ofFileAt: path, failure: nil)
    }

    /// `stableID(ofFileAt:)`, or the error when a file it needed could not be opened for want of
    /// descriptors (EMFILE, ENFILE): an identity worked out without it would read as "none",
    /// which is another answer (a device that cannot be confirmed), not the truth.
    public func checkedStableID(ofFileAt path: String) throws(StorageError) -> String {
        let f = ResourceFailure()
        let id = stableID(ofFileAt: path, failure: f)
        if let e = f.errno {
            throw StorageError(.open, path: path, errno: e, detail: "working out its stable identity")
        }
        return id
    }

    /// `stableID(ofBlock:)`, or the error as `checkedStableID(ofFileAt:)`.
    public func checkedStableID(ofBlock rdev: UInt64, path: String) throws(StorageError) -> String {
        let f = ResourceFailure()
        let id = stableID(ofBlock: rdev, depth: 0, failure: f)
        if let e = f.errno {
            throw StorageError(.open, path: path, errno: e, detail: "working out its stable identity")
        }
        return id
    }

    func stableID(ofFileAt path: String, failure: ResourceFailure?) -> String {
        var ino: UInt64 = 0, sec: Int64 = 0, nsec: UInt32 = 0, hasBtime: Int32 = 0
        var st = stat()
        guard stat(path, &st) == 0, hyd_statx_btime(-1, path, &ino, &sec, &nsec, &hasBtime) == 0, hasBtime != 0 else {
            return ""
        }
        var fd = openRecording(parentDirectory(of: path), O_RDONLY | O_DIRECTORY | O_CLOEXEC, failure)
        var dst = stat()
        if fd >= 0 && (fstat(fd, &dst) != 0 || dst.st_dev != st.st_dev) {
            close(fd)
            fd = -1
        }
        if fd < 0 { fd = openRecording(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK, failure) }
        guard fd >= 0 else { return "" }
        defer { close(fd) }
        let fs = filesystemID(fd)
        guard !fs.isEmpty, ino == UInt64(st.st_ino) else { return "" }
        return StableID.file(filesystem: fs, inode: ino, birthSeconds: sec, birthNanoseconds: nsecString(nsec)).text
    }

    /// `uuid=<hex>` (FS_IOC_GETFSUUID) or `fsid=<hex>` (statfs f_fsid) of the filesystem `fd` is
    /// on; "" when it has neither.
    func filesystemID(_ fd: Int32) -> String {
        var uuid = [UInt8](repeating: 0, count: 16)
        var len: Int32 = 0
        if hyd_get_fsuuid(fd, &uuid, &len) == 0, len > 0, uuid[0..<Int(len)].contains(where: { $0 != 0 }) {
            return "uuid=" + hexString(uuid[0..<Int(len)])
        }
        var fsid: UInt64 = 0
        if hyd_statfs_fsid(fd, &fsid) == 0, fsid != 0 { return "fsid=" + String(fsid, radix: 16) }
        return ""
    }

    /// An identity of a block device that survives reboots and renumbering:
    /// `part:<whole disk's id>:<partition number>:<start sector>`, `dm:uuid=<dm uuid>` (or
    /// `dm:name=<name>`), `md:<array uuid>`, `loop:<backing file's id>:offset=<n>:sizelimit=<n>`,
    /// `wwid:<wwid>`, `serial:<serial>`; "" when none is known.
    public func stableID(ofBlock rdev: UInt64) -> String {
        stableID(ofBlock: rdev, depth: 0, failure: nil)
    }

    func stableID(ofBlock rdev: UInt64, depth: Int, failure: ResourceFailure?) -> String {
        guard depth < 16, let dir = blockDir(rdev) else { return "" }
        func read(_ p: String) -> String? { self.read(p, failure: failure) }
        if exists(dir + "/partition") {
            guard let whole = devNumber(ofDir: parentDirectory(of: dir)) else { return "" }
            let parent = stableID(ofBlock: whole, depth: depth + 1, failure: failure)
            guard !parent.isEmpty, let n = read(dir + "/partition"), let start = read(dir + "/start") else { return "" }
            return StableID.partition(of: StableID(parent), number: n, start: start).text
        }
        if exists(dir + "/dm") {
            if let u = read(dir + "/dm/uuid"), !u.isEmpty { return StableID.deviceMapper(uuid: u).text }
            if let n = read(dir + "/dm/name"), !n.isEmpty { return StableID.deviceMapper(name: n).text }
            return bootScopedID(dir: dir, failure: failure)
        }
        if exists(dir + "/md") {
            if let u = read(dir + "/md/uuid"), !u.isEmpty { return StableID.mdArray(uuid: u).text }
            return bootScopedID(dir: dir, failure: failure)
        }
        if exists(dir + "/loop") {
            guard let lb = loopBacking(dir: dir, failure: failure) else { return "" }
            // The backing file's own id, from the file itself: it must still be the file the
            // loop device holds (not deleted or replaced under its name).
            let fd = openRecording(lb.path, O_RDONLY | O_CLOEXEC | O_NONBLOCK, failure)
            guard fd >= 0 else { return "" }
            defer { close(fd) }
            var st = stat()
            guard fstat(fd, &st) == 0,
                StorageObject.file(device: UInt64(st.st_dev), inode: UInt64(st.st_ino)) == lb.file
            else { return "" }
            let f = stableID(ofFileDescriptor: fd)
            return f.isEmpty ? "" : StableID.loop(backing: StableID(f), offset: lb.offset, sizeLimit: lb.sizeLimit).text
        }
        for w in [dir + "/wwid", dir + "/device/wwid"] {
            if let v = read(w), !v.isEmpty { return StableID.wwid(v).text }
        }
        for s in [dir + "/serial", dir + "/device/serial"] {
            if let v = read(s), !v.isEmpty { return StableID.serial(v).text }
        }
        return bootScopedID(dir: dir, failure: failure)
    }

    /// For a device with nothing stable to go by (a virtio disk without a serial): the boot and
    /// the kernel's disk sequence number, which is never reused within a boot (a loop device
    /// attached again, a disk replaced, each get a new one). It confirms the device across daemon
    /// restarts; after a reboot it differs, and the operator decides (`resume --accept-devices`).
    func bootScopedID(dir: String, failure: ResourceFailure? = nil) -> String {
        guard let boot = read(proc + "/sys/kernel/random/boot_id", failure: failure), !boot.isEmpty,
            let seq = read(dir + "/diskseq", failure: failure), !seq.isEmpty
        else { return "" }
        return StableID.bootScoped(bootID: boot, diskSequence: seq).text
    }
}
