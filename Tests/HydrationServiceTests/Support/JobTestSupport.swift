import Foundation
import HydrationTestSupport
import Synchronization
import Testing

@testable import HydrationEngine
@testable import HydrationService
@testable import HydrationStorage

// Helpers that drive a whole job (the service opens jobs), so they stay with the service's tests
// while the storage-level helpers are in HydrationTestSupport.

/// Holds a job's copier before region `at` (a `CopierGate`): the job stays `hydrating`, with
/// exactly the regions before the hold hydrated, for as long as a test needs, however fast or
/// busy the machine is. `move(to:)` lets it go on to another region, `open()` to the end.
final class HoldGate: CopierGate {
    private let limit: Mutex<Int?>
    init(at region: Int?) { limit = Mutex(region) }

    func admit(_ regions: Range<Int>) -> Range<Int> {
        guard let l = limit.withLock({ $0 }) else { return regions }
        return regions.lowerBound..<max(regions.lowerBound, min(regions.upperBound, l))
    }

    func move(to region: Int?) { limit.withLock { $0 = region } }
    func open() { move(to: nil) }
    var region: Int? { limit.withLock { $0 } }

    /// Waits (a liveness guard, not a timing claim) until every region before the hold is
    /// hydrated and no copy is in flight: the copier is waiting at the gate.
    func waitHeld(_ job: HydrationJob, sourceLocation: SourceLocation = #_sourceLocation) async {
        guard let l = region else { return }
        let held = await eventually {
            job.ownership.allHydrated(0..<min(l, job.ownership.regionCount)) && !job.ownership.anyClaimed
        }
        #expect(
            held, "the copier did not reach its hold at region \(l): \(job.ownership.hydratedCount) hydrated",
            sourceLocation: sourceLocation)
    }
}

/// Creates a job that must be refused with `code`; a job that is accepted (the old code) is
/// recorded as an issue and closed again. Returns the error.
@discardableResult
func expectRefused(
    _ cfg: JobConfiguration, _ code: HydrationError.Code, reopen: Bool = false,
    sourceLocation: SourceLocation = #_sourceLocation
) async -> HydrationError? {
    let io = IOExecutor(threads: 2)
    do {
        let job =
            reopen
            ? try await HydrationJob.open(cfg, io: io, logger: testLogger)
            : try await HydrationJob.create(cfg, io: io, logger: testLogger)
        Issue.record(
            "accepted, expected \(code.rawValue): \(cfg.sourcePath) -> \(cfg.destPath) (metadata \(cfg.metadataPath))",
            sourceLocation: sourceLocation)
        await job.close()
        await io.shutdown()
        return nil
    } catch {
        print("refused as expected: \(error)")
        #expect(error.code == code, "\(error)", sourceLocation: sourceLocation)
        await io.shutdown()
        return error
    }
}

/// Creates a job that must be accepted, and closes it.
func expectAccepted(_ cfg: JobConfiguration, sourceLocation: SourceLocation = #_sourceLocation) async {
    let io = IOExecutor(threads: 2)
    do {
        let job = try await HydrationJob.create(cfg, io: io, logger: testLogger)
        await job.close()
    } catch {
        Issue.record("refused: \(error)", sourceLocation: sourceLocation)
    }
    await io.shutdown()
}
