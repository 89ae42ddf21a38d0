import Testing

@testable import HydrationEngine

@Suite struct DurationCountsTests {
    @Test func durationsFallInTheFirstBucketThatHoldsThem() {
        var d = DurationCounts(boundsSeconds: [0.01, 0.1])
        for s in [0.001, 0.01, 0.05, 0.1, 3.0] { d.record(seconds: s) }
        // Upper bounds are inclusive (Prometheus' `le`); the last count is above every bound.
        #expect(d.counts == [2, 2, 1])
        #expect(abs(d.sumSeconds - 3.161) < 1e-9)
    }
}
