import ControlProtocol

/// `/etc/hydrationtab`: jobs declared in a table, in the layout of systemd's clonetab
/// (`NAME SOURCE DEST [METADATA|-] [OPTIONS|-]`), read by `clonectl apply` and the generator.
/// docs/hydrationtab.5.md is its manual page.
public enum Hydrationtab {
    /// One line: a job as the table declares it.
    public struct Entry: Sendable, Equatable {
        /// 1-based line number in the file.
        public var line: Int
        public var name: String
        public var source: String
        public var dest: String
        /// nil: the daemon's default (`<state-dir>/jobs/NAME.meta`).
        public var metadata: String?
        public var options: Options
    }

    /// The options column: clonectl start's options, spelled without `--`.
    public struct Options: Sendable, Equatable {
        public var regionSize: UInt64?
        public var discardSource = false
        public var destZeroed = false
        public var noHydration = false
        public var export = false
        public var hydrateOnRead = false
        public var verify = false
        public var io: String?
        public var threshold: Int?
        public var batchSize: Int?
        public var commitIntervalMs: Int?
        public var spaceBudgetBytes: UInt64?
        public var rateLimitBytesPerSecond: UInt64?

        public init() {}
    }

    /// A line the table cannot hold: the file, its line and what is wrong, for one message.
    public struct ParseError: Error, Sendable, Equatable, CustomStringConvertible {
        public var file: String
        public var line: Int
        public var message: String
        public var description: String { "\(file):\(line): \(message)" }
    }

    /// Every option the table accepts, as written in it.
    public static let optionNames: [String] = [
        "discard-source", "dest-zeroed", "no-hydration", "export", "hydrate-on-read", "verify", "region-size=SIZE",
        "io=auto|buffered|direct", "threshold=N", "batch-size=N", "commit-interval=DURATION", "space-budget=SIZE",
        "rate-limit=RATE",
    ]

    /// The default region size (as `clonectl start`): what a line without `region-size` means.
    public static let defaultRegionSize: UInt64 = 64 << 10

    /// Parses a whole table; the first line in error fails it all, so nothing is applied from a
    /// table that is partly wrong.
    public static func parse(_ text: String, file: String) throws(ParseError) -> [Entry] {
        var entries: [Entry] = []
        var seen: [String: Int] = [:]
        for (i, raw) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            let line = i + 1
            func fail(_ m: String) -> ParseError { ParseError(file: file, line: line, message: m) }
            let content = raw.split(separator: "#", maxSplits: 1, omittingEmptySubsequences: false).first ?? ""
            let fields = content.split(whereSeparator: { $0 == " " || $0 == "\t" || $0 == "\r" }).map(String.init)
            if fields.isEmpty { continue }
            guard fields.count >= 3 else {
                throw fail("expected NAME SOURCE DEST [METADATA|-] [OPTIONS|-], found \(fields.count) field(s)")
            }
            guard fields.count <= 5 else {
                throw fail(
                    "expected at most 5 fields, found \(fields.count) (options are one field, comma-separated; write a space in a path as \\040)"
                )
            }
            let name = try unescape(fields[0]).get(orThrow: fail)
            guard isValidName(name) else {
                throw fail("invalid job name '\(name)': letters, digits and - _ . : @, up to 64 characters")
            }
            if let first = seen[name] { throw fail("job '\(name)' is declared twice (first on line \(first))") }
            seen[name] = line
            let source = try unescape(fields[1]).get(orThrow: fail)
            let dest = try unescape(fields[2]).get(orThrow: fail)
            guard isAbsolute(source, uriAllowed: true) else {
                throw fail("source '\(source)' must be an absolute path or an NBD URI (nbd://, nbds://, nbd+unix://)")
            }
            guard isAbsolute(dest, uriAllowed: false) else {
                throw fail("destination '\(dest)' must be an absolute path")
            }
            var metadata: String? = nil
            if fields.count >= 4 && fields[3] != "-" {
                let m = try unescape(fields[3]).get(orThrow: fail)
                guard isAbsolute(m, uriAllowed: false) else {
                    throw fail("metadata '\(m)' must be an absolute path or -")
                }
                metadata = m
            }
            var options = Options()
            if fields.count == 5 && fields[4] != "-" {
                options = try parseOptions(fields[4]).get(orThrow: fail)
            }
            if let problem = OptionRules.startProblem(
                name: name, hasSource: true, hasDest: true, creationOptions: [],
                discardSource: options.discardSource, spaceBudget: options.spaceBudgetBytes.map { $0 > 0 } ?? false,
                export: options.export, hydrateOnRead: options.hydrateOnRead)
            {
                throw fail(problem.split(separator: "--", omittingEmptySubsequences: false).joined())
            }
            entries.append(
                Entry(line: line, name: name, source: source, dest: dest, metadata: metadata, options: options))
        }
        return entries
    }

    static func parseOptions(_ field: String) -> Result<Options, StringError> {
        var o = Options()
        var given: Set<String> = []
        for item in field.split(separator: ",", omittingEmptySubsequences: false) {
            let parts = item.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            let key = String(parts[0])
            let value = parts.count == 2 ? String(parts[1]) : nil
            if key.isEmpty { return .failure(StringError("empty option in '\(field)'")) }
            if !given.insert(key).inserted { return .failure(StringError("option '\(key)' given twice")) }
            let flags: [String: WritableKeyPath<Options, Bool>] = [
                "discard-source": \.discardSource, "dest-zeroed": \.destZeroed, "no-hydration": \.noHydration,
                "export": \.export, "hydrate-on-read": \.hydrateOnRead, "verify": \.verify,
            ]
            if let flag = flags[key] {
                if value != nil { return .failure(StringError("option '\(key)' takes no value")) }
                o[keyPath: flag] = true
                continue
            }
            guard let value, !value.isEmpty else {
                if [
                    "region-size", "io", "threshold", "batch-size", "commit-interval", "space-budget", "rate-limit",
                ].contains(key) {
                    return .failure(StringError("option '\(key)' needs a value (\(key)=…)"))
                }
                return .failure(unknown(key))
            }
            do throws(InputError) {
                switch key {
                case "region-size":
                    let r = try ByteSize.parse(value)
                    guard r >= 4096 && r <= 64 << 20 && r & (r - 1) == 0 else {
                        return .failure(StringError("region-size must be a power of two from 4K to 64M (got \(value))"))
                    }
                    o.regionSize = r
                case "io":
                    guard ["auto", "buffered", "direct"].contains(value) else {
                        return .failure(StringError("io must be auto, buffered or direct (got '\(value)')"))
                    }
                    o.io = value
                case "threshold", "batch-size":
                    guard let n = Int(value), n > 0 else {
                        return .failure(StringError("\(key) must be a positive count (got '\(value)')"))
                    }
                    if key == "threshold" { o.threshold = n } else { o.batchSize = n }
                case "commit-interval": o.commitIntervalMs = try DurationParser.milliseconds(value)
                case "space-budget": o.spaceBudgetBytes = try ByteSize.parse(value)
                case "rate-limit":
                    let l = value.lowercased()
                    o.rateLimitBytesPerSecond =
                        l == "none" || l == "off" || l == "unlimited" ? 0 : try ByteRate.parse(value)
                default: return .failure(unknown(key))
                }
            } catch {
                return .failure(StringError("\(key): \(error.description)"))
            }
        }
        return .success(o)
    }

    static func unknown(_ key: String) -> StringError {
        StringError("unknown option '\(key)' (known: \(optionNames.joined(separator: ", ")))")
    }

    /// fstab's escapes: `\040` for a space, `\011` a tab, `\134` a backslash, `\043` a `#`.
    static func unescape(_ field: String) -> Result<String, StringError> {
        guard field.contains("\\") else { return .success(field) }
        var bytes: [UInt8] = []
        let u = Array(field.utf8)
        var i = 0
        while i < u.count {
            if u[i] == UInt8(ascii: "\\") {
                let digits = u[(i + 1)..<min(i + 4, u.count)]
                guard digits.count == 3, digits.allSatisfy({ $0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "7") }),
                    let v = UInt8(String(decoding: digits, as: UTF8.self), radix: 8)
                else {
                    return .failure(StringError("'\(field)': a backslash must start an octal escape such as \\040"))
                }
                bytes.append(v)
                i += 4
            } else {
                bytes.append(u[i])
                i += 1
            }
        }
        return .success(String(decoding: bytes, as: UTF8.self))
    }

    static func isValidName(_ n: String) -> Bool {
        !n.isEmpty && n.utf8.count <= 64
            && n.unicodeScalars.allSatisfy { c in
                (c.isASCII && (c.properties.isAlphabetic || ("0"..."9").contains(c)))
                    || "-_.:@".unicodeScalars.contains(c)
            }
    }

    static func isAbsolute(_ p: String, uriAllowed: Bool) -> Bool {
        if p.hasPrefix("/") { return true }
        return uriAllowed && (p.hasPrefix("nbd://") || p.hasPrefix("nbds://") || p.hasPrefix("nbd+unix://"))
    }

    /// What `clonectl start` sends for the line.
    public static func startParameters(_ e: Entry) -> StartParameters {
        let o = e.options
        return StartParameters(
            name: e.name, source: e.source, dest: e.dest, metadata: e.metadata, regionSize: o.regionSize,
            discardSource: o.discardSource ? true : nil, destZeroed: o.destZeroed ? true : nil,
            noHydration: o.noHydration ? true : nil, threshold: o.threshold, batchSize: o.batchSize,
            commitIntervalMs: o.commitIntervalMs, spaceBudgetBytes: o.spaceBudgetBytes,
            rateLimitBytesPerSecond: o.rateLimitBytesPerSecond, export: o.export ? true : nil,
            hydrateOnRead: o.hydrateOnRead ? true : nil, io: o.io, verify: o.verify ? true : nil)
    }

    /// The options of the line an existing job does not have, named as in the table. What a job
    /// can only be given at creation and does not show (dest-zeroed, no-hydration, io's setting) is
    /// not compared; tunables are compared only where the line sets them (their defaults follow
    /// the region size and the daemon).
    public static func differences(_ e: Entry, _ job: JobStatus) -> [String] {
        var d: [String] = []
        let o = e.options
        if job.source.path != e.source { d.append("source (job: \(job.source.path))") }
        if job.dest.path != e.dest { d.append("dest (job: \(job.dest.path))") }
        if let m = e.metadata, job.metadata.path != m { d.append("metadata (job: \(job.metadata.path))") }
        let region = o.regionSize ?? defaultRegionSize
        if job.regionSize != region { d.append("region-size (job: \(job.regionSize))") }
        if job.discard.enabled != o.discardSource { d.append("discard-source (job: \(job.discard.enabled))") }
        if (job.export != nil) != o.export { d.append("export (job: \(job.export != nil))") }
        if o.export, let x = job.export, x.hydrateOnRead != o.hydrateOnRead {
            d.append("hydrate-on-read (job: \(x.hydrateOnRead))")
        }
        if (job.verify?.enabled ?? false) != o.verify { d.append("verify (job: \(job.verify?.enabled ?? false))") }
        if let t = o.threshold, t != job.settings.threshold { d.append("threshold (job: \(job.settings.threshold))") }
        if let b = o.batchSize, b != job.settings.batchSize { d.append("batch-size (job: \(job.settings.batchSize))") }
        if let c = o.commitIntervalMs, c != job.settings.commitIntervalMs {
            d.append("commit-interval (job: \(job.settings.commitIntervalMs) ms)")
        }
        if let s = o.spaceBudgetBytes, s != (job.spaceBudgetBytes ?? 0) {
            d.append("space-budget (job: \(job.spaceBudgetBytes ?? 0))")
        }
        if let r = o.rateLimitBytesPerSecond, r != (job.settings.rateLimitBytesPerSecond ?? 0) {
            d.append("rate-limit (job: \(job.settings.rateLimitBytesPerSecond ?? 0))")
        }
        return d
    }
}

extension Hydrationtab {
    /// `PREFIX-NAME.service`, NAME escaped as `systemd-escape` does: every byte but ASCII letters,
    /// digits, `:`, `_` and a `.` that does not lead becomes `\xNN` (so `-` and `@` too).
    public static func unitName(prefix: String, job: String) -> String {
        var out = ""
        for (i, b) in job.utf8.enumerated() {
            let c = Character(Unicode.Scalar(b))
            if (c.isASCII && (c.isLetter || c.isNumber)) || c == ":" || c == "_" || (c == "." && i > 0) {
                out.append(c)
            } else {
                let hex = String(b, radix: 16)
                out += "\\x" + (hex.count == 1 ? "0" + hex : hex)
            }
        }
        return "\(prefix)-\(out).service"
    }

    /// One argument of an `ExecStart=` line: quoted, with `\`, `"` and `%` (specifiers) and `$`
    /// (variables) escaped.
    public static func quoteForExec(_ s: String) -> String {
        var out = "\""
        for c in s {
            switch c {
            case "\\": out += "\\\\"
            case "\"": out += "\\\""
            case "%": out += "%%"
            case "$": out += "$$"
            default: out.append(c)
            }
        }
        return out + "\""
    }
}

/// A message as an error, for results built inside the parser.
public struct StringError: Error, Sendable, Equatable, CustomStringConvertible {
    public var description: String
    public init(_ d: String) { description = d }
}

extension Result where Failure == StringError {
    func get(orThrow wrap: (String) -> Hydrationtab.ParseError) throws(Hydrationtab.ParseError) -> Success {
        switch self {
        case .success(let v): return v
        case .failure(let e): throw wrap(e.description)
        }
    }
}
