import Foundation

/// What the job manager needs to serve job clones over NBD (`Start` with `export: true`): the
/// registry the daemon's `NBDServer` looks exports up in, that server (for connection counts and
/// disconnects) and the socket path clients connect to (for the URI in the job status).
///
/// The job manager publishes `await job.liveExport()` under the job's name when an exported job is
/// created or opened (also at restore, so a restart serves it again) and withdraws it — registry
/// first, then the connections, which it waits for — before the job is closed for good (remove)
/// or replaced by a reopened one.
public final class JobExportHost: Sendable {
    public let registry: NBDExportRegistry
    public let server: NBDServer
    /// The NBD socket's path, as it appears in URIs.
    public let socketPath: String

    public init(registry: NBDExportRegistry, server: NBDServer, socketPath: String) {
        self.registry = registry
        self.server = server
        self.socketPath = socketPath
    }

    /// `nbd+unix:///NAME?socket=PATH` (the NBD URI spec; the path percent-encoded where needed).
    public func uri(for name: String) -> String {
        Self.uri(export: name, socketPath: socketPath)
    }

    public static func uri(export name: String, socketPath: String) -> String {
        // Job names are letters, digits and - _ . : @, all allowed in a URI path segment.
        "nbd+unix:///\(percentEncoded(name, keeping: "-_.~:@"))?socket=\(percentEncoded(socketPath, keeping: "-_.~/"))"
    }

    static func percentEncoded(_ s: String, keeping extra: String) -> String {
        var out = ""
        for byte in s.utf8 {
            let c = Character(Unicode.Scalar(byte))
            if byte < 0x80 && (c.isLetter || c.isNumber || extra.contains(c)) {
                out.append(c)
            } else {
                out += "%" + String(byte, radix: 16, uppercase: true).leftPadded(to: 2)
            }
        }
        return out
    }

    /// Connections using the export `name` now (in transmission).
    public func clients(of name: String) -> Int { server.connections(export: name) }

    /// Serves `export` under its name. Throws if the name is taken.
    func publish(_ export: any NBDExport) throws(NBDExportRegistry.DuplicateName) {
        try registry.add(export)
    }

    /// Stops serving `name`: no new connection finds it, then the connections using it are ended
    /// (requests in flight first) and waited for. Returns how many were ended.
    @discardableResult
    func withdraw(_ name: String) async -> Int {
        registry.remove(name)
        return await server.disconnectAndWait(export: name)
    }
}

private extension String {
    func leftPadded(to n: Int) -> String { count >= n ? self : String(repeating: "0", count: n - count) + self }
}
