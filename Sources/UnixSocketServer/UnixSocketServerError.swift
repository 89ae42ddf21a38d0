#if canImport(Glibc)
    import Glibc
#endif

public enum UnixSocketServerError: Error, Sendable, Equatable, CustomStringConvertible {
    /// Another process is accepting connections on the path.
    case socketInUse(path: String)
    /// The path exists and is not a socket; it is never removed.
    case notASocket(path: String)
    case setupFailed(path: String, operation: String, errno: Int32)
    case alreadyStarted

    public var description: String {
        switch self {
        case .socketInUse(let p): return "\(p) is in use: another hydrationd is listening there"
        case .notASocket(let p): return "\(p) exists and is not a socket; refusing to replace it"
        case .setupFailed(let p, let op, let e): return "\(op) \(p): \(String(cString: strerror(e)))"
        case .alreadyStarted: return "the server was already started"
        }
    }
}
