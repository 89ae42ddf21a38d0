import ControlProtocol
import Foundation
import HydrationMetrics
import Logging
import NIOCore
import NIOPosix
import Testing

func status(
    _ name: String, state: JobStatus.State = .hydrating, total: UInt64 = 1 << 30, hydrated: UInt64 = 3 << 20,
    committed: UInt64 = 2 << 20, released: UInt64 = 1 << 20, source: String = "/dev/sdz",
    error: JobStatus.ErrorInfo? = nil, export: JobStatus.Export? = nil
) -> JobStatus {
    JobStatus(
        name: name, state: state, source: .init(path: source, sizeBytes: total), dest: .init(path: "/dev/sdy"),
        regionSize: 1 << 20, regions: .init(total: total >> 20, hydrated: hydrated >> 20, hydrating: 0),
        bytes: .init(total: total, hydrated: hydrated, committed: committed, skippedZero: 0, discarded: released),
        throughputBytesPerSecond: 0, etaSeconds: nil,
        commits: .init(count: 7, lastUnixMs: 1_700_000_000_000, lastDurationMs: 2.5),
        discard: .init(enabled: true, pendingBytes: committed - released, failed: 0), spaceBudgetBytes: nil,
        settings: .init(threshold: 4, batchSize: 8, rateLimitBytesPerSecond: nil, commitIntervalMs: 1000),
        metadata: .init(path: "/var/lib/m", mode: .rw), error: error, export: export)
}

/// The sample lines (name{labels} value) of an exposition, comments left out.
func samples(_ bytes: [UInt8]) -> [String: String] {
    var out: [String: String] = [:]
    for line in String(decoding: bytes, as: UTF8.self).split(separator: "\n") where !line.hasPrefix("#") {
        guard let sp = line.lastIndex(of: " ") else { continue }
        out[String(line[..<sp])] = String(line[line.index(after: sp)...])
    }
    return out
}

@Suite struct MetricsExpositionTests {
    @Test func jobGaugesAreTheStatusNumbers() {
        let s = samples(MetricsExposition.render(jobs: [status("a")]))
        #expect(s[#"hydrationd_job_size_bytes{job="a"}"#] == "1073741824.0")
        #expect(s[#"hydrationd_job_hydrated_bytes{job="a"}"#] == "3145728.0")
        #expect(s[#"hydrationd_job_committed_bytes{job="a"}"#] == "2097152.0")
        #expect(s[#"hydrationd_job_released_bytes{job="a"}"#] == "1048576.0")
        #expect(s[#"hydrationd_job_commits_total{job="a"}"#] == "7")
        #expect(s[#"hydrationd_job_last_commit_duration_seconds{job="a"}"#] == "0.0025")
    }

    @Test func stateIsOneHotAndCountedDaemonWide() {
        let s = samples(MetricsExposition.render(jobs: [status("a", state: .paused), status("b", state: .paused)]))
        for state in JobStatus.State.allCases {
            #expect(
                s[#"hydrationd_job_state{job="a",state="\#(state.rawValue)"}"#] == (state == .paused ? "1.0" : "0.0"))
            #expect(s[#"hydrationd_jobs{state="\#(state.rawValue)"}"#] == (state == .paused ? "2.0" : "0.0"))
        }
    }

    @Test func aRemovedJobHasNoSeries() {
        let before = MetricsExposition.render(jobs: [status("a"), status("gone")])
        #expect(String(decoding: before, as: UTF8.self).contains(#"job="gone""#))
        let after = MetricsExposition.render(jobs: [status("a")])
        #expect(!String(decoding: after, as: UTF8.self).contains(#"job="gone""#))
    }

    @Test func errorsRemoteSourceAndExport() {
        let e = JobStatus.ErrorInfo(code: "SourceUnavailable", message: "down")
        let x = JobStatus.Export(
            uri: "nbd+unix:///r?socket=/run/n", clients: 2,
            io: .init(readBytes: 4096, writtenBytes: 512, trimmedBytes: 0, hydratedRegions: 1))
        let s = samples(
            MetricsExposition.render(jobs: [status("r", state: .paused, source: "nbd://host/x", error: e, export: x)]))
        #expect(s[#"hydrationd_job_error{job="r",code="SourceUnavailable"}"#] == "1.0")
        #expect(s[#"hydrationd_job_source_available{job="r"}"#] == "0.0")
        #expect(s[#"hydrationd_job_export_clients{job="r"}"#] == "2.0")
        #expect(s[#"hydrationd_job_export_read_bytes_total{job="r"}"#] == "4096")
        // A local source has no availability series, a job without an error no error series.
        let local = samples(MetricsExposition.render(jobs: [status("l")]))
        #expect(
            !local.keys.contains {
                $0.hasPrefix("hydrationd_job_source_available") || $0.hasPrefix("hydrationd_job_error")
            })
    }

    @Test func everyFamilyHasHelpAndType() {
        let text = String(decoding: MetricsExposition.render(jobs: [status("a")]), as: UTF8.self)
        let names = Set(samples(Array(text.utf8)).keys.map { String($0.prefix { $0 != "{" }) })
        for n in names {
            #expect(text.contains("# TYPE \(n) "), "no TYPE for \(n)")
            #expect(text.contains("# HELP \(n) "), "no HELP for \(n)")
        }
    }

    @Test func commitDurationsAreAHistogram() {
        let h = DurationHistogramSnapshot(boundsSeconds: [0.01, 0.1], counts: [2, 1, 1], sumSeconds: 1.5)
        let m = JobMetrics(status: status("a\"b"), copiedBytes: 4096, commitDurations: h)
        let text = String(decoding: MetricsExposition.render([m]), as: UTF8.self)
        #expect(text.contains("# TYPE hydrationd_job_commit_duration_seconds histogram\n"))
        let s = samples(Array(text.utf8))
        #expect(s[#"hydrationd_job_commit_duration_seconds_bucket{job="a\"b",le="0.01"}"#] == "2")
        #expect(s[#"hydrationd_job_commit_duration_seconds_bucket{job="a\"b",le="0.1"}"#] == "3")
        #expect(s[#"hydrationd_job_commit_duration_seconds_bucket{job="a\"b",le="+Inf"}"#] == "4")
        #expect(s[#"hydrationd_job_commit_duration_seconds_count{job="a\"b"}"#] == "4")
        #expect(s[#"hydrationd_job_commit_duration_seconds_sum{job="a\"b"}"#] == "1.5")
        #expect(s[#"hydrationd_job_copied_bytes_total{job="a\"b"}"#] == "4096")
    }

    @Test func listenAddresses() throws {
        #expect(try MetricsListenAddress.parse("9100") == .init(host: "127.0.0.1", port: 9100))
        #expect(try MetricsListenAddress.parse("0.0.0.0:9100") == .init(host: "0.0.0.0", port: 9100))
        #expect(try MetricsListenAddress.parse("[::1]:9100") == .init(host: "::1", port: 9100))
        for bad in ["", "x:1", "localhost:9100", "1.2.3.4:0", "1.2.3.4:70000", "[::1]9100", "[zz]:1", "9100x"] {
            #expect(throws: MetricsError.self, "\(bad)") { try MetricsListenAddress.parse(bad) }
        }
    }
}

/// The HTTP server, with a real TCP client (URLSession would bring Foundation networking; a plain
/// socket keeps the exchange visible).
@Suite struct MetricsServerTests {
    func exchange(_ port: Int, _ request: String) throws -> String {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        #expect(fd >= 0)
        defer { close(fd) }
        var tv = timeval(tv_sec: 60, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = in_port_t(UInt16(port).bigEndian)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
            }
        }
        #expect(rc == 0)
        _ = request.withCString { send(fd, $0, strlen($0), 0) }
        var out: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = recv(fd, &buf, buf.count, 0)
            if n <= 0 { break }
            out += buf[0..<n]
        }
        return String(decoding: out, as: UTF8.self)
    }

    @Test func servesMetricsAnd404sElsewhere() async throws {
        let server = try await MetricsServer.start(
            address: .init(host: "127.0.0.1", port: 0), logger: Logger(label: "test")
        ) { MetricsExposition.render(jobs: [status("a")]) }
        defer { server.close() }
        let port = server.boundPort
        let ok = try await Task.detached { try self.exchange(port, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n") }.value
        #expect(ok.hasPrefix("HTTP/1.1 200 OK"))
        #expect(ok.contains("text/plain; version=0.0.4"))
        #expect(ok.contains(#"hydrationd_job_hydrated_bytes{job="a"} 3145728.0"#))
        let missing = try await Task.detached { try self.exchange(port, "GET /other HTTP/1.1\r\nHost: x\r\n\r\n") }
            .value
        #expect(missing.hasPrefix("HTTP/1.1 404"))
        let post = try await Task.detached {
            try self.exchange(port, "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        }.value
        #expect(post.hasPrefix("HTTP/1.1 405"))
    }

    @Test func aSilentClientIsCutAtTheDeadline() async throws {
        // A deadline of one second: the client that never sends its request is closed by the
        // server (recv returns 0) long before the test's own 60 s receive timeout.
        let server = try await MetricsServer.start(
            address: .init(host: "127.0.0.1", port: 0), limits: .init(connections: 2, deadline: .seconds(1)),
            logger: Logger(label: "test")
        ) { [] }
        defer { server.close() }
        let port = server.boundPort
        let started = ContinuousClock.now
        let reply = try await Task.detached { try self.exchange(port, "") }.value
        #expect(reply.isEmpty)
        #expect(ContinuousClock.now - started < .seconds(59), "the server did not cut the idle client")
    }

    @Test func aBusyAddressIsANamedError() async throws {
        let first = try await MetricsServer.start(
            address: .init(host: "127.0.0.1", port: 0), logger: Logger(label: "t")
        ) { [] }
        defer { first.close() }
        await #expect(throws: MetricsError.self) {
            _ = try await MetricsServer.start(
                address: .init(host: "127.0.0.1", port: first.boundPort), logger: Logger(label: "t")
            ) { [] }
        }
    }
}
