/// Parsing of the sizes, rates and durations clonectl accepts on its command line.
///
/// Sizes are bytes with an optional binary suffix (K = KiB = 1024): `4096`, `64K`, `64KiB`, `1M`,
/// `1.5G`, `2T`. Decimal-looking suffixes (`KB`, `MB`...) are refused rather than guessed.
/// Rates are sizes per second, with an optional `/s`: `20M`, `20MiB/s`. Durations are one or more
/// `<number><unit>` with units `ms`, `s`, `m`, `h`: `500ms`, `1s`, `2m`, `1m30s`, `1.5s`; a bare `0`
/// is accepted.

/// A value the user typed that clonectl cannot accept. `description` is the whole message: what
/// was wrong and what is accepted.
public struct InputError: Error, Sendable, Equatable, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}

public enum ByteSize {
    public static let accepted =
        "a number of bytes with an optional binary suffix K, M, G, T (or KiB, MiB, GiB, TiB; K = 1024), e.g. 4096, 64K, 64KiB, 1M, 1.5G"

    static let multipliers: [(suffix: String, shift: UInt64)] = [
        ("", 0), ("b", 0),
        ("k", 10), ("kib", 10),
        ("m", 20), ("mib", 20),
        ("g", 30), ("gib", 30),
        ("t", 40), ("tib", 40),
        ("p", 50), ("pib", 50),
    ]

    /// Parses a size in bytes. Throws `InputError` naming what is accepted.
    public static func parse(_ text: String) throws(InputError) -> UInt64 {
        let s = text.trimmingSpaces()
        let bad = InputError("invalid size '\(text)': expected \(accepted)")
        guard !s.isEmpty else { throw bad }
        // Split into the number and the suffix.
        let numberPart = String(s.prefix { $0.isASCII && ($0.isNumber || $0 == ".") })
        let suffix = String(s.dropFirst(numberPart.count)).lowercased()
        guard !numberPart.isEmpty, numberPart.first != ".", numberPart.last != "." else { throw bad }
        guard let shift = multipliers.first(where: { $0.suffix == suffix })?.shift else {
            if ["kb", "mb", "gb", "tb", "pb"].contains(suffix) {
                throw InputError(
                    "invalid size '\(text)': '\(suffix.uppercased())' is ambiguous; use \(suffix.prefix(1).uppercased()) or \(suffix.prefix(1).uppercased())iB (binary, x1024)"
                )
            }
            throw bad
        }
        let pieces = numberPart.split(separator: ".", omittingEmptySubsequences: false)
        guard pieces.count <= 2 else { throw bad }
        guard let whole = UInt64(pieces[0]) else { throw InputError("invalid size '\(text)': too large") }
        let (scaled, overflow) = whole.multipliedReportingOverflow(by: 1 << shift)
        guard !overflow else { throw InputError("invalid size '\(text)': too large") }
        guard pieces.count == 2 else { return scaled }
        // A fraction: exact arithmetic on the decimal digits, then require a whole number of bytes.
        let digits = pieces[1]
        guard digits.count <= 18, let frac = UInt64(digits) else { throw bad }
        var denominator: UInt64 = 1
        for _ in 0..<digits.count { denominator *= 10 }
        // frac / denominator * 2^shift must be an integer.
        let (num, o2) = frac.multipliedFullWidth(by: 1 << shift)
        let (q, r) = denominator.dividingFullWidth((num, o2))
        guard r == 0 else {
            throw InputError("invalid size '\(text)': not a whole number of bytes; expected \(accepted)")
        }
        let (total, o3) = scaled.addingReportingOverflow(q)
        guard !o3 else { throw InputError("invalid size '\(text)': too large") }
        return total
    }
}

public enum ByteRate {
    public static let accepted =
        "bytes per second with an optional binary suffix and optional '/s', e.g. 20M, 20MiB/s, 512K; 0 means no limit"

    /// Parses a rate in bytes per second.
    public static func parse(_ text: String) throws(InputError) -> UInt64 {
        var s = text.trimmingSpaces()
        if s.lowercased().hasSuffix("/s") { s = String(s.dropLast(2)) }
        do {
            return try ByteSize.parse(s)
        } catch {
            throw InputError("invalid rate '\(text)': expected \(accepted)")
        }
    }
}

public enum DurationParser {
    public static let accepted = "a number with a unit ms, s, m or h, e.g. 500ms, 1s, 2m, 1m30s, 1.5s"

    /// Parses a duration into milliseconds (rounded down to whole milliseconds; must be >= 0).
    public static func milliseconds(_ text: String) throws(InputError) -> Int {
        let s = text.trimmingSpaces().lowercased()
        let bad = InputError("invalid duration '\(text)': expected \(accepted)")
        guard !s.isEmpty else { throw bad }
        if s == "0" { return 0 }
        var total = 0.0
        var rest = Substring(s)
        while !rest.isEmpty {
            let number = rest.prefix { $0.isASCII && ($0.isNumber || $0 == ".") }
            guard !number.isEmpty, number.first != ".", number.last != ".",
                number.filter({ $0 == "." }).count <= 1, let value = Double(number)
            else { throw bad }
            rest = rest.dropFirst(number.count)
            let unit = rest.prefix { $0.isLetter }
            rest = rest.dropFirst(unit.count)
            let scale: Double
            switch unit {
            case "ms": scale = 1
            case "s": scale = 1000
            case "m", "min": scale = 60_000
            case "h": scale = 3_600_000
            default: throw bad
            }
            total += value * scale
        }
        guard total < Double(Int32.max) * 1000 else { throw InputError("invalid duration '\(text)': too long") }
        return Int(total)
    }

    public static func parse(_ text: String) throws(InputError) -> Duration {
        .milliseconds(try milliseconds(text))
    }
}

extension String {
    func trimmingSpaces() -> String {
        var s = Substring(self)
        while s.first?.isWhitespace == true { s = s.dropFirst() }
        while s.last?.isWhitespace == true { s = s.dropLast() }
        return String(s)
    }
}
