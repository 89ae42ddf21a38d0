import CloneCtlCore
import FoundationEssentials
import HydrationStorage

#if canImport(Glibc)
    import Glibc
#endif

/// `clonectl digest PATH|URI ...`: one `DIGEST  PATH` line per argument, like sha256sum, or a
/// JSON array with `--json`. Shared by clonectl (files and block devices) and clonectl-nbd
/// (the same, plus NBD URIs through libnbd).
public enum DigestRunner {
    /// One argument's outcome (`--json`).
    public struct Entry: Codable, Sendable, Equatable {
        public var path: String
        public var digest: String?
        public var sizeBytes: UInt64?
        public var bytesRead: UInt64?
        public var bytesSkipped: UInt64?
        public var threads: Int?
        public var error: String?
        public var exitCode: Int32?

        enum CodingKeys: String, CodingKey {
            case path, digest, error, threads
            case sizeBytes = "size_bytes"
            case bytesRead = "bytes_read"
            case bytesSkipped = "bytes_skipped"
            case exitCode = "exit_code"
        }
    }

    /// A usage problem with one argument (clonectl reports it as a usage error before reading
    /// anything), or nil. An argument with a scheme (`x://`) must be one of `RemoteSource.schemes`.
    public static func usageProblem(_ path: String) -> String? {
        if path.isEmpty { return "an empty path" }
        if path.contains("://") && !RemoteSource.isURI(path) {
            let scheme = path.prefix(while: { $0 != ":" })
            return
                "'\(path)' is not a URI clonectl knows (scheme '\(scheme)'); give a file, a block device or an NBD URI (\(RemoteSource.schemes.joined(separator: ", ")))"
        }
        return nil
    }

    /// Digests every path in order and prints as it goes; returns the exit status: 0 when all
    /// were digested, else the first failure's (66 cannot open, 69 server unreachable, 74 I/O
    /// error while reading). A failure does not stop the other arguments.
    public static func run(paths: [String], json: Bool, threads: Int?, remote: (any RemoteDevices)?) -> Int32 {
        let storage = PosixStorage(remote: remote)
        var entries = [Entry]()
        var status: Int32 = 0
        for path in paths {
            let entry = digest(path, storage: storage, threads: threads ?? ImageDigest.defaultThreads)
            if let e = entry.error, let code = entry.exitCode {
                writeErr("clonectl: \(e)\n")
                if status == 0 { status = code }
            } else if !json, let d = entry.digest {
                print("\(d)  \(escaped(path))")
                fflush(nil)
            }
            entries.append(entry)
        }
        if json {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
            if let data = try? encoder.encode(entries) {
                print(String(decoding: data, as: UTF8.self))
                fflush(nil)
            }
        }
        return status
    }

    static func digest(_ path: String, storage: PosixStorage, threads: Int) -> Entry {
        var entry = Entry(path: path)
        if let problem = usageProblem(path) {
            entry.error = problem
            entry.exitCode = CloneExit.usage.rawValue
            return entry
        }
        let device: any StorageDevice
        do {
            device = try storage.open(absolute(path), mode: .readOnly)
        } catch {
            (entry.error, entry.exitCode) = openFailure(path, error)
            return entry
        }
        defer { device.close() }
        let before = FileState(absolute(path))
        do {
            let r = try ImageDigest.digest(of: device, threads: threads)
            if let before, let after = FileState(absolute(path)), before != after {
                // A digest of bytes read while the image changed is of no state it was ever in.
                entry.error =
                    "\(path) changed while it was being digested (size \(before.size) -> \(after.size), modified); digest it when nothing writes to it"
                entry.exitCode = CloneExit.ioError.rawValue
                return entry
            }
            entry.digest = ImageDigest.format(r.digest)
            entry.sizeBytes = r.size
            entry.bytesRead = r.bytesRead
            entry.bytesSkipped = r.bytesSkipped
            entry.threads = r.threads
        } catch {
            entry.error = "\(path): \(error)"
            entry.exitCode = (error.isConnectionLost ? CloneExit.unavailable : CloneExit.ioError).rawValue
        }
        return entry
    }

    /// What shows a local image changed: size, and for a regular file its modification and change
    /// times (a block device's writes do not touch its node's times). Nil for a URI.
    struct FileState: Equatable {
        var size: Int64
        var inode: UInt64
        var mtime: timespec
        var ctime: timespec

        init?(_ path: String) {
            guard !RemoteSource.isURI(path) else { return nil }
            var st = stat()
            guard stat(path, &st) == 0 else { return nil }
            inode = UInt64(st.st_ino)
            if (st.st_mode & S_IFMT) == S_IFBLK {
                let fd = open(path, O_RDONLY | O_CLOEXEC)
                guard fd >= 0 else { return nil }
                defer { close(fd) }
                size = Int64(lseek(fd, 0, SEEK_END))
                mtime = timespec()
                ctime = timespec()
            } else {
                size = Int64(st.st_size)
                mtime = st.st_mtim
                ctime = st.st_ctim
            }
        }

        static func == (a: FileState, b: FileState) -> Bool {
            a.size == b.size && a.inode == b.inode && a.mtime.tv_sec == b.mtime.tv_sec
                && a.mtime.tv_nsec == b.mtime.tv_nsec && a.ctime.tv_sec == b.ctime.tv_sec
                && a.ctime.tv_nsec == b.ctime.tv_nsec
        }
    }

    /// The storage layer opens absolute paths only; URIs pass as they are.
    static func absolute(_ path: String) -> String {
        if path.hasPrefix("/") || RemoteSource.isURI(path) { return path }
        guard let cwd = getcwd(nil, 0) else { return path }
        defer { free(cwd) }
        return String(cString: cwd) + "/" + path
    }

    /// What an open failure means for the user, and its exit code.
    static func openFailure(_ path: String, _ e: StorageError) -> (String, Int32) {
        if RemoteSource.isURI(path) {
            if e.errno == EPROTONOSUPPORT {
                return ("\(path): \(e)", CloneExit.software.rawValue)
            }
            // libnbd could not parse it (a missing ?socket=, a bad port...): the user's to fix.
            if e.errno == EINVAL {
                return ("not a valid NBD URI: \(path): \(e.detail ?? e.description)", CloneExit.usage.rawValue)
            }
            return (
                "cannot reach the NBD export \(path): \(e) (connections give up after HYDRATION_NBD_CONNECT_TIMEOUT_MS, 10 s by default)",
                CloneExit.unavailable.rawValue
            )
        }
        switch e.errno {
        case ENOENT: return ("\(path): no such file or block device", CloneExit.noInput.rawValue)
        case EACCES, EPERM: return ("\(path): permission denied (\(e))", CloneExit.noInput.rawValue)
        case EISDIR: return ("\(path): is a directory; give a file or a block device", CloneExit.noInput.rawValue)
        case EINVAL where e.operation == .stat || e.operation == .open:
            return ("\(path): not a regular file or block device", CloneExit.noInput.rawValue)
        default: return ("cannot open \(path): \(e)", CloneExit.noInput.rawValue)
        }
    }

    /// sha256sum's convention: a name with a newline or backslash is escaped and the line starts
    /// with a backslash; here the escape is applied to the name only (the digest has a prefix).
    static func escaped(_ path: String) -> String {
        guard path.contains("\n") || path.contains("\\") else { return path }
        return "\\" + path.replacing("\\", with: "\\\\").replacing("\n", with: "\\n")
    }

    public static func writeErr(_ s: String) {
        let bytes = Array(s.utf8)
        var done = 0
        while done < bytes.count {
            let n = bytes.withUnsafeBytes { Glibc.write(STDERR_FILENO, $0.baseAddress! + done, $0.count - done) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return }
            done += n
        }
    }
}
