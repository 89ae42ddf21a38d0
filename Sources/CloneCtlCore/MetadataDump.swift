import ControlProtocol
import FoundationEssentials

/// What `clonectl dump` prints: the committed superblock, what recovery found, and the hydrated
/// regions as ranges. Wire names are snake_case (`dump --json`); schema version 1.
public struct MetadataDump: Codable, Sendable, Equatable {
    public struct Device: Codable, Sendable, Equatable {
        public var path: String
        /// `file` or `block`.
        public var kind: String
        public var sizeBytes: UInt64
        /// st_dev/st_ino of a file, st_rdev of a block device ("major:minor").
        public var identity: String
        /// What confirms the device after a restart (format version 2); "" when it has none.
        public var stableId: String
        public init(path: String, kind: String, sizeBytes: UInt64, identity: String, stableId: String = "") {
            self.path = path; self.kind = kind; self.sizeBytes = sizeBytes; self.identity = identity;
            self.stableId = stableId
        }
        enum CodingKeys: String, CodingKey {
            case path, kind, identity
            case sizeBytes = "size_bytes"
            case stableId = "stable_id"
        }
    }

    public struct Recovery: Codable, Sendable, Equatable {
        public var superblockSlot: Int
        public var otherSlotProblem: String?
        public var uncommittedPageSlots: Int
        public var invalidPageSlots: Int
        public init(superblockSlot: Int, otherSlotProblem: String?, uncommittedPageSlots: Int, invalidPageSlots: Int) {
            self.superblockSlot = superblockSlot; self.otherSlotProblem = otherSlotProblem
            self.uncommittedPageSlots = uncommittedPageSlots; self.invalidPageSlots = invalidPageSlots
        }
        enum CodingKeys: String, CodingKey {
            case superblockSlot = "superblock_slot"
            case otherSlotProblem = "other_slot_problem"
            case uncommittedPageSlots = "uncommitted_page_slots"
            case invalidPageSlots = "invalid_page_slots"
        }
        public func encode(to encoder: any Encoder) throws {
            var c = encoder.container(keyedBy: CodingKeys.self)
            try c.encode(superblockSlot, forKey: .superblockSlot)
            try c.encode(otherSlotProblem, forKey: .otherSlotProblem)
            try c.encode(uncommittedPageSlots, forKey: .uncommittedPageSlots)
            try c.encode(invalidPageSlots, forKey: .invalidPageSlots)
        }
    }

    /// Regions `start ..< start + count` are hydrated.
    public struct Range: Codable, Sendable, Equatable {
        public var start: UInt64
        public var count: UInt64
        public init(start: UInt64, count: UInt64) { self.start = start; self.count = count }
    }

    public static let schemaVersion = 1

    public var dumpVersion: Int
    public var path: String
    public var formatVersion: Int
    public var generation: UInt64
    public var jobId: String
    public var regionSize: UInt64
    public var targetSizeBytes: UInt64
    public var regionsTotal: UInt64
    public var regionsHydrated: UInt64
    public var pageCount: UInt64
    public var discardSource: Bool
    public var destZeroed: Bool
    public var complete: Bool
    public var source: Device
    public var dest: Device
    public var createdUnixMs: Int64
    public var committedUnixMs: Int64
    public var recovery: Recovery
    public var hydratedRanges: [Range]
    /// With discard_source: committed regions whose release is not yet recorded as done (a
    /// restart releases these again).
    public var pendingReleaseRanges: [Range] = []

    public init(
        path: String, formatVersion: Int, generation: UInt64, jobId: String, regionSize: UInt64,
        targetSizeBytes: UInt64, regionsTotal: UInt64, regionsHydrated: UInt64, pageCount: UInt64,
        discardSource: Bool, destZeroed: Bool, complete: Bool, source: Device, dest: Device,
        createdUnixMs: Int64, committedUnixMs: Int64, recovery: Recovery, hydratedRanges: [Range]
    ) {
        self.dumpVersion = Self.schemaVersion
        self.path = path; self.formatVersion = formatVersion; self.generation = generation; self.jobId = jobId
        self.regionSize = regionSize; self.targetSizeBytes = targetSizeBytes; self.regionsTotal = regionsTotal
        self.regionsHydrated = regionsHydrated; self.pageCount = pageCount; self.discardSource = discardSource
        self.destZeroed = destZeroed; self.complete = complete; self.source = source; self.dest = dest
        self.createdUnixMs = createdUnixMs; self.committedUnixMs = committedUnixMs; self.recovery = recovery
        self.hydratedRanges = hydratedRanges
    }

    enum CodingKeys: String, CodingKey {
        case path, generation, source, dest, complete, recovery
        case dumpVersion = "dump_version"
        case formatVersion = "format_version"
        case jobId = "job_id"
        case regionSize = "region_size"
        case targetSizeBytes = "target_size_bytes"
        case regionsTotal = "regions_total"
        case regionsHydrated = "regions_hydrated"
        case pageCount = "page_count"
        case discardSource = "discard_source"
        case destZeroed = "dest_zeroed"
        case createdUnixMs = "created_unix_ms"
        case committedUnixMs = "committed_unix_ms"
        case hydratedRanges = "hydrated_ranges"
        case pendingReleaseRanges = "pending_release_ranges"
    }
}

public enum MetadataFormatter {
    /// `2026-11-29T21:56:54.737Z`. The milliseconds are printed from the integer: through a
    /// Double, …414.737 s is …414.73699 and the format style printed .736.
    static func timestamp(_ ms: Int64) -> String {
        let (seconds, milli) = (ms.quotientAndRemainder(dividingBy: 1000))
        let (s, m) = milli < 0 ? (seconds - 1, milli + 1000) : (seconds, milli)
        let base = Date(timeIntervalSince1970: Double(s)).formatted(Date.ISO8601FormatStyle())  // …:54Z
        let digits = String(m)
        return base.dropLast() + "." + String(repeating: "0", count: 3 - digits.count) + digits + "Z"
    }

    /// `clonectl dump` without `--json`.
    public static func dump(_ d: MetadataDump) -> String {
        var lines: [String] = []
        func row(_ k: String, _ v: String) { lines.append(Text.padded(k, to: 18) + v) }
        row("metadata", d.path)
        row("format version", "\(d.formatVersion)")
        row("generation", "\(d.generation)")
        row("job id", d.jobId)
        row("source", "\(d.source.path) (\(d.source.kind), \(Human.bytes(d.source.sizeBytes)), \(d.source.identity))")
        row("dest", "\(d.dest.path) (\(d.dest.kind), \(Human.bytes(d.dest.sizeBytes)), \(d.dest.identity))")
        row("region size", Human.bytes(d.regionSize))
        row("target size", "\(Human.bytes(d.targetSizeBytes)) (\(d.targetSizeBytes) bytes)")
        row(
            "regions",
            "\(d.regionsHydrated) of \(d.regionsTotal) hydrated (\(Human.percent(d.regionsHydrated, of: d.regionsTotal)))"
        )
        row("bitmap pages", "\(d.pageCount)")
        row(
            "flags",
            [
                d.discardSource ? "discard_source" : nil, d.destZeroed ? "dest_zeroed" : nil,
                d.complete ? "complete" : nil,
            ]
            .compactMap { $0 }.joined(separator: ",").ifEmpty("none"))
        row("created", timestamp(d.createdUnixMs))
        row("last commit", timestamp(d.committedUnixMs))
        var rec = "superblock slot \(d.recovery.superblockSlot)"
        if let p = d.recovery.otherSlotProblem { rec += "; other slot: \(p)" }
        if d.recovery.uncommittedPageSlots > 0 {
            rec += "; \(d.recovery.uncommittedPageSlots) uncommitted page slot(s)"
        }
        if d.recovery.invalidPageSlots > 0 { rec += "; \(d.recovery.invalidPageSlots) invalid page slot(s)" }
        row("recovery", rec)
        if !d.source.stableId.isEmpty || !d.dest.stableId.isEmpty {
            row("source id", d.source.stableId.ifEmpty("none (cannot be confirmed after a restart)"))
            row("dest id", d.dest.stableId.ifEmpty("none (cannot be confirmed after a restart)"))
        }
        if d.discardSource {
            row(
                "pending release",
                d.pendingReleaseRanges.isEmpty
                    ? "none"
                    : d.pendingReleaseRanges.map { "\($0.start)..<\($0.start + $0.count)" }.joined(separator: ", "))
        }
        lines.append("hydrated regions (\(d.hydratedRanges.count) range\(d.hydratedRanges.count == 1 ? "" : "s")):")
        for r in d.hydratedRanges {
            lines.append(r.count == 1 ? "  \(r.start)" : "  \(r.start)-\(r.start + r.count - 1)")
        }
        return lines.joined(separator: "\n")
    }

    /// `clonectl check` without `--json`: `OK` or `INVALID` and what was found.
    public static func check(_ r: MetadataReport) -> String {
        var lines: [String] = []
        if r.valid {
            var head =
                "\(r.path): OK, format version \(r.version.map(String.init) ?? "?"), generation \(r.generation.map(String.init) ?? "?")"
            if let h = r.regionsHydrated, let t = r.regionsTotal {
                head += ", \(h) of \(t) regions hydrated (\(Human.percent(h, of: t)))"
            }
            if r.complete == true { head += ", complete" }
            lines.append(head)
            if let s = r.sourcePath { lines.append("  source  \(s)") }
            if let d = r.destPath { lines.append("  dest    \(d)") }
            for p in r.problems { lines.append("  note: \(p)") }
        } else {
            lines.append("\(r.path): INVALID")
            for p in r.problems { lines.append("  \(p)") }
        }
        return lines.joined(separator: "\n")
    }
}

extension String {
    func ifEmpty(_ other: String) -> String { isEmpty ? other : self }
}
