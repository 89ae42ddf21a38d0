import HydrationTestSupport
import Testing

@testable import HydrationEngine
@testable import HydrationStorage

@Suite struct RegionMapTests {
    @Test func setAndCountRanges() {
        var m = RegionMap(count: 200)
        m.set(3..<70)
        #expect(m.setCount == 67)
        #expect(!m[2] && m[3] && m[69] && !m[70])
        m.set(60..<130)  // overlaps
        #expect(m.setCount == 127)
        #expect(m.setRanges() == [3..<130])
        m.set(199)
        #expect(m.setRanges() == [3..<130, 199..<200])
        #expect(m.first(false, from: 3) == 130)
        #expect(m.first(true, from: 130) == 199)
        #expect(m.first(false, from: 199) == nil)
        #expect(m.count(in: 0..<64) == 61)
    }

    @Test func fullWordsAndTail() {
        var m = RegionMap(count: 130)
        m.set(0..<130)
        #expect(m.isComplete)
        #expect(m.first(false, from: 0) == nil)
        #expect(m.setRanges() == [0..<130])
    }

    @Test func coalescing() {
        #expect(coalesce([5..<7, 0..<2, 2..<3, 6..<9, 20..<20]) == [0..<3, 5..<9])
    }

    @Test func crc32cKnownVectors() {
        // RFC 3720 B.4 test vectors.
        #expect(CRC32C.checksum([UInt8](repeating: 0, count: 32)) == 0x8A91_36AA)
        #expect(CRC32C.checksum([UInt8](repeating: 0xff, count: 32)) == 0x62A8_AB43)
        #expect(CRC32C.checksum((0..<32).map { UInt8($0) }) == 0x46DD_794E)
        #expect(CRC32C.checksum(Array("123456789".utf8)) == 0xE306_9283)
    }

    @Test func zeroDetection() {
        var b = [UInt8](repeating: 0, count: 4099)
        #expect(b.withUnsafeBytes { isAllZero($0) })
        for i in [0, 7, 63, 64, 4095, 4098] {
            b[i] = 1
            #expect(!b.withUnsafeBytes { isAllZero($0) }, "byte \(i)")
            b[i] = 0
        }
    }
}

@Suite struct CRCPathTests {
    @Test func hardwareAndSoftwareAgree() {
        var rng = SeededRandom(seed: 99)
        for n in [0, 1, 7, 8, 9, 63, 4096, 4097] {
            var b = [UInt8](repeating: 0, count: n)
            rng.fill(&b, 0..<n)
            let hw = b.withUnsafeBytes { CRC32C.checksum($0) }
            let sw = b.withUnsafeBytes { CRC32C.software($0) }
            #expect(hw == sw, "length \(n)")
        }
    }
}
