import Foundation
import HydrationTestSupport
import Testing

@testable import HydrationEngine
@testable import HydrationService

/// The `verify` option is kept in the job's record (a restart verifies too), and records written
/// before it existed still read (as false).
@Suite struct VerifyRecordTests {
    func definition(verify: Bool) -> JobDefinition {
        JobDefinition(
            name: "v", source: "/s", dest: "/d", metadata: "/m", regionSize: 65536, discardSource: true,
            destZeroed: false, tunables: .defaults(regionSize: 65536), desired: .hydrating, verify: verify)
    }

    @Test func verifyRoundTripsThroughTheRecordAndReachesTheConfiguration() throws {
        let data = try JSONEncoder().encode(definition(verify: true))
        let obj = try JSONSerialization.jsonObject(with: data) as? [String: Any]
        #expect(obj?["verify"] as? Bool == true)
        let back = try JSONDecoder().decode(JobDefinition.self, from: data)
        #expect(back.verify)
        #expect(back.configuration.verify)
    }

    @Test func aRecordFromBeforeVerifyReadsAsFalse() throws {
        var obj =
            try JSONSerialization.jsonObject(with: JSONEncoder().encode(definition(verify: true))) as! [String: Any]
        obj.removeValue(forKey: "verify")
        let back = try JSONDecoder().decode(JobDefinition.self, from: JSONSerialization.data(withJSONObject: obj))
        #expect(!back.verify)
        #expect(!back.configuration.verify)
    }
}
