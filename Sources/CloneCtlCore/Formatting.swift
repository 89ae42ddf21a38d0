import ControlProtocol
import FoundationEssentials

/// Human-readable numbers: binary sizes (`1.5 GiB`), rates (`120.3 MiB/s`), and durations (`2m05s`).
public enum Human {
    static let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]

    /// `0 B`, `512 B`, `64 KiB`, `1.5 GiB`: whole numbers without decimals, otherwise one decimal.
    public static func bytes(_ value: UInt64) -> String {
        if value < 1024 { return "\(value) B" }
        var unit = 0
        var v = Double(value)
        while v >= 1024, unit < units.count - 1 {
            v /= 1024
            unit += 1
        }
        return number(v) + " " + units[unit]
    }

    public static func bytes(_ value: Double) -> String {
        bytes(UInt64(max(0, value.rounded())))
    }

    /// `0 B/s`, `120.3 MiB/s`.
    public static func rate(_ bytesPerSecond: Double) -> String {
        guard bytesPerSecond.isFinite, bytesPerSecond > 0 else { return "0 B/s" }
        return bytes(bytesPerSecond) + "/s"
    }

    /// One decimal, dropped when it is zero; values that would print as `1024.0` stay below.
    static func number(_ v: Double) -> String {
        let tenths = (v * 10).rounded()
        if tenths.truncatingRemainder(dividingBy: 10) == 0 { return String(Int(tenths / 10)) }
        return Text.oneDecimal(tenths / 10)
    }

    /// `45s`, `2m05s`, `1h02m`, `3d04h`; `<1s` under a second; nil or non-finite gives `unknown`.
    public static func duration(seconds: Double?) -> String {
        guard let s = seconds, s.isFinite, s >= 0 else { return "unknown" }
        if s < 1 { return s == 0 ? "0s" : "<1s" }
        let total = Int(s.rounded())
        let d = total / 86400, h = (total % 86400) / 3600, m = (total % 3600) / 60, sec = total % 60
        if d > 0 { return "\(d)d" + pad2(h) + "h" }
        if h > 0 { return "\(h)h" + pad2(m) + "m" }
        if m > 0 { return "\(m)m" + pad2(sec) + "s" }
        return "\(sec)s"
    }

    /// Milliseconds as the duration syntax clonectl accepts: `500ms`, `1s`, `2m`, `1m30s`.
    public static func milliseconds(_ ms: Int) -> String {
        if ms == 0 { return "0" }
        if ms % 1000 != 0 { return "\(ms)ms" }
        let s = ms / 1000
        if s % 3600 == 0 { return "\(s / 3600)h" }
        if s % 60 == 0 { return "\(s / 60)m" }
        if s > 60 { return "\(s / 60)m\(s % 60)s" }
        return "\(s)s"
    }

    static func pad2(_ v: Int) -> String { v < 10 ? "0\(v)" : "\(v)" }

    /// `42.3%`, using hydrated regions over total (a job with no regions is 100%).
    public static func percent(_ done: UInt64, of total: UInt64) -> String {
        Text.oneDecimal(fraction(done, of: total) * 100) + "%"
    }

    public static func fraction(_ done: UInt64, of total: UInt64) -> Double {
        total == 0 ? 1 : min(1, Double(done) / Double(total))
    }
}

/// JSON as clonectl prints it: pretty, sorted keys, unescaped slashes (the wire encoding, indented).
public enum CloneJSON {
    public static func encoder(pretty: Bool = true) -> JSONEncoder {
        let e = JSONEncoder()
        e.outputFormatting =
            pretty ? [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes] : [.sortedKeys, .withoutEscapingSlashes]
        return e
    }

    public static func string<T: Encodable>(_ value: T, pretty: Bool = true) throws -> String {
        String(decoding: try encoder(pretty: pretty).encode(value), as: UTF8.self)
    }
}

/// The human renderings of the control protocol's replies.
public enum StatusFormatter {
    /// The progress of a job in bytes: hydrated bytes over total bytes.
    static func progress(_ s: JobStatus) -> (done: UInt64, total: UInt64) {
        (s.bytes.hydrated, s.bytes.total)
    }

    /// `42.3% (1.5 GiB of 3.5 GiB)`.
    public static func progressText(_ s: JobStatus) -> String {
        let p = progress(s)
        if s.regions.total == 0 && s.state == .failed { return "progress unknown" }
        return
            "\(Human.percent(s.regions.hydrated, of: s.regions.total)) (\(Human.bytes(p.done)) of \(Human.bytes(p.total)))"
    }

    /// The multi-line report of `clonectl status NAME`.
    public static func detailed(_ s: JobStatus, now: Date = Date()) -> String {
        var lines: [String] = []
        lines.append("\(s.name): \(s.state.rawValue), \(progressText(s))")
        func row(_ label: String, _ value: String) {
            lines.append("  " + Text.padded(label, to: 12) + value)
        }
        row("source", "\(s.source.path) (\(Human.bytes(s.source.sizeBytes)))")
        row("dest", s.dest.path)
        // How the job reads and writes (Start io): one line when both sides agree.
        func io(_ mode: String, _ why: String?) -> String { mode + (why.map { " (\($0))" } ?? "") }
        switch (s.source.io, s.dest.io) {
        case let (src?, dst?) where src == dst && s.source.ioReason == s.dest.ioReason:
            row("i/o", io(src, s.source.ioReason))
        case let (src, dst) where src != nil || dst != nil:
            row(
                "i/o",
                [src.map { "source " + io($0, s.source.ioReason) }, dst.map { "dest " + io($0, s.dest.ioReason) }]
                    .compactMap { $0 }.joined(separator: ", "))
        default: break
        }
        let inFlight = s.regions.hydrating > 0 ? ", \(s.regions.hydrating) in flight" : ""
        row(
            "regions",
            "\(s.regions.hydrated) of \(s.regions.total) hydrated\(inFlight), \(Human.bytes(s.regionSize)) each")
        var committed = "\(Human.bytes(s.bytes.committed))"
        if s.commits.count > 0 {
            committed += " (\(s.commits.count) commit\(s.commits.count == 1 ? "" : "s")"
            if let last = s.commits.lastUnixMs {
                let ago = now.timeIntervalSince1970 - Double(last) / 1000
                committed += ", last \(Human.duration(seconds: max(0, ago))) ago"
            }
            if let d = s.commits.lastDurationMs { committed += ", took \(Text.oneDecimal(d)) ms" }
            committed += ")"
        }
        row("committed", committed)
        if s.bytes.skippedZero > 0 { row("zero", "\(Human.bytes(s.bytes.skippedZero)) skipped (already zero)") }
        switch s.state {
        case .hydrating:
            row("throughput", "\(Human.rate(s.throughputBytesPerSecond)), ETA \(Human.duration(seconds: s.etaSeconds))")
        case .complete, .failed, .paused, .idle:
            if s.throughputBytesPerSecond > 0 { row("throughput", Human.rate(s.throughputBytesPerSecond)) }
        }
        if let e = s.export {
            row(
                "export",
                "\(e.uri) (\(e.clients) client\(e.clients == 1 ? "" : "s"))\(e.hydrateOnRead ? ", hydrate on read" : "")"
            )
            if let io = e.io {
                row(
                    "client i/o",
                    "read \(Human.bytes(io.readBytes)), written \(Human.bytes(io.writtenBytes)), trimmed \(Human.bytes(io.trimmedBytes)); \(io.hydratedRegions) regions hydrated by clients"
                )
            }
        }
        if s.discard.enabled {
            var d = "on: \(Human.bytes(s.bytes.discarded)) discarded, \(Human.bytes(s.discard.pendingBytes)) pending"
            if s.discard.failed > 0 { d += ", \(s.discard.failed) region(s) failed" }
            row("discard", d)
            row("budget", s.spaceBudgetBytes.map { $0 == 0 ? "none" : Human.bytes($0) } ?? "none")
        } else {
            row("discard", "off")
        }
        if let v = s.verify, v.enabled {
            var t = "on: \(Human.bytes(v.verifiedBytes)) read back and equal"
            if let how = v.readBack { t += " (\(how == "evicted" ? "page cache evicted, no O_DIRECT" : how))" }
            if v.mismatches > 0 { t += ", \(v.mismatches) region(s) mismatched" }
            row("verify", t)
        }
        row("settings", settingsText(s.settings))
        row("metadata", "\(s.metadata.path) (\(s.metadata.mode.rawValue))")
        if let e = s.error {
            var where_: [String] = []
            if let n = e.errno { where_.append("errno \(n)") }
            if let r = e.region { where_.append("region \(r)") }
            if let o = e.offset { where_.append("offset \(o)") }
            if let x = e.expectedDigest, let f = e.foundDigest {
                where_.append("source sha256 \(x), destination sha256 \(f)")
            }
            row("error", "\(e.code): \(e.message)" + (where_.isEmpty ? "" : " (\(where_.joined(separator: ", ")))"))
        }
        return lines.joined(separator: "\n")
    }

    public static func settingsText(_ t: JobStatus.Settings) -> String {
        let rate = t.rateLimitBytesPerSecond.map { $0 == 0 ? "none" : Human.rate(Double($0)) } ?? "none"
        return
            "threshold \(t.threshold), batch size \(t.batchSize), rate limit \(rate), commit interval \(Human.milliseconds(t.commitIntervalMs))"
    }

    /// One line per update for `status --watch` when not on a terminal.
    public static func line(_ s: JobStatus) -> String {
        var parts = [s.name, s.state.rawValue, progressText(s)]
        if s.state == .hydrating {
            parts.append(Human.rate(s.throughputBytesPerSecond))
            parts.append("ETA \(Human.duration(seconds: s.etaSeconds))")
        }
        if s.discard.enabled { parts.append("discarded \(Human.bytes(s.bytes.discarded))") }
        if let e = s.error { parts.append("error \(e.code): \(e.message)") }
        return parts.joined(separator: "  ")
    }

    /// The terminal progress bar: `name [#####.....]  42.3%  120.3 MiB/s  ETA 17s  discarded 1 GiB  hydrating`,
    /// fitted into `width` columns (the bar shrinks first; at least 10 cells).
    public static func progressBar(_ s: JobStatus, width: Int) -> String {
        let frac = Human.fraction(s.regions.hydrated, of: s.regions.total)
        var tail = [Human.percent(s.regions.hydrated, of: s.regions.total)]
        if s.state == .hydrating {
            tail.append(Human.rate(s.throughputBytesPerSecond))
            tail.append("ETA \(Human.duration(seconds: s.etaSeconds))")
        }
        if s.discard.enabled { tail.append("discarded \(Human.bytes(s.bytes.discarded))") }
        tail.append(s.state.rawValue)
        if let e = s.error { tail.append(e.code) }
        let tailText = tail.joined(separator: "  ")
        let fixed = s.name.count + 4 + 2 + tailText.count  // "name [" + "]  " + tail
        let cells = max(10, min(50, width - fixed - 1))
        let filled = Int((frac * Double(cells)).rounded(.down))
        let bar = String(repeating: "#", count: filled) + String(repeating: ".", count: cells - filled)
        let line = "\(s.name) [\(bar)]  \(tailText)"
        return line.count > width && width > 0 ? String(line.prefix(width)) : line
    }

    /// The table of `clonectl list`.
    public static func table(_ jobs: [JobSummary]) -> String {
        guard !jobs.isEmpty else { return "no jobs" }
        let header = ["NAME", "STATE", "PROGRESS", "DISCARD", "SOURCE", "DEST"]
        var rows = [header]
        for j in jobs {
            rows.append([
                j.name, j.state.rawValue,
                "\(Human.percent(j.regionsHydrated, of: j.regionsTotal)) (\(j.regionsHydrated)/\(j.regionsTotal))",
                j.discardEnabled ? "on" : "off", j.sourcePath, j.destPath,
            ])
        }
        return alignColumns(rows)
    }

    /// The short table of `clonectl status` without a name.
    public static func statusTable(_ jobs: [JobStatus]) -> String {
        guard !jobs.isEmpty else { return "no jobs" }
        var rows = [["NAME", "STATE", "PROGRESS", "SIZE", "RATE", "ETA", "DISCARDED"]]
        for s in jobs {
            rows.append([
                s.name, s.state.rawValue, Human.percent(s.regions.hydrated, of: s.regions.total),
                Human.bytes(s.bytes.total),
                s.state == .hydrating ? Human.rate(s.throughputBytesPerSecond) : "-",
                s.state == .hydrating ? Human.duration(seconds: s.etaSeconds) : "-",
                s.discard.enabled ? Human.bytes(s.bytes.discarded) : "-",
            ])
        }
        return alignColumns(rows)
    }

    static func alignColumns(_ rows: [[String]]) -> String {
        let n = rows.map(\.count).max() ?? 0
        var widths = [Int](repeating: 0, count: n)
        for r in rows { for (i, c) in r.enumerated() { widths[i] = max(widths[i], c.count) } }
        return rows.map { r in
            r.enumerated().map { i, c in i == r.count - 1 ? c : Text.padded(c, to: widths[i]) }
                .joined(separator: "  ")
        }.joined(separator: "\n")
    }
}

/// The two pieces of `String(format:)` and NSString clonectl used, so that it links
/// FoundationEssentials only (full Foundation's ICU tripled a cold start).
public enum Text {
    /// `x` with one decimal, exactly as `%.1f` prints it: the exact binary value is rounded, so
    /// 0.15 (stored as 0.1499…) prints 0.1, an exact tie goes to even (3.25 → 3.2), and a negative
    /// value that rounds to zero keeps its sign (-0.0).
    public static func oneDecimal(_ x: Double) -> String {
        guard x.isFinite, abs(x) < 1e15 else { return "\(x)" }
        let a = abs(x)
        // a·10 = p + e exactly (fma gives the product's rounding error).
        let p = a * 10
        let err = fmaError(a, p)
        var floorP = p.rounded(.down)
        if p == floorP && err < 0 { floorP -= 1 }
        let d = p - floorP - 0.5  // exact: all three are multiples of p's ulp
        let above = d != 0 ? d > 0 : err != 0 ? err > 0 : Int(floorP) % 2 == 1
        let tenths = Int(floorP) + (above ? 1 : 0)
        return (x.sign == .minus ? "-" : "") + "\(tenths / 10).\(tenths % 10)"
    }

    /// The rounding error of `p = a * 10`: a·10 − p, exact.
    private static func fmaError(_ a: Double, _ p: Double) -> Double {
        (-p).addingProduct(a, 10)
    }

    /// `s` cut or space-padded to `width` characters, as NSString's `padding(toLength:withPad:" "startingAt:0)`.
    public static func padded(_ s: String, to width: Int) -> String {
        s.count >= width ? String(s.prefix(width)) : s + String(repeating: " ", count: width - s.count)
    }
}
