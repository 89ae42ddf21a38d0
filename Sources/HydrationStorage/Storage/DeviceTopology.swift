import CLinux

#if canImport(Glibc)
    import Glibc
#endif

// Device identity and aliases: what a path's bytes live on (loop backing files, partitions'
// disks, dm/md slaves, a file's filesystem device, recursively), who else has it open, and an
// identity that survives reboots and renumbering. Read from sysfs (a root parameter, so tests can
// point it at a fake tree), /proc, and a few ioctls (CLinux). See docs/design.md, "Device identity
// and aliases".

/// Reads the storage topology: sysfs under `sysfs`, processes under `proc`, and — only against
/// the real /sys — device nodes under /dev (LOOP_GET_STATUS64). Every call blocks.
public struct DeviceTopology: Sendable {
    public var sysfs: String
    public var proc: String
    /// Query /dev/loopN with ioctls; false for a fake sysfs tree.
    public var useDeviceNodes: Bool

    public init(sysfs: String = "/sys", proc: String = "/proc") {
        self.sysfs = sysfs
        self.proc = proc
        self.useDeviceNodes = sysfs == "/sys"
    }

    // MARK: stacks

    /// What `path` lives on. A missing path is a file to be created: it lives on the filesystem
    /// of its nearest existing ancestor directory.
    public func stack(of path: String) throws(StorageError) -> StorageStack {
        var b = Builder(topo: self)
        var st = stat()
        if stat(path, &st) != 0 {
            guard errno == ENOENT else { throw StorageError(.stat, path: path, errno: errno) }
            b.layers.append(StorageLayer(object: .absent(path: path), name: path))
            var dir = parentDirectory(of: path)
            while stat(dir, &st) != 0 {
                if dir == "/" { return StorageStack(path: path, layers: b.layers) }
                dir = parentDirectory(of: dir)
            }
            b.addFilesystem(of: UInt64(st.st_dev), path: dir, parent: 0)
            return StorageStack(path: path, layers: b.layers)
        }
        if (st.st_mode & S_IFMT) == S_IFBLK {
            b.addBlock(UInt64(st.st_rdev), parent: nil, relation: "", name: path)
        } else {
            b.addFile(.file(device: UInt64(st.st_dev), inode: UInt64(st.st_ino)), name: path, parent: nil, relation: "")
        }
        return StorageStack(path: path, layers: b.layers)
    }

    /// The stack of a block device given by number (tests with a fake sysfs tree use it).
    func stack(ofBlockDevice rdev: UInt64, path: String) -> StorageStack {
        var b = Builder(topo: self)
        b.addBlock(rdev, parent: nil, relation: "", name: path)
        return StorageStack(path: path, layers: b.layers)
    }

    private struct Builder {
        let topo: DeviceTopology
        var layers: [StorageLayer] = []

        func index(of o: StorageObject) -> Int? { layers.firstIndex { $0.object == o } }

        mutating func addFile(_ o: StorageObject, name: String, parent: Int?, relation: String) {
            guard index(of: o) == nil else { return }
            layers.append(StorageLayer(object: o, name: name, parent: parent, relation: relation))
            let me = layers.count - 1
            guard case .file(let dev, _) = o else { return }
            addFilesystem(of: dev, path: name, parent: me)
            // An overlay file lives on its upper and lower files: /upper/f and /merged/f are the
            // same file under two device numbers, and a job copying one onto the other zeroes it.
            for real in topo.overlayLayers(of: name, device: dev) {
                var st = stat()
                guard stat(real, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG else { continue }
                addFile(
                    .file(device: UInt64(st.st_dev), inode: UInt64(st.st_ino)), name: real, parent: me,
                    relation: "overlay layer")
            }
        }

        mutating func addFilesystem(of dev: UInt64, path: String, parent: Int) {
            if majorOf(dev) != 0, topo.blockDir(dev) != nil {
                addBlock(dev, parent: parent, relation: "filesystem on", name: nil)
                return
            }
            // An anonymous st_dev (btrfs, whose st_dev is not its disks'; tmpfs, overlay, nfs
            // have no disk and end the stack here).
            for d in topo.filesystemDevices(anonymous: dev, path: path) {
                addBlock(d, parent: parent, relation: "filesystem on", name: nil)
            }
        }

        mutating func addBlock(_ rdev: UInt64, parent: Int?, relation: String, name: String?) {
            let o = StorageObject.block(rdev: rdev)
            guard index(of: o) == nil else { return }
            guard let dir = topo.blockDir(rdev) else {
                layers.append(
                    StorageLayer(
                        object: o, name: name ?? "block device \(majorOf(rdev)):\(minorOf(rdev))", parent: parent,
                        relation: relation))
                return
            }
            let kname = baseName(dir)
            var label = "/dev/\(kname)"
            if let n = topo.read(dir + "/dm/name"), !n.isEmpty { label += " (\(n))" }
            if let name, name != "/dev/\(kname)" { label = "\(name) (\(label))" }
            let me = layers.count
            layers.append(StorageLayer(object: o, name: label, parent: parent, relation: relation))
            if topo.exists(dir + "/partition"), let whole = topo.devNumber(ofDir: parentDirectory(of: dir)) {
                addBlock(whole, parent: me, relation: "partition of", name: nil)
            }
            for s in topo.list(dir + "/slaves") {
                if let sd = topo.realPath(dir + "/slaves/" + s), let r = topo.devNumber(ofDir: sd) {
                    addBlock(r, parent: me, relation: "on", name: nil)
                }
            }
            if let lb = topo.loopBacking(dir: dir) {
                layers[me].loop = LoopBacking(file: lb.file, offset: lb.offset, sizeLimit: lb.sizeLimit)
                addFile(lb.file, name: lb.path, parent: me, relation: "backing file")
            }
        }
    }

    struct LoopStatus {
        var file: StorageObject
        var path: String
        var offset: UInt64
        var sizeLimit: UInt64
    }

    /// A bound loop device's backing file: LOOP_GET_STATUS64 (st_dev/st_ino even of a deleted or
    /// renamed file) when the device node can be opened, else sysfs `loop/backing_file` + stat.
    func loopBacking(dir: String, failure: ResourceFailure? = nil) -> LoopStatus? {
        guard exists(dir + "/loop") else { return nil }
        var path = read(dir + "/loop/backing_file", failure: failure) ?? ""
        if path.hasSuffix(" (deleted)") { path.removeLast(" (deleted)".count) }
        if useDeviceNodes {
            let fd = openRecording("/dev/" + baseName(dir), O_RDONLY | O_CLOEXEC | O_NONBLOCK, failure)
            if fd >= 0 {
                defer { close(fd) }
                var dev: UInt64 = 0, ino: UInt64 = 0, off: UInt64 = 0, lim: UInt64 = 0
                if hyd_loop_status(fd, &dev, &ino, &off, &lim) == 0 {
                    return LoopStatus(
                        file: .file(device: dev, inode: ino),
                        path: path.isEmpty ? "backing file of /dev/\(baseName(dir))" : path,
                        offset: off, sizeLimit: lim)
                }
                if errno == ENXIO { return nil }  // not bound
            }
        }
        var st = stat()
        guard !path.isEmpty, stat(path, &st) == 0 else { return nil }
        return LoopStatus(
            file: .file(device: UInt64(st.st_dev), inode: UInt64(st.st_ino)), path: path,
            offset: UInt64(read(dir + "/loop/offset") ?? "") ?? 0,
            sizeLimit: UInt64(read(dir + "/loop/sizelimit") ?? "") ?? 0)
    }

}
