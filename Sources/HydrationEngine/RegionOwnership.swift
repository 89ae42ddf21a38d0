import HydrationStorage
import Synchronization

/// Who may write a region, and what each region is: hydrated, committed, released, being written.
///
/// With a live clone the copier is one of several writers of a region: a client's write or
/// write-zeroes, a TRIM, a CACHE request. This type is the single owner of the rules between them:
///
/// - **Writers claim.** Every writer of an unhydrated region (the copier's batch, a client write
///   that must hydrate first or overwrites whole regions, a trim, a zero, a cache) holds a claim on
///   its regions for the whole operation. Claims are exclusive and all-or-nothing (no writer ever
///   holds some regions while waiting for others, so claims cannot deadlock). The copier only
///   *tries* to claim and steps over regions a client holds; clients wait (dm-clone defers a write
///   to a region under copy until the copy ends). A claim is a non-copyable `RegionClaim`; it
///   ends once, with `finish`, which tells the committer of the regions that became hydrated and
///   then marks them in the same step as the claim ends, so "hydrated" never changes under a
///   claim, or with `end` when nothing was hydrated.
/// - **Hydrated is forever.** A hydrated region's source is never read again: reads and writes of it
///   go to the destination, with no claim (nothing else can make it unhydrated).
/// - **Source readers pin.** A read served from the source pins its (unhydrated) regions, decided
///   atomically with the check, for the scope of `withSourcePins`. The discarder waits for a region's pins to drop before it releases
///   it. A region can only be released once committed, hence hydrated, and hydrated regions are
///   never pinned again, so the wait is short and bounded.
/// - **Bits for status.** Committed (set by the committer after the metadata is durable) and
///   released (set by the discarder) are kept here too, for BLOCK_STATUS `x-hydrationd:state`.
///
/// A `Mutex`, not an actor: the copier scans the hydrated bits once per batch and a client read
/// checks them once per request; neither should hop executors for that. Waiting is done with
/// continuations resumed outside the lock.
package final class RegionOwnership: Sendable {
    package let regionCount: Int

    private struct Waiter {
        package var regions: Range<Int>
        package var continuation: CheckedContinuation<Void, Never>
    }

    private struct State {
        package var hydrated: RegionMap
        package var committed: RegionMap
        package var released: RegionMap
        /// Regions under a claim.
        package var claimed: RegionMap
        /// Source-read pins per region.
        package var pins: [Int: Int] = [:]
        package var claimWaiters: [Waiter] = []
        package var unpinWaiters: [Waiter] = []
        package var changeWaiters: [CheckedContinuation<Void, Never>] = []
        /// The destination reads as zeros wherever nothing was written (see `destinationWritten`).
        package var destZeroed: Bool
        /// A destination sync or writeback failed: what was written since the last commit may be
        /// gone from the destination (the kernel drops pages whose writeback failed).
        package var destinationDataLost = false
    }

    private let state: Mutex<State>

    package init(hydrated: RegionMap, committed: RegionMap, released: RegionMap, destZeroed: Bool) {
        precondition(hydrated.count == committed.count && committed.count == released.count)
        regionCount = hydrated.count
        state = Mutex(
            State(
                hydrated: hydrated, committed: committed, released: released,
                claimed: RegionMap(count: hydrated.count), destZeroed: destZeroed))
    }

    // MARK: reading the bits

    package var isComplete: Bool { state.withLock { $0.hydrated.isComplete } }
    package var hydratedCount: Int { state.withLock { $0.hydrated.setCount } }
    package func isHydrated(_ region: Int) -> Bool { state.withLock { $0.hydrated[region] } }
    package func allHydrated(_ regions: Range<Int>) -> Bool {
        state.withLock { $0.hydrated.count(in: regions) == regions.count }
    }
    /// The first region at or after `start` whose hydrated bit is `value`.
    package func firstHydrated(_ value: Bool, from start: Int) -> Int? {
        state.withLock { $0.hydrated.first(value, from: start) }
    }
    /// A copy of the hydrated bits (tests, status).
    package var hydratedSnapshot: RegionMap { state.withLock { $0.hydrated } }
    package var anyClaimed: Bool { state.withLock { $0.claimed.setCount > 0 } }
    package func isClaimed(_ region: Int) -> Bool { state.withLock { $0.claimed[region] } }
    package var destZeroed: Bool { state.withLock { $0.destZeroed } }

    /// Per-region bits for `x-hydrationd:state`, over `regions`.
    package func stateBits(_ regions: Range<Int>) -> [UInt32] {
        state.withLock { st in
            regions.map { r in
                var b: UInt32 = 0
                if st.hydrated[r] { b |= RegionStateBits.hydrated }
                if st.committed[r] { b |= RegionStateBits.committed }
                if st.released[r] { b |= RegionStateBits.released }
                if st.claimed[r] { b |= RegionStateBits.writing }
                return b
            }
        }
    }

    // MARK: claims

    /// The copier's claim: the longest run of `regions`, from its start, that is unhydrated and
    /// unclaimed, or nil when the first region is not. Never waits.
    package func tryClaim(_ regions: Range<Int>) -> RegionClaim? {
        let taken = state.withLock { st -> Range<Int>? in
            var end = regions.lowerBound
            while end < regions.upperBound && !st.hydrated[end] && !st.claimed[end] { end += 1 }
            guard end > regions.lowerBound else { return nil }
            st.claimed.set(regions.lowerBound..<end)
            return regions.lowerBound..<end
        }
        guard let taken else { return nil }
        return RegionClaim(taken, of: self)
    }

    /// The runs of `ranges` not hydrated yet.
    package func unhydratedRuns(in ranges: [Range<Int>]) -> [Range<Int>] {
        state.withLock { st in
            var out: [Range<Int>] = []
            for h in ranges where !h.isEmpty {
                var i = h.lowerBound
                while let a = st.hydrated.first(false, from: i), a < h.upperBound {
                    let b = min(st.hydrated.first(true, from: a) ?? st.hydrated.count, h.upperBound)
                    out.append(a..<b)
                    i = b
                }
            }
            return out
        }
    }

    /// A client's claim: waits until no region of `regions` is claimed, then claims them all.
    package func claim(_ regions: Range<Int>) async -> RegionClaim {
        if state.withLock({ st in Self.takeIfFree(&st, regions) }) { return RegionClaim(regions, of: self) }
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            let now = state.withLock { st -> Bool in
                if Self.takeIfFree(&st, regions) { return true }
                st.claimWaiters.append(Waiter(regions: regions, continuation: c))
                return false
            }
            if now { c.resume() }
        }
        return RegionClaim(regions, of: self)
    }

    private static func takeIfFree(_ st: inout State, _ regions: Range<Int>) -> Bool {
        guard st.claimed.count(in: regions) == 0 else { return false }
        st.claimed.set(regions)
        return true
    }

    /// Ends a claim on `regions`; `hydrated` (sub-ranges of it) became hydrated. Returns the
    /// sub-ranges that were not hydrated before. Marks without telling the committer: only the
    /// claim itself calls it (`RegionClaim`).
    @discardableResult
    fileprivate func finish(_ regions: Range<Int>, hydrated: [Range<Int>]) -> [Range<Int>] {
        let (newly, wake) = state.withLock { st -> ([Range<Int>], [CheckedContinuation<Void, Never>]) in
            var newly: [Range<Int>] = []
            for h in hydrated where !h.isEmpty {
                precondition(
                    h.lowerBound >= regions.lowerBound && h.upperBound <= regions.upperBound,
                    "hydrated \(h) outside the claim \(regions)")
                var i = h.lowerBound
                while i < h.upperBound {
                    if st.hydrated[i] { i += 1; continue }
                    var j = i + 1
                    while j < h.upperBound && !st.hydrated[j] { j += 1 }
                    newly.append(i..<j)
                    st.hydrated.set(i..<j)
                    i = j
                }
            }
            st.claimed.clear(regions)
            var wake: [CheckedContinuation<Void, Never>] = st.changeWaiters
            st.changeWaiters = []
            // Waiters are served in order; one whose regions are free now takes them.
            var still: [Waiter] = []
            for w in st.claimWaiters {
                if Self.takeIfFree(&st, w.regions) { wake.append(w.continuation) } else { still.append(w) }
            }
            st.claimWaiters = still
            return (newly, wake)
        }
        for c in wake { c.resume() }
        return newly
    }

    /// Ends a claim on `regions`, of which `hydrated` (sub-ranges of it) became hydrated
    /// (`RegionClaim.finish`, which says why in this order).
    fileprivate func finish(
        _ regions: Range<Int>, hydrated: [Range<Int>], noting committer: Committer, budgetBytes: UInt64,
        beforeMarking: @Sendable ([Range<Int>]) -> Void
    ) async -> [Range<Int>] {
        // Nobody else changes these regions' hydration while the claim holds them.
        let newly = unhydratedRuns(in: hydrated)
        beforeMarking(newly)
        for (i, r) in newly.enumerated() { await committer.noteHydrated(r, budgetBytes: i == 0 ? budgetBytes : 0) }
        finish(regions, hydrated: hydrated)
        return newly
    }

    /// Suspends until some claim ends (the copier, at the end of a pass over regions a client held).
    package func waitForChange() async {
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            let now = state.withLock { st -> Bool in
                if st.claimed.setCount == 0 { return true }
                st.changeWaiters.append(c)
                return false
            }
            if now { c.resume() }
        }
    }

    // MARK: source pins

    /// Runs `body` with `regions` split into runs served by the destination (hydrated) or by the
    /// source, the source runs pinned: the discarder cannot release them until `body` returns.
    /// Scoped rather than a token the caller ends: a pin must last exactly as long as the read
    /// it protects, and a scope says so where a deinit's timing would not.
    package func withSourcePins<R, E: Error>(_ regions: Range<Int>, _ body: (borrowing SourcePins) throws(E) -> R)
        throws(E) -> R
    {
        let pins = SourcePins(runs: pinForRead(regions))
        defer { unpin(pins.runs) }
        return try body(pins)
    }

    /// `withSourcePins` for a body that awaits (a read of the source on an I/O thread).
    package func withSourcePins<R, E: Error>(
        _ regions: Range<Int>, _ body: (borrowing SourcePins) async throws(E) -> R
    ) async throws(E) -> R {
        let pins = SourcePins(runs: pinForRead(regions))
        defer { unpin(pins.runs) }
        return try await body(pins)
    }

    private func pinForRead(_ regions: Range<Int>) -> [(regions: Range<Int>, fromSource: Bool)] {
        state.withLock { st in
            var out: [(Range<Int>, Bool)] = []
            var i = regions.lowerBound
            while i < regions.upperBound {
                let h = st.hydrated[i]
                var j = i + 1
                while j < regions.upperBound && st.hydrated[j] == h { j += 1 }
                if !h { for r in i..<j { st.pins[r, default: 0] += 1 } }
                out.append((i..<j, !h))
                i = j
            }
            return out
        }
    }

    private func unpin(_ runs: [(regions: Range<Int>, fromSource: Bool)]) {
        let wake = state.withLock { st -> [CheckedContinuation<Void, Never>] in
            for run in runs where run.fromSource {
                for r in run.regions {
                    let n = (st.pins[r] ?? 1) - 1
                    st.pins[r] = n > 0 ? n : nil
                }
            }
            var wake: [CheckedContinuation<Void, Never>] = []
            var still: [Waiter] = []
            for w in st.unpinWaiters {
                if Self.pinned(st, w.regions) { still.append(w) } else { wake.append(w.continuation) }
            }
            st.unpinWaiters = still
            return wake
        }
        for c in wake { c.resume() }
    }

    private static func pinned(_ st: State, _ regions: Range<Int>) -> Bool {
        if st.pins.isEmpty { return false }
        if regions.count > st.pins.count { return st.pins.keys.contains { regions.contains($0) } }
        return regions.contains { st.pins[$0] != nil }
    }

    /// Some read of the source holds a pin on a region of `regions` now.
    package func isPinned(_ regions: Range<Int>) -> Bool { state.withLock { Self.pinned($0, regions) } }

    /// Returns once no read of the source holds a pin on `regions` (the discarder, before release).
    package func waitUnpinned(_ regions: Range<Int>) async {
        if !state.withLock({ Self.pinned($0, regions) }) { return }
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            let now = state.withLock { st -> Bool in
                if !Self.pinned(st, regions) { return true }
                st.unpinWaiters.append(Waiter(regions: regions, continuation: c))
                return false
            }
            if now { c.resume() }
        }
    }

    /// Every source pin has dropped (before the source is closed).
    package func waitNoPins() async { await waitUnpinned(0..<regionCount) }

    // MARK: committer and discarder

    /// The committer failed for good. With `destinationDataLost` (a failed destination sync or
    /// writeback error), regions hydrated since the last commit are no longer served.
    package func commitsFailed(destinationDataLost: Bool) {
        state.withLock { $0.destinationDataLost = $0.destinationDataLost || destinationDataLost }
    }

    /// The first region of `regions` that is hydrated but not committed while the destination's
    /// uncommitted data may be lost (nil: every region can be served).
    package func lostRegion(in regions: Range<Int>) -> Int? {
        state.withLock { st in
            guard st.destinationDataLost else { return nil }
            return regions.first { st.hydrated[$0] && !st.committed[$0] }
        }
    }

    package func markCommitted(_ ranges: [Range<Int>]) {
        state.withLock { st in for r in ranges where !r.isEmpty { st.committed.set(r) } }
    }

    package func markReleased(_ regions: Range<Int>) {
        state.withLock { st in st.released.set(regions) }
    }

    /// Client data is about to be written to the destination: from now on it may hold data where
    /// the job never hydrated (a write not yet committed when the daemon crashed).
    package func destinationWritten() {
        state.withLock { $0.destZeroed = false }
    }
}

/// A writer's exclusive hold on `regions` (RegionOwnership's "writers claim"): the copier's
/// batch, a client's write, trim, zero or cache.
///
/// Non-copyable: it has one holder and ends once. It ends with `finish(hydrated:noting:)` when
/// some of its regions became hydrated: the only place where a writer's regions become
/// hydrated, and it does "the committer hears of them, then they are marked" in that order. It
/// ends with `end()` when nothing was hydrated (a copy that failed or was given up). A claim
/// dropped on a path that does neither ends in `deinit` as if nothing was hydrated, so that no
/// error path leaves clients waiting for its regions forever.
package struct RegionClaim: ~Copyable, Sendable {
    package let regions: Range<Int>
    private let ownership: RegionOwnership
    private var ended = false

    fileprivate init(_ regions: Range<Int>, of ownership: RegionOwnership) {
        self.regions = regions
        self.ownership = ownership
    }

    /// Ends the claim; `hydrated` (sub-ranges of `regions`) became hydrated. The committer hears
    /// of the regions newly hydrated first (and `beforeMarking` is told of them), then they are
    /// marked. In that order: from the moment they are marked, clients write into them directly,
    /// and a FLUSH replied to after such a write must find them in its commit (were they marked
    /// first, a flush in between would commit without them, and a crash would re-copy the source
    /// over the flushed write); and once the last region is marked, the copier may see the job
    /// complete and commit completion, which the metadata refuses with a region the committer was
    /// never told of. Returns the runs newly hydrated.
    @discardableResult
    package consuming func finish(
        hydrated: [Range<Int>], noting committer: Committer, budgetBytes: UInt64 = 0,
        beforeMarking: @Sendable ([Range<Int>]) -> Void = { _ in }
    ) async -> [Range<Int>] {
        let newly = await ownership.finish(
            regions, hydrated: hydrated, noting: committer, budgetBytes: budgetBytes, beforeMarking: beforeMarking)
        ended = true
        return newly
    }

    /// Ends the claim with nothing hydrated.
    package consuming func end() {
        ownership.finish(regions, hydrated: [])
        ended = true
    }

    /// Ends the claim marking `hydrated` without telling the committer: for engine tests that play
    /// the copier's two steps apart (note the committer, later mark) to check what happens between.
    consuming func markHydratedWithoutNoting(_ hydrated: [Range<Int>]) {
        ownership.finish(regions, hydrated: hydrated)
        ended = true
    }

    deinit {
        if !ended { ownership.finish(regions, hydrated: []) }
    }
}

/// Moves a `RegionClaim` into a task: a non-copyable value cannot be captured by the escaping
/// closure a task group runs, so the claim waits here until the task takes it, once.
package final class ClaimHandoff: Sendable {
    private let slot: Mutex<RegionClaim?>

    package init(_ claim: consuming RegionClaim) { slot = Mutex(Optional(claim)) }

    /// The claim; a second call is a bug.
    package func take() -> RegionClaim {
        let claim = slot.withLock { $0.take() }
        guard let claim else { preconditionFailure("a claim handed off is taken once") }
        return claim
    }
}

/// The runs of a read under `RegionOwnership.withSourcePins`: served by the destination, or by
/// the source and pinned there. Non-copyable and only borrowed by the body, so the runs cannot
/// outlive the pins that make reading the source safe.
package struct SourcePins: ~Copyable {
    package let runs: [(regions: Range<Int>, fromSource: Bool)]
    package var readsSource: Bool { runs.contains { $0.fromSource } }
}

/// Bits of the `x-hydrationd:state` metadata context, per region.
public enum RegionStateBits {
    /// Reads are served by the destination.
    public static let hydrated: UInt32 = 1
    /// The metadata records the region as hydrated, durably.
    public static let committed: UInt32 = 2
    /// The source's space for the region has been given back.
    public static let released: UInt32 = 4
    /// A writer (the copier or a client's write, trim, zero or cache) holds the region.
    public static let writing: UInt32 = 8
}
