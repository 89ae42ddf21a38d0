/// Where `--metrics-listen` serves: `PORT` (on 127.0.0.1, local only), `HOST:PORT`, or
/// `[IPV6]:PORT`. The host is a literal address: the daemon resolves no names at start.
public struct MetricsListenAddress: Sendable, Equatable, CustomStringConvertible {
    public var host: String
    public var port: Int

    /// The host when only a port is given: loopback, so that metrics are not exposed by accident.
    public static let defaultHost = "127.0.0.1"

    public init(host: String, port: Int) { self.host = host; self.port = port }

    public var description: String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }

    public static func parse(_ text: String) throws(MetricsError) -> MetricsListenAddress {
        func port(_ p: Substring) throws(MetricsError) -> Int {
            guard let n = Int(p), (1...65535).contains(n) else {
                throw MetricsError.invalidListenAddress(text, "the port must be a number from 1 to 65535")
            }
            return n
        }
        if text.isEmpty { throw MetricsError.invalidListenAddress(text, "empty") }
        if text.hasPrefix("[") {
            guard let close = text.firstIndex(of: "]"), text[text.index(after: close)...].hasPrefix(":") else {
                throw MetricsError.invalidListenAddress(text, "expected [IPV6]:PORT")
            }
            let host = String(text[text.index(after: text.startIndex)..<close])
            guard isIPv6(host) else { throw MetricsError.invalidListenAddress(text, "not an IPv6 address: '\(host)'") }
            return MetricsListenAddress(host: host, port: try port(text[text.index(close, offsetBy: 2)...]))
        }
        guard let colon = text.lastIndex(of: ":") else {
            return MetricsListenAddress(host: defaultHost, port: try port(Substring(text)))
        }
        let host = String(text[..<colon])
        guard isIPv4(host) else {
            throw MetricsError.invalidListenAddress(
                text, "the host must be an IPv4 address or a bracketed IPv6 address, got '\(host)'")
        }
        return MetricsListenAddress(host: host, port: try port(text[text.index(after: colon)...]))
    }

    static func isIPv4(_ s: String) -> Bool {
        let parts = s.split(separator: ".", omittingEmptySubsequences: false)
        return parts.count == 4
            && parts.allSatisfy { p in
                !p.isEmpty && p.count <= 3 && p.allSatisfy(\.isASCII) && p.allSatisfy(\.isNumber) && Int(p)! <= 255
            }
    }

    static func isIPv6(_ s: String) -> Bool {
        !s.isEmpty && s.contains(":") && s.allSatisfy { $0.isHexDigit || $0 == ":" || $0 == "." }
    }
}

/// Errors of the metrics endpoint, named so that an operator knows which option is at fault.
public enum MetricsError: Error, Equatable, CustomStringConvertible {
    case invalidListenAddress(String, String)
    case cannotListen(String, String)

    public var description: String {
        switch self {
        case .invalidListenAddress(let a, let why): return "--metrics-listen '\(a)': \(why)"
        case .cannotListen(let a, let why): return "MetricsListenFailed: cannot listen for metrics on \(a): \(why)"
        }
    }
}
