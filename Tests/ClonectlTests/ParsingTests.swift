import Testing

@testable import CloneCtlCore

let sizeCases: [(String, UInt64)] = [
    ("4096", 4096), ("0", 0), ("64K", 65536), ("64k", 65536), ("64KiB", 65536), ("64kib", 65536),
    ("1M", 1 << 20), ("1MiB", 1 << 20), ("1G", 1 << 30), ("1GiB", 1 << 30), ("2T", 2 << 40),
    ("1.5G", 3 << 29), ("0.5K", 512), ("512B", 512), (" 1M ", 1 << 20),
]

@Suite struct SizeParsingTests {
    @Test(arguments: sizeCases)
    func accepts(_ text: String, _ bytes: UInt64) throws {
        #expect(try ByteSize.parse(text) == bytes)
    }

    @Test(arguments: ["", "K", "abc", "12X", "-1", "1..5K", ".5K", "5.K", "1.3B", "1 M M", "1e3", "0x10"])
    func rejects(_ text: String) {
        #expect(throws: InputError.self) { try ByteSize.parse(text) }
    }

    @Test func rejectionSaysWhatIsAccepted() {
        do {
            _ = try ByteSize.parse("12X")
            Issue.record("accepted 12X")
        } catch {
            #expect(error.description.contains("'12X'"))
            #expect(error.description.contains("64K"))
            #expect(error.description.contains("KiB"))
        }
    }

    @Test func decimalSuffixIsRefusedAsAmbiguous() {
        do {
            _ = try ByteSize.parse("64KB")
            Issue.record("accepted 64KB")
        } catch {
            #expect(error.description.contains("ambiguous"))
        }
    }

    @Test func overflowIsRejected() {
        #expect(throws: InputError.self) { try ByteSize.parse("99999999999999999999") }
        #expect(throws: InputError.self) { try ByteSize.parse("100000000P") }
    }

    static let rateCases: [(String, UInt64)] = [
        ("20M", 20 << 20), ("20MiB/s", 20 << 20), ("512K/s", 512 << 10), ("0", 0), ("1000", 1000),
    ]
    @Test(arguments: rateCases)
    func rates(_ text: String, _ v: UInt64) throws {
        #expect(try ByteRate.parse(text) == v)
    }

    @Test func badRateNamesRates() {
        do {
            _ = try ByteRate.parse("fast")
            Issue.record("accepted fast")
        } catch {
            #expect(error.description.contains("invalid rate 'fast'"))
            #expect(error.description.contains("20MiB/s"))
        }
    }
}

let durationCases: [(String, Int)] = [
    ("500ms", 500), ("1s", 1000), ("2m", 120_000), ("1h", 3_600_000), ("1m30s", 90_000), ("1.5s", 1500),
    ("0", 0), ("0s", 0), ("250MS", 250), ("2min", 120_000), ("1h2m3s4ms", 3_723_004),
]

@Suite struct DurationParsingTests {
    @Test(arguments: durationCases)
    func accepts(_ text: String, _ ms: Int) throws {
        #expect(try DurationParser.milliseconds(text) == ms)
    }

    @Test(arguments: ["", "5", "1x", "s", "ms", "1.s", "-1s", "1s2", "1 s", "forever", "1d"])
    func rejects(_ text: String) {
        #expect(throws: InputError.self) { try DurationParser.milliseconds(text) }
    }

    @Test func rejectionSaysWhatIsAccepted() {
        do {
            _ = try DurationParser.milliseconds("5")
            Issue.record("accepted 5")
        } catch {
            #expect(error.description == "invalid duration '5': expected \(DurationParser.accepted)")
            #expect(error.description.contains("500ms"))
        }
    }

    @Test func duration() throws {
        #expect(try DurationParser.parse("2m") == .seconds(120))
    }
}
