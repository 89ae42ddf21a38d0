/// An identity of a file, block device or remote export that survives reboots and renumbering
/// (device numbers, /dev/loopN and /dev/sdX change; a loop device's backing file, a dm uuid, a
/// disk's WWN, a file's filesystem and birth time do not), and differs for any other object.
///
/// The one place that knows the grammar (`scheme:…`, built by the constructors below, which
/// `DeviceTopology` and `RemoteIdentity` use), the limit a metadata record keeps (`recorded`),
/// and how a found ID is compared with a recorded one (`confirms`). Empty when none can be
/// found: such a device cannot be confirmed after a restart.
public struct StableID: Sendable, Hashable, CustomStringConvertible {
    public let text: String

    public init(_ text: String) { self.text = text }

    public static let none = StableID("")

    public var isEmpty: Bool { text.isEmpty }
    public var description: String { text }

    /// What kind of object the ID names: `file`, `loop`, `part`, `dm`, `md`, `wwid`, `serial`,
    /// `boot` or `nbd`; nil for an empty or unknown ID.
    public var scheme: String? {
        guard let colon = text.firstIndex(of: ":") else { return nil }
        let s = String(text[..<colon])
        return Self.schemes.contains(s) ? s : nil
    }
    static let schemes: Set<String> = ["file", "loop", "part", "dm", "md", "wwid", "serial", "boot", "nbd"]

    // MARK: the record's limit

    /// Bytes of UTF-8 a metadata record keeps of an ID (the superblock's field).
    public static let recordLimit = MetadataFormat.maxStableIDBytes

    /// The ID as a metadata record keeps it: its first `recordLimit` bytes of UTF-8 (a cut
    /// inside a character decodes as U+FFFD, exactly as the superblock reads it back).
    public var recorded: StableID {
        text.utf8.count <= Self.recordLimit
            ? self : StableID(String(decoding: Array(text.utf8.prefix(Self.recordLimit)), as: UTF8.self))
    }

    /// Whether `found` (what a device has now) confirms this recorded ID. The found ID is compared
    /// in the form the record keeps: an ID longer than the record's limit must still confirm its
    /// own device after a restart. An empty recorded ID confirms nothing.
    public func confirms(_ found: StableID) -> Bool {
        !isEmpty && found.recorded == recorded
    }

    // MARK: the grammar

    /// A regular file: `file:<fs>:ino=<n>:btime=<s>.<ns>`, `fs` being `uuid=<hex>` or `fsid=<hex>`.
    public static func file(filesystem fs: String, inode: UInt64, birthSeconds: Int64, birthNanoseconds: String)
        -> StableID
    {
        StableID("file:\(fs):ino=\(inode):btime=\(birthSeconds).\(birthNanoseconds)")
    }

    /// A partition: `part:<whole disk's id>:<partition number>:<start sector>`.
    public static func partition(of disk: StableID, number: String, start: String) -> StableID {
        StableID("part:\(disk.text):\(number):\(start)")
    }

    /// A device-mapper device: `dm:uuid=<uuid>`, or `dm:name=<name>` without a uuid.
    public static func deviceMapper(uuid: String) -> StableID { StableID("dm:uuid=\(uuid)") }
    public static func deviceMapper(name: String) -> StableID { StableID("dm:name=\(name)") }

    /// An md array: `md:<array uuid>`.
    public static func mdArray(uuid: String) -> StableID { StableID("md:\(uuid)") }

    /// A loop device: `loop:<backing file's id>:offset=<n>:sizelimit=<n>`.
    public static func loop(backing: StableID, offset: UInt64, sizeLimit: UInt64) -> StableID {
        StableID("loop:\(backing.text):offset=\(offset):sizelimit=\(sizeLimit)")
    }

    /// A disk by its WWN (`wwid:<wwid>`) or its serial number (`serial:<serial>`).
    public static func wwid(_ v: String) -> StableID { StableID("wwid:\(v)") }
    public static func serial(_ v: String) -> StableID { StableID("serial:\(v)") }

    /// A device with nothing stable but the boot and its disk sequence number:
    /// `boot:<boot id>:diskseq:<n>` (it differs after a reboot).
    public static func bootScoped(bootID: String, diskSequence: String) -> StableID {
        StableID("boot:\(bootID):diskseq:\(diskSequence)")
    }
}
