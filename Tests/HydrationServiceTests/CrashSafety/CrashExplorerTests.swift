import Foundation
import Testing
@testable import HydrationService

@Suite(.serialized) struct CrashExplorerTests {
    let io = IOExecutor(threads: 2)

    @Test func smoke() async throws {
        let start = Date()
        let sc = CrashScenario.make(seed: 1)
        let (run, failures) = try await CrashHarness.record(sc, io: io)
        #expect(failures.isEmpty, "\(failures)")
        print("trace: \(run.trace.count) ops, \(run.trace.filter { $0.kind.isMutation }.count) mutations, recorded in \(Date().timeIntervalSince(start))s")
        let t0 = Date()
        let stats = await CrashHarness.explore(sc, run: run, io: io, pointFilter: { $0 % 10 == 0 })
        print("boundaries \(stats.boundaries) states \(stats.states) dup \(stats.duplicates) second \(stats.secondCrashes) in \(Date().timeIntervalSince(t0))s")
        for f in stats.findings { print(f) }
        #expect(stats.findings.isEmpty)
    }
}
