import Testing

@testable import HydrationEngine

/// The job's state value: what closing keeps, and what the phase, error and reopening derive from.
@Suite struct JobStateTests {
    let noSpace = HydrationError(.noSpace, "out of space")

    /// A closing or closed job shows, and goes on changing, the state inside: a run that ends
    /// while the job closes still records how it ended.
    @Test func closingKeepsTheStateInside() {
        let run = HydrationRun(id: 1, task: Task {})
        var s = JobState.closing(.hydrating(run))
        #expect(s.isShuttingDown && !s.isClosed)
        #expect(s.phase == .hydrating)
        s = s.with(activity: .paused(.noSpace(noSpace), .reopen))
        guard case .closing(.paused) = s else {
            Issue.record("closing lost: \(s)")
            return
        }
        #expect(s.phase == .paused && s.needsReopen && s.error?.code == .noSpace)
        s = .closed(s.activity)
        #expect(s.isClosed && s.phase == .paused)
        run.task.cancel()
    }

    /// The error a job shows: why it paused or failed, or why its run is stopping; none otherwise.
    @Test func theErrorComesWithTheState() {
        let inUse = HydrationError(.deviceInUse, "opened elsewhere")
        var run = HydrationRun(id: 2, task: Task {})
        #expect(JobState.hydrating(run).error == nil)
        run.stopReason = .sourceOpenedElsewhere(inUse)
        #expect(JobState.hydrating(run).error?.code == .deviceInUse)
        #expect(JobState.paused(.requested, .inPlace).error == nil)
        #expect(JobState.failed(noSpace, .inPlace).error == noSpace)
        #expect(JobState.complete(.nothing).error == nil && JobState.idle.error == nil)
        run.task.cancel()
    }

    /// Only a paused or failed job that must be reopened says so.
    @Test func onlyAReopenResumptionNeedsReopening() {
        #expect(JobState.failed(noSpace, .reopen).needsReopen)
        #expect(!JobState.failed(noSpace, .inPlace).needsReopen)
        #expect(JobState.paused(.noSpace(noSpace), .reopen).needsReopen)
        #expect(!JobState.paused(.requested, .inPlace).needsReopen)
        #expect(!JobState.complete(.devices).needsReopen && !JobState.idle.needsReopen)
    }
}
