import CLinux

#if canImport(Glibc)
    import Glibc
#endif

extension DeviceTopology {
    // MARK: in use

    /// Whether anything else has `path` open. A regular file: a write lease is refused
    /// (F_SETLEASE F_WRLCK fails with EAGAIN while any other open file description exists; taken
    /// and dropped at once), or a loop device or a process is found holding it. A block device:
    /// something is stacked on it or on one of its partitions (sysfs holders), or it is mounted.
    /// nil when nothing is found, or `path` does not exist.
    public func usage(of path: String) throws(StorageError) -> DeviceUsage? {
        var st = stat()
        if stat(path, &st) != 0 {
            if errno == ENOENT { return nil }
            throw StorageError(.stat, path: path, errno: errno)
        }
        if (st.st_mode & S_IFMT) == S_IFBLK {
            var holders = blockHolders(UInt64(st.st_rdev))
            // A loop device in its stack shares its bytes with whatever else has the backing
            // file open: other loop devices over the same bytes, and processes.
            let stack = stack(ofBlockDevice: UInt64(st.st_rdev), path: path)
            let mine = Set(stack.layers.map(\.object))
            for (i, l) in stack.layers.enumerated() {
                guard let lb = l.loop, i + 1 < stack.layers.count,
                    let fileLayer = stack.layers.first(where: { $0.object == lb.file })
                else { continue }
                for other in loopDevices(backing: lb.file)
                where !mine.contains(.block(rdev: other.rdev)) && other.backing.overlaps(lb) {
                    holders.append("\(other.name) (a loop device over the same bytes of \(fileLayer.name))")
                }
                holders += processesHolding(lb.file).map { "\($0) (has \(fileLayer.name) open)" }
            }
            return holders.isEmpty ? nil : DeviceUsage(path: path, holders: holders)
        }
        guard (st.st_mode & S_IFMT) == S_IFREG else { return nil }
        // The scans run even when the kernel would grant a write lease: the lease does not count
        // a descriptor opened with O_PATH or with no access mode (flags 3), and either one lets
        // its holder open the file again through /proc/PID/fd at any time. Asking the lease
        // first and skipping the scans would save about 20 ms per job and accept, and release,
        // a source held that way (DeviceTopologyTests.everyKindOfHolderIsRefusedTheLease).
        let me = StorageObject.file(device: UInt64(st.st_dev), inode: UInt64(st.st_ino))
        var holders = loopsBacked(by: me)
        holders += processesHolding(me)
        // An overlay file's upper and lower files, opened by their own paths, are the same bytes.
        let layers = overlayLayers(of: path, device: UInt64(st.st_dev))
        var layerObjects: [(path: String, object: StorageObject)] = []
        for real in layers {
            var rst = stat()
            guard stat(real, &rst) == 0 else { continue }
            let o = StorageObject.file(device: UInt64(rst.st_dev), inode: UInt64(rst.st_ino))
            layerObjects.append((real, o))
            holders += (loopsBacked(by: o) + processesHolding(o)).map {
                "\($0) (has \(real) open, a layer of the overlay file)"
            }
        }
        if !holders.isEmpty { return DeviceUsage(path: path, holders: holders) }
        // Nothing found holding it: ask the kernel again for about a second. A reference the
        // kernel still holds for a moment after a close (the deferred release of a file a moment
        // ago in use, e.g. by this daemon's previous job on it) refuses the lease too, and goes
        // away; so does a child of this process between fork and exec, which the scan skips but
        // whose copies of our descriptors and mappings count until its exec (on a loaded 2-core
        // machine that took longer than the 80 ms this loop used to wait: a full test run failed
        // on it). A real opener does not go away. Runs on an I/O thread: the sleeps block
        // nothing else, and only a refusal nobody could be named for waits at all.
        var namedWithoutDescriptors = false
        for delayMs in [20, 40, 80, 160, 320, 400, 0] {
            if !([path] + layers).contains(where: writeLeaseRefused) { return nil }
            if !namedWithoutDescriptors {
                namedWithoutDescriptors = true
                // A mapping of an overlay file shows the overlay's device and inode here (checked on
                // this kernel); a holder that mapped the upper or lower file directly shows that one.
                let named =
                    holdersWithoutDescriptors(me)
                    + layerObjects.flatMap { l in
                        holdersWithoutDescriptors(l.object).map { "\($0) (\(l.path), a layer of the overlay file)" }
                    }
                if !named.isEmpty { return DeviceUsage(path: path, holders: named) }
            }
            if delayMs > 0 { usleep(UInt32(delayMs) * 1000) }
        }
        return DeviceUsage(path: path, holders: [])
    }

    /// The kernel's answer to a write lease on a file, taken and dropped at once.
    package enum LeaseAnswer: Equatable {
        /// Nobody else has the file open (no other open file description, no mapping).
        case granted
        /// Someone else has it open, or holds a lease on it.
        case refused
        /// The lease cannot be asked for (EACCES without CAP_LEASE on another user's file, a
        /// filesystem without leases, the file gone): says nothing either way.
        case unknown
    }

    package func leaseProbe(_ path: String) -> LeaseAnswer {
        // O_NONBLOCK: an open that would break someone else's lease fails (EWOULDBLOCK) instead of
        // waiting for it; that someone has the file open.
        let fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK)
        guard fd >= 0 else { return errno == EWOULDBLOCK ? .refused : .unknown }
        defer { close(fd) }
        if hyd_probe_write_lease(fd) == 0 { return .granted }
        return errno == EAGAIN ? .refused : .unknown
    }

    /// Whether the kernel refuses a write lease on the file: someone else has it open.
    func writeLeaseRefused(_ path: String) -> Bool {
        leaseProbe(path) == .refused
    }

    /// Bound loop devices whose backing file is `file`.
    func loopsBacked(by file: StorageObject) -> [String] {
        loopDevices(backing: file).map(\.name)
    }

    /// The same, with device numbers and ranges. Candidates come from sysfs (a stat of
    /// `loop/backing_file`), so that the loop devices of unrelated users are not opened; a
    /// candidate, or a loop whose backing file's name is gone, is confirmed with the ioctl.
    func loopDevices(backing file: StorageObject) -> [(name: String, rdev: UInt64, backing: LoopBacking)] {
        var out: [(name: String, rdev: UInt64, backing: LoopBacking)] = []
        for name in list(sysfs + "/block").sorted(by: natural) where exists(sysfs + "/block/\(name)/loop") {
            guard let dir = realPath(sysfs + "/block/" + name), let rdev = devNumber(ofDir: dir) else { continue }
            var path = read(dir + "/loop/backing_file") ?? ""
            if path.hasSuffix(" (deleted)") { path.removeLast(" (deleted)".count) }
            var st = stat()
            let named = !path.isEmpty && stat(path, &st) == 0
            if named && StorageObject.file(device: UInt64(st.st_dev), inode: UInt64(st.st_ino)) != file { continue }
            if !named && !useDeviceNodes { continue }
            guard let lb = loopBacking(dir: dir), lb.file == file else { continue }
            out.append(
                (
                    name: "/dev/\(name)", rdev: rdev,
                    backing: LoopBacking(file: lb.file, offset: lb.offset, sizeLimit: lb.sizeLimit)
                ))
        }
        return out
    }

    /// Holders without a descriptor, which the kernel counts but `processesHolding` cannot see:
    /// "pid N (comm) maps it" (/proc/PID/maps: a mapping whose descriptor was closed), "pid N
    /// (comm) runs it" (/proc/PID/exe), "swap" (/proc/swaps). Read only after a refused lease
    /// that nobody was named for: they are real holders, not a moment's reference, so the check
    /// names them instead of waiting for them to go away.
    func holdersWithoutDescriptors(_ file: StorageObject) -> [String] {
        guard case .file(let dev, let ino) = file else { return [] }
        var out: [String] = []
        let selfPid = getpid()
        let selfExe = realPath("\(proc)/self/exe")
        let mapsDev =
            String(majorOf(dev), radix: 16, uppercase: false).leftPadded(2) + ":"
            + String(minorOf(dev), radix: 16).leftPadded(2)
        for p in list(proc).sorted(by: natural) {
            guard let pid = Int32(p) else { continue }
            // A child of this process not yet exec'd shares our mappings: not another user.
            if pid != selfPid, let selfExe, isUnexecedChild(p, of: selfPid, exe: selfExe) { continue }
            let name =
                pid == selfPid
                ? "this process (pid \(pid), \(read("\(proc)/\(p)/comm") ?? "?"))"
                : "pid \(pid) (\(read("\(proc)/\(p)/comm") ?? "?"))"
            var st = stat()
            if stat("\(proc)/\(p)/exe", &st) == 0,
                StorageObject.file(device: UInt64(st.st_dev), inode: UInt64(st.st_ino)) == file
            {
                out.append("\(name) runs it")
                continue
            }
            guard let maps = read("\(proc)/\(p)/maps", limit: 1 << 24) else { continue }
            for line in maps.split(separator: "\n") {
                // address perms offset dev inode path
                let f = line.split(separator: " ", maxSplits: 5, omittingEmptySubsequences: true)
                if f.count >= 5, f[3] == mapsDev, UInt64(f[4]) == ino {
                    out.append("\(name) maps it")
                    break
                }
            }
        }
        if let swaps = read("\(proc)/swaps") {
            for line in swaps.split(separator: "\n").dropFirst() {
                guard let first = line.split(separator: " ", omittingEmptySubsequences: true).first else { continue }
                var st = stat()
                if stat(unescapeMount(String(first)), &st) == 0,
                    StorageObject.file(device: UInt64(st.st_dev), inode: UInt64(st.st_ino)) == file
                {
                    out.append("swap (swapon \(first))")
                }
            }
        }
        return out
    }

    /// "pid N (comm)" for every process with `file` open (/proc/PID/fd); this process is named as such.
    func processesHolding(_ file: StorageObject) -> [String] {
        var out: [String] = []
        let selfPid = getpid()
        let selfExe = realPath("\(proc)/self/exe")
        for p in list(proc).sorted(by: natural) {
            guard let pid = Int32(p) else { continue }
            let fdDir = "\(proc)/\(p)/fd"
            for f in list(fdDir) {
                var st = stat()
                guard stat(fdDir + "/" + f, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG,
                    StorageObject.file(device: UInt64(st.st_dev), inode: UInt64(st.st_ino)) == file
                else { continue }
                // A child of this process between fork and exec holds copies of this process's
                // own descriptors (the probe's among them; close-on-exec drops them at its exec):
                // not another user. It made the in-use check refuse a file only this process had
                // open, when another thread spawned a program at that moment.
                if pid != selfPid, let selfExe, isUnexecedChild(p, of: selfPid, exe: selfExe) { break }
                let comm = read("\(proc)/\(p)/comm") ?? "?"
                out.append(pid == selfPid ? "this process (pid \(pid), \(comm))" : "pid \(pid) (\(comm))")
                break
            }
        }
        return out
    }

    /// Whether process `p` is a child of `parent` still running `parent`'s executable (forked, not
    /// yet exec'd).
    func isUnexecedChild(_ p: String, of parent: Int32, exe: String) -> Bool {
        guard let status = read("\(proc)/\(p)/status"),
            let line = status.split(separator: "\n").first(where: { $0.hasPrefix("PPid:") }),
            Int32(line.dropFirst(5).filter { $0 != " " && $0 != "\t" }) == parent
        else { return false }
        return realPath("\(proc)/\(p)/exe") == exe
    }

    /// Devices stacked on a block device or its partitions, and its mount points.
    func blockHolders(_ rdev: UInt64) -> [String] {
        guard let dir = blockDir(rdev) else { return [] }
        var devs: [(String, UInt64?)] = [(dir, rdev)]
        for sub in list(dir).sorted(by: natural) where exists(dir + "/" + sub + "/partition") {
            devs.append((dir + "/" + sub, devNumber(ofDir: dir + "/" + sub)))
        }
        var out: [String] = []
        let mounts = mountPoints()
        for (d, r) in devs {
            for h in list(d + "/holders").sorted(by: natural) {
                let via = d == dir ? "" : " (on \(baseName(d)))"
                out.append("/dev/\(h)\(via)")
            }
            if let r, let m = mounts["\(majorOf(r)):\(minorOf(r))"] {
                let via = d == dir ? "" : "\(baseName(d)) "
                out += m.map { "\(via)mount at \($0)" }
            }
        }
        return out
    }

    struct Mount {
        var device: String  // "maj:min" (st_dev of the files on it)
        var mountPoint: String
        var fsType: String
        var source: String
        /// The directory of the filesystem mounted there ("/" unless a bind mount of a subtree).
        var root: String = "/"
        /// Filesystem-specific options (overlay: lowerdir=…,upperdir=…).
        var superOptions: String = ""
    }

    /// /proc/self/mountinfo.
    func mounts() -> [Mount] {
        guard let text = read(proc + "/self/mountinfo", limit: 1 << 22) else { return [] }
        var out: [Mount] = []
        for line in text.split(separator: "\n") {
            let f = line.split(separator: " ", omittingEmptySubsequences: true)
            guard f.count > 4 else { continue }
            var fsType = "", source = "", superOptions = ""
            if let dash = f.firstIndex(of: "-"), dash + 2 < f.count {
                fsType = String(f[dash + 1])
                source = unescapeMount(String(f[dash + 2]))
                if dash + 3 < f.count { superOptions = String(f[dash + 3]) }
            }
            out.append(
                Mount(
                    device: String(f[2]), mountPoint: unescapeMount(String(f[4])), fsType: fsType, source: source,
                    root: unescapeMount(String(f[3])), superOptions: superOptions))
        }
        return out
    }

    /// "maj:min" → mount points.
    func mountPoints() -> [String: [String]] {
        var out: [String: [String]] = [:]
        for m in mounts() { out[m.device, default: []].append(m.mountPoint) }
        return out
    }

    /// The block devices under a filesystem with an anonymous st_dev (`path` is on it): for
    /// btrfs every device of the filesystem (BTRFS_IOC_FS_INFO → /sys/fs/btrfs/<fsid>/devices);
    /// otherwise the source of the mount `path` is under, when that is a block device.
    func filesystemDevices(anonymous dev: UInt64, path: String) -> [UInt64] {
        var pst = stat()
        // Only files and directories are opened: opening a device node or a FIFO can have effects.
        let openable = stat(path, &pst) == 0 && ((pst.st_mode & S_IFMT) == S_IFREG || (pst.st_mode & S_IFMT) == S_IFDIR)
        let fd = openable ? open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK) : -1
        if fd >= 0 {
            defer { close(fd) }
            var fsid = [UInt8](repeating: 0, count: 16)
            if hyd_btrfs_fsid(fd, &fsid) == 0 {
                let h = hexString(fsid)
                let uuid = [
                    h.prefix(8), h.dropFirst(8).prefix(4), h.dropFirst(12).prefix(4), h.dropFirst(16).prefix(4),
                    h.dropFirst(20),
                ]
                .map(String.init).joined(separator: "-")
                let devs = "\(sysfs)/fs/btrfs/\(uuid)/devices"
                let out = list(devs).sorted(by: natural).compactMap { d in
                    realPath(devs + "/" + d).flatMap { devNumber(ofDir: $0) }
                }
                if !out.isEmpty { return out }
            }
        }
        // The mount whose mount point is the longest prefix of the path (the last one mounted
        // there when several are).
        guard let real = realPath(path) else { return [] }
        var best: Mount? = nil
        for m in mounts() where real == m.mountPoint || real.hasPrefix(m.mountPoint == "/" ? "/" : m.mountPoint + "/") {
            if best == nil || m.mountPoint.count >= best!.mountPoint.count { best = m }
        }
        guard let m = best, m.source.hasPrefix("/") else { return [] }
        var st = stat()
        guard stat(m.source, &st) == 0, (st.st_mode & S_IFMT) == S_IFBLK else { return [] }
        return [UInt64(st.st_rdev)]
    }
}
