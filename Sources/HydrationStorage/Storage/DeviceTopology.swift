import CLinux

#if canImport(Glibc)
    import Glibc
#endif

// Device identity and aliases: what a path's bytes live on (loop backing files, partitions'
// disks, dm/md slaves, a file's filesystem device, recursively), who else has it open, and an
// identity that survives reboots and renumbering. Read from sysfs (a root parameter, so tests can
// point it at a fake tree), /proc, and a few ioctls (CLinux). See docs/design.md, "Device identity
// and aliases".

/// One object of a storage stack.
public enum StorageObject: Hashable, Sendable, CustomStringConvertible {
    /// A regular file (or anything that is not a block device): st_dev, st_ino.
    case file(device: UInt64, inode: UInt64)
    /// A block device: st_rdev.
    case block(rdev: UInt64)
    /// A path that does not exist yet (a file the job will create): equal to nothing else.
    case absent(path: String)

    public var description: String {
        switch self {
        case .file(let d, let i): return "file \(majorOf(d)):\(minorOf(d)) ino \(i)"
        case .block(let r): return "block \(majorOf(r)):\(minorOf(r))"
        case .absent(let p): return "new file \(p)"
        }
    }
}

/// The part of a backing file a loop device shows.
public struct LoopBacking: Hashable, Sendable {
    public var file: StorageObject
    public var offset: UInt64
    /// 0: up to the end of the file.
    public var sizeLimit: UInt64

    public init(file: StorageObject, offset: UInt64, sizeLimit: UInt64) {
        self.file = file; self.offset = offset; self.sizeLimit = sizeLimit
    }

    var end: UInt64 { sizeLimit == 0 ? UInt64.max : offset &+ sizeLimit }

    /// Two loop devices over the same bytes of one file alias each other.
    public func overlaps(_ o: LoopBacking) -> Bool {
        file == o.file && offset < o.end && o.offset < end
    }
}

/// One object a path's bytes live on, and how it was reached.
public struct StorageLayer: Hashable, Sendable {
    public var object: StorageObject
    /// For messages: "/dev/loop3", "/dev/dm-0 (vg-lv)", "/srv/vm.raw".
    public var name: String
    /// The layer this one was reached from (nil for the top), and how: "partition of",
    /// "on", "backing file", "filesystem on".
    public var parent: Int?
    public var relation: String
    /// Set on a loop device's layer.
    public var loop: LoopBacking?

    public init(
        object: StorageObject, name: String, parent: Int? = nil, relation: String = "", loop: LoopBacking? = nil
    ) {
        self.object = object; self.name = name; self.parent = parent; self.relation = relation; self.loop = loop
    }

    /// The same object, or two loop devices over overlapping bytes of one file.
    public func aliases(_ o: StorageLayer) -> Bool {
        if object == o.object { return true }
        if let a = loop, let b = o.loop { return a.overlaps(b) }
        return false
    }
}

/// Everything a path's bytes live on: the path's own object first, then (recursively) a
/// partition's whole disk, a dm/md device's slaves, a loop device's backing file, a file's
/// filesystem device.
public struct StorageStack: Sendable, Equatable {
    public var path: String
    public var layers: [StorageLayer]

    public init(path: String, layers: [StorageLayer]) {
        self.path = path; self.layers = layers
    }

    public var top: StorageLayer { layers[0] }

    /// "/dev/dm-0 (v) → on /dev/loop3 → backing file /srv/vm.raw"
    public func chain(to index: Int) -> String {
        var parts: [String] = []
        var i: Int? = index
        while let j = i {
            let l = layers[j]
            parts.append(l.relation.isEmpty ? l.name : "\(l.relation) \(l.name)")
            i = l.parent
        }
        return parts.reversed().joined(separator: " → ")
    }

    /// Whether the two share bytes: one's top object is among the objects the other lives on.
    /// Returns why (a sentence naming both paths), or nil. Two partitions of one disk, or two
    /// LVs (dm devices) on one PV, do not overlap: neither is below the other.
    public func overlap(with other: StorageStack, as label: String, otherLabel: String) -> String? {
        if let i = other.layers.firstIndex(where: { $0.aliases(top) }) {
            if i == 0 {
                return
                    "\(otherLabel) \(other.path) and \(label) \(path) are the same \(top.object != other.top.object ? "bytes (\(Self.aliasNote(other.top, top)))" : "object")"
            }
            return
                "\(otherLabel) \(other.path) lives on \(label) \(path) (\(other.chain(to: i))\(Self.aliasSuffix(other.layers[i], top)))"
        }
        if let i = layers.firstIndex(where: { $0.aliases(other.top) }) {
            return
                "\(label) \(path) lives on \(otherLabel) \(other.path) (\(chain(to: i))\(Self.aliasSuffix(layers[i], other.top)))"
        }
        return nil
    }

    /// ", which shows the same bytes of F as /dev/loopN" when a layer matched through another
    /// loop device over the same file.
    static func aliasSuffix(_ found: StorageLayer, _ top: StorageLayer) -> String {
        found.object == top.object ? "" : ", \(aliasNote(found, top))"
    }

    static func aliasNote(_ a: StorageLayer, _ b: StorageLayer) -> String {
        "\(a.name) and \(b.name) are loop devices over the same bytes of one file"
    }
}

/// Who else has a file or device open.
public struct DeviceUsage: Sendable, Equatable {
    public var path: String
    /// "/dev/loop3", "pid 1234 (qemu-system-x86)", "/dev/dm-0", "mount at /mnt": empty when the
    /// kernel says someone has it open (a write lease was refused) but nobody could be named.
    public var holders: [String]

    public init(path: String, holders: [String]) { self.path = path; self.holders = holders }

    public var holder: String { holders.first ?? "another process or the kernel" }
}

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
            // An overlay file lives on its upper and lower files (an attack had a job copy
            // /upper/f onto /merged/f, the same file under another device number, and zero it).
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
        // its holder open the file again through /proc/PID/fd at any time. (Asking the lease
        // first and skipping the scans saved about 20 ms per job; an attack accepted, and
        // released, a source held that way: DeviceTopologyTests.everyKindOfHolderIsRefusedTheLease.)
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
                let h = hex(fsid)
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

    // MARK: overlayfs

    /// The real files behind a file of an overlay filesystem: its upper file and the lower
    /// files of the same name that exist (`upperdir`/`lowerdir`/`lowerdir+`/`datadir+` of the
    /// mount, from /proc/self/mountinfo). The merged file and its upper file are one file under
    /// two device numbers; a lower file is what the merged file reads until it is copied up.
    /// Empty for a file on any other filesystem.
    func overlayLayers(of path: String, device dev: UInt64) -> [String] {
        guard majorOf(dev) == 0 else { return [] }
        let key = "\(majorOf(dev)):\(minorOf(dev))"
        guard let real = realPath(path) else { return [] }
        var out: [String] = []
        for m in mounts() where m.device == key && m.fsType == "overlay" {
            guard real == m.mountPoint || real.hasPrefix(m.mountPoint == "/" ? "/" : m.mountPoint + "/") else {
                continue
            }
            let inMount = String(real.dropFirst(m.mountPoint == "/" ? 0 : m.mountPoint.count))
            let rel = (m.root == "/" ? "" : m.root) + inMount
            for dir in Self.overlayDirectories(m.superOptions) {
                let candidate = dir + rel
                if exists(candidate), !out.contains(candidate) { out.append(candidate) }
            }
        }
        return out
    }

    /// upperdir, then every lower and data directory, from an overlay mount's super options
    /// (`lowerdir=a:b`, or one `lowerdir+=`/`datadir+=` per directory on newer kernels). A
    /// backslash escapes: `\ooo` (octal, as mountinfo writes space, comma, backslash) or the next
    /// character (`\:` in a lower directory's name).
    static func overlayDirectories(_ options: String) -> [String] {
        // Split on unescaped separators, then unescape each piece.
        func split(_ s: [Character], on sep: Character) -> [[Character]] {
            var out: [[Character]] = [], cur: [Character] = [], i = 0
            while i < s.count {
                if s[i] == "\\", i + 1 < s.count { cur += [s[i], s[i + 1]]; i += 2; continue }
                if s[i] == sep { out.append(cur); cur = [] } else { cur.append(s[i]) }
                i += 1
            }
            out.append(cur)
            return out
        }
        func unescape(_ s: [Character]) -> String {
            var out = "", i = 0
            while i < s.count {
                if s[i] == "\\", i + 3 < s.count, let v = UInt8(String(s[(i + 1)...(i + 3)]), radix: 8) {
                    out.append(Character(UnicodeScalar(v))); i += 4; continue
                }
                if s[i] == "\\", i + 1 < s.count { out.append(s[i + 1]); i += 2; continue }
                out.append(s[i]); i += 1
            }
            return out
        }
        var upper: [String] = [], lower: [String] = []
        for field in split(Array(options), on: ",") {
            guard let eq = field.firstIndex(of: "=") else { continue }
            let key = String(field[..<eq])
            let dirs = split(Array(field[(eq + 1)...]), on: ":").map(unescape).filter { !$0.isEmpty }
            switch key {
            case "upperdir": upper = dirs
            case "lowerdir", "lowerdir+", "datadir+": lower += dirs
            default: break
            }
        }
        return upper + lower
    }

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

    private func stableID(ofFileAt path: String, failure: ResourceFailure?) -> String {
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
    private func filesystemID(_ fd: Int32) -> String {
        var uuid = [UInt8](repeating: 0, count: 16)
        var len: Int32 = 0
        if hyd_get_fsuuid(fd, &uuid, &len) == 0, len > 0, uuid[0..<Int(len)].contains(where: { $0 != 0 }) {
            return "uuid=" + hex(uuid[0..<Int(len)])
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

    private func stableID(ofBlock rdev: UInt64, depth: Int, failure: ResourceFailure?) -> String {
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

    // MARK: sysfs helpers

    /// The sysfs directory of a block device (/sys/dev/block/M:m resolved).
    func blockDir(_ rdev: UInt64) -> String? {
        realPath("\(sysfs)/dev/block/\(majorOf(rdev)):\(minorOf(rdev))")
    }

    func devNumber(ofDir dir: String) -> UInt64? {
        guard let s = read(dir + "/dev") else { return nil }
        let p = s.split(separator: ":")
        guard p.count == 2, let ma = UInt64(p[0]), let mi = UInt64(p[1]) else { return nil }
        return makeDev(ma, mi)
    }

    func exists(_ path: String) -> Bool {
        var st = stat()
        return stat(path, &st) == 0
    }

    func realPath(_ path: String) -> String? {
        guard let r = realpath(path, nil) else { return nil }
        defer { free(r) }
        return String(cString: r)
    }

    /// open(2), noting in `failure` a refusal for want of descriptors.
    func openRecording(_ path: String, _ flags: Int32, _ failure: ResourceFailure?) -> Int32 {
        let fd = open(path, flags)
        if fd < 0, errno == EMFILE || errno == ENFILE { failure?.errno = errno }
        return fd
    }

    /// A small text file, trimmed of trailing whitespace.
    func read(_ path: String, limit: Int = 65536, failure: ResourceFailure? = nil) -> String? {
        let fd = openRecording(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK, failure)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var out: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 4096)
        while out.count < limit {
            let n = buf.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            if n < 0 { if errno == EINTR { continue }; return nil }
            if n == 0 { break }
            out += buf[0..<n]
        }
        var s = String(decoding: out, as: UTF8.self)
        while let l = s.last, l == "\n" || l == " " || l == "\t" || l == "\0" { s.removeLast() }
        return s
    }

    func list(_ dir: String) -> [String] {
        guard let d = opendir(dir) else { return [] }
        defer { closedir(d) }
        var out: [String] = []
        while let e = readdir(d) {
            let name = withUnsafePointer(to: &e.pointee.d_name) {
                $0.withMemoryRebound(to: CChar.self, capacity: 256) { String(cString: $0) }
            }
            if name != "." && name != ".." { out.append(name) }
        }
        return out
    }
}

/// Where the identity functions note that a file could not be opened for want of descriptors.
/// Local to one call (never shared between threads).
final class ResourceFailure {
    var errno: Int32?
}

func majorOf(_ d: UInt64) -> UInt64 { ((d >> 8) & 0xfff) | ((d >> 32) & ~UInt64(0xfff)) }
func minorOf(_ d: UInt64) -> UInt64 { (d & 0xff) | ((d >> 12) & ~UInt64(0xff)) }
func makeDev(_ ma: UInt64, _ mi: UInt64) -> UInt64 {
    ((ma & 0xfff) << 8) | ((ma & ~UInt64(0xfff)) << 32) | (mi & 0xff) | ((mi & ~UInt64(0xff)) << 12)
}

private func baseName(_ p: String) -> String {
    guard let s = p.lastIndex(of: "/") else { return p }
    return String(p[p.index(after: s)...])
}

private func hex<C: Collection>(_ bytes: C) -> String where C.Element == UInt8 {
    let digits = Array("0123456789abcdef")
    var s = ""
    for b in bytes { s.append(digits[Int(b >> 4)]); s.append(digits[Int(b & 15)]) }
    return s
}

private func nsecString(_ n: UInt32) -> String {
    let s = String(n)
    return String(repeating: "0", count: max(0, 9 - s.count)) + s
}

/// Orders "loop2" before "loop10".
private func natural(_ a: String, _ b: String) -> Bool {
    let pa = a.prefix { !$0.isNumber }, pb = b.prefix { !$0.isNumber }
    if pa != pb { return a < b }
    if let x = Int(a.dropFirst(pa.count)), let y = Int(b.dropFirst(pb.count)) { return x < y }
    return a < b
}

extension String {
    /// At least `n` characters, zeros in front (maps' "fd:00").
    func leftPadded(_ n: Int) -> String { count >= n ? self : String(repeating: "0", count: n - count) + self }
}

/// mountinfo escapes space, tab, newline and backslash as \ooo.
private func unescapeMount(_ s: String) -> String {
    guard s.contains("\\") else { return s }
    var out: [UInt8] = []
    let u = Array(s.utf8)
    var i = 0
    while i < u.count {
        if u[i] == UInt8(ascii: "\\"), i + 3 < u.count,
            let v = UInt8(String(decoding: u[(i + 1)...(i + 3)], as: UTF8.self), radix: 8)
        {
            out.append(v); i += 4
        } else {
            out.append(u[i]); i += 1
        }
    }
    return String(decoding: out, as: UTF8.self)
}
