import NIOCore
import NIOPosix

/// Where a server's connections come from.
public enum UnixSocketListener: Sendable, Equatable {
    /// Bind a Unix socket at this path: the parent directory is created, a stale socket file
    /// (nobody listening) is replaced, the socket gets the server's mode and group.
    case path(String)
    /// Adopt an already bound and listening Unix stream socket (systemd socket activation).
    /// Its mode and owner are the activator's business; the path is only for logs.
    case descriptor(Int32, path: String?)

    /// The path to show in logs: the one bound, or the one given with an adopted descriptor.
    public var path: String? {
        switch self {
        case .path(let p): return p
        case .descriptor(_, let p): return p
        }
    }
}

/// A bound listener: its channel, and the socket file this process created (nil for an adopted
/// descriptor) with its inode, so that shutdown removes only that file.
struct BoundListener<Accepted: Sendable>: Sendable {
    var channel: NIOAsyncChannel<Accepted, Never>
    var path: String?
    var inode: ino_t

    /// Binds `listener` (an adopted descriptor, or a path: stale socket replaced, `mode` and
    /// `group` applied) for a server whose connections `initializer` sets up.
    static func bind(
        _ bootstrap: ServerBootstrap, listener: UnixSocketListener, mode: UInt32, group: UInt32?,
        initializer: @escaping @Sendable (any Channel) -> EventLoopFuture<Accepted>
    ) async throws -> BoundListener {
        switch listener {
        case .descriptor(let fd, _):
            return BoundListener(
                channel: try await bootstrap.bind(fd, childChannelInitializer: initializer), path: nil, inode: 0)
        case .path(let path):
            try UnixSocketFile.prepare(path)
            let fd = try UnixSocketFile.bindListening(path)
            let ch: NIOAsyncChannel<Accepted, Never>
            do {
                ch = try await bootstrap.bind(fd, childChannelInitializer: initializer)
            } catch {
                UnixSocketFile.remove(path, inode: nil)
                throw error
            }
            do {
                try UnixSocketFile.applyAccess(path, mode: mode, group: group)
            } catch {
                try? await ch.channel.close()
                UnixSocketFile.remove(path, inode: nil)
                throw error
            }
            return BoundListener(channel: ch, path: path, inode: UnixSocketFile.inode(path))
        }
    }
}
