import Foundation
import HydrationTestSupport
import Testing

@testable import HydrationEngine
@testable import HydrationService
@testable import HydrationStorage

#if canImport(Glibc)
    import Glibc
#endif

/// The daemon's state directory as it is read at start and written by control operations: a
/// record that cannot be read never makes a job (or what it reserves) vanish, and an operation
/// that fails leaves the state as it was.
@Suite(.serialized) struct JobRecordTests {
    /// The error's name (as a string, so that these tests also build, and fail, without it).
    static let unreadable = "JobRecordUnreadable"

    /// A partly released discard_source job's record damaged while the daemon is down.
    enum Damage: String, CaseIterable, Sendable {
        case unknownValue, newerVersion, missingField, truncatedByOne, truncatedHalf, garbage, empty, otherName

        func apply(_ original: Data) throws -> Data {
            func edit(_ change: (inout [String: Any]) -> Void) throws -> Data {
                var obj = try #require(try JSONSerialization.jsonObject(with: original) as? [String: Any])
                change(&obj)
                return try JSONSerialization.data(withJSONObject: obj, options: [.prettyPrinted, .sortedKeys])
            }
            switch self {
            // Exactly what a newer version's value leaves for a downgraded daemon.
            case .unknownValue: return try edit { $0["desired"] = "draining" }
            case .newerVersion: return try edit { $0["version"] = 99 }
            case .missingField: return try edit { $0["tunables"] = nil }
            case .truncatedByOne: return original.dropLast(1)
            case .truncatedHalf: return original.prefix(original.count / 2)
            case .garbage:
                var rng = SeededRandom(seed: 7)
                return Data((0..<300).map { _ in UInt8.random(in: 0...255, using: &rng) })
            case .empty: return Data()
            case .otherName: return try edit { $0["name"] = "other" }
            }
        }
    }

    @Test(arguments: Damage.allCases)
    func unreadableJobRecordKeepsTheJobAndItsDevices(_ damage: Damage) async throws {
        let dir = TempDir("rec")
        let state = dir.file("state")
        let a = TestImage.make(size: 4 << 20, seed: 1)
        try a.write(to: dir.file("a.img"))
        try TestImage.make(size: 4 << 20, seed: 2).write(to: dir.file("b.img"))
        let io = IOExecutor(threads: 2)
        defer { Task { await io.shutdown() } }

        let m1 = JobManager(stateDirectory: state, io: io, logger: testLogger)
        try await m1.restore()
        // At the minimum rate: resumed once repaired, it cannot complete before its state is read.
        _ = try await m1.create(
            CreateJobRequest(
                name: "a", source: dir.file("a.img"), dest: dir.file("a.out"),
                discardSource: true, noHydration: true, tunables: TunablesUpdate(rateLimitBytesPerSecond: 4096)))
        await m1.shutdown()
        let record = state + "/jobs/a.json"
        let original = try Data(contentsOf: URL(fileURLWithPath: record))
        let damaged = try damage.apply(original)
        try damaged.write(to: URL(fileURLWithPath: record))

        let m2 = JobManager(stateDirectory: state, io: io, logger: testLogger)
        try await m2.restore()
        // Still listed, failed, naming the file.
        #expect(await m2.names == ["a"], "\(damage): the job vanished")
        let s = try await m2.status("a")
        #expect(s.state == .failed)
        #expect(s.error?.code == "JobRecordUnreadable", "\(damage): \(String(describing: s.error))")
        #expect(s.error?.message.contains(record) == true)
        // What it names stays reserved: its destination may not be written, its (discard) source
        // not read, by a new job.
        for (what, req) in [
            ("its destination", CreateJobRequest(name: "b", source: dir.file("b.img"), dest: dir.file("a.out"))),
            ("its source", CreateJobRequest(name: "c", source: dir.file("a.img"), dest: dir.file("c.out"))),
        ] {
            do {
                _ = try await m2.create(req)
                Issue.record("\(damage): a new job on \(what) was accepted")
            } catch {
                #expect(error.code.rawValue == Self.unreadable, "\(damage): \(error)")
            }
        }
        #expect(!FileManager.default.fileExists(atPath: dir.file("c.out")))
        // Nothing is opened or written for it until the operator acts.
        for op in ["resume", "pause", "remove"] {
            do {
                switch op {
                case "resume": _ = try await m2.resume("a")
                case "pause": _ = try await m2.pause("a")
                default: try await m2.remove("a", force: false)
                }
                Issue.record("\(damage): \(op) of a job whose record cannot be read succeeded")
            } catch {
                #expect(error.code.rawValue == Self.unreadable, "\(damage) \(op): \(error)")
            }
        }
        #expect(try Data(contentsOf: URL(fileURLWithPath: record)) == damaged)
        #expect(await m2.names == ["a"])
        // Repaired, it resumes.
        try original.write(to: URL(fileURLWithPath: record))
        #expect(try await m2.resume("a").state == .hydrating)
        _ = try await m2.pause("a")
        await m2.shutdown()
    }

    /// A record whose metadata is elsewhere and whose text gives no path: nothing can be checked
    /// against it, so every new job is refused until the operator removes it with force (the file
    /// is then kept aside in kept/).
    @Test func recordNamingNothingRefusesEveryNewJobUntilRemoved() async throws {
        let dir = TempDir("rec")
        let state = dir.file("state")
        try TestImage.make(size: 2 << 20, seed: 1).write(to: dir.file("a.img"))
        try TestImage.make(size: 2 << 20, seed: 2).write(to: dir.file("x.img"))
        let io = IOExecutor(threads: 2)
        defer { Task { await io.shutdown() } }
        let m1 = JobManager(stateDirectory: state, io: io, logger: testLogger)
        try await m1.restore()
        _ = try await m1.create(
            CreateJobRequest(
                name: "a", source: dir.file("a.img"), dest: dir.file("a.out"),
                metadata: dir.file("a.meta"), discardSource: true, noHydration: true))
        await m1.shutdown()
        try Data("{\"garbage".utf8).write(to: URL(fileURLWithPath: state + "/jobs/a.json"))

        let m2 = JobManager(stateDirectory: state, io: io, logger: testLogger)
        try await m2.restore()
        #expect(await m2.names == ["a"])
        do {
            _ = try await m2.create(CreateJobRequest(name: "x", source: dir.file("x.img"), dest: dir.file("x.out")))
            Issue.record("a new job was accepted while a record naming nothing is unreadable")
        } catch {
            #expect(error.code.rawValue == Self.unreadable)
            #expect(error.message.contains("every new job is refused"))
        }
        #expect(try await m2.remove("a", force: true) == nil)
        #expect(await m2.names == [])
        let aside = try FileManager.default.contentsOfDirectory(atPath: state + "/kept").filter {
            $0.hasSuffix(".unreadable-record")
        }
        #expect(aside.count == 1)
        _ = try await m2.create(
            CreateJobRequest(name: "x", source: dir.file("x.img"), dest: dir.file("x.out"), noHydration: true))
        // Its metadata was not touched.
        #expect(FileManager.default.fileExists(atPath: dir.file("a.meta")))
        await m2.shutdown()
    }

    /// remove --force of a job whose record cannot be read keeps what was recovered: a kept
    /// record (its destination stays reserved), the metadata, and the unreadable file.
    @Test func forcedRemoveOfUnreadableRecordKeepsItsDevicesReserved() async throws {
        let dir = TempDir("rec")
        let state = dir.file("state")
        try TestImage.make(size: 2 << 20, seed: 1).write(to: dir.file("a.img"))
        try TestImage.make(size: 2 << 20, seed: 2).write(to: dir.file("b.img"))
        let io = IOExecutor(threads: 2)
        defer { Task { await io.shutdown() } }
        let m1 = JobManager(stateDirectory: state, io: io, logger: testLogger)
        try await m1.restore()
        _ = try await m1.create(
            CreateJobRequest(
                name: "a", source: dir.file("a.img"), dest: dir.file("a.out"),
                discardSource: true, noHydration: true))
        await m1.shutdown()
        let record = state + "/jobs/a.json"
        try Data(try Data(contentsOf: URL(fileURLWithPath: record)).dropLast(1)).write(to: URL(fileURLWithPath: record))
        let m2 = JobManager(stateDirectory: state, io: io, logger: testLogger)
        try await m2.restore()
        #expect(try await m2.remove("a", force: true) == state + "/jobs/a.meta")
        #expect(FileManager.default.fileExists(atPath: state + "/jobs/a.meta"))
        do {
            _ = try await m2.create(CreateJobRequest(name: "b", source: dir.file("b.img"), dest: dir.file("a.out")))
            Issue.record("a new job on the destination of a removed, unreadable job was accepted")
        } catch {
            #expect(error.code == .dataAtRisk)
        }
        await m2.shutdown()
    }

    /// A kept record (remove --force of a partly released job) cut by one byte, or overwritten:
    /// the DataAtRisk guard on its devices stays (without a restart), named for the file.
    @Test func unreadableKeptRecordStillGuardsItsDevices() async throws {
        let dir = TempDir("rec")
        let state = dir.file("state")
        try TestImage.make(size: 2 << 20, seed: 2).write(to: dir.file("b.img"))
        try TestImage.make(size: 2 << 20, seed: 3).write(to: dir.file("k.out"))
        let io = IOExecutor(threads: 2)
        defer { Task { await io.shutdown() } }
        let m = JobManager(stateDirectory: state, io: io, logger: testLogger)
        try await m.restore()
        let def = JobDefinition(
            name: "k", source: dir.file("k.img"), dest: dir.file("k.out"), metadata: dir.file("k.meta"),
            regionSize: 65536, discardSource: true, destZeroed: false,
            tunables: .defaults(regionSize: 65536), desired: .hydrating)
        try FileManager.default.createDirectory(atPath: state + "/kept", withIntermediateDirectories: true)
        let kept = state + "/kept/k-1.json"
        let enc = JSONEncoder()
        enc.outputFormatting = [.prettyPrinted, .sortedKeys]
        let good = try enc.encode(JobManager.KeptRecord(definition: def, removedUnixMs: 1))
        let onto = CreateJobRequest(name: "b", source: dir.file("b.img"), dest: dir.file("k.out"), noHydration: true)
        for (label, bytes, code) in [
            ("readable", good, "DataAtRisk"),
            ("cut by one byte", Data(good.dropLast(1)), Self.unreadable),
            (
                "unknown value",
                Data(
                    String(decoding: good, as: UTF8.self).replacingOccurrences(
                        of: "\"hydrating\"", with: "\"draining\""
                    ).utf8), Self.unreadable
            ),
        ] {
            try bytes.write(to: URL(fileURLWithPath: kept))
            do {
                _ = try await m.create(onto)
                Issue.record("kept record \(label): a new job on its destination was accepted")
            } catch {
                #expect(error.code.rawValue == code, "kept record \(label): \(error)")
                if code == Self.unreadable { #expect(error.message.contains(kept)) }
            }
        }
        // Garbage: it names nothing, so nothing can be checked against it.
        try Data([0xff, 0x00, 0x12]).write(to: URL(fileURLWithPath: kept))
        do {
            _ = try await m.create(
                CreateJobRequest(
                    name: "b", source: dir.file("b.img"), dest: dir.file("elsewhere.out"), noHydration: true))
            Issue.record("garbage kept record: a new job was accepted")
        } catch {
            #expect(error.code.rawValue == Self.unreadable)
        }
        await m.shutdown()
    }

    // MARK: a full state directory

    static func sh(_ args: [String]) -> (status: Int32, output: String) { LoopFS.sh(args) }

    /// A small tmpfs as the state directory.
    final class SmallStateFS {
        let dir: TempDir
        let mnt: String
        var mounted = false
        init(size: String) throws {
            dir = TempDir("statefs")
            mnt = dir.file("state")
            try FileManager.default.createDirectory(atPath: mnt, withIntermediateDirectories: true)
            let r = JobRecordTests.sh(["/usr/bin/mount", "-t", "tmpfs", "-o", "size=\(size),mode=0700", "tmpfs", mnt])
            try #require(r.status == 0, "mount tmpfs: \(r.output)")
            mounted = true
        }
        /// Fills it, leaving `leave` bytes (0: full).
        func fill(leaving leave: UInt64) throws {
            var st = statvfs()
            _ = statvfs(mnt, &st)
            let free = UInt64(st.f_bavail) * UInt64(st.f_frsize)
            let fd = open(mnt + "/filler", O_WRONLY | O_CREAT | O_APPEND, 0o600)
            defer { close(fd) }
            var want = free > leave ? free - leave : 0
            let chunk = [UInt8](repeating: 0xEE, count: 4096)
            while want > 0 {
                let n = write(fd, chunk, Int(min(UInt64(chunk.count), want)))
                if n <= 0 { break }
                want -= UInt64(n)
            }
        }
        func free() { unlink(mnt + "/filler") }
        deinit { if mounted { _ = JobRecordTests.sh(["/usr/bin/umount", "-l", mnt]) } }
    }

    /// A create that runs out of space in the state directory leaves nothing behind: the same
    /// start succeeds once there is space (it was refused as "metadata already exists").
    @Test(.enabled(if: getuid() == 0, "needs root (a tmpfs mount)"))
    func createOutOfSpaceLeavesNothing() async throws {
        let fs = try SmallStateFS(size: "1m")
        let dir = TempDir("rec")
        let io = IOExecutor(threads: 2)
        defer { Task { await io.shutdown() } }
        let size = 256 << 20
        // A sparse source: its metadata (one bit per region and checksummed pages) is the big file.
        let src = dir.file("a.img")
        #expect(Self.sh(["/usr/bin/truncate", "-s", "\(size)", src]).status == 0)
        let metaSize = MetadataFormat.fileSize(
            regions: Int(RegionGeometry.regionCount(size: UInt64(size), regionSize: 4096)))
        let m = JobManager(stateDirectory: fs.mnt, io: io, logger: testLogger)
        try await m.restore()
        try fs.fill(leaving: metaSize / 2)
        let req = CreateJobRequest(name: "a", source: src, dest: dir.file("a.out"), regionSize: 4096, noHydration: true)
        do {
            _ = try await m.create(req)
            Issue.record("created with a full state directory (metadata \(metaSize) bytes)")
        } catch {
            #expect(error.errno == ENOSPC, "\(error)")
        }
        #expect(await m.names == [])
        let left = try FileManager.default.contentsOfDirectory(atPath: fs.mnt + "/jobs")
        #expect(left.isEmpty, "left behind: \(left)")
        #expect(
            !FileManager.default.fileExists(atPath: dir.file("a.out")), "the destination file the create made is left")
        fs.free()
        #expect(try await m.create(req).state == .paused)
        await m.shutdown()
    }

    /// remove --force of a partly released job that cannot write its kept record (state
    /// directory full) leaves the job as it was: listed, open (metadata rw), resumable.
    @Test(.enabled(if: getuid() == 0, "needs root (a tmpfs mount)"))
    func removeOutOfSpaceLeavesTheJobAsItWas() async throws {
        let fs = try SmallStateFS(size: "4m")
        let dir = TempDir("rec")
        let io = IOExecutor(threads: 2)
        defer { Task { await io.shutdown() } }
        let a = TestImage.make(size: 8 << 20, seed: 5)
        try a.write(to: dir.file("a.img"))
        let m = JobManager(stateDirectory: fs.mnt, io: io, logger: testLogger)
        try await m.restore()
        var slow = TunablesUpdate()
        slow.rateLimitBytesPerSecond = .some(256 << 10)
        slow.commitIntervalMs = 50
        _ = try await m.create(
            CreateJobRequest(
                name: "d", source: dir.file("a.img"), dest: dir.file("a.out"),
                discardSource: true, tunables: slow))
        // Some regions committed (and so possibly released): the removal must keep a record.
        let committed = await eventually(60) { (try? await m.status("d").bytes.committed) ?? 0 > 0 }
        let seen = try? await m.status("d")
        #expect(committed, "no region committed in 60 s: \(String(describing: seen))")
        _ = try await m.pause("d")
        try fs.fill(leaving: 0)
        do {
            try await m.remove("d", force: true)
            Issue.record("remove --force wrote its kept record on a full filesystem")
        } catch {
            #expect(error.errno == ENOSPC && error.code == .ioError, "\(error)")
        }
        #expect(await m.names == ["d"])
        let s = try await m.status("d")
        #expect(
            s.state == .paused && s.metadata.mode == .rw,
            "status after the failed remove: \(s.state) \(s.metadata.mode)")
        fs.free()
        // It is open, as the status says.
        #expect(try await m.resume("d").state == .hydrating)
        var fast = TunablesUpdate()
        fast.rateLimitBytesPerSecond = .some(nil)
        _ = try await m.set("d", fast)
        #expect(await eventually(60) { (try? await m.status("d").state) == .complete })
        #expect(byteDifference(readFile(dir.file("a.out")), a.bytes) == nil)
        await m.shutdown()
    }

    /// A control operation whose record cannot be written leaves the job as it was: pause on a
    /// full state directory is refused and the job goes on hydrating, its record unchanged.
    @Test(.enabled(if: getuid() == 0, "needs root (a tmpfs mount)"))
    func pauseOutOfSpaceLeavesTheJobAsItWas() async throws {
        let fs = try SmallStateFS(size: "4m")
        let dir = TempDir("rec")
        let io = IOExecutor(threads: 2)
        defer { Task { await io.shutdown() } }
        try TestImage.make(size: 8 << 20, seed: 6).write(to: dir.file("a.img"))
        let m = JobManager(stateDirectory: fs.mnt, io: io, logger: testLogger)
        try await m.restore()
        var slow = TunablesUpdate()
        slow.rateLimitBytesPerSecond = .some(64 << 10)
        _ = try await m.create(
            CreateJobRequest(name: "p", source: dir.file("a.img"), dest: dir.file("a.out"), tunables: slow))
        let record = try Data(contentsOf: URL(fileURLWithPath: fs.mnt + "/jobs/p.json"))
        try fs.fill(leaving: 0)
        do {
            _ = try await m.pause("p")
            Issue.record("pause wrote its record on a full filesystem")
        } catch {
            #expect(error.errno == ENOSPC && error.code == .ioError, "\(error)")
        }
        #expect(try await m.status("p").state == .hydrating)
        #expect(try Data(contentsOf: URL(fileURLWithPath: fs.mnt + "/jobs/p.json")) == record)
        fs.free()
        _ = try await m.pause("p")
        await m.shutdown()
    }
}
