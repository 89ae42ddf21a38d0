import Synchronization

/// Wakes status watchers (`WatchStatus`, so `clonectl wait` and `start --wait`) when a job
/// changes state, instead of each watcher polling: a generation counter, bumped by every job's
/// state change and every change to the manager's set of jobs, and the tasks waiting for it to
/// move. Polling every 20 ms made a finished job's waiter learn of it 10 ms late on average.
public final class StateChangeSignal: Sendable {
    private struct State {
        var generation: UInt64 = 0
        var waiters: [Int: CheckedContinuation<Void, Never>] = [:]
        var nextID = 0
    }

    private let state = Mutex(State())

    public init() {}

    public var generation: UInt64 { state.withLock { $0.generation } }

    /// Something changed: every waiter wakes.
    public func signal() {
        let waiters = state.withLock { s -> [CheckedContinuation<Void, Never>] in
            s.generation &+= 1
            defer { s.waiters = [:] }
            return Array(s.waiters.values)
        }
        for c in waiters { c.resume() }
    }

    /// Returns once the generation is no longer `seen`, or the calling task is cancelled (a
    /// cancelled waiter is removed, so long watches of idle jobs leave nothing behind).
    public func wait(past seen: UInt64) async {
        let id = state.withLock { s -> Int in
            s.nextID &+= 1
            return s.nextID
        }
        await withTaskCancellationHandler {
            await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
                let now = state.withLock { s -> Bool in
                    if s.generation != seen || Task.isCancelled { return true }
                    s.waiters[id] = c
                    return false
                }
                if now { c.resume() }
            }
        } onCancel: {
            state.withLock { $0.waiters.removeValue(forKey: id) }?.resume()
        }
    }

    /// Returns once the generation is no longer `seen`, or at `deadline`.
    public func wait(past seen: UInt64, until deadline: ContinuousClock.Instant) async {
        await withTaskGroup(of: Void.self) { group in
            group.addTask { await self.wait(past: seen) }
            group.addTask { try? await Task.sleep(until: deadline, clock: .continuous) }
            await group.next()
            group.cancelAll()
        }
    }

    /// Waiters registered now (tests: none may be left behind).
    var waiterCount: Int { state.withLock { $0.waiters.count } }
}
