import ControlProtocol
import Foundation
import Testing

@testable import CloneCtlCore

func sampleStatus(
    name: String = "vm1", state: JobStatus.State = .hydrating, hydrated: UInt64 = 1536, total: UInt64 = 3584,
    discard: Bool = true, error: JobStatus.ErrorInfo? = nil
) -> JobStatus {
    let region: UInt64 = 1 << 20
    return JobStatus(
        name: name, state: state, source: .init(path: "/dev/vg/src", sizeBytes: total * region),
        dest: .init(path: "/dev/vg/dst"), regionSize: region,
        regions: .init(total: total, hydrated: hydrated, hydrating: 4),
        bytes: .init(
            total: total * region, hydrated: hydrated * region, committed: (hydrated - 36) * region,
            skippedZero: 0, discarded: 1 << 30),
        throughputBytesPerSecond: 126_143_283, etaSeconds: 17.4,
        commits: .init(count: 42, lastUnixMs: 1_700_000_000_000, lastDurationMs: 3.25),
        discard: .init(enabled: discard, pendingBytes: 200 << 20, failed: 0),
        spaceBudgetBytes: discard ? 1 << 30 : nil,
        settings: .init(threshold: 128, batchSize: 16, rateLimitBytesPerSecond: 20 << 20, commitIntervalMs: 1000),
        metadata: .init(path: "/var/lib/hydrationd/jobs/vm1.meta", mode: .rw), error: error)
}

let byteCases: [(UInt64, String)] = [
    (0, "0 B"), (512, "512 B"), (1023, "1023 B"), (1024, "1 KiB"), (65536, "64 KiB"),
    (1_572_864, "1.5 MiB"), (3 << 29, "1.5 GiB"), (1 << 40, "1 TiB"), (1_000_000, "976.6 KiB"),
]
let etaCases: [(Double?, String)] = [
    (nil, "unknown"), (0, "0s"), (0.4, "<1s"), (45, "45s"), (125, "2m05s"), (3720, "1h02m"),
    (273_600, "3d04h"), (Double.infinity, "unknown"),
]

@Suite struct HumanTests {
    @Test(arguments: byteCases)
    func bytes(_ v: UInt64, _ text: String) {
        #expect(Human.bytes(v) == text)
    }

    @Test func rates() {
        #expect(Human.rate(0) == "0 B/s")
        #expect(Human.rate(.nan) == "0 B/s")
        #expect(Human.rate(20 * 1_048_576) == "20 MiB/s")
        #expect(Human.rate(126_143_283) == "120.3 MiB/s")
    }

    @Test(arguments: etaCases)
    func eta(_ s: Double?, _ text: String) {
        #expect(Human.duration(seconds: s) == text)
    }

    @Test func milliseconds() {
        #expect(Human.milliseconds(500) == "500ms")
        #expect(Human.milliseconds(1000) == "1s")
        #expect(Human.milliseconds(90_000) == "1m30s")
        #expect(Human.milliseconds(120_000) == "2m")
        #expect(Human.milliseconds(1500) == "1500ms")
    }

    @Test func percent() {
        #expect(Human.percent(1, of: 3) == "33.3%")
        #expect(Human.percent(0, of: 0) == "100.0%")
    }
}

@Suite struct StatusFormattingTests {
    @Test func detailedHasSizesRateAndETA() {
        let text = StatusFormatter.detailed(sampleStatus(), now: Date(timeIntervalSince1970: 1_700_000_002))
        #expect(text.hasPrefix("vm1: hydrating, 42.9% (1.5 GiB of 3.5 GiB)"))
        #expect(text.contains("120.3 MiB/s, ETA 17s"))
        #expect(text.contains("1536 of 3584 hydrated, 4 in flight, 1 MiB each"))
        #expect(text.contains("42 commits, last 2s ago, took 3.2 ms"))
        #expect(text.contains("on: 1 GiB discarded, 200 MiB pending"))
        #expect(text.contains("rate limit 20 MiB/s, commit interval 1s"))
        #expect(text.contains("/var/lib/hydrationd/jobs/vm1.meta (rw)"))
        #expect(!text.contains("error"))
    }

    /// The i/o row: one line when source and destination agree, one entry per side otherwise,
    /// none when status has no io (a job whose devices are not open).
    @Test func detailedShowsIOMode() {
        var s = sampleStatus()
        #expect(!StatusFormatter.detailed(s).contains("i/o"))
        s.source.io = "direct"; s.source.ioReason = "io=auto: file source, 1.0 % allocated"
        s.dest.io = "direct"; s.dest.ioReason = "io=auto: file source, 1.0 % allocated"
        #expect(
            StatusFormatter.detailed(s).contains("\n  i/o         direct (io=auto: file source, 1.0 % allocated)\n"))
        s.dest.io = "buffered"
        s.dest.ioReason =
            "io=auto: file source, 1.0 % allocated, but the filesystem reports no direct-I/O alignment (STATX_DIOALIGN)"
        #expect(
            StatusFormatter.detailed(s).contains(
                "\n  i/o         source direct (io=auto: file source, 1.0 % allocated), dest buffered (io=auto: file source, 1.0 % allocated, but the filesystem reports no direct-I/O alignment (STATX_DIOALIGN))\n"
            ))
        s.source.io = nil; s.source.ioReason = nil
        #expect(StatusFormatter.detailed(s).contains("\n  i/o         dest buffered ("))
    }

    @Test func detailedShowsError() {
        let s = sampleStatus(state: .failed, error: .init(code: "SourceReadFailed", message: "read /dev/vg/src: EIO"))
        let text = StatusFormatter.detailed(s)
        #expect(text.contains("error       SourceReadFailed: read /dev/vg/src: EIO"))
        #expect(!text.contains("ETA"))
        let withWhere = sampleStatus(
            state: .failed,
            error: .init(code: "SourceReadFailed", message: "region 8: read failed", errno: 5, region: 8))
        #expect(
            StatusFormatter.detailed(withWhere).contains("SourceReadFailed: region 8: read failed (errno 5, region 8)"))
    }

    @Test func detailedShowsVerifyAndAMismatch() {
        var s = sampleStatus(
            state: .failed,
            error: .init(
                code: "DestinationMismatch", message: "region 3: …", region: 3, offset: 196_612,
                expectedDigest: "aa", foundDigest: "bb"))
        #expect(!StatusFormatter.detailed(s).contains("verify "))
        s.verify = .init(enabled: true, verifiedBytes: 3 << 20, mismatches: 1, readBack: "evicted")
        let text = StatusFormatter.detailed(s)
        #expect(
            text.contains(
                "\n  verify      on: 3 MiB read back and equal (page cache evicted, no O_DIRECT), 1 region(s) mismatched\n"
            ),
            "\(text)")
        #expect(
            text.contains(
                "DestinationMismatch: region 3: … (region 3, offset 196612, source sha256 aa, destination sha256 bb)"),
            "\(text)")
    }

    @Test func line() {
        #expect(
            StatusFormatter.line(sampleStatus())
                == "vm1  hydrating  42.9% (1.5 GiB of 3.5 GiB)  120.3 MiB/s  ETA 17s  discarded 1 GiB")
        #expect(
            StatusFormatter.line(sampleStatus(state: .complete, hydrated: 3584, discard: false))
                == "vm1  complete  100.0% (3.5 GiB of 3.5 GiB)")
    }

    @Test func progressBarFitsWidth() {
        for width in [40, 80, 120, 200] {
            let bar = StatusFormatter.progressBar(sampleStatus(), width: width)
            #expect(bar.count <= width)
            #expect(bar.hasPrefix("vm1 ["))
        }
        let bar = StatusFormatter.progressBar(sampleStatus(), width: 120)
        #expect(bar.contains("42.9%  120.3 MiB/s  ETA 17s  discarded 1 GiB  hydrating"))
        let cells = bar.split(separator: "[")[1].split(separator: "]")[0]
        #expect(cells.count == 50)
        #expect(cells.filter { $0 == "#" }.count == 21)  // 42.9% of 50
        let full = StatusFormatter.progressBar(sampleStatus(state: .complete, hydrated: 3584), width: 80)
        #expect(!full.split(separator: "[")[1].split(separator: "]")[0].contains("."))
    }

    @Test func tables() {
        let t = StatusFormatter.table([
            JobSummary(sampleStatus()), JobSummary(sampleStatus(name: "longer-name", discard: false)),
        ])
        let lines = t.split(separator: "\n")
        #expect(lines.count == 3)
        #expect(lines[0].hasPrefix("NAME         STATE"))
        #expect(lines[1].contains("42.9% (1536/3584)"))
        #expect(StatusFormatter.table([]) == "no jobs")
        #expect(StatusFormatter.statusTable([sampleStatus()]).contains("3.5 GiB  120.3 MiB/s  17s"))
    }
}

@Suite struct ExportFormattingTests {
    @Test func detailedShowsTheExportAndItsClients() {
        var s = sampleStatus()
        #expect(!StatusFormatter.detailed(s).contains("export"))
        s.export = .init(uri: "nbd+unix:///vm1?socket=/run/hydrationd/nbd.sock", clients: 1)
        #expect(
            StatusFormatter.detailed(s).contains(
                "  export      nbd+unix:///vm1?socket=/run/hydrationd/nbd.sock (1 client)\n"))
        s.export?.clients = 3
        #expect(StatusFormatter.detailed(s).contains("(3 clients)"))
    }

    @Test func exportInUseIsARefusal() {
        let e = VarlinkError.exportInUse("vm1", clients: 2, message: "m")
        let f = CloneFailure.from(e, socketPath: "/s")
        #expect(f.exit == .rejected)
        #expect(f.message.contains("2 clients"))
        #expect(f.message.contains("clonectl remove vm1 --force"))
    }
}

@Suite struct JSONOutputTests {
    /// `status --json` prints exactly the JobStatus object: every schema key, nulls included.
    @Test func statusJSONHasEverySchemaKey() throws {
        let text = try CloneJSON.string(sampleStatus(discard: false))
        let obj = try #require(try JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any])
        #expect(
            Set(obj.keys) == [
                "version", "name", "state", "source", "dest", "region_size", "regions", "bytes",
                "throughput_bytes_per_second", "eta_seconds", "commits", "discard", "space_budget_bytes", "settings",
                "metadata", "error", "export", "verify",
            ])
        #expect(obj["version"] as? Int == 1)
        #expect(obj["error"] is NSNull)
        #expect(obj["export"] is NSNull)
        #expect(obj["space_budget_bytes"] is NSNull)
        #expect(text.contains("\"/dev/vg/src\""))  // slashes unescaped
        let back = try JSONDecoder().decode(JobStatus.self, from: Data(text.utf8))
        #expect(back == sampleStatus(discard: false))
    }

    @Test func compactIsOneLine() throws {
        #expect(!(try CloneJSON.string([sampleStatus()], pretty: false)).contains("\n"))
    }

    @Test func dumpJSON() throws {
        let d = MetadataDump(
            path: "/m", formatVersion: 1, generation: 7, jobId: "id", regionSize: 65536, targetSizeBytes: 1 << 20,
            regionsTotal: 16, regionsHydrated: 5, pageCount: 1, discardSource: false, destZeroed: true,
            complete: false, source: .init(path: "/s", kind: "file", sizeBytes: 1 << 20, identity: "file dev=1 ino=2"),
            dest: .init(path: "/d", kind: "file", sizeBytes: 1 << 20, identity: "file dev=1 ino=3"),
            createdUnixMs: 0, committedUnixMs: 1000,
            recovery: .init(superblockSlot: 1, otherSlotProblem: nil, uncommittedPageSlots: 0, invalidPageSlots: 0),
            hydratedRanges: [.init(start: 0, count: 4), .init(start: 9, count: 1)])
        let obj = try #require(
            try JSONSerialization.jsonObject(with: Data(try CloneJSON.string(d).utf8)) as? [String: Any])
        #expect(obj["dump_version"] as? Int == 1)
        #expect((obj["hydrated_ranges"] as? [[String: Any]])?.count == 2)
        let human = MetadataFormatter.dump(d)
        #expect(human.contains("flags             dest_zeroed"))
        #expect(human.contains("  0-3\n  9"))
        #expect(human.contains("5 of 16 hydrated (31.2%)") || human.contains("5 of 16 hydrated (31.3%)"))
    }

    @Test func checkReport() {
        let ok = MetadataFormatter.check(
            MetadataReport(
                path: "/m", valid: true, version: 1, generation: 3,
                regionsTotal: 10, regionsHydrated: 10, complete: true))
        #expect(ok.hasPrefix("/m: OK, format version 1, generation 3, 10 of 10 regions hydrated (100.0%), complete"))
        let bad = MetadataFormatter.check(MetadataReport(path: "/m", valid: false, problems: ["bad magic"]))
        #expect(bad == "/m: INVALID\n  bad magic")
    }
}

@Suite struct ExitCodeTests {
    @Test func mapping() {
        #expect(CloneFailure.from(VarlinkError.noSuchJob("x"), socketPath: "/s").exit == .rejected)
        #expect(
            CloneFailure.from(VarlinkError.invalidParameter("dest", reason: "r"), socketPath: "/s").exit == .rejected)
        #expect(CloneFailure.from(VarlinkError.deviceInUse(path: "/d", job: "j"), socketPath: "/s").exit == .rejected)
        #expect(
            CloneFailure.from(VarlinkError.jobFailed("j", code: "c", message: "m"), socketPath: "/s").exit == .jobFailed
        )
        #expect(CloneFailure.from(VarlinkError.internalError("boom"), socketPath: "/s").exit == .software)
        let un = CloneFailure.from(
            VarlinkClientError.unreachable(path: "/run/x.sock", errno: 2), socketPath: "/run/x.sock")
        #expect(un.exit == .unavailable)
        #expect(un.message.contains("/run/x.sock"))
        #expect(un.message.contains("hydrationd --socket"))
        #expect(!un.message.contains("\n"))
        #expect(
            CloneExit.usage.rawValue == 64 && CloneExit.rejected.rawValue == 65 && CloneExit.unavailable.rawValue == 69)
    }

    @Test func messagesSayWhatToDo() {
        #expect(
            CloneFailure.from(VarlinkError.noSuchJob("x"), socketPath: "/s").message
                == "no job named 'x'; see 'clonectl list'")
        let inUse = VarlinkError.deviceInUse(path: "source /a is in use (locked)", job: "j")
        #expect(CloneFailure.from(inUse, socketPath: "/s").message.hasPrefix("source /a is in use (locked); "))
    }
}

/// clonectl formats without Foundation's `String(format:)` (it links FoundationEssentials only);
/// its replacement must print what `%.1f` prints.
@Suite struct TextWithoutFoundationTests {
    @Test func oneDecimalMatchesPrintf() {
        var values: [Double] = [
            0, -0.0, 0.04, 0.05, 0.15, 0.25, 0.35, 0.45, 1.25, 2.5, 3.25, 3.35, 99.95, 99.96, 100, -1.25, -0.04,
            1e6 + 0.05, 12345.67,
        ]
        var x = 0.0
        while x < 200 { values.append(x); x += 0.0125 }
        for i in 0..<20_000 {
            values.append(Double(i) / 1000 * 7.001)  // three decimals and their neighbours: near-ties
            values.append(Double(i) * 0.0314159265358979)  // arbitrary low bits
        }
        for v in values {
            #expect(Text.oneDecimal(v) == String(format: "%.1f", v), "value \(v)")
        }
    }

    @Test func paddedCutsOrPads() {
        #expect(Text.padded("abc", to: 5) == "abc  ")
        #expect(Text.padded("abcdef", to: 4) == "abcd")
        #expect(Text.padded("", to: 0) == "")
    }
}

/// `clonectl dump` prints metadata timestamps (integer milliseconds) exactly.
@Suite struct MetadataTimestampTests {
    @Test func millisecondsAreExact() {
        // Through a Double this one printed .736 (found comparing dumps of one file by two builds).
        #expect(MetadataFormatter.timestamp(1_795_989_414_737) == "2026-11-29T21:56:54.737Z")
        #expect(MetadataFormatter.timestamp(0) == "1970-01-01T00:00:00.000Z")
        #expect(MetadataFormatter.timestamp(1_795_989_414_999) == "2026-11-29T21:56:54.999Z")
        #expect(MetadataFormatter.timestamp(1_795_989_415_005) == "2026-11-29T21:56:55.005Z")
        #expect(MetadataFormatter.timestamp(-1) == "1969-12-31T23:59:59.999Z")
        // Every millisecond of a second, against Foundation's own formatter.
        let f = ISO8601DateFormatter()
        f.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
        for ms in Int64(1_795_989_414_000)..<1_795_989_415_000 {
            let want = f.string(from: Date(timeIntervalSince1970: TimeInterval(ms / 1000)))
                .replacingOccurrences(of: ".000Z", with: String(format: ".%03dZ", Int(ms % 1000)))
            #expect(MetadataFormatter.timestamp(ms) == want)
        }
    }
}
