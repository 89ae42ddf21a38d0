#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Logging
@testable import HydrationService
@testable import HydrationStorage
import Testing

/// nbdkit serving a file on a Unix socket, for the remote-source tests; stopped by PID (SIGKILL:
/// children inherit the test thread's blocked SIGTERM).
final class NBDKitServer {
    let socket: String
    private let process: Process

    init(file: String, socket: String, extra: [String] = []) throws {
        self.socket = socket
        unlink(socket)
        // Ready when nbdkit writes its PID file (after listen), not when the socket file appears
        // (after bind, before listen: a connect in between is refused; a fresh-clone CI run saw
        // ECONNREFUSED from a server restarted by reconnectRefusesAnotherExport).
        let pidFile = socket + ".pid"
        unlink(pidFile)
        let p = Process()
        p.executableURL = URL(fileURLWithPath: NBDTools.path("nbdkit") ?? "/usr/sbin/nbdkit")
        p.arguments = ["-f", "--exit-with-parent", "-U", socket, "-P", pidFile] + extra + ["file", file]
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        try p.run()
        process = p
        let deadline = Date().addingTimeInterval(10)
        while !FileManager.default.fileExists(atPath: pidFile) && Date() < deadline { usleep(10_000) }
    }

    var uri: String { "nbd+unix:///?socket=\(socket)" }

    private var stopped = false

    func stop() {
        guard !stopped else { return }
        stopped = true
        if process.isRunning {
            kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
        }
        unlink(socket)
        unlink(socket + ".pid")
    }

    deinit { stop() }

    static var available: Bool { NBDTools.path("nbdkit") != nil || FileManager.default.isExecutableFile(atPath: "/usr/sbin/nbdkit") }
}

@Suite("RemoteSource", .serialized, .enabled(if: NBDKitServer.available, "nbdkit not installed (Scripts/install-deps.sh --test)"))
struct RemoteSourceTests {
    @Test func uriDetectionAndIdentityFormat() {
        #expect(RemoteSource.isURI("nbd://127.0.0.1:10809/disk"))
        #expect(RemoteSource.isURI("nbd+unix:///disk?socket=/run/x.sock"))
        #expect(RemoteSource.isURI("nbds://host/disk?tls-psk-file=/k"))
        #expect(!RemoteSource.isURI("/var/lib/images/a.img"))
        #expect(!RemoteSource.isURI("nbdfile"))
        let samples = [RemoteIdentity.Sample(offset: 0, crc: 0xdeadbeef), RemoteIdentity.Sample(offset: 8 << 20, crc: 1)]
        let id = RemoteIdentity.format(base: "nbd:export=a;size=1;desc=none", samples: samples)
        let parsed = RemoteIdentity.parse(id)
        #expect(parsed.base == "nbd:export=a;size=1;desc=none")
        #expect(parsed.samples == samples)
        #expect(RemoteIdentity.parse("nbd:export=a;size=1;desc=none").samples.isEmpty)
    }

    @Test func readsHolesTrimAndFlush() throws {
        let dir = TempDir("remote")
        let image = TestImage.make(size: 8 << 20, seed: 15)
        try image.write(to: dir.file("src.img"))
        let server = try NBDKitServer(file: dir.file("src.img"), socket: dir.file("nbd.sock"))
        defer { server.stop() }
        let storage = PosixStorage()
        let info = try #require(try storage.identify(server.uri))
        #expect(info.identity.kind == .remote)
        #expect(info.size == 8 << 20)
        #expect(info.stableID.hasPrefix("nbd:export=;size=8388608;"))
        #expect(try storage.stack(of: server.uri) == nil)
        #expect(try storage.usage(of: server.uri) == nil)

        let dev = try storage.open(server.uri, mode: .source(discard: true))
        defer { dev.close() }
        #expect(dev.reportsHoles)
        let all = try dev.read(count: 8 << 20, at: 0)
        #expect(byteDifference(all, image.bytes) == nil)
        // Past the end reads as zeros, like a short file.
        let tail = try dev.read(count: 8192, at: (8 << 20) - 4096)
        #expect(byteDifference(Array(tail[4096...]), [UInt8](repeating: 0, count: 4096)) == nil)
        // The first hole of the image (chunk 1) is found by BLOCK_STATUS.
        let first = try #require(try dev.nextData(from: 0))
        #expect(first == 0..<(1 << 20))
        let second = try #require(try dev.nextData(from: 1 << 20))
        #expect(second.lowerBound == 2 << 20)

        let before = allocatedBytes(dir.file("src.img"))
        try dev.release(offset: 0, length: 1 << 20)
        try dev.sync()
        #expect(allocatedBytes(dir.file("src.img")) <= before - (1 << 20))
        // Writes are refused: a source is never written.
        #expect(throws: StorageError.self) { try dev.write(bytes: [1], at: 0) }
        // Only a source: never a destination or metadata.
        #expect(throws: StorageError.self) { _ = try storage.open(server.uri, mode: .destination(createSize: nil)) }
    }

    @Test func discardNeedsTrim() throws {
        let dir = TempDir("remote")
        try TestImage.make(size: 1 << 20, seed: 1).write(to: dir.file("src.img"))
        let server = try NBDKitServer(file: dir.file("src.img"), socket: dir.file("nbd.sock"), extra: ["--readonly"])
        defer { server.stop() }
        do {
            _ = try PosixStorage().open(server.uri, mode: .source(discard: true))
            Issue.record("opened for release on a server without TRIM")
        } catch {
            #expect(error.errno == EOPNOTSUPP)
            #expect(error.detail?.contains("TRIM") == true)
        }
        // Reading is fine.
        let dev = try PosixStorage().open(server.uri, mode: .source(discard: false))
        dev.close()
    }

    @Test func destinationAndMetadataMustBeLocal() {
        for (dest, meta) in [("nbd://h/x", "/m"), ("/d", "nbd+unix:///x?socket=/s")] {
            let cfg = JobConfiguration(name: "j", sourcePath: "nbd://h/y", destPath: dest, metadataPath: meta)
            #expect(throws: HydrationError.self) { try HydrationJob.validateCommon(cfg) }
        }
        let ok = JobConfiguration(name: "j", sourcePath: "nbd://h/y", destPath: "/d", metadataPath: "/m")
        #expect(throws: Never.self) { try HydrationJob.validateCommon(ok) }
    }

    /// The connection goes away; the server that comes back at the same socket offers a
    /// different export (another size): not this source, so the read fails as "unavailable"
    /// and status would say why. The right export back: reads work again.
    @Test func reconnectRefusesAnotherExport() throws {
        let dir = TempDir("remote")
        let image = TestImage.make(size: 2 << 20, seed: 2)
        try image.write(to: dir.file("src.img"))
        try TestImage.make(size: 3 << 20, seed: 3).write(to: dir.file("other.img"))
        var server = try NBDKitServer(file: dir.file("src.img"), socket: dir.file("nbd.sock"))
        let dev = try PosixStorage().open(server.uri, mode: .source(discard: false))
        defer { dev.close() }
        #expect(byteDifference(try dev.read(count: 4096, at: 0), Array(image.bytes[0..<4096])) == nil)
        #expect(dev.availability == nil)
        server.stop()
        server = try NBDKitServer(file: dir.file("other.img"), socket: dir.file("nbd.sock"))
        do {
            _ = try dev.read(count: 4096, at: 0)
            Issue.record("read from another export")
        } catch {
            #expect(error.isConnectionLost)
            #expect(error.detail?.contains("different export") == true)
        }
        #expect(dev.availability?.lastError.contains("different export") == true)
        server.stop()
        server = try NBDKitServer(file: dir.file("src.img"), socket: dir.file("nbd.sock"))
        defer { server.stop() }
        try dev.probeConnection()
        #expect(byteDifference(try dev.read(count: 4096, at: 4096), Array(image.bytes[4096..<8192])) == nil)
        #expect(dev.availability == nil)
    }

    /// The fingerprint: a changed sampled block is noticed; a sample inside a region that may
    /// be released (committed, discard_source) is not compared.
    @Test func fingerprintComparesOnlyUnreleasedSamples() throws {
        let dir = TempDir("remote")
        let size = 8 << 20
        let image = TestImage.make(size: size, seed: 4)
        try image.write(to: dir.file("src.img"))
        let server = try NBDKitServer(file: dir.file("src.img"), socket: dir.file("nbd.sock"))
        defer { server.stop() }
        let storage = PosixStorage()
        let dev = try storage.open(server.uri, mode: .source(discard: false))
        defer { dev.close() }
        let record = try HydrationJob.sourceRecord(dev, mayRead: { _ in true })
        let (_, samples) = RemoteIdentity.parse(record.stableID)
        #expect(samples.count >= 4)
        #expect(record.stableID.utf8.count <= MetadataFormat.maxStableIDBytes)
        let all: (Range<UInt64>) -> Bool = { _ in true }
        // Same export: confirmed, before open (base only) and once open (samples).
        #expect(try HydrationJob.confirmedRemote(dev.info, recorded: record, device: nil, mayRead: all).stableID == record.stableID)
        #expect(try HydrationJob.confirmedRemote(dev.info, recorded: record, device: dev, mayRead: all).stableID == record.stableID)

        // Change the bytes of one sampled block behind the server's back.
        let victim = samples[samples.count / 2]
        let fd = open(dir.file("src.img"), O_WRONLY)
        var junk = [UInt8](repeating: 0xA5, count: 4096)
        _ = pwrite(fd, &junk, 4096, off_t(victim.offset))
        close(fd)
        let found = try HydrationJob.confirmedRemote(dev.info, recorded: record, device: dev, mayRead: all)
        #expect(found.stableID != record.stableID)
        #expect(throws: HydrationError.self) {
            try HydrationJob.confirm(found, is: record, what: "source", metadataPath: "/m", exactSize: true)
        }
        do {
            try HydrationJob.confirm(found, is: record, what: "source", metadataPath: "/m", exactSize: true)
        } catch {
            #expect(error.code == .deviceUnconfirmed)
        }
        // With that block's region committed (and so possibly released), it is not compared.
        let regionSize: UInt64 = 1 << 20
        var committed = RegionMap(count: size / Int(regionSize))
        committed.set(Int(victim.offset / regionSize)..<Int(victim.offset / regionSize) + 1)
        let mayRead = HydrationJob.unreleased(committed, regionSize: regionSize, discardSource: true)
        #expect(try HydrationJob.confirmedRemote(dev.info, recorded: record, device: dev, mayRead: mayRead).stableID == record.stableID)
        // Without discard_source nothing is ever released: still compared.
        let keep = HydrationJob.unreleased(committed, regionSize: regionSize, discardSource: false)
        #expect(try HydrationJob.confirmedRemote(dev.info, recorded: record, device: dev, mayRead: keep).stableID != record.stableID)
    }

    /// A whole job over a remote source, with discard_source: clone equal, source released,
    /// metadata records the source as remote with its fingerprint.
    @Test func jobEndToEnd() async throws {
        let dir = TempDir("remote")
        let size = 6 << 20
        let image = TestImage.make(size: size, seed: 5)
        try image.write(to: dir.file("src.img"))
        let server = try NBDKitServer(file: dir.file("src.img"), socket: dir.file("nbd.sock"))
        defer { server.stop() }
        let io = IOExecutor(threads: 4)
        let cfg = JobConfiguration(name: "r", sourcePath: server.uri, destPath: dir.file("dst.img"),
                                   metadataPath: dir.file("r.meta"), regionSize: 64 << 10, discardSource: true)
        let job = try await HydrationJob.create(cfg, io: io)
        try await job.start()
        #expect(await job.waitUntilSettled() == .complete)
        await job.close()
        #expect(byteDifference(readFile(dir.file("dst.img")), image.bytes) == nil)
        #expect(allocatedBytes(dir.file("src.img")) == 0)
        let (store, _) = try MetadataStore.open(path: dir.file("r.meta"), storage: PosixStorage(), readOnly: true)
        #expect(store.header.source.identity.kind == .remote)
        #expect(store.header.source.path == server.uri)
        #expect(store.header.source.stableID.contains(";fp="))
        await io.shutdown()
    }
}
