/// Why a range or a state was refused by `ImageDigestAccumulator`.
public struct ImageDigestError: Error, Sendable, Equatable, CustomStringConvertible {
    public enum Kind: String, Sendable {
        /// The byte range is not one node of the tree (not 4 KiB aligned, not a power-of-two
        /// number of leaves aligned to its size, or past the image's end).
        case notANode
        /// The range overlaps one inserted before.
        case overlap
        /// `finalize` before every leaf was inserted.
        case incomplete
        /// A serialised state that is not one (bad magic, version, length or entries).
        case badState
    }
    public var kind: Kind
    public var message: String
    public init(_ kind: Kind, _ message: String) { self.kind = kind; self.message = message }
    public var description: String { "\(kind.rawValue): \(message)" }
}

/// Builds an image digest from subtree digests of byte ranges given in any order: a job's
/// regions as they commit, a parallel reader's chunks as they finish. Complete siblings are
/// merged upward at once, so the state is the set of maximal subtrees inserted and not yet
/// merged: for insertions in increasing order, at most one per tree level (at most 53, as a
/// 2^64-byte image has 2^52 leaves); in general at most 2 per level per contiguous run of
/// inserted bytes. `serialized()` is 20 + 48 bytes per pending subtree.
///
/// A range is a node when it starts on a leaf boundary, holds 2^j leaves and starts at a
/// multiple of 2^j leaves, and ends inside the image, or when it is the image's last such
/// range cut short by the end of the image: so a job's regions (power-of-two sizes >= 4 KiB,
/// aligned, the last one possibly short) are always nodes, whatever the region size.
public struct ImageDigestAccumulator: Sendable, Equatable, Codable {
    /// A subtree inserted and not yet merged: leaves [start, end) and its digest.
    public struct Node: Sendable, Equatable, Codable {
        public var start: UInt64
        public var end: UInt64
        public var hash: ImageDigest.Hash
    }

    /// The image's size in bytes.
    public let size: UInt64
    /// Its number of leaves.
    public var leafCount: UInt64 { ImageDigest.leafCount(size: size) }
    /// The pending subtrees, sorted by start, disjoint.
    public private(set) var pending: [Node]

    public init(size: UInt64) {
        self.size = size
        self.pending = []
    }

    /// Whether every leaf has been inserted (the root is the one pending node).
    public var isComplete: Bool {
        pending.count == 1 && pending[0].start == 0 && pending[0].end == leafCount
    }

    /// Leaves inserted so far.
    public var leavesInserted: UInt64 { pending.reduce(0) { $0 + ($1.end - $1.start) } }

    /// Inserts the subtree digest of bytes [offset, offset + length) (see
    /// `ImageDigest.subtree(of:)`): a node of the tree (see the type's doc). An empty image takes
    /// (0, 0).
    public mutating func insert(offset: UInt64, length: UInt64, digest: ImageDigest.Hash) throws(ImageDigestError) {
        let leaves = try leafRange(offset: offset, length: length)
        let path = try pathTo(leaves)
        try checkFree(leaves)
        merge(Node(start: leaves.lowerBound, end: leaves.upperBound, hash: digest), path: path)
    }

    /// Inserts bytes [offset, offset + length) as zeros (a hole, a zero run): any range that
    /// starts on a leaf boundary and ends on one or at the image's end, split into the largest
    /// aligned subtrees, whose digests are the fixed zero digests (no hashing but for a short
    /// last leaf).
    public mutating func insertZeros(offset: UInt64, length: UInt64) throws(ImageDigestError) {
        let leaves = try leafSpan(offset: offset, length: length)
        var a = leaves.lowerBound
        let b = leaves.upperBound
        let n = leafCount
        let lastLeafBytes = Int(size - (n - 1) * UInt64(ImageDigest.leafSize))
        while a < b {
            // The largest power of two that `a` is a multiple of and that fits before `b`.
            var span: UInt64 = a == 0 ? 1 << 62 : 1 << UInt64(a.trailingZeroBitCount)
            while span > b - a { span >>= 1 }
            let range = a..<(a + span)
            let path = try pathTo(range)
            try checkFree(range)
            let hash =
                range.upperBound == n
                ? ImageDigest.zeroNode(count: span, lastLeafBytes: lastLeafBytes)
                : ImageDigest.zeroSubtree(level: span.trailingZeroBitCount)
            merge(Node(start: range.lowerBound, end: range.upperBound, hash: hash), path: path)
            a += span
        }
    }

    /// The image digest, once every leaf is in.
    public func finalize() throws(ImageDigestError) -> ImageDigest.Hash {
        guard isComplete else {
            throw ImageDigestError(
                .incomplete, "\(leavesInserted) of \(leafCount) leaves inserted (\(pending.count) pending subtrees)")
        }
        return ImageDigest.image(size: size, root: pending[0].hash)
    }

    // MARK: - Serialisation

    static let magic: [UInt8] = Array("HYDA".utf8)
    static let formatVersion: UInt8 = 1
    /// Bytes of `serialized()` for `count` pending subtrees.
    public static func serializedSize(pending count: Int) -> Int { 20 + 48 * count }

    /// "HYDA", version 1, 3 zero bytes, size (UInt64 LE), count (UInt32 LE), then per pending
    /// subtree start and end leaf (UInt64 LE each) and its 32-byte digest.
    public func serialized() -> [UInt8] {
        var out = ImageDigestAccumulator.magic
        out.reserveCapacity(ImageDigestAccumulator.serializedSize(pending: pending.count))
        out += [ImageDigestAccumulator.formatVersion, 0, 0, 0]
        withUnsafeBytes(of: size.littleEndian) { out += $0 }
        withUnsafeBytes(of: UInt32(pending.count).littleEndian) { out += $0 }
        for p in pending {
            withUnsafeBytes(of: p.start.littleEndian) { out += $0 }
            withUnsafeBytes(of: p.end.littleEndian) { out += $0 }
            out += p.hash.bytes
        }
        return out
    }

    /// Reads `serialized()`'s bytes back, checking every entry is a node, sorted and disjoint.
    public init(serialized bytes: [UInt8]) throws(ImageDigestError) {
        guard bytes.count >= 20, Array(bytes[0..<4]) == ImageDigestAccumulator.magic else {
            throw ImageDigestError(.badState, "not an image digest state (no HYDA header)")
        }
        guard bytes[4] == ImageDigestAccumulator.formatVersion else {
            throw ImageDigestError(.badState, "state format version \(bytes[4]), this program reads 1")
        }
        func u64(_ at: Int) -> UInt64 {
            bytes.withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(fromByteOffset: at, as: UInt64.self)) }
        }
        let count = bytes.withUnsafeBytes {
            Int(UInt32(littleEndian: $0.loadUnaligned(fromByteOffset: 16, as: UInt32.self)))
        }
        guard bytes.count == ImageDigestAccumulator.serializedSize(pending: count) else {
            throw ImageDigestError(.badState, "\(bytes.count) bytes for \(count) entries")
        }
        var nodes = [Node]()
        for i in 0..<count {
            let at = 20 + 48 * i
            nodes.append(
                Node(
                    start: u64(at), end: u64(at + 8),
                    hash: ImageDigest.Hash(bytes: Array(bytes[(at + 16)..<(at + 48)]))!))
        }
        try self.init(size: u64(8), pending: nodes)
    }

    /// From a size and pending subtrees (the Codable form), checking them as `init(serialized:)`.
    public init(size: UInt64, pending nodes: [Node]) throws(ImageDigestError) {
        self.size = size
        self.pending = []
        var last: UInt64 = 0
        for (i, node) in nodes.enumerated() {
            guard node.start < node.end, i == 0 || node.start >= last else {
                throw ImageDigestError(.badState, "entry \(i) [\(node.start), \(node.end)) is not sorted or disjoint")
            }
            do { _ = try pathTo(node.start..<node.end) } catch {
                throw ImageDigestError(.badState, "entry \(i): \(error.message)")
            }
            last = node.end
        }
        self.pending = nodes
    }

    enum CodingKeys: String, CodingKey { case size, pending }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        try self.init(
            size: c.decode(UInt64.self, forKey: .size), pending: c.decode([Node].self, forKey: .pending))
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(size, forKey: .size)
        try c.encode(pending, forKey: .pending)
    }

    // MARK: - The tree

    /// Leaves [a, b) of a byte range that must be a node's whole bytes.
    private func leafRange(offset: UInt64, length: UInt64) throws(ImageDigestError) -> Range<UInt64> {
        if size == 0 {
            guard offset == 0 && length == 0 else {
                throw ImageDigestError(.notANode, "an empty image has only the range (0, 0)")
            }
            return 0..<1
        }
        return try leafSpan(offset: offset, length: length)
    }

    /// Leaves [a, b) of a byte range that starts on a leaf boundary and ends on one or at the end.
    private func leafSpan(offset: UInt64, length: UInt64) throws(ImageDigestError) -> Range<UInt64> {
        let leaf = UInt64(ImageDigest.leafSize)
        if size == 0 && offset == 0 && length == 0 { return 0..<1 }
        let (end, overflow) = offset.addingReportingOverflow(length)
        guard !overflow, length > 0, end <= size, offset % leaf == 0, end % leaf == 0 || end == size else {
            throw ImageDigestError(
                .notANode,
                "bytes [\(offset), \(offset &+ length)) of a \(size)-byte image: a range must start on a 4096-byte boundary, be non-empty and end on one or at the end"
            )
        }
        return (offset / leaf)..<(end == size ? leafCount : end / leaf)
    }

    /// The siblings on the way from `range` up to the root (nearest first), with whether each
    /// is on the right; throws when `range` is not a node.
    private func pathTo(_ range: Range<UInt64>) throws(ImageDigestError) -> [(sibling: Range<UInt64>, onRight: Bool)] {
        var path = [(sibling: Range<UInt64>, onRight: Bool)]()
        var node = 0..<leafCount
        while node != range {
            guard node.count > 1, node.lowerBound <= range.lowerBound, range.upperBound <= node.upperBound else {
                throw ImageDigestError(
                    .notANode,
                    "leaves [\(range.lowerBound), \(range.upperBound)) are not a subtree of a \(leafCount)-leaf tree")
            }
            let mid = node.lowerBound + ImageDigest.split(UInt64(node.count))
            if range.upperBound <= mid {
                path.append((mid..<node.upperBound, true))
                node = node.lowerBound..<mid
            } else if range.lowerBound >= mid {
                path.append((node.lowerBound..<mid, false))
                node = mid..<node.upperBound
            } else {
                throw ImageDigestError(
                    .notANode,
                    "leaves [\(range.lowerBound), \(range.upperBound)) straddle a split of the tree at leaf \(mid)")
            }
        }
        return path.reversed()
    }

    /// Index of the first pending node whose start is >= `leaf`.
    private func firstIndex(atOrAfter leaf: UInt64) -> Int {
        var lo = 0
        var hi = pending.count
        while lo < hi {
            let m = (lo + hi) / 2
            if pending[m].start < leaf { lo = m + 1 } else { hi = m }
        }
        return lo
    }

    private func checkFree(_ range: Range<UInt64>) throws(ImageDigestError) {
        let i = firstIndex(atOrAfter: range.lowerBound)
        let clashes =
            (i < pending.count && pending[i].start < range.upperBound)
            || (i > 0 && pending[i - 1].end > range.lowerBound)
        if clashes {
            throw ImageDigestError(
                .overlap, "leaves [\(range.lowerBound), \(range.upperBound)) overlap a range inserted before")
        }
    }

    /// Inserts `node`, merging it with each sibling already pending on the way up.
    private mutating func merge(_ node: Node, path: [(sibling: Range<UInt64>, onRight: Bool)]) {
        var current = node
        for step in path {
            let i = firstIndex(atOrAfter: step.sibling.lowerBound)
            guard i < pending.count, pending[i].start == step.sibling.lowerBound,
                pending[i].end == step.sibling.upperBound
            else { break }
            let sibling = pending.remove(at: i)
            let (left, right) = step.onRight ? (current, sibling) : (sibling, current)
            current = Node(start: left.start, end: right.end, hash: combine(left, right))
        }
        pending.insert(current, at: firstIndex(atOrAfter: current.start))
    }

    /// node(L, R), or Z(k+1) without hashing when both are Z(k) (a parent of two full zero
    /// subtrees of 2^k leaves each, none of them the image's short last leaf).
    private func combine(_ left: Node, _ right: Node) -> ImageDigest.Hash {
        let count = left.end - left.start
        if count == right.end - right.start, count & (count - 1) == 0, !holdsShortLeaf(right) {
            let z = ImageDigest.zeroSubtree(level: count.trailingZeroBitCount)
            if left.hash == z && right.hash == z {
                return ImageDigest.zeroSubtree(level: count.trailingZeroBitCount + 1)
            }
        }
        return ImageDigest.node(left.hash, right.hash)
    }

    private func holdsShortLeaf(_ node: Node) -> Bool {
        node.end == leafCount && size % UInt64(ImageDigest.leafSize) != 0
    }
}
