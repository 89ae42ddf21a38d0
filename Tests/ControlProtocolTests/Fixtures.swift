import ControlProtocol
import Foundation

func sampleStatus(name: String = "vm1", state: JobStatus.State = .hydrating) -> JobStatus {
    JobStatus(
        name: name, state: state,
        source: .init(
            path: "/dev/loop0", sizeBytes: 1 << 30, io: "buffered",
            ioReason: "io=auto: the source's allocation is unknown (not a regular file)"),
        dest: .init(
            path: "/dev/loop1", io: "buffered",
            ioReason: "io=auto: the source's allocation is unknown (not a regular file)"),
        regionSize: 65536,
        regions: .init(total: 16384, hydrated: 100, hydrating: 4),
        bytes: .init(total: 1 << 30, hydrated: 6_553_600, committed: 6_291_456, skippedZero: 65536, discarded: 4096),
        throughputBytesPerSecond: 123456.5, etaSeconds: nil,
        commits: .init(count: 3, lastUnixMs: 1_764_000_000_000, lastDurationMs: nil),
        discard: .init(enabled: true, pendingBytes: 8192, failed: 0),
        spaceBudgetBytes: nil,
        settings: .init(threshold: 4, batchSize: 8, rateLimitBytesPerSecond: nil, commitIntervalMs: 1000),
        metadata: .init(path: "/var/lib/hydrationd/vm1.meta", mode: .rw),
        error: nil
    )
}

/// Parses `type`, `method` and `error` declarations of a Varlink IDL into field-name lists, enough
/// to check that the interface text and the Swift types agree. (Nested anonymous structs are not
/// used by the interface.)
struct IDLDeclarations {
    var types: [String: [String]] = [:]
    var methodInputs: [String: [String]] = [:]
    var methodOutputs: [String: [String]] = [:]
    var errors: [String: [String]] = [:]
    var interfaceName = ""

    init(_ text: String) {
        // Drop comments, then tokenize on parentheses.
        let body = text.split(separator: "\n").map { line -> Substring in
            if let hash = line.firstIndex(of: "#") { return line[..<hash] }
            return line
        }.joined(separator: " ")
        var rest = Substring(body)
        func fields(_ s: Substring) -> [String] {
            // Split top-level "a: T, b: (x, y)" into names.
            var names: [String] = []
            var depth = 0
            var current = ""
            for ch in s {
                if ch == "(" { depth += 1 }
                if ch == ")" { depth -= 1 }
                if ch == "," && depth == 0 { names.append(current); current = ""; continue }
                current.append(ch)
            }
            if !current.trimmingCharacters(in: .whitespaces).isEmpty { names.append(current) }
            return names.compactMap { f in
                let name = f.split(separator: ":").first.map { $0.trimmingCharacters(in: .whitespaces) }
                return (name?.isEmpty ?? true) ? nil : name
            }
        }
        func takeParens(_ s: inout Substring) -> Substring {
            guard let open = s.firstIndex(of: "(") else { return "" }
            var depth = 0
            var i = open
            while i < s.endIndex {
                if s[i] == "(" { depth += 1 }
                if s[i] == ")" { depth -= 1; if depth == 0 { break } }
                i = s.index(after: i)
            }
            let inner = s[s.index(after: open)..<i]
            s = s[s.index(after: i)...]
            return inner
        }
        while let word = rest.split(separator: " ", maxSplits: 1).first {
            rest = rest.drop(while: { $0 == " " }).dropFirst(word.count)
            switch word {
            case "interface":
                interfaceName = String(rest.split(separator: " ").first ?? "")
                rest = rest.drop(while: { $0 == " " }).dropFirst(interfaceName.count)
            case "type", "error", "method":
                let trimmed = rest.drop(while: { $0 == " " })
                let name = String(trimmed.prefix(while: { $0.isLetter || $0.isNumber }))
                rest = trimmed.dropFirst(name.count)
                let inner = takeParens(&rest)
                if word == "type" { types[name] = fields(inner) }
                if word == "error" { errors[name] = fields(inner) }
                if word == "method" {
                    methodInputs[name] = fields(inner)
                    rest = rest.drop(while: { $0 == " " })
                    if rest.hasPrefix("->") {
                        rest = rest.dropFirst(2)
                        methodOutputs[name] = fields(takeParens(&rest))
                    }
                }
            default:
                break
            }
        }
    }
}
