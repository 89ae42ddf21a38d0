import Foundation
import Testing
@testable import HydrationService

/// The crash explorer with a live clone (issue 12): a client writes, zeroes, trims, flushes and
/// reads through the LiveCloneExport while the job hydrates with discard_source; every crash
/// state of the recorded trace is checked against what a correct disk with a volatile cache may
/// hold, before and after recovery (LiveCrashExplorer.swift, docs/reliability.md "Live writes").
@Suite(.serialized) struct LiveCrashExplorerTests {
    let io = IOExecutor(threads: 2)

    /// Crash states (point x policy) checked against the model.
    static let targetChecked = 4_000
    static let maxScenarios = 12

    static func summary(_ s: LiveCrashHarness.Stats) -> String {
        "\(s.points) crash points, \(s.checked) crash states checked against the model, \(s.recovered) distinct ones recovered (+\(s.secondCrashes) second crashes during recovery)"
    }

    @Test func liveWritesAndFlushesSurviveEveryCrashPoint() async throws {
        let started = Date()
        var total = LiveCrashHarness.Stats()
        var scenarios = 0, requests = 0, flushes = 0, mutations = 0
        var seed: UInt64 = 401
        while total.checked < Self.targetChecked && scenarios < Self.maxScenarios {
            let sc = CrashScenario.make(seed: seed)
            let (live, failures) = try await LiveCrashHarness.record(sc, io: io, clientSeed: seed)
            #expect(failures.isEmpty, "live recording run of seed \(seed): \(failures)")
            requests += live.ops.count
            flushes += live.ops.filter { $0.kind == .flush || $0.fua }.count
            mutations += live.run.trace.filter { $0.kind.isMutation }.count
            let stats = await LiveCrashHarness.explore(sc, live: live, io: io)
            total.points += stats.points
            total.checked += stats.checked
            total.recovered += stats.recovered
            total.secondCrashes += stats.secondCrashes
            total.findings += stats.findings
            scenarios += 1
            seed += 1
            if !total.findings.isEmpty { break }
        }
        let elapsed = Date().timeIntervalSince(started)
        print("live crash explorer: \(scenarios) scenarios (seeds 401...\(seed - 1)), \(requests) client requests (\(flushes) flushes or FUA), \(mutations) recorded mutations; \(Self.summary(total)) in \(String(format: "%.1f", elapsed)) s")
        countCrash("live crash states", total.checked + total.secondCrashes)
        for f in total.findings { Issue.record("live crash-safety violation: \(f)") }
        #expect(total.checked >= Self.targetChecked)
    }
}
