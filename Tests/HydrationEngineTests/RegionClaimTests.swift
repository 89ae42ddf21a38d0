import HydrationStorage
import Testing

@testable import HydrationEngine

/// The claim and pin tokens of `RegionOwnership`: what the types guarantee on the paths that
/// forget to end them or leave by an error.
@Suite struct RegionClaimTests {
    static func ownership(_ count: Int = 8) -> RegionOwnership {
        RegionOwnership(
            hydrated: RegionMap(count: count), committed: RegionMap(count: count),
            released: RegionMap(count: count), destZeroed: true)
    }

    /// A claim dropped on a path that neither finishes nor ends it still ends, with nothing
    /// hydrated: a client waiting for its regions gets them instead of waiting forever.
    @Test func aDroppedClaimEndsAndWakesTheWriterWaitingForIt() async {
        let own = Self.ownership()
        func forgetfulWriter() async {
            let claim = await own.claim(2..<4)
            #expect(own.isClaimed(2) && own.isClaimed(3))
            _ = claim.regions  // the claim goes out of scope here without finish or end
        }
        await forgetfulWriter()
        #expect(!own.isClaimed(2) && !own.isClaimed(3), "a dropped claim kept its regions")
        #expect(!own.isHydrated(2) && !own.isHydrated(3), "a dropped claim marked regions hydrated")
        let next = own.tryClaim(3..<5)?.regions
        #expect(next == 3..<5, "regions of a dropped claim cannot be claimed again")
        #expect(!own.anyClaimed)
    }

    /// `end` gives the regions back unhydrated; the copier may claim them again.
    @Test func anEndedClaimLeavesItsRegionsUnhydratedAndClaimable() {
        let own = Self.ownership()
        guard let claim = own.tryClaim(0..<8) else {
            Issue.record("nothing could be claimed")
            return
        }
        #expect(own.tryClaim(0..<8)?.regions == nil, "claims are exclusive")
        claim.end()
        #expect(own.hydratedCount == 0)
        #expect(own.tryClaim(0..<8)?.regions == 0..<8)
    }

    /// A claim moved into a task through a handoff is the task's to end; taking it twice is a bug
    /// the handoff refuses (not tested: a precondition).
    @Test func aClaimHandedToATaskIsEndedThere() async {
        let own = Self.ownership()
        guard let claim = own.tryClaim(1..<3) else {
            Issue.record("nothing could be claimed")
            return
        }
        let handoff = ClaimHandoff(claim)
        await Task { handoff.take().markHydratedWithoutNoting([1..<2]) }.value
        #expect(!own.anyClaimed)
        #expect(own.isHydrated(1) && !own.isHydrated(2))
    }

    /// Pins last exactly as long as the scope: a body that throws still unpins, and the
    /// discarder's wait ends.
    @Test func pinsEndWithTheirScopeEvenWhenTheBodyThrows() {
        struct ReadFailed: Error {}
        let own = Self.ownership()
        #expect(throws: ReadFailed.self) {
            try own.withSourcePins(0..<4) { pins throws(ReadFailed) in
                let readsSource = pins.readsSource
                #expect(readsSource)
                throw ReadFailed()
            }
        }
        #expect(!own.isPinned(0..<4), "a body that threw left its pins")
        let pinnedInside = own.withSourcePins(0..<1) { _ in own.isPinned(0..<1) }
        #expect(pinnedInside)
        #expect(!own.isPinned(0..<1))
    }
}
