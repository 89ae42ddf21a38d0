import Foundation
import HydrationTestSupport
import Logging
import Synchronization
import Testing

@testable import HydrationEngine
@testable import HydrationRemote
@testable import HydrationService
@testable import HydrationStorage

#if canImport(Glibc)
    import Glibc
#endif

/// nbdkit serving a file on a Unix socket, for the remote-source tests; stopped by PID (SIGKILL:
/// children inherit the test thread's blocked SIGTERM).
final class NBDKitServer {
    let socket: String
    private let process: Process

    init(file: String, socket: String, extra: [String] = [], args: [String] = []) throws {
        self.socket = socket
        unlink(socket)
        // Ready when nbdkit writes its PID file (after listen), not when the socket file appears
        // (after bind, before listen: a connect in between is refused; a fresh-clone CI run saw
        // ECONNREFUSED from a server restarted by reconnectRefusesAnotherExport).
        let pidFile = socket + ".pid"
        unlink(pidFile)
        let p = Process()
        p.executableURL = URL(fileURLWithPath: NBDTools.path("nbdkit") ?? "/usr/sbin/nbdkit")
        p.arguments = ["-f", "--exit-with-parent", "-U", socket, "-P", pidFile] + extra + ["file", file] + args
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

    static var available: Bool {
        NBDTools.path("nbdkit") != nil || FileManager.default.isExecutableFile(atPath: "/usr/sbin/nbdkit")
    }
}

@Suite(
    "RemoteSource", .serialized,
    .enabled(if: NBDKitServer.available, "nbdkit not installed (Scripts/install-deps.sh --test)"))
struct RemoteSourceTests {
    @Test func uriDetectionAndIdentityFormat() {
        #expect(RemoteSource.isURI("nbd://127.0.0.1:10809/disk"))
        #expect(RemoteSource.isURI("nbd+unix:///disk?socket=/run/x.sock"))
        #expect(RemoteSource.isURI("nbds://host/disk?tls-psk-file=/k"))
        #expect(!RemoteSource.isURI("/var/lib/images/a.img"))
        #expect(!RemoteSource.isURI("nbdfile"))
        let samples = [
            RemoteIdentity.Sample(offset: 0, crc: 0xdeadbeef), RemoteIdentity.Sample(offset: 8 << 20, crc: 1),
        ]
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

    /// Opens `server`'s export as a job would: its fingerprint recorded and its identity armed.
    private func openArmed(_ server: NBDKitServer, discard: Bool = false) throws -> (RemoteNBDDevice, DeviceRecord) {
        let dev = try #require(try PosixStorage().open(server.uri, mode: .source(discard: discard)) as? RemoteNBDDevice)
        let record = try HydrationJob.sourceRecord(dev, mayRead: { _ in true })
        try HydrationJob.armRemoteIdentity(dev, recorded: record, mayRead: { _ in true })
        return (dev, record)
    }

    /// The connection goes away; the server that comes back at the same socket offers a
    /// different export (another size): not this source. The device is unconfirmed for good
    /// (ESTALE, the job stops with DeviceUnconfirmed), even once the right export is back: a
    /// resume reopens the job, which confirms the source against its metadata again.
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
            #expect(error.isUnconfirmedSource, "\(error)")
            #expect(error.detail?.contains("another export") == true, "\(error)")
        }
        server.stop()
        server = try NBDKitServer(file: dir.file("src.img"), socket: dir.file("nbd.sock"))
        defer { server.stop() }
        #expect(throws: StorageError.self) { try dev.probeConnection() }
        #expect(throws: StorageError.self) { _ = try dev.read(count: 4096, at: 4096) }
    }

    /// Another disk of the same size at the same socket (nbdkit's file plugin sends no
    /// description, so the offer is identical): the reconnection reads the witness blocks,
    /// finds other bytes, and nothing is read from or released on that disk, now or later.
    @Test func reconnectToAnotherDiskOfTheSameSizeIsUnconfirmed() throws {
        let dir = TempDir("remote")
        let size = 8 << 20
        try TestImage.make(size: size, seed: 30).write(to: dir.file("src.img"))
        try TestImage.make(size: size, seed: 31).write(to: dir.file("other.img"))
        var server = try NBDKitServer(file: dir.file("src.img"), socket: dir.file("nbd.sock"))
        let (dev, _) = try openArmed(server, discard: true)
        defer { dev.close() }
        _ = try dev.read(count: 1 << 20, at: 0)
        server.stop()
        server = try NBDKitServer(file: dir.file("other.img"), socket: dir.file("nbd.sock"))
        defer { server.stop() }
        let before = allocatedBytes(dir.file("other.img"))
        let otherBytes = readFile(dir.file("other.img"))
        do {
            _ = try dev.read(count: 1 << 20, at: 2 << 20)
            Issue.record("read from another disk")
        } catch {
            #expect(error.isUnconfirmedSource, "\(error)")
            #expect(error.detail?.contains("witness blocks differ") == true, "\(error)")
        }
        // A release queued before the swap is not sent to it either.
        #expect(throws: StorageError.self) { try dev.release(offset: 0, length: 4 << 20) }
        #expect(throws: StorageError.self) { try dev.sync() }
        #expect(throws: StorageError.self) { try dev.probeConnection() }
        #expect(allocatedBytes(dir.file("other.img")) == before)
        #expect(byteDifference(readFile(dir.file("other.img")), otherBytes) == nil)
    }

    /// The same bytes served with another description (nbdkit's exportname filter): what the
    /// server offers is compared at every reconnection, so a unique description per export
    /// makes the identity certain where sampling cannot.
    @Test func reconnectRefusesAnotherDescription() throws {
        let dir = TempDir("remote")
        try TestImage.make(size: 2 << 20, seed: 38).write(to: dir.file("src.img"))
        var server = try NBDKitServer(
            file: dir.file("src.img"), socket: dir.file("nbd.sock"),
            extra: ["--filter=exportname"], args: ["exportdesc=fixed:disk-1111"])
        let (dev, record) = try openArmed(server)
        defer { dev.close() }
        #expect(record.stableID.contains("desc=") && !record.stableID.contains("desc=none"))
        server.stop()
        server = try NBDKitServer(
            file: dir.file("src.img"), socket: dir.file("nbd.sock"),
            extra: ["--filter=exportname"], args: ["exportdesc=fixed:disk-2222"])
        defer { server.stop() }
        do {
            _ = try dev.read(count: 4096, at: 0)
            Issue.record("read from an export with another description")
        } catch {
            #expect(error.isUnconfirmedSource, "\(error)")
            #expect(error.detail?.contains("description 'disk-2222', was 'disk-1111'") == true, "\(error)")
        }
    }

    /// A disk that equals the source at every block of the recorded fingerprint (a copy that
    /// differs only elsewhere): the fingerprint alone takes it for the source; the witnesses
    /// taken at random and from recent reads do not.
    @Test func aDiskMatchingTheFingerprintIsCaughtByTheWitnesses() throws {
        let dir = TempDir("remote")
        let size = 8 << 20
        let image = TestImage.make(size: size, seed: 32)
        try image.write(to: dir.file("src.img"))
        var server = try NBDKitServer(file: dir.file("src.img"), socket: dir.file("nbd.sock"))
        let (dev, record) = try openArmed(server)
        defer { dev.close() }
        _ = try dev.read(count: 2 << 20, at: 4 << 20)
        // The other disk: random bytes everywhere but the recorded samples, which are copied.
        var other = TestImage.make(size: size, seed: 33)
        let samples = RemoteIdentity.parse(record.stableID).samples
        #expect(!samples.isEmpty)
        for s in samples {
            let lo = Int(s.offset)
            other.bytes.replaceSubrange(lo..<lo + 4096, with: image.bytes[lo..<lo + 4096])
        }
        try other.write(to: dir.file("other.img"))
        server.stop()
        server = try NBDKitServer(file: dir.file("other.img"), socket: dir.file("nbd.sock"))
        defer { server.stop() }
        // The recorded fingerprint alone (what a reopen after a restart can check) is satisfied.
        let probe = try PosixStorage().open(server.uri, mode: .source(discard: false))
        #expect(
            try HydrationJob.confirmedRemote(probe.info, recorded: record, device: probe, mayRead: { _ in true })
                .stableID == record.stableID)
        probe.close()
        #expect(dev.witnessesForTesting.contains { $0.kind != .recorded })
        do {
            _ = try dev.read(count: 4096, at: 0)
            Issue.record("read from a disk that only matches the fingerprint")
        } catch {
            #expect(error.isUnconfirmedSource, "\(error)")
        }
    }

    /// The same disk back (restarted server): confirmed, reads go on. A witness block that was
    /// released is not compared (it reads as zeros now).
    @Test func theSameDiskIsConfirmedAndReleasedWitnessesAreNotCompared() throws {
        let dir = TempDir("remote")
        let size = 8 << 20
        let image = TestImage.make(size: size, seed: 34)
        try image.write(to: dir.file("src.img"))
        var server = try NBDKitServer(file: dir.file("src.img"), socket: dir.file("nbd.sock"))
        let (dev, _) = try openArmed(server, discard: true)
        defer { dev.close() }
        _ = try dev.read(count: 1 << 20, at: 0)
        server.stop()
        server = try NBDKitServer(file: dir.file("src.img"), socket: dir.file("nbd.sock"))
        #expect(
            byteDifference(try dev.read(count: 4096, at: 4 << 20), Array(image.bytes[(4 << 20)..<(4 << 20) + 4096]))
                == nil)
        // Release the whole first half: its witnesses go.
        try dev.release(offset: 0, length: 4 << 20)
        try dev.sync()
        #expect(!dev.witnessesForTesting.contains { $0.offset < 4 << 20 })
        server.stop()
        server = try NBDKitServer(file: dir.file("src.img"), socket: dir.file("nbd.sock"))
        defer { server.stop() }
        #expect(
            byteDifference(try dev.read(count: 4096, at: 6 << 20), Array(image.bytes[(6 << 20)..<(6 << 20) + 4096]))
                == nil)
        #expect(dev.unconfirmedReason == nil)
    }

    /// The server dies under a read in flight (nbdkit's delay filter holds the reply) and
    /// another disk comes up at the socket: the read fails (the data it would have got from the
    /// new disk is never returned), and so does every later call.
    @Test func aSwapUnderAReadInFlightIsNotUsed() throws {
        let dir = TempDir("remote")
        let size = 8 << 20
        try TestImage.make(size: size, seed: 35).write(to: dir.file("src.img"))
        try TestImage.make(size: size, seed: 36).write(to: dir.file("other.img"))
        var server = try NBDKitServer(file: dir.file("src.img"), socket: dir.file("nbd.sock"))
        let (dev, _) = try openArmed(server)
        defer { dev.close() }
        server.stop()
        // The same disk, slow: each read is answered after 20 s.
        server = try NBDKitServer(
            file: dir.file("src.img"), socket: dir.file("nbd.sock"), extra: ["--filter=delay"], args: ["delay-read=20"])
        let done = DispatchSemaphore(value: 0)
        let started = DispatchSemaphore(value: 0)
        let outcome = Mutex<Result<[UInt8], StorageError>?>(nil)
        let device = dev
        Thread.detachNewThread {
            started.signal()
            let r = Result { () throws(StorageError) -> [UInt8] in try device.read(count: 1 << 20, at: 2 << 20) }
            outcome.withLock { $0 = r }
            done.signal()
        }
        started.wait()
        server.stop()
        server = try NBDKitServer(file: dir.file("other.img"), socket: dir.file("nbd.sock"))
        defer { server.stop() }
        #expect(done.wait(timeout: .now() + 60) == .success, "the read in flight did not end within 60 s")
        switch outcome.withLock({ $0 }) {
        case .success?: Issue.record("a read in flight across the swap returned data")
        case .failure(let e)?: #expect(e.isUnconfirmedSource || e.isConnectionLost, "\(e)")
        case nil: Issue.record("no outcome")
        }
        do {
            _ = try dev.read(count: 4096, at: 0)
            Issue.record("read from another disk")
        } catch {
            #expect(error.isUnconfirmedSource, "\(error)")
        }
    }

    /// A listener that accepts and never greets (a wrong port, a proxy): connecting fails with
    /// ETIMEDOUT after the connection deadline instead of waiting for ever.
    @Test func connectingHasADeadline() throws {
        let dir = TempDir("remote")
        let path = dir.file("mute.sock")
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        #expect(fd >= 0)
        defer { close(fd) }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { p in
            for (i, b) in path.utf8.enumerated() { p[i] = b }
        }
        let bound = withUnsafePointer(to: &addr) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        #expect(bound == 0)
        #expect(listen(fd, 16) == 0)
        let t0 = Date()
        do {
            _ = try PosixStorage().identify("nbd+unix:///?socket=\(path)")
            Issue.record("connected to a server that never greets")
        } catch {
            #expect(error.errno == ETIMEDOUT, "\(error)")
            #expect(error.detail?.contains("handshake") == true, "\(error)")
        }
        let took = Date().timeIntervalSince(t0)
        #expect(took < 60, "the connection attempt took \(took) s")
    }

    /// A server that needs 4 KiB alignment (nbdkit's blocksize-policy filter): a 512-byte read
    /// at a 512-byte offset (a guest's sector read through the live clone) is widened to the
    /// server's minimum block size and gets the right bytes instead of EINVAL.
    @Test func readsAreWidenedToTheServersMinimumBlockSize() throws {
        let dir = TempDir("remote")
        let image = TestImage.make(size: 2 << 20, seed: 37)
        try image.write(to: dir.file("src.img"))
        let server = try NBDKitServer(
            file: dir.file("src.img"), socket: dir.file("nbd.sock"),
            extra: ["--filter=blocksize-policy"],
            args: ["blocksize-minimum=4096", "blocksize-preferred=4096", "blocksize-error-policy=error"])
        defer { server.stop() }
        let dev = try PosixStorage().open(server.uri, mode: .source(discard: false))
        defer { dev.close() }
        #expect(dev.info.logicalBlockSize == 4096)
        for (at, count) in [(512, 512), (4096 + 1000, 3000), (0, 4096), (8192 - 512, 1024)] {
            let got = try dev.read(count: count, at: UInt64(at))
            #expect(byteDifference(got, Array(image.bytes[at..<at + count])) == nil, "read of \(count) at \(at)")
        }
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
        #expect(
            try HydrationJob.confirmedRemote(dev.info, recorded: record, device: nil, mayRead: all).stableID
                == record.stableID)
        #expect(
            try HydrationJob.confirmedRemote(dev.info, recorded: record, device: dev, mayRead: all).stableID
                == record.stableID)

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
        #expect(
            try HydrationJob.confirmedRemote(dev.info, recorded: record, device: dev, mayRead: mayRead).stableID
                == record.stableID)
        // Without discard_source nothing is ever released: still compared.
        let keep = HydrationJob.unreleased(committed, regionSize: regionSize, discardSource: false)
        #expect(
            try HydrationJob.confirmedRemote(dev.info, recorded: record, device: dev, mayRead: keep).stableID
                != record.stableID)
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
        let cfg = JobConfiguration(
            name: "r", sourcePath: server.uri, destPath: dir.file("dst.img"),
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
