import HydrationEngine

#if canImport(Glibc)
    import Glibc
#endif

/// An exclusive lock on a state directory (`<state-dir>/lock`, flock), held while a daemon uses
/// it: a second daemon on the same directory would open every job's metadata read-write while
/// the first commits to it. Released when the value goes away (or with the process).
///
/// Sendable: the descriptor is immutable after init and only closed in deinit.
final class StateDirectoryLock: Sendable {
    let fd: Int32

    init(directory: String) throws(HydrationError) {
        let path = directory + "/lock"
        let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        guard fd >= 0 else {
            throw HydrationError(.ioError, "state directory lock \(path): \(errnoSymbol(errno))", errno: errno)
        }
        guard flock(fd, LOCK_EX | LOCK_NB) == 0 else {
            let e = errno
            close(fd)
            var err = HydrationError(
                .deviceInUse,
                "state directory \(directory) is in use by another hydrationd (\(path) is locked); one daemon per state directory",
                errno: e)
            err.path = directory
            throw err
        }
        self.fd = fd
    }

    deinit { close(fd) }
}
