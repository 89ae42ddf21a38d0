import Foundation
import HydrationStorage
import Logging
import Synchronization
import Testing

/// A temporary directory removed when the value is dropped.
package final class TempDir {
    package let path: String
    package init(_ tag: String = "hyd") {
        let base = ProcessInfo.processInfo.environment["HYDRATION_TEST_TMP"] ?? "/var/tmp"
        path = base + "/\(tag)-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try! FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }
    deinit { try? FileManager.default.removeItem(atPath: path) }
    package func file(_ name: String) -> String { path + "/" + name }
}

/// Deterministic pseudo-random bytes (SplitMix64), so a failing test reproduces.
package struct SeededRandom: RandomNumberGenerator {
    package var state: UInt64
    package init(seed: UInt64) { state = seed }
    package mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
    package mutating func fill(_ buf: inout [UInt8], _ range: Range<Int>) {
        var i = range.lowerBound
        while i < range.upperBound {
            var v = next()
            for _ in 0..<8 where i < range.upperBound {
                buf[i] = UInt8(truncatingIfNeeded: v)
                v >>= 8
                i += 1
            }
        }
    }
}

/// An image with random data, zero-filled runs and (when written as a sparse file) holes.
/// Layout per 1 MiB chunk, by chunk index mod 4: data, hole, data, zeros — plus a short tail.
package struct TestImage {
    package var bytes: [UInt8]
    /// Ranges that should be holes in the file.
    package var holes: [Range<Int>]

    package init(bytes: [UInt8], holes: [Range<Int>]) {
        self.bytes = bytes
        self.holes = holes
    }

    package static func make(size: Int, seed: UInt64, chunk: Int = 1 << 20) -> TestImage {
        var rng = SeededRandom(seed: seed)
        var b = [UInt8](repeating: 0, count: size)
        var holes: [Range<Int>] = []
        var off = 0
        var i = 0
        while off < size {
            let end = min(size, off + chunk)
            switch i % 4 {
            case 0, 2: rng.fill(&b, off..<end)
            case 1: holes.append(off..<end)
            default: break  // allocated zeros
            }
            off = end
            i += 1
        }
        return TestImage(bytes: b, holes: holes)
    }

    /// Writes it as a sparse file: holes are skipped, zero runs are written as real zeros.
    package func write(to path: String) throws {
        _ = FileManager.default.createFile(atPath: path, contents: nil)
        let fh = try FileHandle(forWritingTo: URL(fileURLWithPath: path))
        defer { try? fh.close() }
        var off = 0
        for h in holes + [bytes.count..<bytes.count] {
            if off < h.lowerBound {
                try fh.seek(toOffset: UInt64(off))
                try fh.write(contentsOf: bytes[off..<h.lowerBound])
            }
            off = h.upperBound
        }
        try fh.truncate(atOffset: UInt64(bytes.count))
        try fh.synchronize()
    }
}

package func allocatedBytes(_ path: String) -> UInt64 {
    var st = stat()
    guard stat(path, &st) == 0 else { return 0 }
    return UInt64(st.st_blocks) * 512
}

package func readFile(_ path: String) -> [UInt8] {
    [UInt8](FileManager.default.contents(atPath: path) ?? Data())
}

package let testLogger: Logger = {
    var l = Logger(label: "test")
    l.logLevel = .warning
    return l
}()

/// Polls `condition` until it holds or `seconds` pass. The deadline is a liveness guard for a
/// state the test holds deterministically, never a timing claim: generous, so that a slow or
/// busy machine changes how long a test takes, not its verdict.
package func eventually(_ seconds: Double = 120, _ condition: () async -> Bool) async -> Bool {
    let deadline = Date().addingTimeInterval(seconds)
    while Date() < deadline {
        if await condition() { return true }
        try? await Task.sleep(nanoseconds: 10_000_000)
    }
    return await condition()
}

/// Compares byte arrays for `#expect` without letting Swift Testing diff them: on failure it
/// computes a collection difference of both operands, which for two multi-megabyte images runs
/// for hours (a failing test then hangs CI instead of failing). nil when equal, else where the
/// arrays first differ.
package func byteDifference(_ a: [UInt8]?, _ b: [UInt8]?) -> String? {
    guard let a, let b else { return a == nil && b == nil ? nil : "one side is missing" }
    if a == b { return nil }
    if a.count != b.count { return "sizes differ: \(a.count) and \(b.count) bytes" }
    let i = a.indices.first { a[$0] != b[$0] } ?? 0
    return "first difference at byte \(i) (4 KiB block \(i / 4096))"
}
