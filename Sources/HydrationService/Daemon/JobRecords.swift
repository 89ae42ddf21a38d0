import ControlProtocol
import Foundation
import HydrationEngine

#if canImport(Glibc)
    import Glibc
#endif

// The records the daemon keeps in its state directory (see docs/metadata-format.md, "Job
// records"), how they are read, and what is recovered from one that cannot be read.

/// What the daemon remembers of a job across restarts: `<state-dir>/jobs/<name>.json`.
public struct JobDefinition: Codable, Sendable, Equatable {
    public enum Desired: String, Codable, Sendable, CaseIterable { case hydrating, paused }
    /// The record format this daemon writes (field `version`). A record without the field was
    /// written before records had a version and reads as version 0 (the same fields). A record
    /// of a later version is refused by name, not read as far as it goes: a newer daemon may have
    /// given a field a meaning this one would get wrong.
    public static let formatVersion = 1
    public var name: String
    public var source: String
    public var dest: String
    public var metadata: String
    public var regionSize: UInt64
    public var discardSource: Bool
    public var destZeroed: Bool
    public var tunables: Tunables
    /// What the user last asked for. A graceful shutdown pauses jobs but keeps this, so that a
    /// restart resumes what was hydrating and leaves paused jobs paused.
    public var desired: Desired
    /// Served as NBD export `name` (Start with `export: true`); records written before exports
    /// existed read as false.
    public var export: Bool = false
    /// With `export`: reads served by the source hydrate what they read (Start `hydrate_on_read`).
    public var hydrateOnRead: Bool = false
    /// Direct or buffered I/O (Start `io`); records from before it read as `auto`.
    public var io: IOMode = .auto
    /// Read copied regions back before committing them (Start `verify`); records from before it
    /// read as false.
    public var verify: Bool = false

    var configuration: JobConfiguration {
        JobConfiguration(
            name: name, sourcePath: source, destPath: dest, metadataPath: metadata, regionSize: regionSize,
            discardSource: discardSource, destZeroed: destZeroed, tunables: tunables, ioMode: io,
            verify: verify)
    }
}

/// Why a record could not be used; `reason` is said to the operator as it is.
struct RecordUnreadable: Error, Sendable, Equatable {
    var reason: String
    /// Set when the file could not be read at all (open or read failed).
    var errno: Int32? = nil
}

extension JobDefinition {
    // Written by hand (in an extension, so the memberwise initialiser stays) so that records from
    // before a field existed still read, and a value this version does not know is refused with
    // its name and value.
    enum CodingKeys: String, CodingKey {
        case version, name, source, dest, metadata, regionSize, discardSource, destZeroed, tunables, desired, export,
            hydrateOnRead, io, verify
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        let version = try c.decodeIfPresent(Int.self, forKey: .version) ?? 0
        guard version >= 0 else { throw RecordUnreadable(reason: "format version \(version) is not a version") }
        guard version <= Self.formatVersion else {
            throw RecordUnreadable(
                reason:
                    "format version \(version) is newer than this hydrationd reads (up to \(Self.formatVersion)): it was written by a newer hydrationd"
            )
        }
        func known<T: RawRepresentable & CaseIterable>(_ t: T.Type, _ key: CodingKeys) throws -> T?
        where T.RawValue == String {
            guard let raw = try c.decodeIfPresent(String.self, forKey: key) else { return nil }
            guard let v = T(rawValue: raw) else {
                throw RecordUnreadable(
                    reason:
                        "field '\(key.stringValue)' has the value \"\(raw)\", which this hydrationd does not know (it knows \(T.allCases.map { "\"\($0.rawValue)\"" }.joined(separator: ", ")))"
                )
            }
            return v
        }
        guard let desired = try known(Desired.self, .desired) else {
            throw DecodingError.keyNotFound(CodingKeys.desired, .init(codingPath: [], debugDescription: "missing"))
        }
        self.init(
            name: try c.decode(String.self, forKey: .name), source: try c.decode(String.self, forKey: .source),
            dest: try c.decode(String.self, forKey: .dest), metadata: try c.decode(String.self, forKey: .metadata),
            regionSize: try c.decode(UInt64.self, forKey: .regionSize),
            discardSource: try c.decode(Bool.self, forKey: .discardSource),
            destZeroed: try c.decode(Bool.self, forKey: .destZeroed),
            tunables: try c.decode(Tunables.self, forKey: .tunables),
            desired: desired,
            export: try c.decodeIfPresent(Bool.self, forKey: .export) ?? false,
            hydrateOnRead: try c.decodeIfPresent(Bool.self, forKey: .hydrateOnRead) ?? false,
            io: try known(IOMode.self, .io) ?? .auto,
            verify: try c.decodeIfPresent(Bool.self, forKey: .verify) ?? false)
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(Self.formatVersion, forKey: .version)
        try c.encode(name, forKey: .name)
        try c.encode(source, forKey: .source)
        try c.encode(dest, forKey: .dest)
        try c.encode(metadata, forKey: .metadata)
        try c.encode(regionSize, forKey: .regionSize)
        try c.encode(discardSource, forKey: .discardSource)
        try c.encode(destZeroed, forKey: .destZeroed)
        try c.encode(tunables, forKey: .tunables)
        try c.encode(desired, forKey: .desired)
        try c.encode(export, forKey: .export)
        try c.encode(hydrateOnRead, forKey: .hydrateOnRead)
        try c.encode(io, forKey: .io)
        try c.encode(verify, forKey: .verify)
    }
}

extension JobManager {
    /// A removed job's record, kept because its destination holds the only copy of regions
    /// already released from its source: `<state-dir>/kept/<name>-<job uuid>.json`.
    public struct KeptRecord: Codable, Sendable, Equatable {
        public var definition: JobDefinition
        public var removedUnixMs: Int64
    }
}

/// Reading records: every way a record can be unusable gives a reason that names it.
enum JobRecords {
    static func encode<T: Encodable>(_ value: T) throws -> Data {
        let enc = JSONEncoder()
        enc.outputFormatting = [.prettyPrinted, .sortedKeys]
        return try enc.encode(value)
    }

    /// The file's bytes, or why they cannot be read (EACCES, EIO, EMFILE...).
    static func readBytes(_ path: String) -> Result<Data, RecordUnreadable> {
        let fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW)
        guard fd >= 0 else {
            let e = errno
            return .failure(
                RecordUnreadable(
                    reason: "it cannot be opened: \(errnoSymbol(e)) (\(String(cString: strerror(e))))", errno: e))
        }
        defer { close(fd) }
        var out = Data()
        var buf = [UInt8](repeating: 0, count: 16384)
        while out.count < 1 << 20 {
            let n = buf.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 {
                if errno == EINTR { continue }
                let e = errno
                return .failure(
                    RecordUnreadable(
                        reason: "it cannot be read: \(errnoSymbol(e)) (\(String(cString: strerror(e))))", errno: e))
            }
            if n == 0 { return .success(out) }
            out.append(contentsOf: buf[0..<n])
        }
        return .failure(RecordUnreadable(reason: "it is larger than 1 MiB: not a record this daemon wrote"))
    }

    static func decode<T: Decodable>(_ type: T.Type, _ data: Data) -> Result<T, RecordUnreadable> {
        if data.isEmpty { return .failure(RecordUnreadable(reason: "it is empty")) }
        do {
            return .success(try JSONDecoder().decode(T.self, from: data))
        } catch let e as RecordUnreadable {
            return .failure(e)
        } catch let e as DecodingError {
            return .failure(RecordUnreadable(reason: describe(e)))
        } catch {
            return .failure(RecordUnreadable(reason: "\(error)"))
        }
    }

    /// A job record, checked to be the record of the job its file is named for.
    static func readDefinition(_ path: String, name: String) -> Result<JobDefinition, RecordUnreadable> {
        readBytes(path).flatMap { decode(JobDefinition.self, $0) }.flatMap { def in
            def.name == name
                ? .success(def)
                : .failure(RecordUnreadable(reason: "it names job '\(def.name)', not '\(name)' as its file name says"))
        }
    }

    /// The names in `dir` (nil: it does not exist), or the errno of a failure to list it.
    static func list(_ dir: String) -> Result<[String]?, RecordUnreadable> {
        guard let d = opendir(dir) else {
            let e = errno
            if e == ENOENT { return .success(nil) }
            return .failure(
                RecordUnreadable(
                    reason: "the directory cannot be listed: \(errnoSymbol(e)) (\(String(cString: strerror(e))))",
                    errno: e))
        }
        defer { closedir(d) }
        var out: [String] = []
        while let entry = readdir(d) {
            let name = withUnsafePointer(to: &entry.pointee.d_name) {
                $0.withMemoryRebound(to: CChar.self, capacity: 256) { String(cString: $0) }
            }
            if name != "." && name != ".." { out.append(name) }
        }
        return .success(out.sorted())
    }

    static func describe(_ e: DecodingError) -> String {
        func field(_ path: [any CodingKey]) -> String {
            path.map { $0.intValue.map { "[\($0)]" } ?? $0.stringValue }.joined(separator: ".")
        }
        switch e {
        case .keyNotFound(let k, let ctx): return "field '\(field(ctx.codingPath + [k]))' is missing"
        case .valueNotFound(let t, let ctx): return "field '\(field(ctx.codingPath))' is null (a \(t) is required)"
        case .typeMismatch(let t, let ctx): return "field '\(field(ctx.codingPath))' is not a \(t)"
        case .dataCorrupted(let ctx):
            if ctx.codingPath.isEmpty {
                return "it is not valid JSON (truncated or damaged)"
            }
            return "field '\(field(ctx.codingPath))' has a value this hydrationd cannot read"
        @unknown default: return "\(e)"
        }
    }

    // MARK: what an unreadable record still says

    /// Paths and flags found in the raw text of a record that cannot be decoded: from its JSON
    /// when it parses, else from `"key": "value"` pairs that are complete in the text (a value
    /// cut off by a truncation is not taken: a prefix of a path is another path).
    struct Salvaged: Sendable, Equatable {
        var source: String?
        var dest: String?
        var metadata: String?
        var discardSource: Bool?
    }

    static func salvage(_ data: Data) -> Salvaged {
        if let obj = try? JSONSerialization.jsonObject(with: data) as? [String: Any] {
            let d = (obj["definition"] as? [String: Any]) ?? obj
            func str(_ k: String) -> String? { (d[k] as? String).flatMap { $0.isEmpty ? nil : $0 } }
            return Salvaged(
                source: str("source"), dest: str("dest"), metadata: str("metadata"),
                discardSource: d["discardSource"] as? Bool)
        }
        let text = Array(String(decoding: data, as: UTF8.self).unicodeScalars)
        return Salvaged(
            source: stringValue(text, "source"), dest: stringValue(text, "dest"),
            metadata: stringValue(text, "metadata"), discardSource: boolValue(text, "discardSource"))
    }

    /// After `"key"` (and blanks and a colon): the position of the value.
    private static func valueStart(_ t: [Unicode.Scalar], _ key: String) -> [Int] {
        let k = Array(("\"" + key + "\"").unicodeScalars)
        var out: [Int] = []
        var i = 0
        while i + k.count <= t.count {
            if Array(t[i..<(i + k.count)]) == k {
                var j = i + k.count
                while j < t.count, t[j] == " " || t[j] == "\n" || t[j] == "\t" || t[j] == "\r" { j += 1 }
                if j < t.count, t[j] == ":" {
                    j += 1
                    while j < t.count, t[j] == " " || t[j] == "\n" || t[j] == "\t" || t[j] == "\r" { j += 1 }
                    out.append(j)
                }
                i += k.count
            } else {
                i += 1
            }
        }
        return out
    }

    private static func stringValue(_ t: [Unicode.Scalar], _ key: String) -> String? {
        for start in valueStart(t, key) where start < t.count && t[start] == "\"" {
            var s = String.UnicodeScalarView()
            var j = start + 1
            var closed = false
            while j < t.count {
                let c = t[j]
                if c == "\"" { closed = true; break }
                if c == "\\" {
                    guard j + 1 < t.count else { break }
                    let n = t[j + 1]
                    switch n {
                    case "\"", "\\", "/": s.append(n)
                    case "n": s.append("\n")
                    case "t": s.append("\t")
                    default: s.append(n)
                    }
                    j += 2
                    continue
                }
                s.append(c)
                j += 1
            }
            if closed && !s.isEmpty { return String(s) }
        }
        return nil
    }

    private static func boolValue(_ t: [Unicode.Scalar], _ key: String) -> Bool? {
        for start in valueStart(t, key) {
            let rest = String(String.UnicodeScalarView(t[start..<min(t.count, start + 5)]))
            if rest.hasPrefix("true") { return true }
            if rest.hasPrefix("false") { return false }
        }
        return nil
    }
}

/// A record the daemon cannot read (a job's in `jobs/`, or a kept one in `kept/`), with what
/// could still be learnt about it: the paths found in its raw text and, from the metadata file
/// (which has checksums of its own), the devices the metadata was created for. Everything found
/// stays reserved: no new job may write to it or release it, until the operator acts.
struct UnreadableRecord: Error, Sendable {
    /// The job's name (a job record's file name; for a kept record, its file name).
    var name: String
    var file: String
    var reason: String
    /// The errno when the file could not be read at all: out of descriptors (EMFILE, ENFILE)
    /// is said as such (`ResourceExhausted`), as nothing may be wrong with the file.
    var errno: Int32? = nil
    var salvaged: JobRecords.Salvaged
    /// The metadata file used (the record's, else the default place for a job record).
    var metadataPath: String?
    var header: MetadataHeader?
    /// Why the metadata could not be read, when a path for it was found.
    var metadataProblem: String?

    var sources: [String] {
        Array(Set([salvaged.source, header?.source.path].compactMap { $0 }.filter { !$0.isEmpty })).sorted()
    }
    var dests: [String] {
        Array(Set([salvaged.dest, header?.dest.path].compactMap { $0 }.filter { !$0.isEmpty })).sorted()
    }
    /// Unknown: assumed, so that a source that may be being released is not read by a new job.
    var discardSource: Bool { header?.discardSource ?? salvaged.discardSource ?? true }
    /// Nothing at all to reserve by: every new job is refused until the operator acts.
    var namesNothing: Bool { sources.isEmpty && dests.isEmpty }

    /// The error status and control operations report.
    func error(kept: Bool) -> HydrationError {
        var what = reason
        if let m = metadataPath {
            if header != nil {
                what += "; the devices recorded in its metadata \(m) stay reserved"
            } else if let p = metadataProblem {
                what += "; its metadata \(m) cannot be read either (\(p))"
            }
        } else {
            what += "; no metadata path could be recovered from it"
        }
        if namesNothing {
            what +=
                "; it names no device that could be recovered, so every new job is refused until it is repaired or moved away"
        }
        let subject = kept ? "kept job record \(file)" : "job record \(file)"
        let action =
            kept
            ? "repair or restore the file, or move it out of kept/ once the data of the removed job it recorded is no longer needed"
            : "repair or restore the file and resume the job, or remove it with --force (its metadata is kept, and a kept record written with what was recovered)"
        let code: HydrationError.Code =
            errno.map(HydrationError.isResourceExhaustion) == true ? .resourceExhausted : .jobRecordUnreadable
        var e = HydrationError(
            code, "\(subject) cannot be read: \(what). Nothing is written or released for it; \(action)", errno: errno)
        e.path = file
        return e
    }

    /// A stand-in definition for status and kept records: what was recovered, empty where
    /// nothing was.
    var definition: JobDefinition {
        let regionSize = header?.regionSize ?? RegionGeometry.defaultRegionSize
        return JobDefinition(
            name: name, source: header?.source.path ?? salvaged.source ?? "",
            dest: header?.dest.path ?? salvaged.dest ?? "", metadata: metadataPath ?? "",
            regionSize: regionSize, discardSource: discardSource, destZeroed: header?.destZeroed ?? false,
            tunables: .defaults(regionSize: regionSize), desired: .paused)
    }

    /// Reads what can be read of the record at `file` (the bytes already read, or nil when they
    /// could not be) and of the metadata it names; blocks (file I/O).
    static func examine(
        name: String, file: String, bytes: Data?, reason: String, errno: Int32? = nil, defaultMetadata: String?,
        storage: any StorageProvider
    ) -> UnreadableRecord {
        let salvaged = bytes.map(JobRecords.salvage) ?? JobRecords.Salvaged()
        var metadataPath = salvaged.metadata
        if metadataPath == nil, let d = defaultMetadata, FileManager.default.fileExists(atPath: d) { metadataPath = d }
        var header: MetadataHeader? = nil
        var problem: String? = nil
        if let m = metadataPath {
            do {
                header = try MetadataStore.open(path: m, storage: storage, readOnly: true).0.header
            } catch {
                problem = error.description
            }
        }
        return UnreadableRecord(
            name: name, file: file, reason: reason, errno: errno, salvaged: salvaged, metadataPath: metadataPath,
            header: header, metadataProblem: problem)
    }
}
