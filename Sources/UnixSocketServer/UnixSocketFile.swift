import Foundation

#if canImport(Glibc)
    import Glibc
#endif

/// The socket file of a bound listener: made safe to bind (parent created, a stale socket
/// replaced, a live one or a non-socket refused), given its mode and group, and removed at exit
/// only if it is still the file this process bound.
public enum UnixSocketFile {
    /// Gives a freshly bound socket file its mode and group.
    public static func applyAccess(_ path: String, mode: UInt32, group: UInt32?) throws(UnixSocketServerError) {
        guard chmod(path, mode_t(mode)) == 0 else {
            throw .setupFailed(path: path, operation: "chmod", errno: errno)
        }
        if let gid = group, chown(path, uid_t.max, gid_t(gid)) != 0 {
            throw .setupFailed(path: path, operation: "chown", errno: errno)
        }
    }

    /// The inode of the socket file this process bound, so that shutdown removes only that file.
    public static func inode(_ path: String) -> ino_t {
        var st = stat()
        return lstat(path, &st) == 0 ? st.st_ino : 0
    }

    /// Creates the parent directory; removes a stale socket file; refuses a live socket or a non-socket.
    public static func prepare(_ path: String) throws(UnixSocketServerError) {
        let parent = (path as NSString).deletingLastPathComponent
        if !parent.isEmpty {
            do {
                try FileManager.default.createDirectory(
                    atPath: parent, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o755])
            } catch {
                let underlying = (error as NSError).userInfo[NSUnderlyingErrorKey] as? NSError
                let code = underlying?.domain == NSPOSIXErrorDomain ? Int32(underlying!.code) : EIO
                throw .setupFailed(path: parent, operation: "mkdir", errno: code)
            }
        }
        var st = stat()
        guard lstat(path, &st) == 0 else { return }  // nothing there
        guard (st.st_mode & S_IFMT) == S_IFSOCK else { throw .notASocket(path: path) }
        if isListening(path) { throw .socketInUse(path: path) }
        guard unlink(path) == 0 || errno == ENOENT else {
            throw .setupFailed(path: path, operation: "unlink", errno: errno)
        }
    }

    /// Whether something listens on the Unix socket at `path`, asked without ever waiting: a
    /// non-blocking connect succeeds, or finds the listener's backlog full (EAGAIN), when a server
    /// is there, and is refused when the file is stale. (A blocking connect waited for as long as
    /// a hung server's full backlog stayed full, on the thread that starts the daemon.)
    public static func isListening(_ path: String) -> Bool {
        let fd = socket(
            AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        guard let rc = withAddress(path, { connect(fd, $0, $1) }) else { return false }
        if rc == 0 { return true }
        return errno == EAGAIN || errno == EINPROGRESS
    }

    /// A Unix stream socket bound at `path` and listening, for the server to adopt. Bound here
    /// rather than by swift-nio: a listener swift-nio binds by path unlinks whatever file has
    /// that path when it closes, even a socket another server bound there after this one's file
    /// was removed; the file of an adopted descriptor is left to `remove`, which checks the inode.
    public static func bindListening(_ path: String, backlog: Int32 = 128) throws(UnixSocketServerError) -> Int32 {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw .setupFailed(path: path, operation: "socket", errno: errno) }
        guard let rc = withAddress(path, { bind(fd, $0, $1) }) else {
            close(fd)
            throw .setupFailed(path: path, operation: "bind", errno: ENAMETOOLONG)
        }
        guard rc == 0 else {
            let e = errno
            close(fd)
            throw .setupFailed(path: path, operation: "bind", errno: e)
        }
        guard listen(fd, backlog) == 0 else {
            let e = errno
            close(fd)
            remove(path, inode: nil)
            throw .setupFailed(path: path, operation: "listen", errno: e)
        }
        return fd
    }

    /// Calls `body` with the `sockaddr_un` of `path`; nil when the path is too long for one.
    private static func withAddress(
        _ path: String, _ body: (UnsafePointer<sockaddr>, socklen_t) -> Int32
    ) -> Int32? {
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: addr.sun_path) else { return nil }
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        return withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                body($0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
    }

    /// Removes the socket file if it is still the one this server bound (same inode).
    public static func remove(_ path: String, inode: ino_t?) {
        var st = stat()
        guard lstat(path, &st) == 0, (st.st_mode & S_IFMT) == S_IFSOCK else { return }
        if let inode, inode != 0, st.st_ino != inode { return }
        unlink(path)
    }
}
