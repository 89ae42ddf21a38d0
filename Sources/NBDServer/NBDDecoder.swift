import NIOCore

// Pure functions over byte buffers: decoding what a client sends, encoding what the server sends.
// No I/O, no state beyond what is passed in, so they can be fuzzed.
//
// Decoders follow one rule: they return nil without consuming anything until a whole message is
// buffered (the request framer's payload skipping is the one exception: it consumes what it
// discards and keeps the count), and they never ask for more than a bounded number of bytes.

/// Input that ends the connection (the spec allows a hard disconnect; nothing else is possible
/// once framing is lost).
public enum NBDWireError: Error, Sendable, Equatable, CustomStringConvertible {
    case badOptionMagic(UInt64)
    case optionTooLong(length: UInt32, limit: Int)
    case badRequestMagic(UInt32)
    /// A write payload too large to read, or even to skip.
    case writeTooLarge(length: UInt32, limit: UInt64)

    public var description: String {
        switch self {
        case .badOptionMagic(let m): return "option magic is 0x\(String(m, radix: 16)), not IHAVEOPT"
        case .optionTooLong(let l, let limit): return "option data of \(l) bytes exceeds the limit of \(limit)"
        case .badRequestMagic(let m): return "request magic is 0x\(String(m, radix: 16))"
        case .writeTooLarge(let l, let limit): return "write payload of \(l) bytes exceeds \(limit)"
        }
    }
}

/// An option as framed on the wire: its code and its data.
public struct NBDRawOption: Sendable, Equatable {
    public var code: UInt32
    public var data: ByteBuffer
    public init(code: UInt32, data: ByteBuffer) {
        self.code = code
        self.data = data
    }
}

/// An option, parsed.
public enum NBDOptionRequest: Sendable, Equatable {
    case exportName(String)
    case abort
    case list
    case info(name: String, requests: [UInt16])
    case go(name: String, requests: [UInt16])
    case structuredReply
    case listMetaContext(name: String, queries: [String])
    case setMetaContext(name: String, queries: [String])
    /// Unknown, withdrawn or not implemented here (STARTTLS, EXTENDED_HEADERS): NBD_REP_ERR_UNSUP.
    case unsupported(UInt32)
    /// Known but malformed: NBD_REP_ERR_INVALID with the reason.
    case invalid(UInt32, String)
}

/// One transmission request header.
public struct NBDRequest: Sendable, Equatable {
    public var flags: NBDCommandFlags
    /// The raw type: unknown commands are answered (EINVAL), not dropped.
    public var type: UInt16
    public var cookie: UInt64
    public var offset: UInt64
    public var length: UInt32

    public init(flags: NBDCommandFlags = [], type: UInt16, cookie: UInt64, offset: UInt64, length: UInt32) {
        self.flags = flags
        self.type = type
        self.cookie = cookie
        self.offset = offset
        self.length = length
    }

    public init(
        _ command: NBDCommand, flags: NBDCommandFlags = [], cookie: UInt64, offset: UInt64 = 0, length: UInt32 = 0
    ) {
        self.init(flags: flags, type: command.rawValue, cookie: cookie, offset: offset, length: length)
    }

    public var command: NBDCommand? { NBDCommand(rawValue: type) }
    var commandName: String { command.map { "\($0)" } ?? "command \(type)" }
}

/// What the transmission framer produces.
public enum NBDFrame: Sendable, Equatable {
    /// A request, with its payload for a write.
    case request(NBDRequest, payload: ByteBuffer?)
    /// A write whose payload exceeded the maximum; the payload was read and dropped. Reply EINVAL.
    case skippedWrite(NBDRequest)
}

public enum NBDDecoder {
    /// The client's 32-bit flags, sent once after the greeting.
    public static func decodeClientFlags(_ buffer: inout ByteBuffer) -> UInt32? {
        buffer.readInteger(as: UInt32.self)
    }

    /// One option (header and data). Throws on a bad magic or data longer than `maxLength`.
    public static func decodeOption(_ buffer: inout ByteBuffer, maxLength: Int) throws(NBDWireError) -> NBDRawOption? {
        guard buffer.readableBytes >= NBDProtocol.optionHeaderSize else { return nil }
        let start = buffer.readerIndex
        let magic = buffer.getInteger(at: start, as: UInt64.self)!
        guard magic == NBDProtocol.optionMagic else { throw .badOptionMagic(magic) }
        let code = buffer.getInteger(at: start + 8, as: UInt32.self)!
        let length = buffer.getInteger(at: start + 12, as: UInt32.self)!
        guard UInt64(length) <= UInt64(max(0, maxLength)) else {
            throw .optionTooLong(length: length, limit: maxLength)
        }
        guard buffer.readableBytes >= NBDProtocol.optionHeaderSize + Int(length) else { return nil }
        buffer.moveReaderIndex(forwardBy: NBDProtocol.optionHeaderSize)
        let data = buffer.readSlice(length: Int(length))!
        return NBDRawOption(code: code, data: data)
    }

    /// The meaning of an option's data. Never fails: malformed data is `.invalid`.
    public static func parseOption(_ option: NBDRawOption) -> NBDOptionRequest {
        var data = option.data
        let code = option.code
        guard let known = NBDOption(rawValue: code) else { return .unsupported(code) }
        switch known {
        case .exportName:
            guard let name = string(&data, length: data.readableBytes) else {
                return .invalid(code, "the export name is not a valid string")
            }
            return .exportName(name)
        case .abort:
            return .abort  // data, if any, is ignored (spec)
        case .list, .structuredReply:
            guard data.readableBytes == 0 else { return .invalid(code, "\(known) takes no data") }
            return known == .list ? .list : .structuredReply
        case .info, .go:
            guard let nameLength = data.readInteger(as: UInt32.self),
                UInt64(nameLength) + 2 <= UInt64(data.readableBytes)
            else {
                return .invalid(code, "the export name length exceeds the option")
            }
            guard let name = string(&data, length: Int(nameLength)) else {
                return .invalid(code, "the export name is not a valid string")
            }
            guard let count = data.readInteger(as: UInt16.self), data.readableBytes == Int(count) * 2 else {
                return .invalid(code, "the number of information requests does not match the option length")
            }
            var requests: [UInt16] = []
            requests.reserveCapacity(Int(count))
            for _ in 0..<count { requests.append(data.readInteger(as: UInt16.self)!) }
            return known == .info ? .info(name: name, requests: requests) : .go(name: name, requests: requests)
        case .listMetaContext, .setMetaContext:
            guard let nameLength = data.readInteger(as: UInt32.self),
                UInt64(nameLength) + 4 <= UInt64(data.readableBytes)
            else {
                return .invalid(code, "the export name length exceeds the option")
            }
            guard let name = string(&data, length: Int(nameLength)) else {
                return .invalid(code, "the export name is not a valid string")
            }
            let count = data.readInteger(as: UInt32.self)!
            // Every query takes at least its 4-byte length: a count beyond that cannot be honest.
            guard UInt64(count) * 4 <= UInt64(data.readableBytes) else {
                return .invalid(code, "the number of queries exceeds the option length")
            }
            var queries: [String] = []
            for _ in 0..<count {
                guard let length = data.readInteger(as: UInt32.self), UInt64(length) <= UInt64(data.readableBytes)
                else {
                    return .invalid(code, "a query length exceeds the option")
                }
                guard let query = string(&data, length: Int(length)) else {
                    return .invalid(code, "a query is not a valid string")
                }
                queries.append(query)
            }
            guard data.readableBytes == 0 else { return .invalid(code, "trailing data after the queries") }
            return known == .listMetaContext
                ? .listMetaContext(name: name, queries: queries) : .setMetaContext(name: name, queries: queries)
        case .peekExport, .startTLS, .extendedHeaders:
            return .unsupported(code)
        }
    }

    /// A protocol string: valid UTF-8, no NUL, at most 4096 bytes.
    static func string(_ buffer: inout ByteBuffer, length: Int) -> String? {
        guard length <= NBDProtocol.maxStringLength, let bytes = buffer.readBytes(length: length) else { return nil }
        guard !bytes.contains(0), let s = String(validating: bytes, as: UTF8.self) else { return nil }
        return s
    }

    /// A request header (28 bytes) without its payload.
    public static func decodeRequestHeader(_ buffer: inout ByteBuffer) throws(NBDWireError) -> NBDRequest? {
        guard buffer.readableBytes >= NBDProtocol.requestHeaderSize else { return nil }
        let s = buffer.readerIndex
        let magic = buffer.getInteger(at: s, as: UInt32.self)!
        guard magic == NBDProtocol.requestMagic else { throw .badRequestMagic(magic) }
        let request = NBDRequest(
            flags: NBDCommandFlags(rawValue: buffer.getInteger(at: s + 4, as: UInt16.self)!),
            type: buffer.getInteger(at: s + 6, as: UInt16.self)!,
            cookie: buffer.getInteger(at: s + 8, as: UInt64.self)!,
            offset: buffer.getInteger(at: s + 16, as: UInt64.self)!,
            length: buffer.getInteger(at: s + 24, as: UInt32.self)!)
        buffer.moveReaderIndex(forwardBy: NBDProtocol.requestHeaderSize)
        return request
    }
}

/// Splits the transmission byte stream into requests. A write carries `length` payload bytes; a
/// write over `maxPayload` has its payload skipped (consumed in pieces as it arrives, never
/// buffered) when it is at most `maxSkip`, and ends the connection beyond.
public struct NBDRequestFramer: Sendable {
    public let maxPayload: UInt32
    public let maxSkip: UInt64
    private var pendingWrite: NBDRequest?
    private var skipping: (request: NBDRequest, remaining: Int)?

    public init(maxPayload: UInt32, maxSkip: UInt64? = nil) {
        self.maxPayload = maxPayload
        self.maxSkip = maxSkip ?? UInt64(maxPayload) * 2
    }

    /// The next frame, or nil until more bytes arrive. At most `maxPayload` + 28 bytes are ever
    /// needed in `buffer` to make progress.
    public mutating func next(_ buffer: inout ByteBuffer) throws(NBDWireError) -> NBDFrame? {
        if let s = skipping {
            let n = min(s.remaining, buffer.readableBytes)
            buffer.moveReaderIndex(forwardBy: n)
            if n < s.remaining {
                skipping = (s.request, s.remaining - n)
                return nil
            }
            skipping = nil
            return .skippedWrite(s.request)
        }
        if let w = pendingWrite {
            guard let payload = buffer.readSlice(length: Int(w.length)) else { return nil }
            pendingWrite = nil
            return .request(w, payload: payload)
        }
        guard let header = try NBDDecoder.decodeRequestHeader(&buffer) else { return nil }
        guard header.type == NBDCommand.write.rawValue, header.length > 0 else {
            return .request(header, payload: header.type == NBDCommand.write.rawValue ? ByteBuffer() : nil)
        }
        if header.length > maxPayload {
            guard UInt64(header.length) <= maxSkip else { throw .writeTooLarge(length: header.length, limit: maxSkip) }
            skipping = (header, Int(header.length))
        } else {
            pendingWrite = header
        }
        return try next(&buffer)
    }
}

/// What a request is checked against: the negotiated session.
public struct NBDTransmissionContext: Sendable, Equatable {
    public var size: UInt64
    public var flags: NBDTransmissionFlags
    public var structuredReplies: Bool
    /// Number of meta contexts selected for this export.
    public var metaContextCount: Int
    public var minimumBlock: UInt32
    /// Largest read or write payload accepted.
    public var maxPayload: UInt32

    public init(
        size: UInt64, flags: NBDTransmissionFlags, structuredReplies: Bool, metaContextCount: Int,
        minimumBlock: UInt32 = 1, maxPayload: UInt32 = NBDProtocol.defaultMaxPayload
    ) {
        self.size = size
        self.flags = flags
        self.structuredReplies = structuredReplies
        self.metaContextCount = metaContextCount
        self.minimumBlock = max(1, minimumBlock)
        self.maxPayload = maxPayload
    }
}

extension NBDRequest {
    /// nil when the request may be executed, otherwise the error to reply (spec "Error values",
    /// in the order nbdkit's `validate_request` checks them): writes on a read-only export EPERM;
    /// unknown commands EINVAL; out of range or zero length EINVAL, or ENOSPC for WRITE and
    /// WRITE_ZEROES; unknown or inapplicable or not negotiated flags EINVAL; a READ over the maximum
    /// payload EOVERFLOW with structured replies (EINVAL without), a WRITE over it EINVAL;
    /// commands not advertised EINVAL; BLOCK_STATUS without a selected context EINVAL; requests
    /// not aligned to the minimum block size EINVAL.
    public func validate(in ctx: NBDTransmissionContext) -> NBDError? {
        guard let command else { return .invalid("unknown command \(type)") }
        let writes = command == .write || command == .trim || command == .writeZeroes
        if writes && ctx.flags.contains(.readOnly) {
            return NBDError(.EPERM, "\(command) on a read-only export")
        }
        switch command {
        case .read, .write, .trim, .cache, .writeZeroes, .blockStatus:
            // nbdkit counts a zero length as out of range too (so a zero-length write is ENOSPC).
            let (end, overflow) = offset.addingReportingOverflow(UInt64(length))
            if length == 0 || overflow || end > ctx.size {
                let message =
                    length == 0
                    ? "\(command) of length 0"
                    : "\(command) at offset \(offset) length \(length) is beyond the end of the export (\(ctx.size) bytes)"
                return NBDError(command == .write || command == .writeZeroes ? .ENOSPC : .EINVAL, message)
            }
        case .flush:
            if offset != 0 || length != 0 { return .invalid("flush needs offset and length 0") }
        case .disconnect:
            break
        }
        let unknown = flags.subtracting(.known)
        if !unknown.isEmpty { return .invalid("unknown flags 0x\(String(unknown.rawValue, radix: 16))") }
        if flags.contains(.noHole) && command != .writeZeroes {
            return .invalid("NO_HOLE is only valid with WRITE_ZEROES")
        }
        if flags.contains(.fastZero) {
            if command != .writeZeroes { return .invalid("FAST_ZERO is only valid with WRITE_ZEROES") }
            if !ctx.flags.contains(.sendFastZero) { return .invalid("FAST_ZERO was not negotiated") }
        }
        if flags.contains(.dontFragment) {
            if command != .read { return .invalid("DF is only valid with READ") }
            if !ctx.structuredReplies || !ctx.flags.contains(.sendDF) { return .invalid("DF was not negotiated") }
        }
        if flags.contains(.reqOne) && command != .blockStatus {
            return .invalid("REQ_ONE is only valid with BLOCK_STATUS")
        }
        if flags.contains(.fua) && !ctx.flags.contains(.sendFUA) { return .invalid("FUA was not negotiated") }
        if command == .read && length > ctx.maxPayload {
            return NBDError(
                ctx.structuredReplies ? .EOVERFLOW : .EINVAL,
                "read of \(length) bytes exceeds the maximum payload of \(ctx.maxPayload)")
        }
        if command == .write && length > ctx.maxPayload {
            return .invalid("write of \(length) bytes exceeds the maximum payload of \(ctx.maxPayload)")
        }
        switch command {
        case .flush where !ctx.flags.contains(.sendFlush): return .invalid("flush is not supported")
        case .trim where !ctx.flags.contains(.sendTrim): return .invalid("trim is not supported")
        case .writeZeroes where !ctx.flags.contains(.sendWriteZeroes): return .invalid("write zeroes is not supported")
        case .cache where !ctx.flags.contains(.sendCache): return .invalid("cache is not supported")
        case .blockStatus where !ctx.structuredReplies || ctx.metaContextCount == 0:
            return .invalid("block status needs structured replies and a selected meta context")
        default: break
        }
        if ctx.minimumBlock > 1, command != .flush, command != .disconnect,
            offset % UInt64(ctx.minimumBlock) != 0 || length % ctx.minimumBlock != 0
        {
            // The end of an export whose size is not a multiple of the block size stays reachable.
            let end = offset + UInt64(length)
            if offset % UInt64(ctx.minimumBlock) != 0 || end != ctx.size {
                return .invalid(
                    "\(command) at offset \(offset) length \(length) is not aligned to \(ctx.minimumBlock) bytes")
            }
        }
        return nil
    }
}

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
