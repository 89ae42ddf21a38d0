import NIOCore

/// What the server sends, as byte buffers: pure functions, no I/O.
public enum NBDEncoder {
    /// NBDMAGIC, IHAVEOPT, handshake flags (fixed newstyle, no zeroes).
    public static func greeting() -> ByteBuffer {
        var b = ByteBuffer()
        b.writeInteger(NBDProtocol.initMagic)
        b.writeInteger(NBDProtocol.optionMagic)
        b.writeInteger(NBDProtocol.flagFixedNewstyle | NBDProtocol.flagNoZeroes)
        return b
    }

    /// An option reply with `data`.
    public static func optionReply(_ option: UInt32, _ type: NBDOptionReply, data: ByteBuffer = ByteBuffer())
        -> ByteBuffer
    {
        var b = ByteBuffer()
        b.reserveCapacity(20 + data.readableBytes)
        b.writeInteger(NBDProtocol.optionReplyMagic)
        b.writeInteger(option)
        b.writeInteger(type.rawValue)
        b.writeInteger(UInt32(data.readableBytes))
        var d = data
        b.writeBuffer(&d)
        return b
    }

    /// An error reply with a message for the user.
    public static func optionError(_ option: UInt32, _ type: NBDOptionReply, _ message: String) -> ByteBuffer {
        var d = ByteBuffer()
        d.writeBytes(truncated(message))
        return optionReply(option, type, data: d)
    }

    public static func server(_ option: UInt32, name: String, description: String?) -> ByteBuffer {
        var d = ByteBuffer()
        let n = truncated(name)
        d.writeInteger(UInt32(n.count))
        d.writeBytes(n)
        if let description { d.writeBytes(truncated(description)) }
        return optionReply(option, .server, data: d)
    }

    public static func infoExport(_ option: UInt32, size: UInt64, flags: NBDTransmissionFlags) -> ByteBuffer {
        var d = ByteBuffer()
        d.writeInteger(NBDInfo.export.rawValue)
        d.writeInteger(size)
        d.writeInteger(flags.rawValue)
        return optionReply(option, .info, data: d)
    }

    public static func infoString(_ option: UInt32, _ info: NBDInfo, _ value: String) -> ByteBuffer {
        var d = ByteBuffer()
        d.writeInteger(info.rawValue)
        d.writeBytes(truncated(value))
        return optionReply(option, .info, data: d)
    }

    public static func infoBlockSize(_ option: UInt32, _ size: NBDBlockSize) -> ByteBuffer {
        var d = ByteBuffer()
        d.writeInteger(NBDInfo.blockSize.rawValue)
        d.writeInteger(size.minimum)
        d.writeInteger(size.preferred)
        d.writeInteger(size.maximum)
        return optionReply(option, .info, data: d)
    }

    public static func metaContext(_ option: UInt32, id: UInt32, name: String) -> ByteBuffer {
        var d = ByteBuffer()
        d.writeInteger(id)
        d.writeBytes(truncated(name))
        return optionReply(option, .metaContext, data: d)
    }

    /// The reply to NBD_OPT_EXPORT_NAME: size, flags, and 124 zeroes unless NO_ZEROES was agreed.
    public static func exportNameReply(size: UInt64, flags: NBDTransmissionFlags, noZeroes: Bool) -> ByteBuffer {
        var b = ByteBuffer()
        b.writeInteger(size)
        b.writeInteger(flags.rawValue)
        if !noZeroes { b.writeRepeatingByte(0, count: 124) }
        return b
    }

    public static func simpleReply(cookie: UInt64, error: UInt32 = 0) -> ByteBuffer {
        var b = ByteBuffer()
        b.writeInteger(NBDProtocol.simpleReplyMagic)
        b.writeInteger(error)
        b.writeInteger(cookie)
        return b
    }

    public static func chunkHeader(
        cookie: UInt64, type: NBDReplyType, done: Bool, length: UInt32, into b: inout ByteBuffer
    ) {
        b.writeInteger(NBDProtocol.structuredReplyMagic)
        b.writeInteger(done ? UInt16(1) : 0)
        b.writeInteger(type.rawValue)
        b.writeInteger(cookie)
        b.writeInteger(length)
    }

    /// Header and offset of an NBD_REPLY_TYPE_OFFSET_DATA chunk of `dataLength` bytes; the data follows.
    public static func offsetDataHeader(cookie: UInt64, offset: UInt64, dataLength: Int, done: Bool) -> ByteBuffer {
        var b = ByteBuffer()
        chunkHeader(cookie: cookie, type: .offsetData, done: done, length: UInt32(8 + dataLength), into: &b)
        b.writeInteger(offset)
        return b
    }

    public static func noneChunk(cookie: UInt64) -> ByteBuffer {
        var b = ByteBuffer()
        chunkHeader(cookie: cookie, type: .none, done: true, length: 0, into: &b)
        return b
    }

    public static func errorChunk(cookie: UInt64, error: NBDErrorCode, message: String) -> ByteBuffer {
        let m = truncated(message)
        var b = ByteBuffer()
        chunkHeader(cookie: cookie, type: .error, done: true, length: UInt32(6 + m.count), into: &b)
        b.writeInteger(error.rawValue)
        b.writeInteger(UInt16(m.count))
        b.writeBytes(m)
        return b
    }

    /// Bytes of a block status chunk besides its extents: the chunk header and the context id.
    static let blockStatusChunkOverhead = 24

    public static func blockStatusChunk(cookie: UInt64, contextID: UInt32, extents: [NBDExtent], done: Bool)
        -> ByteBuffer
    {
        var b = ByteBuffer()
        b.reserveCapacity(24 + 4 + 8 * extents.count)
        chunkHeader(cookie: cookie, type: .blockStatus, done: done, length: UInt32(4 + 8 * extents.count), into: &b)
        b.writeInteger(contextID)
        for e in extents {
            b.writeInteger(e.length)
            b.writeInteger(e.flags)
        }
        return b
    }

    /// UTF-8 of `s`, cut at a character boundary to the 4096-byte string limit.
    static func truncated(_ s: String) -> [UInt8] {
        let utf8 = Array(s.utf8)
        guard utf8.count > NBDProtocol.maxStringLength else { return utf8 }
        var end = NBDProtocol.maxStringLength
        while end > 0 && (utf8[end] & 0xC0) == 0x80 { end -= 1 }
        return Array(utf8[..<end])
    }
}

/// Makes an export's extents a valid reply to a block status request (spec): at least one extent,
/// none of length 0; with REQ_ONE exactly one, not longer than the request; otherwise stop at the
/// first extent that reaches the end of the request, at most `maxExtents` of them (the client asks
/// again from where the reply ends). nil when the export returned nothing usable.
func normalizeExtents(_ extents: [NBDExtent], length: UInt32, reqOne: Bool, maxExtents: Int = 1 << 20) -> [NBDExtent]? {
    var out: [NBDExtent] = []
    var covered: UInt64 = 0
    for e in extents where e.length > 0 {
        if reqOne {
            return [NBDExtent(length: min(e.length, length), flags: e.flags)]
        }
        if let last = out.last, last.flags == e.flags, UInt64(last.length) + UInt64(e.length) <= UInt64(UInt32.max) {
            out[out.count - 1].length += e.length  // merge equal neighbours
        } else {
            out.append(e)
        }
        covered += UInt64(e.length)
        if covered >= UInt64(length) || out.count >= max(1, maxExtents) { break }
    }
    return out.isEmpty ? nil : out
}
