import CLinux

#if canImport(Glibc)
    import Glibc
#endif

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
