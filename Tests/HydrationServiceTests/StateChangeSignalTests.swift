import ControlProtocol
import Foundation
import HydrationTestSupport
import Testing

@testable import HydrationEngine
@testable import HydrationService
@testable import HydrationStorage

/// Status watchers (`clonectl wait`, `start --wait`, `status --watch`) are woken by job state
/// changes rather than polling.
@Suite struct StateChangeSignalTests {
    @Test func waitersWakeOnASignalAndLeaveNothingBehind() async throws {
        let s = StateChangeSignal()
        let g = s.generation
        // A generation already past: at once.
        s.signal()
        await s.wait(past: g)
        #expect(s.waiterCount == 0)

        // A waiter parked until the next signal.
        let g2 = s.generation
        let woke = Task {
            await s.wait(past: g2); return true
        }
        #expect(await eventually { s.waiterCount == 1 })
        s.signal()
        #expect(await woke.value)
        #expect(s.waiterCount == 0)

        // A deadline: returns without a signal, and its waiter is removed.
        await s.wait(past: s.generation, until: .now + .milliseconds(30))
        #expect(s.waiterCount == 0)

        // A cancelled waiter is removed and returns.
        let cancelled = Task { await s.wait(past: s.generation) }
        #expect(await eventually { s.waiterCount == 1 })
        cancelled.cancel()
        await cancelled.value
        #expect(s.waiterCount == 0)
    }

    /// With a watch interval of an hour, only the job's own state change can end a named watch:
    /// without `reportStateChanges` (or the signal in `setState`) this watch waits an hour.
    @Test(.timeLimit(.minutes(1))) func aWatchIsToldOfCompletionByTheJob() async throws {
        let dir = TempDir("signal")
        let img = TestImage.make(size: 4 << 20, seed: 3)
        try img.write(to: dir.file("a.img"))
        let io = IOExecutor(threads: 2)
        let m = JobManager(stateDirectory: dir.file("state"), io: io, logger: testLogger)
        try await m.restore()
        _ = try await m.create(
            CreateJobRequest(name: "a", source: dir.file("a.img"), dest: dir.file("a.out"), noHydration: true))
        let handler = DaemonControlHandler(manager: m, watchInterval: .seconds(3600))
        let stream = try await handler.watchStatus(
            GetStatusParameters(name: "a"), peer: PeerCredentials(pid: 1, uid: 0, gid: 0))
        let watcher = Task {
            var states: [JobStatus.State] = []
            for try await u in stream { states += u.jobs.map(\.state) }
            return states
        }
        #expect(await eventually { m.stateChanges.waiterCount == 1 }, "the watch is parked on the signal")
        _ = try await m.resume("a")
        let states = try await watcher.value
        #expect(states.first == .paused && states.last == .complete, "\(states)")
        #expect(m.stateChanges.waiterCount == 0)
        await m.shutdown()
    }
}
