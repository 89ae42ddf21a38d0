/// A bitmap with one bit per region: set means hydrated. A plain value type; whoever owns one
/// decides who may change it.
public struct RegionMap: Sendable, Equatable {
    public let count: Int
    private(set) var words: [UInt64]
    public private(set) var setCount: Int

    public init(count: Int) {
        precondition(count >= 0)
        self.count = count
        self.words = [UInt64](repeating: 0, count: (count + 63) / 64)
        self.setCount = 0
    }

    init(count: Int, words: [UInt64]) {
        precondition(words.count == (count + 63) / 64)
        self.count = count
        self.words = words
        // Bits past `count` in the last word must never count.
        if count % 64 != 0, let last = words.indices.last {
            self.words[last] &= (UInt64(1) << UInt64(count % 64)) - 1
        }
        self.setCount = self.words.reduce(0) { $0 + $1.nonzeroBitCount }
    }

    public var isComplete: Bool { setCount == count }

    public subscript(index: Int) -> Bool {
        precondition(index >= 0 && index < count)
        return words[index >> 6] & (UInt64(1) << UInt64(index & 63)) != 0
    }

    public mutating func set(_ index: Int) {
        precondition(index >= 0 && index < count)
        let bit = UInt64(1) << UInt64(index & 63)
        if words[index >> 6] & bit == 0 {
            words[index >> 6] |= bit
            setCount += 1
        }
    }

    /// Sets every bit of `range`, a word at a time.
    public mutating func set(_ range: Range<Int>) {
        precondition(range.lowerBound >= 0 && range.upperBound <= count)
        Self.forEachWordMask(range) { w, mask in
            setCount += (mask & ~words[w]).nonzeroBitCount
            words[w] |= mask
        }
    }

    /// Clears every bit of `range`. Hydration never clears bits; this is for maps of transient
    /// state (regions under a claim, see `RegionOwnership`).
    package mutating func clear(_ range: Range<Int>) {
        precondition(range.lowerBound >= 0 && range.upperBound <= count)
        Self.forEachWordMask(range) { w, mask in
            setCount -= (mask & words[w]).nonzeroBitCount
            words[w] &= ~mask
        }
    }

    /// Number of set bits in `range`.
    public func count(in range: Range<Int>) -> Int {
        var n = 0
        Self.forEachWordMask(range) { w, mask in n += (words[w] & mask).nonzeroBitCount }
        return n
    }

    /// Calls `body` with each word index `range` touches and the mask of its bits in that word.
    private static func forEachWordMask(_ range: Range<Int>, _ body: (Int, UInt64) -> Void) {
        var i = range.lowerBound
        while i < range.upperBound {
            let first = i & 63
            let last = min(64, first + (range.upperBound - i))
            let mask: UInt64 = last - first == 64 ? ~0 : ((UInt64(1) << UInt64(last - first)) - 1) << UInt64(first)
            body(i >> 6, mask)
            i += last - first
        }
    }

    /// The first index at or after `start` whose bit equals `value`, or nil.
    public func first(_ value: Bool, from start: Int) -> Int? {
        guard start < count else { return nil }
        var w = start >> 6
        var word = value ? words[w] : ~words[w]
        word &= ~0 << UInt64(start & 63)
        while true {
            if word != 0 {
                let i = (w << 6) + word.trailingZeroBitCount
                return i < count ? i : nil
            }
            w += 1
            if w >= words.count { return nil }
            word = value ? words[w] : ~words[w]
        }
    }

    /// Maximal runs of set bits, in order.
    public func setRanges(in range: Range<Int>? = nil) -> [Range<Int>] {
        let r = range ?? 0..<count
        var out: [Range<Int>] = []
        var i = r.lowerBound
        while let s = first(true, from: i), s < r.upperBound {
            let e = min(first(false, from: s) ?? count, r.upperBound)
            out.append(s..<e)
            i = e
        }
        return out
    }

    /// The 64-bit words `range` of the bitmap (for metadata pages).
    func wordSlice(_ range: Range<Int>) -> ArraySlice<UInt64> {
        words[range.clamped(to: 0..<words.count)]
    }

    var wordCount: Int { words.count }

    /// Replaces words from `index` on (metadata load). Recomputes the count.
    mutating func load(words newWords: [UInt64], at index: Int) {
        for (k, v) in newWords.enumerated() where index + k < words.count {
            setCount -= words[index + k].nonzeroBitCount
            var v = v
            if index + k == words.count - 1, count % 64 != 0 {
                v &= (UInt64(1) << UInt64(count % 64)) - 1
            }
            words[index + k] = v
            setCount += v.nonzeroBitCount
        }
    }
}

/// Normalises a list of region ranges: sorted, overlapping and adjacent ones merged.
public func coalesce(_ ranges: [Range<Int>]) -> [Range<Int>] {
    let sorted = ranges.filter { !$0.isEmpty }.sorted { $0.lowerBound < $1.lowerBound }
    var out: [Range<Int>] = []
    for r in sorted {
        if let last = out.last, r.lowerBound <= last.upperBound {
            out[out.count - 1] = last.lowerBound..<max(last.upperBound, r.upperBound)
        } else {
            out.append(r)
        }
    }
    return out
}
