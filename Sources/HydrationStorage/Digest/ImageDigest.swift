import Crypto

/// The image digest (`hyd1:`): a Merkle tree of SHA-256 over 4 KiB leaves, the same for an image
/// whatever region size a job used, computable region by region in any order, with holes and
/// zero runs costing no hashing. The construction, its rationale and a worked example are in
/// docs/digest.md; what follows implements it, nothing more.
///
/// - leaf i = bytes [i*4096, min((i+1)*4096, size)); an empty image has one empty leaf;
///   leaf digest = SHA-256(0x00 || leaf bytes);
/// - a range of m > 1 leaves splits into the largest power of two strictly less than m on the
///   left and the rest on the right (left-complete, as BLAKE3); node = SHA-256(0x01 || L || R);
/// - image digest = SHA-256(0x02 || size as UInt64 little-endian || root).
public enum ImageDigest {
    /// Bytes per leaf: the smallest region size, so every region is a subtree.
    public static let leafSize = 4096
    /// The printed digest's prefix: names the construction (and its version).
    public static let prefix = "hyd1:"

    /// A SHA-256 value (a leaf, a node, a root or an image digest).
    public struct Hash: Hashable, Sendable, CustomStringConvertible, Codable {
        /// The 32 bytes, in SHA-256's output order, as four words loaded in memory order.
        private var w0: UInt64, w1: UInt64, w2: UInt64, w3: UInt64

        public init(_ bytes: UnsafeRawBufferPointer) {
            precondition(bytes.count == 32, "a SHA-256 value is 32 bytes")
            w0 = bytes.loadUnaligned(fromByteOffset: 0, as: UInt64.self)
            w1 = bytes.loadUnaligned(fromByteOffset: 8, as: UInt64.self)
            w2 = bytes.loadUnaligned(fromByteOffset: 16, as: UInt64.self)
            w3 = bytes.loadUnaligned(fromByteOffset: 24, as: UInt64.self)
        }

        /// From 32 bytes; nil for any other count.
        public init?(bytes: [UInt8]) {
            guard bytes.count == 32 else { return nil }
            self = bytes.withUnsafeBytes { Hash($0) }
        }

        /// From 64 hex digits (either case); nil otherwise.
        public init?(hex: String) {
            let digits = Array(hex.utf8)
            guard digits.count == 64 else { return nil }
            var out = [UInt8](repeating: 0, count: 32)
            for i in 0..<32 {
                guard let hi = Hash.nibble(digits[2 * i]), let lo = Hash.nibble(digits[2 * i + 1]) else { return nil }
                out[i] = hi << 4 | lo
            }
            self.init(bytes: out)
        }

        init(_ digest: SHA256.Digest) {
            self = digest.withUnsafeBytes { Hash($0) }
        }

        public func withUnsafeBytes<R>(_ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
            var words = (w0, w1, w2, w3)
            return try Swift.withUnsafeBytes(of: &words) { try body($0) }
        }

        public var bytes: [UInt8] { withUnsafeBytes { Array($0) } }

        /// Lowercase hex, 64 digits.
        public var hex: String {
            let table = Array("0123456789abcdef".utf8)
            var out = [UInt8]()
            out.reserveCapacity(64)
            withUnsafeBytes { raw in
                for b in raw {
                    out.append(table[Int(b >> 4)])
                    out.append(table[Int(b & 15)])
                }
            }
            return String(decoding: out, as: UTF8.self)
        }

        public var description: String { hex }

        public init(from decoder: any Decoder) throws {
            let s = try decoder.singleValueContainer().decode(String.self)
            guard let h = Hash(hex: s) else {
                throw DecodingError.dataCorrupted(
                    .init(codingPath: decoder.codingPath, debugDescription: "not 64 hex digits: \(s)"))
            }
            self = h
        }

        public func encode(to encoder: any Encoder) throws {
            var c = encoder.singleValueContainer()
            try c.encode(hex)
        }

        private static func nibble(_ c: UInt8) -> UInt8? {
            switch c {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): return c - UInt8(ascii: "0")
            case UInt8(ascii: "a")...UInt8(ascii: "f"): return c - UInt8(ascii: "a") + 10
            case UInt8(ascii: "A")...UInt8(ascii: "F"): return c - UInt8(ascii: "A") + 10
            default: return nil
            }
        }
    }

    // MARK: - The three hashes

    /// SHA-256(0x00 || bytes): a leaf of at most `leafSize` bytes.
    public static func leaf(_ bytes: UnsafeRawBufferPointer) -> Hash {
        precondition(bytes.count <= leafSize, "a leaf is at most \(leafSize) bytes")
        var h = SHA256()
        withUnsafeBytes(of: UInt8(0)) { h.update(bufferPointer: $0) }
        h.update(bufferPointer: bytes)
        return Hash(h.finalize())
    }

    /// SHA-256(0x01 || left || right): an inner node.
    public static func node(_ left: Hash, _ right: Hash) -> Hash {
        var h = SHA256()
        withUnsafeBytes(of: UInt8(1)) { h.update(bufferPointer: $0) }
        left.withUnsafeBytes { h.update(bufferPointer: $0) }
        right.withUnsafeBytes { h.update(bufferPointer: $0) }
        return Hash(h.finalize())
    }

    /// SHA-256(0x02 || size as UInt64 little-endian || root): the image digest.
    public static func image(size: UInt64, root: Hash) -> Hash {
        var h = SHA256()
        withUnsafeBytes(of: UInt8(2)) { h.update(bufferPointer: $0) }
        withUnsafeBytes(of: size.littleEndian) { h.update(bufferPointer: $0) }
        root.withUnsafeBytes { h.update(bufferPointer: $0) }
        return Hash(h.finalize())
    }

    /// `hyd1:` and the lowercase hex of an image digest.
    public static func format(_ digest: Hash) -> String { prefix + digest.hex }

    // MARK: - Zero subtrees

    /// Z(k): the digest of 2^k full zero leaves. Z(0) = leaf(4096 zeros), Z(k) = node(Z(k-1), Z(k-1)).
    /// 53 levels cover 2^64 bytes.
    public static let zeroLevels: [Hash] = {
        var levels = [Hash]()
        let zeros = [UInt8](repeating: 0, count: leafSize)
        var z = zeros.withUnsafeBytes { leaf($0) }
        levels.append(z)
        for _ in 1...52 {
            z = node(z, z)
            levels.append(z)
        }
        return levels
    }()

    /// The digest of 2^level full zero leaves, without hashing.
    public static func zeroSubtree(level: Int) -> Hash { zeroLevels[level] }

    // MARK: - Tree shape

    /// Leaves of an image of `size` bytes: ceil(size / 4096), and 1 (an empty leaf) when empty.
    public static func leafCount(size: UInt64) -> UInt64 {
        size == 0 ? 1 : (size - 1) / UInt64(leafSize) + 1
    }

    /// Where a range of `count` > 1 leaves splits: the largest power of two strictly less than it.
    public static func split(_ count: UInt64) -> UInt64 {
        precondition(count > 1)
        return 1 << (63 - UInt64((count - 1).leadingZeroBitCount))
    }

    // MARK: - Subtrees from bytes

    /// The subtree digest of `bytes` taken as a node's leaves: the left-complete tree over
    /// ceil(count / 4096) leaves (one empty leaf when `bytes` is empty). A region's digest is
    /// this over the region's bytes (the image's last region may be short). All-zero full leaves
    /// are not hashed (Z(0)); two zero siblings give Z(k+1) without hashing.
    public static func subtree(of bytes: UnsafeRawBufferPointer) -> Hash {
        let count = bytes.count == 0 ? 1 : UInt64((bytes.count - 1) / leafSize + 1)
        return subtree(bytes, first: 0, count: count).hash
    }

    /// (digest, zero level when the subtree is 2^level full zero leaves).
    private static func subtree(_ bytes: UnsafeRawBufferPointer, first: UInt64, count: UInt64) -> (
        hash: Hash, zeroLevel: Int?
    ) {
        if count == 1 {
            let start = Int(first) * leafSize
            let end = min(start + leafSize, bytes.count)
            let leafBytes = UnsafeRawBufferPointer(rebasing: bytes[start..<end])
            if leafBytes.count == leafSize && isAllZero(leafBytes) { return (zeroLevels[0], 0) }
            return (leaf(leafBytes), nil)
        }
        let p = split(count)
        let l = subtree(bytes, first: first, count: p)
        let r = subtree(bytes, first: first + p, count: count - p)
        if let lz = l.zeroLevel, let rz = r.zeroLevel, lz == rz, count == 2 * p {
            return (zeroLevels[lz + 1], lz + 1)
        }
        return (node(l.hash, r.hash), nil)
    }

    /// The digest of the node made of `count` leaves of zeros whose last leaf has `lastLeafBytes`
    /// bytes (4096 but for an image's short last leaf): Z(k) when it is 2^k full leaves, else
    /// O(log count) hashes.
    public static func zeroNode(count: UInt64, lastLeafBytes: Int) -> Hash {
        precondition(count >= 1 && lastLeafBytes >= 0 && lastLeafBytes <= leafSize)
        if lastLeafBytes == leafSize && count & (count - 1) == 0 {
            return zeroLevels[count.trailingZeroBitCount]
        }
        if count == 1 {
            let zeros = [UInt8](repeating: 0, count: lastLeafBytes)
            return zeros.withUnsafeBytes { leaf($0) }
        }
        let p = split(count)
        return node(zeroLevels[p.trailingZeroBitCount], zeroNode(count: count - p, lastLeafBytes: lastLeafBytes))
    }

    /// Whether every byte is zero (eight at a time; stops at the first that is not).
    public static func isAllZero(_ bytes: UnsafeRawBufferPointer) -> Bool {
        let n = bytes.count
        var i = 0
        while i + 32 <= n {
            let a = bytes.loadUnaligned(fromByteOffset: i, as: UInt64.self)
            let b = bytes.loadUnaligned(fromByteOffset: i + 8, as: UInt64.self)
            let c = bytes.loadUnaligned(fromByteOffset: i + 16, as: UInt64.self)
            let d = bytes.loadUnaligned(fromByteOffset: i + 24, as: UInt64.self)
            if (a | b | c | d) != 0 { return false }
            i += 32
        }
        while i < n {
            if bytes[i] != 0 { return false }
            i += 1
        }
        return true
    }
}
