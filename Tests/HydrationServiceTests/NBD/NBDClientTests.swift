import Foundation
import HydrationTestSupport
import Testing

@testable import HydrationService
@testable import HydrationStorage
@testable import NBDServer

#if canImport(Glibc)
    import Glibc
#endif

/// The server against real NBD clients (libnbd's nbdinfo, nbdcopy and nbdsh; qemu-img, qemu-io),
/// each test on its own socket. A test is skipped only when its client is not installed
/// (`Scripts/install-deps.sh --test` installs them).
@Suite(.serialized) struct NBDClientTests {
    static let mib = 1 << 20

    private func exportJSON(_ r: ToolResult) throws -> [String: Any] {
        #expect(r.status == 0, "\(r.stderr)")
        let root = try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any]
        let exports = try #require(root?["exports"] as? [[String: Any]])
        return try #require(exports.first)
    }

    @Test(.enabled(if: NBDTools.hasNbdinfo, "nbdinfo (libnbd-bin) is not installed"))
    func nbdinfoShowsSizeFlagsBlockSizesNameAndDescription() async throws {
        try await withNBDServer { f in
            let disk = try f.fileExport(
                name: "disk", path: f.dir.path + "/disk.img", size: 8 * Self.mib, description: "a test disk")
            try f.registry.add(TestExport(name: "disk", inner: disk))
            try f.registry.add(
                try f.fileExport(name: "ro", path: f.dir.path + "/ro.img", size: 3 * Self.mib + 512, readOnly: true))

            let r = try await runTool("nbdinfo", ["--json", f.uri("disk")])
            let root = try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any]
            #expect(root?["protocol"] as? String == "newstyle-fixed")
            #expect(root?["structured"] as? Bool == true)
            let e = try exportJSON(r)
            #expect(e["export-name"] as? String == "disk")
            #expect(e["description"] as? String == "a test disk")
            #expect(e["export-size"] as? Int == 8 * Self.mib)
            #expect(e["block_size_minimum"] as? Int == 1)
            #expect(e["block_size_preferred"] as? Int == 4096)
            #expect(e["block_size_maximum"] as? Int == 32 * Self.mib)
            #expect(e["is_read_only"] as? Bool == false)
            for flag in [
                "can_cache", "can_df", "can_fast_zero", "can_flush", "can_fua", "can_multi_conn", "can_trim",
                "can_zero",
            ] {
                #expect(e[flag] as? Bool == true, "\(flag)")
            }
            #expect(e["contexts"] as? [String] == ["base:allocation", "x-test:stripes"])

            let ro = try exportJSON(try await runTool("nbdinfo", ["--json", f.uri("ro")]))
            #expect(ro["export-size"] as? Int == 3 * Self.mib + 512)
            #expect(ro["is_read_only"] as? Bool == true)
            for flag in ["can_trim", "can_zero", "can_fua", "can_fast_zero"] {
                #expect(ro[flag] as? Bool == false, "\(flag) on a read-only export")
            }
            #expect(ro["can_flush"] as? Bool == true)

            // libnbd shows the server's message only in its debug output.
            let missing = try await runTool("nbdinfo", [f.uri("nosuch")], environment: ["LIBNBD_DEBUG": "1"])
            #expect(missing.status != 0)
            #expect(missing.stderr.contains("No such file or directory"), "NBD_REP_ERR_UNKNOWN is ENOENT to libnbd")
            #expect(missing.stderr.contains("server error message: no export named 'nosuch'"))
        }
    }

    @Test(.enabled(if: NBDTools.hasNbdinfo, "nbdinfo (libnbd-bin) is not installed"))
    func listShowsTheExportsThePeerMayUseAndTheAccessHookRefusesTheOthers() async throws {
        try await withNBDServer(configure: { c in
            c.access = { peer, export in
                #expect(peer.uid == geteuid(), "SO_PEERCRED reaches the hook")
                switch export.name {
                case "secret": return .denied("not for uid \(peer.uid)")
                case "shared": return .readOnly
                default: return .readWrite
                }
            }
        }) { f in
            for name in ["disk", "shared", "secret"] {
                try f.registry.add(
                    try f.fileExport(
                        name: name, path: f.dir.path + "/\(name).img", size: Self.mib, description: "\(name) export"))
            }
            f.registry.defaultExport = "disk"
            let list = try await runTool("nbdinfo", ["--list", "--json", f.uri("")])
            #expect(list.status == 0, "\(list.stderr)")
            let root = try JSONSerialization.jsonObject(with: Data(list.stdout.utf8)) as? [String: Any]
            let exports = try #require(root?["exports"] as? [[String: Any]])
            #expect(exports.compactMap { $0["export-name"] as? String } == ["disk", "shared"])
            #expect(exports.compactMap { $0["description"] as? String } == ["disk export", "shared export"])

            let denied = try await runTool("nbdinfo", [f.uri("secret")], environment: ["LIBNBD_DEBUG": "1"])
            #expect(denied.status != 0)
            #expect(
                denied.stderr.contains("server error message: not for uid"),
                "NBD_REP_ERR_POLICY carries the hook's message")

            let shared = try await runTool("nbdinfo", ["--is", "read-only", f.uri("shared")])
            #expect(shared.status == 0, "a read-only grant makes the export read-only")
            // The empty name is the default export.
            let dflt = try exportJSON(try await runTool("nbdinfo", ["--json", f.uri("")]))
            #expect(dflt["export-size"] as? Int == Self.mib)
        }
    }

    @Test(.enabled(if: NBDTools.hasNbdinfo, "nbdinfo (libnbd-bin) is not installed"))
    func canReportsEachCapability() async throws {
        try await withNBDServer { f in
            let disk = try f.fileExport(name: "disk", path: f.dir.path + "/disk.img", size: Self.mib)
            try f.registry.add(disk)
            try f.registry.add(
                TestExport(
                    name: "limited", inner: disk,
                    removing: [.fua, .trim, .cache, .multiConn, .writeZeroes, .fastZero, .flush]))
            for what in [
                "flush", "trim", "zero", "fast-zero", "fua", "multi-conn", "cache", "df", "structured-reply", "write",
            ] {
                let yes = try await runTool("nbdinfo", ["--can", what, f.uri("disk")])
                #expect(yes.status == 0, "--can \(what): \(yes.stderr)")
            }
            for what in ["flush", "trim", "zero", "fast-zero", "fua", "multi-conn", "cache"] {
                let no = try await runTool("nbdinfo", ["--can", what, f.uri("limited")])
                #expect(no.status == 2, "--can \(what) on an export without it: \(no.status) \(no.stderr)")
            }
        }
    }

    @Test(.enabled(if: NBDTools.hasNbdinfo, "nbdinfo (libnbd-bin) is not installed"))
    func mapShowsHolesAndDataAndAPrivateContext() async throws {
        try await withNBDServer { f in
            let path = f.dir.path + "/sparse.img"
            let disk = try f.fileExport(name: "disk", path: path, size: 8 * Self.mib)
            // Data in MiB 1 and in MiB 4-5; the rest stays a hole.
            let fd = open(path, O_WRONLY)
            let data = [UInt8](repeating: 0x5a, count: Self.mib)
            _ = data.withUnsafeBytes { pwrite(fd, $0.baseAddress, Self.mib, off_t(Self.mib)) }
            _ = data.withUnsafeBytes { pwrite(fd, $0.baseAddress, Self.mib, off_t(4 * Self.mib)) }
            _ = data.withUnsafeBytes { pwrite(fd, $0.baseAddress, Self.mib, off_t(5 * Self.mib)) }
            fsync(fd)
            close(fd)
            try f.registry.add(TestExport(name: "disk", inner: disk))

            let map = try await runTool("nbdinfo", ["--map", f.uri("disk")])
            #expect(map.status == 0, "\(map.stderr)")
            let rows = map.stdout.split(separator: "\n").map {
                $0.split(separator: " ", omittingEmptySubsequences: true).prefix(3).map(String.init)
            }
            let m = Self.mib
            #expect(
                rows == [
                    ["0", "\(m)", "3"], ["\(m)", "\(m)", "0"], ["\(2 * m)", "\(2 * m)", "3"],
                    ["\(4 * m)", "\(2 * m)", "0"], ["\(6 * m)", "\(2 * m)", "3"],
                ], "\(map.stdout)")

            let stripes = try await runTool("nbdinfo", ["--map=x-test:stripes", f.uri("disk")])
            #expect(stripes.status == 0, "\(stripes.stderr)")
            let srows = stripes.stdout.split(separator: "\n").map {
                $0.split(separator: " ", omittingEmptySubsequences: true).prefix(3).map(String.init)
            }
            #expect(srows == (0..<8).map { ["\($0 * m)", "\(m)", "\($0 % 4)"] }, "\(stripes.stdout)")
        }
    }

    @Test(
        .enabled(
            if: NBDTools.hasNbdcopy && NBDTools.hasQemu,
            "nbdcopy (libnbd-bin) or qemu-img (qemu-utils) is not installed"))
    func nbdcopyIntoTheExportAndBackIsByteEqual() async throws {
        try await withNBDServer { f in
            let size = 64 * Self.mib
            let source = f.dir.path + "/source.img"
            let image = TestImage.make(size: size, seed: 12)
            try image.write(to: source)
            try f.registry.add(try f.fileExport(name: "disk", path: f.dir.path + "/export.img", size: size))

            let start = ContinuousClock.now
            let into = try await runTool("nbdcopy", ["--flush", source, f.uri("disk")], timeout: 60)
            #expect(into.status == 0, "nbdcopy into the export: \(into.stderr)")
            let back = f.dir.path + "/back.img"
            let out = try await runTool("nbdcopy", [f.uri("disk"), back], timeout: 60)
            #expect(out.status == 0, "nbdcopy out of the export: \(out.stderr)")
            let elapsed = ContinuousClock.now - start
            #expect(
                byteDifference(readFile(back), image.bytes) == nil, "64 MiB round trip through the export is byte-equal"
            )
            #expect(byteDifference(readFile(f.dir.path + "/export.img"), image.bytes) == nil)

            let cmp = try await runTool(
                "qemu-img", ["compare", "-f", "raw", "-F", "raw", source, f.uri("disk")], timeout: 60)
            #expect(cmp.status == 0, "qemu-img compare: \(cmp.stdout) \(cmp.stderr)")
            print("nbdcopy 64 MiB in and out: \(elapsed)")
        }
    }

    @Test(.enabled(if: NBDTools.hasQemu, "qemu-io (qemu-utils) is not installed"))
    func qemuIoWritesReadsDiscardsZeroesAndFlushes() async throws {
        try await withNBDServer { f in
            let path = f.dir.path + "/disk.img"
            try f.registry.add(try f.fileExport(name: "disk", path: path, size: 8 * Self.mib))
            let r = try await runTool(
                "qemu-io",
                [
                    "-f", "raw",
                    "-c", "write -P 0xab 0 1M",
                    "-c", "read -P 0xab 0 1M",
                    "-c", "write -P 0xcd 2M 2M",
                    "-c", "discard 2M 1M",
                    "-c", "write -z 3M 512k",
                    "-c", "read -P 0 3M 512k",
                    "-c", "read -P 0xcd 3584k 512k",
                    "-c", "write -z -u 4M 1M",
                    "-c", "read -P 0 4M 1M",
                    "-c", "flush",
                    f.uri("disk"),
                ])
            #expect(r.status == 0, "\(r.stdout) \(r.stderr)")
            #expect(!r.stdout.contains("Pattern verification failed"), "\(r.stdout)")
            #expect(!r.stdout.lowercased().contains("error"), "\(r.stdout)")
            let bytes = readFile(path)
            #expect(bytes[0..<Self.mib].allSatisfy { $0 == 0xab })
            #expect(bytes[3 * Self.mib..<(3 * Self.mib + Self.mib / 2)].allSatisfy { $0 == 0 })
            #expect(bytes[(3 * Self.mib + Self.mib / 2)..<4 * Self.mib].allSatisfy { $0 == 0xcd })
            #expect(allocatedBytes(path) < UInt64(8 * Self.mib), "discard and write -z punched holes")
        }
    }

    @Test(.enabled(if: NBDTools.hasNbdsh, "nbdsh (libnbd-bin, python3-libnbd) is not installed"))
    func badRequestsGetTheirErrnoAndTheConnectionGoesOn() async throws {
        try await withNBDServer { f in
            // 64 MiB (sparse), so that a 48 MiB read is inside the export and only too large.
            let disk = try f.fileExport(name: "disk", path: f.dir.path + "/disk.img", size: 64 * Self.mib)
            try f.registry.add(TestExport(name: "limited", inner: disk, removing: [.fua, .trim]))
            let script = """
                import errno, nbd
                h.set_strict_mode(0)
                size = h.get_size()
                def attempt(name, f):
                    try:
                        f()
                        print(name, "OK")
                    except nbd.Error as e:
                        print(name, errno.errorcode.get(e.errnum, e.errnum))
                    h.pwrite(b"\\x42" * 512, 4096)
                    assert h.pread(512, 4096) == b"\\x42" * 512
                attempt("read-beyond-end", lambda: h.pread(4096, size - 512))
                attempt("write-beyond-end", lambda: h.pwrite(b"x" * 4096, size - 512))
                attempt("zero-beyond-end", lambda: h.zero(4096, size))
                attempt("oversized-read", lambda: h.pread(48 << 20, 0))
                attempt("zero-length-read", lambda: h.pread(0, 0))
                attempt("fua-not-negotiated", lambda: h.pwrite(b"x" * 512, 0, nbd.CMD_FLAG_FUA))
                attempt("trim-not-negotiated", lambda: h.trim(4096, 0))
                attempt("flag-on-wrong-command", lambda: h.pread(512, 0, nbd.CMD_FLAG_REQ_ONE))
                attempt("block-status-without-context", lambda: h.block_status(4096, 0, lambda *a: 0))
                attempt("good-read", lambda: h.pread(4096, size - 4096))
                attempt("max-write", lambda: h.pwrite(b"\\x17" * (32 << 20), 32 << 20))
                attempt("max-read", lambda: h.pread(32 << 20, 32 << 20) == b"\\x17" * (32 << 20) or 1 / 0)
                print("in-flight", h.aio_in_flight())
                """
            let r = try await runTool("nbdsh", ["-u", f.uri("limited"), "-c", script])
            #expect(r.status == 0, "\(r.stdout) \(r.stderr)")
            var results: [String: String] = [:]
            for line in r.stdout.split(separator: "\n") {
                let parts = line.split(separator: " ")
                if parts.count == 2 { results[String(parts[0])] = String(parts[1]) }
            }
            #expect(results["read-beyond-end"] == "EINVAL")
            #expect(results["write-beyond-end"] == "ENOSPC")
            #expect(results["zero-beyond-end"] == "ENOSPC")
            #expect(results["oversized-read"] == "EOVERFLOW")
            #expect(results["zero-length-read"] == "EINVAL")
            #expect(results["fua-not-negotiated"] == "EINVAL")
            #expect(results["trim-not-negotiated"] == "EINVAL")
            #expect(results["flag-on-wrong-command"] == "EINVAL")
            #expect(results["block-status-without-context"] == "EINVAL")
            #expect(results["good-read"] == "OK")
            #expect(results["max-write"] == "OK", "32 MiB writes")
            #expect(results["max-read"] == "OK", "32 MiB reads")
            #expect(results["in-flight"] == "0")
        }
    }

    @Test(
        .enabled(
            if: NBDTools.path("nbdfuse") != nil && geteuid() == 0
                && FileManager.default.fileExists(atPath: "/dev/fuse"),
            "nbdfuse (libnbd-bin), root and /dev/fuse are needed"))
    func nbdfuseServesTheExportAsAFile() async throws {
        try await withNBDServer { f in
            let path = f.dir.path + "/disk.img"
            try f.registry.add(try f.fileExport(name: "disk", path: path, size: 4 * Self.mib))
            let mnt = f.dir.path + "/mnt"
            try FileManager.default.createDirectory(atPath: mnt, withIntermediateDirectories: true)
            let fuse = Process()
            fuse.executableURL = URL(fileURLWithPath: NBDTools.path("nbdfuse")!)
            fuse.arguments = [mnt, f.uri("disk")]
            fuse.standardOutput = FileHandle.nullDevice
            fuse.standardError = FileHandle.nullDevice
            try fuse.run()
            defer {
                _ = umount2(mnt, Int32(MNT_DETACH))
                if fuse.isRunning { kill(fuse.processIdentifier, SIGKILL) }
            }
            #expect(
                await eventually(10) { FileManager.default.fileExists(atPath: mnt + "/nbd") },
                "nbdfuse mounted the export")
            let ok = try await offPool { () -> Bool in
                let fd = open(mnt + "/nbd", O_RDWR)
                guard fd >= 0 else { return false }
                defer { close(fd) }
                let data = [UInt8](repeating: 0x3c, count: 65536)
                guard data.withUnsafeBytes({ pwrite(fd, $0.baseAddress, $0.count, 1 << 20) }) == 65536, fsync(fd) == 0
                else { return false }
                var back = [UInt8](repeating: 0, count: 65536)
                guard back.withUnsafeMutableBytes({ pread(fd, $0.baseAddress, $0.count, 1 << 20) }) == 65536 else {
                    return false
                }
                return back == data
            }
            #expect(ok, "a write and a read through the FUSE file")
            #expect(umount2(mnt, 0) == 0, "unmount: errno \(errno)")
            let disk = readFile(path)
            #expect(disk[(1 << 20)..<((1 << 20) + 65536)].allSatisfy { $0 == 0x3c }, "the write reached the export")
        }
    }

    /// The same bad requests against nbdkit (the reference the spec's open choices follow) and
    /// against this server get the same errnos. (nbdkit accepts reads up to 64 MiB, so the
    /// oversized read is left out.)
    @Test(.enabled(if: NBDTools.hasNbdsh && NBDTools.path("nbdkit") != nil, "nbdkit or nbdsh is not installed"))
    func badRequestErrnosMatchNbdkit() async throws {
        try await withNBDServer { f in
            let size = 8 * Self.mib
            try f.registry.add(try f.fileExport(name: "disk", path: f.dir.path + "/ours.img", size: size))
            let theirs = f.dir.path + "/theirs.img"
            let fd = open(theirs, O_CREAT | O_RDWR, 0o600)
            ftruncate(fd, off_t(size))
            close(fd)
            let kitSocket = f.dir.path + "/nbdkit.sock"
            let kit = Process()
            kit.executableURL = URL(fileURLWithPath: NBDTools.path("nbdkit")!)
            kit.arguments = ["-f", "--exit-with-parent", "-U", kitSocket, "file", theirs]
            // Not the test's own stdout: a child holding it open keeps `swift test` waiting.
            kit.standardOutput = FileHandle.nullDevice
            kit.standardError = FileHandle.nullDevice
            try kit.run()
            // SIGKILL: children inherit the test thread's blocked signal mask, so SIGTERM stays pending.
            defer { kill(kit.processIdentifier, SIGKILL) }
            #expect(await eventually(10) { FileManager.default.fileExists(atPath: kitSocket) })

            let script = """
                import errno, nbd
                h.set_strict_mode(0)
                size = h.get_size()
                def attempt(name, f):
                    try:
                        f()
                        print(name, "OK")
                    except nbd.Error as e:
                        print(name, errno.errorcode.get(e.errnum, e.errnum))
                attempt("read-beyond-end", lambda: h.pread(4096, size - 512))
                attempt("read-past-offset", lambda: h.pread(512, size + 4096))
                attempt("write-beyond-end", lambda: h.pwrite(b"x" * 4096, size - 512))
                attempt("zero-beyond-end", lambda: h.zero(4096, size))
                attempt("trim-beyond-end", lambda: h.trim(4096, size))
                attempt("cache-beyond-end", lambda: h.cache(4096, size))
                attempt("zero-length-read", lambda: h.pread(0, 0))
                attempt("zero-length-write", lambda: h.pwrite(b"", 0))
                attempt("req-one-on-read", lambda: h.pread(512, 0, nbd.CMD_FLAG_REQ_ONE))
                attempt("no-hole-on-write", lambda: h.pwrite(b"x", 0, nbd.CMD_FLAG_NO_HOLE))
                attempt("df-on-write", lambda: h.pwrite(b"x", 0, nbd.CMD_FLAG_DF))
                attempt("unknown-flag", lambda: h.pread(512, 0, 0x40))
                attempt("block-status-without-context", lambda: h.block_status(4096, 0, lambda *a: 0))
                attempt("read", lambda: h.pread(4096, 0))
                attempt("write-fua", lambda: h.pwrite(b"y" * 4096, 0, nbd.CMD_FLAG_FUA))
                attempt("zero-no-hole", lambda: h.zero(4096, 0, nbd.CMD_FLAG_NO_HOLE))
                attempt("trim", lambda: h.trim(4096, 8192))
                attempt("flush", lambda: h.flush())
                """
            let ours = try await runTool("nbdsh", ["-u", f.uri("disk"), "-c", script])
            let reference = try await runTool("nbdsh", ["-u", nbdURI("", socket: kitSocket), "-c", script])
            #expect(ours.status == 0 && reference.status == 0, "\(ours.stderr) \(reference.stderr)")
            #expect(ours.stdout.split(separator: "\n").count == 18)
            #expect(ours.stdout == reference.stdout, "ours:\n\(ours.stdout)\nnbdkit:\n\(reference.stdout)")
        }
    }
}
