import ControlProtocol
import Foundation
import HydrationTestSupport
import Testing

@testable import HydrationEngine
@testable import HydrationService
@testable import HydrationStorage
@testable import NBDServer

/// The daemon-side wiring of issue 12: jobs started with `export` are published in the NBD
/// server's registry (also after a restart), their status shows the URI and the connected
/// clients, and remove refuses (ExportInUse) or, with force, disconnects them first. The export's
/// I/O is the engine's; only the handshake is used here.
@Suite(.serialized) struct ExportWiringTests {
    @Test func exportedJobIsPublishedCountedRestoredAndWithdrawn() async throws {
        try await withNBDServer { f in
            let dir = TempDir("export")
            let state = dir.file("state")
            try TestImage.make(size: 4 << 20, seed: 1).write(to: dir.file("e.img"))
            try TestImage.make(size: 2 << 20, seed: 2).write(to: dir.file("n.img"))
            let host = JobExportHost(registry: f.registry, server: f.server, socketPath: f.socket)

            let m1 = JobManager(stateDirectory: state, io: f.io, logger: testLogger, exports: host)
            try await m1.restore()
            let created = try await m1.create(
                CreateJobRequest(
                    name: "e", source: dir.file("e.img"), dest: dir.file("e.out"),
                    noHydration: true, export: true))
            #expect(created.export?.uri == "nbd+unix:///e?socket=\(f.socket)" && created.export?.clients == 0)
            #expect(created.export?.io == .init(readBytes: 0, writtenBytes: 0, trimmedBytes: 0, hydratedRegions: 0))
            _ = try await m1.create(
                CreateJobRequest(name: "n", source: dir.file("n.img"), dest: dir.file("n.out"), noHydration: true))
            #expect(try await m1.status("n").export == nil)
            #expect(await f.registry.exports().map(\.name) == ["e"])
            // The flag is part of the job's record.
            let record = try String(contentsOfFile: state + "/jobs/e.json", encoding: .utf8)
            #expect(record.contains("\"export\" : true"))

            // A client in transmission is counted, and makes remove refuse without force.
            let client = try await offPool { () throws -> RawNBDClient in
                let c = try RawNBDClient(path: f.socket)
                let (size, _) = try c.handshake(export: "e", structured: true)
                #expect(size == 4 << 20)
                return c
            }
            #expect(await eventually { (try? await m1.status("e").export?.clients) == 1 })
            #expect(f.server.connections(export: "e") == 1)
            #expect(f.server.connections(export: "n") == 0)
            do throws(HydrationError) {
                try await m1.remove("e", force: false)
                Issue.record("removed an export with a client connected")
            } catch {
                #expect(error.code == .exportInUse)
                #expect(error.clients == 1)
                #expect(error.message.contains("1 client is connected"))
                let v = DaemonControlHandler.varlinkError(error, job: "e")
                #expect(v.name == VarlinkError.Name.exportInUse)
                #expect(v.parameters["clients"] == .int(1))
            }
            #expect(await f.registry.exports().map(\.name) == ["e"])

            // Shutdown ends the export's connections; a restart serves it again.
            await m1.shutdown()
            #expect(await f.registry.exports().isEmpty)
            #expect(try await offPool { client.isClosed() })

            let m2 = JobManager(stateDirectory: state, io: f.io, logger: testLogger, exports: host)
            try await m2.restore()
            #expect(await f.registry.exports().map(\.name) == ["e"])
            #expect(try await m2.status("e").export?.uri == host.uri(for: "e"))
            let again = try await offPool { () throws -> RawNBDClient in
                let c = try RawNBDClient(path: f.socket)
                try c.handshake(export: "e", structured: false)
                return c
            }
            #expect(await eventually { f.server.connections(export: "e") == 1 })
            // Force: the client is disconnected and the export gone before the job closes.
            try await m2.remove("e", force: true)
            #expect(await f.registry.exports().isEmpty)
            #expect(try await offPool { again.isClosed() })
            #expect(f.server.connections(export: "e") == 0)
            // Without clients, a plain remove of an exported job works.
            _ = try await m2.create(
                CreateJobRequest(
                    name: "e2", source: dir.file("e.img"), dest: dir.file("e2.out"),
                    noHydration: true, export: true))
            #expect(await f.registry.exports().map(\.name) == ["e2"])
            try await m2.remove("e2", force: false)
            #expect(await f.registry.exports().isEmpty)
            await m2.shutdown()
        }
    }

    @Test func exportNeedsAnNBDServer() async throws {
        let dir = TempDir("export-none")
        try TestImage.make(size: 1 << 20, seed: 3).write(to: dir.file("a.img"))
        let io = IOExecutor(threads: 2)
        let m = JobManager(stateDirectory: dir.file("state"), io: io, logger: testLogger)
        try await m.restore()
        do throws(HydrationError) {
            _ = try await m.create(
                CreateJobRequest(name: "a", source: dir.file("a.img"), dest: dir.file("a.out"), export: true))
            Issue.record("export accepted without an NBD server")
        } catch {
            #expect(error.code == .invalidParameter)
            #expect(DaemonControlHandler.varlinkError(error).parameters["parameter"] == .string("export"))
        }
        #expect(await m.names.isEmpty)
        await m.shutdown()
        await io.shutdown()
    }

    @Test func recordsWithoutTheFlagReadAsNotExported() throws {
        let old = """
            {"name":"a","source":"/s","dest":"/d","metadata":"/m","regionSize":65536,"discardSource":false,
             "destZeroed":false,"desired":"paused",
             "tunables":\(String(decoding: try JSONEncoder().encode(Tunables.defaults(regionSize: 65536)), as: UTF8.self))}
            """
        let def = try JSONDecoder().decode(JobDefinition.self, from: Data(old.utf8))
        #expect(def.export == false)
        #expect(def.io == .auto, "a record from before Start's io reads as auto")
        var exported = def
        exported.export = true
        exported.io = .direct
        let back = try JSONDecoder().decode(JobDefinition.self, from: JSONEncoder().encode(exported))
        #expect(back == exported)
    }

    @Test func uriAndSocketAssignment() {
        #expect(
            JobExportHost.uri(export: "vm-1.a:b@c", socketPath: "/run/hydrationd/nbd.sock")
                == "nbd+unix:///vm-1.a:b@c?socket=/run/hydrationd/nbd.sock")
        #expect(
            JobExportHost.uri(export: "a", socketPath: "/tmp/my dir/nbd&.sock")
                == "nbd+unix:///a?socket=/tmp/my%20dir/nbd%26.sock")
        #expect(
            DaemonOptions.defaultNBDSocketPath(controlSocket: "/run/hydrationd/control.sock")
                == "/run/hydrationd/nbd.sock")
        #expect(DaemonOptions(socketPath: "/x/c.sock").effectiveNBDSocketPath == "/x/nbd.sock")
        #expect(
            DaemonOptions(socketPath: "/x/c.sock", nbdSocketPath: "/y/n.sock").effectiveNBDSocketPath == "/y/n.sock")

        let unnamed = SystemdNotifier.assignListeners([(3, "hydrationd.socket")])
        #expect(unnamed.control == 3 && unnamed.nbd == nil && unnamed.unused.isEmpty)
        let both = SystemdNotifier.assignListeners([(3, "nbd"), (4, "hydrationd.socket")])
        #expect(both.control == 4 && both.nbd == 3 && both.unused.isEmpty)
        let named = SystemdNotifier.assignListeners([(3, "other"), (4, "control"), (5, "nbd")])
        #expect(named.control == 4 && named.nbd == 5 && named.unused == [3])
        #expect(SystemdNotifier.assignListeners([]).control == nil)
    }
}

@Suite struct BoundSocketPathTests {
    /// What the URI of a socket-activated NBD socket shows: the path the passed descriptor is bound to.
    @Test func boundUnixPathOfAListeningSocket() throws {
        let dir = try SocketTempDir()
        defer { dir.remove() }
        let path = dir.path + "/n.sock"
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        #expect(fd >= 0)
        defer { close(fd) }
        #expect(HydrationDaemon.boundUnixPath(fd) == nil, "not bound yet")
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            for (i, b) in path.utf8.enumerated() { raw[i] = b }
        }
        let ok = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) == 0
            }
        }
        #expect(ok)
        #expect(HydrationDaemon.boundUnixPath(fd) == path)
        #expect(HydrationDaemon.boundUnixPath(-1) == nil)
    }
}
