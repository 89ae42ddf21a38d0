import Foundation
import HydrationTestSupport
import Testing

@testable import HydrationEngine
@testable import HydrationService
@testable import HydrationStorage

@Suite(.serialized) struct JobManagerTests {
    @Test func twoJobsPauseResumeRestartRemove() async throws {
        let dir = TempDir("mgr")
        let state = dir.file("state")
        let a = TestImage.make(size: 24 << 20, seed: 1)
        let b = TestImage.make(size: 8 << 20, seed: 2)
        try a.write(to: dir.file("a.img"))
        try b.write(to: dir.file("b.img"))
        let io = IOExecutor(threads: 4)

        let m1 = JobManager(stateDirectory: state, io: io, logger: testLogger)
        try await m1.restore()
        var slow = TunablesUpdate()
        // Slow enough that a loaded machine cannot finish the job before the shutdown below.
        slow.rateLimitBytesPerSecond = .some(512 << 10)
        _ = try await m1.create(
            CreateJobRequest(
                name: "a", source: dir.file("a.img"), dest: dir.file("a.out"),
                discardSource: true, tunables: slow))
        _ = try await m1.create(
            CreateJobRequest(name: "b", source: dir.file("b.img"), dest: dir.file("b.out"), noHydration: true))
        #expect(try await m1.status("b").state == .paused)
        // Name rules and duplicates.
        await #expect(throws: HydrationError.self) {
            _ = try await m1.create(CreateJobRequest(name: "a", source: dir.file("b.img"), dest: dir.file("x.out")))
        }
        for bad in ["", "a/b", String(repeating: "x", count: 65), ".hidden", "spa ce"] {
            do {
                _ = try await m1.create(CreateJobRequest(name: bad, source: dir.file("b.img"), dest: dir.file("x.out")))
                Issue.record("accepted name '\(bad)'")
            } catch { #expect(error.code == .invalidParameter) }
        }
        // The source of job a cannot be another job's destination.
        do {
            _ = try await m1.create(CreateJobRequest(name: "c", source: dir.file("b.out"), dest: dir.file("a.img")))
            Issue.record("accepted a device in use")
        } catch { #expect(error.code == .deviceInUse) }
        await #expect(throws: HydrationError.self) { try await m1.remove("a", force: false) }

        #expect(await eventually { (try? await m1.status("a").bytes.committed) ?? 0 > 1 << 20 })
        // Graceful shutdown in the middle of job a: final commit, definitions keep "hydrating".
        await m1.shutdown()
        let committed = try await m1.status("a").bytes.committed
        #expect(committed < UInt64(a.bytes.count))

        let m2 = JobManager(stateDirectory: state, io: io, logger: testLogger)
        try await m2.restore()
        #expect(await m2.names == ["a", "b"])
        #expect(try await m2.status("b").state == .paused)
        let restored = try await m2.status("a")
        #expect(restored.state == .hydrating)
        #expect(restored.bytes.committed >= committed)
        var fast = TunablesUpdate()
        fast.rateLimitBytesPerSecond = .some(nil)
        _ = try await m2.set("a", fast)
        #expect(await eventually(30) { (try? await m2.status("a").state) == .complete })
        _ = try await m2.resume("b")
        #expect(await eventually(30) { (try? await m2.status("b").state) == .complete })
        _ = try await m2.commit("a")
        #expect(byteDifference(readFile(dir.file("a.out")), a.bytes) == nil)
        #expect(byteDifference(readFile(dir.file("b.out")), b.bytes) == nil)
        #expect(allocatedBytes(dir.file("a.img")) == 0)
        #expect(byteDifference(readFile(dir.file("b.img")), b.bytes) == nil)

        try await m2.remove("a", force: false)
        #expect(await m2.names == ["b"])
        #expect(!FileManager.default.fileExists(atPath: state + "/jobs/a.meta"))
        await #expect(throws: HydrationError.self) { _ = try await m2.status("a") }
        await m2.shutdown()

        // A complete job whose source has since been deleted is still reported complete.
        try FileManager.default.removeItem(atPath: dir.file("b.img"))
        let mGone = JobManager(stateDirectory: state, io: io, logger: testLogger)
        try await mGone.restore()
        let done = try await mGone.status("b")
        #expect(done.state == .complete && done.error == nil)
        #expect(done.regions.hydrated == done.regions.total && done.regions.total > 0)
        #expect(try await mGone.resume("b").state == .complete)
        await mGone.shutdown()

        // A job whose metadata was destroyed is restored as failed with the reason, and the
        // daemon keeps serving the others.
        try Data(repeating: 0xAB, count: 9000).write(to: URL(fileURLWithPath: state + "/jobs/b.meta"))
        let m3 = JobManager(stateDirectory: state, io: io, logger: testLogger)
        try await m3.restore()
        let broken = try await m3.status("b")
        #expect(broken.state == .failed)
        #expect(broken.error?.code == "MetadataCorrupt")
        await m3.shutdown()
        await io.shutdown()
    }
}
