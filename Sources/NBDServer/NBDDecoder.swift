import NIOCore

// Pure functions over byte buffers that decode what a client sends (NBDEncoder encodes what the
// server sends). No I/O, no state beyond what is passed in, so they can be fuzzed.
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
