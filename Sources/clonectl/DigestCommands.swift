import ArgumentParser
import CloneCtlCore
import DigestCommand
import HydrationStorage

#if canImport(Glibc)
    import Glibc
#endif

struct Digest: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Print the image digest (hyd1:) of files, block devices or NBD exports (no daemon; read-only).",
        discussion: """
            One 'DIGEST  PATH' line per argument, like sha256sum. The digest is a Merkle tree of SHA-256 over \
            4 KiB leaves (docs/digest.md): the same for the same bytes whatever holds them, and the one a job's \
            receipt gives. Holes (SEEK_DATA, NBD BLOCK_STATUS) and all-zero blocks cost no hashing; the rest is \
            hashed on several threads. NBD URIs (nbd://, nbd+unix://, nbds://...) are read by clonectl-nbd, \
            installed next to clonectl. Exit 0 when every argument was digested; else the first failure's: \
            64 not a URI clonectl knows, 66 cannot open, 69 NBD server unreachable, 74 I/O error while reading, or a file that changed while it was read.
            """)

    @ParentCommand var root: Clonectl
    @Argument(help: ArgumentHelp("Files, block devices or NBD URIs.", valueName: "path|uri"), completion: .file())
    var paths: [String]

    @Flag(
        help: "Print a JSON array: path, digest, size_bytes, bytes_read, bytes_skipped, threads (or error, exit_code).")
    var json = false

    @Option(help: ArgumentHelp("Hashing threads (default: online CPUs, at most 8).", valueName: "n"))
    var threads: Int?

    func validate() throws {
        if root.socket != nil {
            throw ValidationError(
                "--socket does not apply to 'digest': it reads the images directly, without the daemon (leave out --socket)"
            )
        }
        if paths.isEmpty { throw ValidationError("give at least one file, block device or NBD URI") }
        if let t = threads, t < 1 || t > 256 { throw ValidationError("--threads must be 1...256") }
        for p in paths {
            if let problem = DigestRunner.usageProblem(p) { throw ValidationError(problem) }
        }
    }

    func run() throws {
        if paths.contains(where: RemoteSource.isURI) { execHelper() }
        let status = DigestRunner.run(paths: paths, json: json, threads: threads, remote: nil)
        if status != 0 { Glibc.exit(status) }
    }

    /// Replaces this process with clonectl-nbd (next to this binary), which links libnbd.
    func execHelper() -> Never {
        let helper = Digest.helperPath()
        var args = ["clonectl-nbd", "digest"]
        if json { args.append("--json") }
        if let threads { args += ["--threads", String(threads)] }
        args.append("--")
        args += paths
        var cargs: [UnsafeMutablePointer<CChar>?] = args.map { strdup($0) }
        cargs.append(nil)
        execv(helper, &cargs)
        let e = errno
        Output.fail(
            CloneFailure(
                "NBD URIs are digested by clonectl-nbd, which could not be run at \(helper): \(String(cString: strerror(e))); install it next to clonectl",
                exit: .unavailable))
    }

    /// `clonectl-nbd` in the directory of this executable (/proc/self/exe).
    static func helperPath() -> String {
        var buf = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        let n = readlink("/proc/self/exe", &buf, buf.count - 1)
        guard n > 0 else { return "clonectl-nbd" }
        let exe = String(decoding: buf[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        guard let slash = exe.lastIndex(of: "/") else { return "clonectl-nbd" }
        return String(exe[..<slash]) + "/clonectl-nbd"
    }
}
