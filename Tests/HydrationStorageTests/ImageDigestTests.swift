import Crypto
import FoundationEssentials
import Testing

@testable import HydrationStorage

#if canImport(Glibc)
    import Glibc
#endif

/// The construction of docs/digest.md written out plainly, with SHA-256 straight from
/// swift-crypto: every leaf hashed (no zero shortcut), the split found by doubling.
enum ReferenceDigest {
    static func sha(_ parts: [[UInt8]]) -> [UInt8] {
        var h = SHA256()
        for p in parts { h.update(data: p) }
        return Array(h.finalize())
    }

    static func leaves(_ data: [UInt8]) -> [[UInt8]] {
        let n = max(1, (data.count + 4095) / 4096)
        return (0..<n).map { i in sha([[0], Array(data[min(i * 4096, data.count)..<min((i + 1) * 4096, data.count)])]) }
    }

    static func tree(_ h: ArraySlice<[UInt8]>) -> [UInt8] {
        if h.count == 1 { return h.first! }
        var p = 1
        while p * 2 < h.count { p *= 2 }
        let mid = h.startIndex + p
        return sha([[1], tree(h[h.startIndex..<mid]), tree(h[mid...])])
    }

    static func root(_ data: [UInt8]) -> [UInt8] { tree(leaves(data)[...]) }

    static func image(_ data: [UInt8]) -> [UInt8] {
        var size = UInt64(data.count).littleEndian
        let le = withUnsafeBytes(of: &size) { Array($0) }
        return sha([[2], le, root(data)])
    }
}

/// A deterministic generator, so a failure is reproducible.
struct SplitMix: RandomNumberGenerator {
    var state: UInt64
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// An image of `size` bytes: random 4 KiB blocks, with every third 64 KiB stretch zero (data
/// that is zero, not a hole) and a few lone zero leaves.
func testImage(size: Int, seed: UInt64 = 1) -> [UInt8] {
    var rng = SplitMix(state: seed)
    var data = [UInt8](repeating: 0, count: size)
    for i in 0..<size where (i / 65536) % 3 != 1 && (i / 4096) % 7 != 3 {
        data[i] = UInt8(truncatingIfNeeded: rng.next())
    }
    return data
}

func subtreeDigest(_ data: [UInt8], _ range: Range<Int>) -> ImageDigest.Hash {
    data.withUnsafeBytes { ImageDigest.subtree(of: UnsafeRawBufferPointer(rebasing: $0[range])) }
}

func digestByRegions(_ data: [UInt8], regionSize: Int, order: (inout [Int]) -> Void) throws -> ImageDigest.Hash {
    var acc = ImageDigestAccumulator(size: UInt64(data.count))
    var regions = Array(0..<max(1, (data.count + regionSize - 1) / regionSize))
    order(&regions)
    for k in regions {
        let r = (k * regionSize)..<min((k + 1) * regionSize, data.count)
        try acc.insert(offset: UInt64(r.lowerBound), length: UInt64(r.count), digest: subtreeDigest(data, r))
    }
    return try acc.finalize()
}

@Suite struct ImageDigestTests {
    static let sizes = [
        0, 1, 100, 4095, 4096, 4097, 8192, 3 * 4096, 5 * 4096 + 7, 9 * 4096, 65536 + 4096, 1 << 20 | 123,
    ]

    @Test(arguments: sizes) func wholeImageMatchesTheReference(size: Int) throws {
        let data = testImage(size: size)
        let root = subtreeDigest(data, 0..<data.count)
        #expect(root.bytes == ReferenceDigest.root(data))
        #expect(ImageDigest.image(size: UInt64(size), root: root).bytes == ReferenceDigest.image(data))
    }

    @Test func emptyImageRootIsSHA256OfZeroByte() {
        let root = subtreeDigest([], 0..<0)
        #expect(root.bytes == Array(SHA256.hash(data: [UInt8(0)])))
    }

    /// The same image gives the same digest whatever the region size and insertion order.
    @Test(arguments: [4096, 65536, 1 << 20]) func regionSizesAndOrderDoNotMatter(regionSize: Int) throws {
        for size in [3 << 20 | 5000, 1 << 20, 70_000, 1000] {
            let data = testImage(size: size, seed: UInt64(size))
            let expected = ReferenceDigest.image(data)
            #expect(try digestByRegions(data, regionSize: regionSize) { _ in }.bytes == expected)
            var rng = SplitMix(state: 42)
            #expect(try digestByRegions(data, regionSize: regionSize) { $0.shuffle(using: &rng) }.bytes == expected)
            #expect(try digestByRegions(data, regionSize: regionSize) { $0.reverse() }.bytes == expected)
        }
    }

    @Test func zeroSubtreesEqualHashingZeros() throws {
        for k in 0...9 {
            let zeros = [UInt8](repeating: 0, count: 4096 << k)
            #expect(ImageDigest.zeroSubtree(level: k).bytes == ReferenceDigest.root(zeros))
        }
        for (count, last) in [(1, 0), (1, 100), (3, 4096), (5, 1), (6, 4095), (9, 4096), (1000, 17)] {
            let zeros = [UInt8](repeating: 0, count: (count - 1) * 4096 + last)
            #expect(
                ImageDigest.zeroNode(count: UInt64(count), lastLeafBytes: last).bytes == ReferenceDigest.root(zeros))
        }
        // Whole images of zeros inserted as holes, in pieces and at once.
        for size in [0, 5, 4096, 4097, 12288 + 1, 1 << 20, (1 << 20) + 4096 * 3 + 9] {
            let zeros = [UInt8](repeating: 0, count: size)
            var whole = ImageDigestAccumulator(size: UInt64(size))
            try whole.insertZeros(offset: 0, length: UInt64(size))
            #expect(try whole.finalize().bytes == ReferenceDigest.image(zeros))
            guard size > 8192 else { continue }
            var pieces = ImageDigestAccumulator(size: UInt64(size))
            try pieces.insertZeros(offset: 4096, length: UInt64(size - 4096))
            try pieces.insertZeros(offset: 0, length: 4096)
            #expect(try pieces.finalize().bytes == ReferenceDigest.image(zeros))
        }
    }

    /// Holes mixed with data regions, out of order.
    @Test func holesAmongRegions() throws {
        var data = testImage(size: 2 << 20 | 777, seed: 9)
        for i in (256 << 10)..<(1 << 20) { data[i] = 0 }
        var acc = ImageDigestAccumulator(size: UInt64(data.count))
        try acc.insertZeros(offset: 256 << 10, length: (1 << 20) - (256 << 10))
        for r in [(1 << 20)..<data.count, 0..<(256 << 10)] {
            for start in stride(from: r.lowerBound, to: r.upperBound, by: 65536).reversed() {
                let rr = start..<min(start + 65536, r.upperBound)
                try acc.insert(offset: UInt64(start), length: UInt64(rr.count), digest: subtreeDigest(data, rr))
            }
        }
        #expect(try acc.finalize().bytes == ReferenceDigest.image(data))
    }

    @Test func stateRoundTrips() throws {
        let data = testImage(size: 3 << 20 | 99, seed: 5)
        var acc = ImageDigestAccumulator(size: UInt64(data.count))
        var regions = Array(0..<((data.count + 65535) / 65536))
        var rng = SplitMix(state: 7)
        regions.shuffle(using: &rng)
        func insert(_ k: Int, into a: inout ImageDigestAccumulator) throws {
            let r = (k * 65536)..<min((k + 1) * 65536, data.count)
            try a.insert(offset: UInt64(r.lowerBound), length: UInt64(r.count), digest: subtreeDigest(data, r))
        }
        for k in regions.prefix(regions.count / 2) { try insert(k, into: &acc) }
        #expect(!acc.isComplete)
        let bytes = acc.serialized()
        #expect(bytes.count == ImageDigestAccumulator.serializedSize(pending: acc.pending.count))
        var restored = try ImageDigestAccumulator(serialized: bytes)
        #expect(restored == acc)
        let json = try JSONDecoder().decode(ImageDigestAccumulator.self, from: JSONEncoder().encode(acc))
        #expect(json == acc)
        for k in regions.dropFirst(regions.count / 2) { try insert(k, into: &restored) }
        #expect(try restored.finalize().bytes == ReferenceDigest.image(data))

        // Damaged states are refused.
        #expect(throws: ImageDigestError.self) { try ImageDigestAccumulator(serialized: Array(bytes.dropLast())) }
        var badMagic = bytes
        badMagic[0] = 0
        #expect(throws: ImageDigestError.self) { try ImageDigestAccumulator(serialized: badMagic) }
        if acc.pending.count > 0 {
            var notNode = bytes
            notNode[20] ^= 1  // the first entry's start leaf
            #expect(throws: ImageDigestError.self) { try ImageDigestAccumulator(serialized: notNode) }
        }
    }

    /// In increasing order the state stays at most one subtree per level.
    @Test func inOrderStateIsLogarithmic() throws {
        let leaves = 1000
        var acc = ImageDigestAccumulator(size: UInt64(leaves * 4096 - 1))
        var most = 0
        for k in 0..<leaves {
            let len = k == leaves - 1 ? 4095 : 4096
            try acc.insert(offset: UInt64(k * 4096), length: UInt64(len), digest: ImageDigest.zeroSubtree(level: 0))
            most = max(most, acc.pending.count)
        }
        #expect(most <= 10)  // ceil(log2(1000))
        #expect(acc.isComplete)
    }

    @Test func refusesRangesThatAreNotNodes() throws {
        var acc = ImageDigestAccumulator(size: 10 * 4096 + 5)
        let z = ImageDigest.zeroSubtree(level: 0)
        func refused(_ o: Int, _ l: Int, _ kind: ImageDigestError.Kind) {
            do {
                try acc.insert(offset: UInt64(o), length: UInt64(l), digest: z)
                Issue.record("[\(o), \(o + l)) was accepted")
            } catch {
                #expect(error.kind == kind, "[\(o), \(o + l)): \(error)")
            }
        }
        refused(100, 4096, .notANode)  // unaligned
        refused(4096, 8192, .notANode)  // two leaves starting at an odd leaf
        refused(0, 3 * 4096, .notANode)  // three leaves: not a power of two
        refused(8 * 4096, 4 * 4096, .notANode)  // past the end
        refused(10 * 4096, 4096, .notANode)  // past the end (the last leaf is 5 bytes)
        try acc.insert(offset: 8 * 4096, length: 2 * 4096 + 5, digest: z)  // the tail of 16K regions
        try acc.insert(offset: 0, length: 4096, digest: z)
        refused(0, 4096, .overlap)
        refused(0, 8192, .overlap)
        refused(8 * 4096, 4096, .overlap)
        #expect(throws: ImageDigestError.self) { try acc.finalize() }
    }

    /// A real sparse file: holes are not read (even inside a chunk that holds data), zero data is,
    /// and both give the reference digest.
    @Test func deviceDigestOfASparseFile() throws {
        let dir = String(cString: mkdtemp(strdup("/tmp/imagedigest.XXXXXX"))!)
        defer { _ = system("rm -rf '\(dir)'") }
        let path = dir + "/image"
        let size = 5 << 20 | 1234
        var data = testImage(size: size, seed: 3)
        for i in (1 << 20)..<(3 << 20) { data[i] = 0 }  // becomes a hole...
        let island = (3 << 19)..<((3 << 19) + 8192)  // ...but for 8 KiB inside a chunk
        for i in island { data[i] = 0xA5 }
        let fd = open(path, O_CREAT | O_WRONLY, 0o600)
        #expect(ftruncate(fd, off_t(size)) == 0)
        for r in [0..<(1 << 20), island, (3 << 20)..<size] {
            _ = data.withUnsafeBytes { pwrite(fd, $0.baseAddress! + r.lowerBound, r.count, off_t(r.lowerBound)) }
        }
        close(fd)
        let device = try PosixStorage(remote: nil).open(path, mode: .readOnly)
        defer { device.close() }
        for threads in [1, 3] {
            let r = try ImageDigest.digest(of: device, threads: threads, chunkBytes: 1 << 20)
            #expect(r.digest.bytes == ReferenceDigest.image(data))
            // Only the data is read, the island without the rest of its chunk.
            #expect(r.bytesSkipped == (2 << 20) - 8192)
            #expect(r.bytesRead == UInt64(size) - (2 << 20) + 8192)
        }
    }

    @Test func hashHexRoundTrips() {
        let z = ImageDigest.zeroSubtree(level: 3)
        #expect(ImageDigest.Hash(hex: z.hex) == z)
        #expect(ImageDigest.Hash(hex: z.hex.uppercased()) == z)
        #expect(ImageDigest.Hash(hex: "xyz") == nil)
        #expect(ImageDigest.format(z).hasPrefix("hyd1:"))
    }
}
