import Foundation
import NIOCore

@testable import HydrationService
@testable import HydrationStorage
@testable import NBDServer

#if canImport(Glibc)
    import Glibc
#endif

/// A blocking NBD client that sends exactly the bytes a test wants (run it off the cooperative
/// pool with `offPool`).
final class RawNBDClient: Sendable {
    let connection: RawConnection

    init(path: String, timeoutSeconds: Int = 60) throws {
        connection = try RawConnection(path: path, timeoutSeconds: timeoutSeconds)
    }

    struct Closed: Error {}

    /// Exactly `count` bytes; throws `Closed` at EOF.
    func read(_ count: Int) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        var done = 0
        while done < count {
            let n = out.withUnsafeMutableBytes { recv(connection.fd, $0.baseAddress! + done, count - done, 0) }
            if n == 0 { throw Closed() }
            if n < 0 {
                if errno == EINTR { continue }
                if errno == ECONNRESET { throw Closed() }
                throw POSIXError(POSIXErrorCode(rawValue: errno)!)
            }
            done += n
        }
        return out
    }

    /// True when the server closed the connection (EOF within the receive timeout).
    func isClosed() -> Bool {
        var b = [UInt8](repeating: 0, count: 1)
        let n = b.withUnsafeMutableBytes { recv(connection.fd, $0.baseAddress!, 1, 0) }
        return n == 0 || (n < 0 && errno == ECONNRESET)
    }

    func send(_ buffer: ByteBuffer) throws { try connection.send(Array(buffer.readableBytesView)) }
    func send(_ bytes: [UInt8]) throws { try connection.send(bytes) }

    static func be<T: FixedWidthInteger>(_ bytes: [UInt8], _ at: Int, _: T.Type) -> T {
        var v: T = 0
        for i in 0..<MemoryLayout<T>.size { v = v << 8 | T(bytes[at + i]) }
        return v
    }

    /// Reads the greeting and sends client flags.
    func greet(flags: UInt32 = 3) throws {
        let g = try read(18)
        precondition(Self.be(g, 0, UInt64.self) == NBDProtocol.initMagic)
        var b = ByteBuffer()
        b.writeInteger(flags)
        try send(b)
    }

    func sendOption(_ code: UInt32, _ data: [UInt8] = []) throws {
        var b = ByteBuffer()
        b.writeInteger(NBDProtocol.optionMagic)
        b.writeInteger(code)
        b.writeInteger(UInt32(data.count))
        b.writeBytes(data)
        try send(b)
    }

    struct OptionReply {
        var option: UInt32
        var type: UInt32
        var data: [UInt8]
    }

    func readOptionReply() throws -> OptionReply {
        let h = try read(20)
        precondition(Self.be(h, 0, UInt64.self) == NBDProtocol.optionReplyMagic)
        let length = Int(Self.be(h, 16, UInt32.self))
        return OptionReply(
            option: Self.be(h, 8, UInt32.self), type: Self.be(h, 12, UInt32.self), data: try read(length))
    }

    static func nameData(_ name: String, infos: [UInt16] = []) -> [UInt8] {
        var b = ByteBuffer()
        b.writeInteger(UInt32(name.utf8.count))
        b.writeString(name)
        b.writeInteger(UInt16(infos.count))
        for i in infos { b.writeInteger(i) }
        return Array(b.readableBytesView)
    }

    static func metaData(_ name: String, _ queries: [String]) -> [UInt8] {
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

    /// OPT_STRUCTURED_REPLY (optional), SET_META_CONTEXT base:allocation (with structured), OPT_GO.
    /// Returns the export size and transmission flags.
    @discardableResult
    func handshake(export: String, structured: Bool) throws -> (size: UInt64, flags: UInt16) {
        try greet()
        if structured {
            try sendOption(NBDOption.structuredReply.rawValue)
            let ack = try readOptionReply()
            precondition(ack.type == NBDOptionReply.ack.rawValue)
            try sendOption(NBDOption.setMetaContext.rawValue, Self.metaData(export, [NBDProtocol.baseAllocation]))
            while try readOptionReply().type != NBDOptionReply.ack.rawValue {}
        }
        try sendOption(NBDOption.go.rawValue, Self.nameData(export))
        var result: (UInt64, UInt16) = (0, 0)
        while true {
            let r = try readOptionReply()
            if r.type == NBDOptionReply.info.rawValue && Self.be(r.data, 0, UInt16.self) == 0 {
                result = (Self.be(r.data, 2, UInt64.self), Self.be(r.data, 10, UInt16.self))
            } else if r.type == NBDOptionReply.ack.rawValue {
                return result
            } else if r.type & 0x8000_0000 != 0 {
                throw POSIXError(.EPERM)
            }
        }
    }

    func sendRequest(_ r: NBDRequest, payload: [UInt8] = []) throws {
        var b = ByteBuffer()
        b.writeInteger(NBDProtocol.requestMagic)
        b.writeInteger(r.flags.rawValue)
        b.writeInteger(r.type)
        b.writeInteger(r.cookie)
        b.writeInteger(r.offset)
        b.writeInteger(r.length)
        b.writeBytes(payload)
        try send(b)
    }

    /// A reply: simple (error, and `readLength` data bytes on success) or one structured chunk.
    struct Reply {
        var structured: Bool
        var cookie: UInt64
        var error: UInt32
        var flags: UInt16 = 0
        var type: UInt16 = 0
        var payload: [UInt8]
    }

    func readReply(readLength: (UInt64) -> Int = { _ in 0 }) throws -> Reply {
        let magic = Self.be(try read(4), 0, UInt32.self)
        if magic == NBDProtocol.simpleReplyMagic {
            let h = try read(12)
            let error = Self.be(h, 0, UInt32.self)
            let cookie = Self.be(h, 4, UInt64.self)
            return Reply(
                structured: false, cookie: cookie, error: error, payload: error == 0 ? try read(readLength(cookie)) : []
            )
        }
        precondition(magic == NBDProtocol.structuredReplyMagic, "bad reply magic \(magic)")
        let h = try read(16)
        let flags = Self.be(h, 0, UInt16.self)
        let type = Self.be(h, 2, UInt16.self)
        let cookie = Self.be(h, 4, UInt64.self)
        let payload = try read(Int(Self.be(h, 12, UInt32.self)))
        let error = type & 0x8000 != 0 ? Self.be(payload, 0, UInt32.self) : 0
        return Reply(structured: true, cookie: cookie, error: error, flags: flags, type: type, payload: payload)
    }
}
