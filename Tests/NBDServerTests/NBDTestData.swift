import NIOCore

/// Option data as a client sends it (the same encoding as the raw client of the server tests).
enum OptionData {
    /// NBD_OPT_GO / NBD_OPT_INFO: name, then the requested NBD_INFO types.
    static func name(_ name: String, infos: [UInt16] = []) -> [UInt8] {
        var b = ByteBuffer()
        b.writeInteger(UInt32(name.utf8.count))
        b.writeString(name)
        b.writeInteger(UInt16(infos.count))
        for i in infos { b.writeInteger(i) }
        return Array(b.readableBytesView)
    }

    /// NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT: name, then the queries.
    static func meta(_ name: String, _ queries: [String]) -> [UInt8] {
        var b = ByteBuffer()
        b.writeInteger(UInt32(name.utf8.count))
        b.writeString(name)
        b.writeInteger(UInt32(queries.count))
        for q in queries {
            b.writeInteger(UInt32(q.utf8.count))
            b.writeString(q)
        }
        return Array(b.readableBytesView)
    }
}

/// Deterministic pseudo-random numbers (SplitMix64), so a failing fuzz run reproduces.
struct SeededRandom: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
