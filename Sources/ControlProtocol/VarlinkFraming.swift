import FoundationEssentials

/// Varlink framing: each message is one JSON object followed by a single NUL byte, on a stream socket.
public enum VarlinkFraming {
    /// Largest request the daemon accepts, excluding the NUL terminator. A peer that sends more
    /// without a terminator gets `MessageTooLarge` and its connection is closed.
    public static let maxMessageSize = 64 * 1024

    /// Largest reply `VarlinkClient` accepts (a status listing of many jobs can exceed 64 KiB).
    public static let maxReplySize = 16 * 1024 * 1024

    /// JSON text of `message` followed by the NUL terminator.
    public static func encode<T: Encodable>(_ message: T) throws -> [UInt8] {
        var bytes = [UInt8](try VarlinkJSON.makeEncoder().encode(message))
        bytes.append(0)
        return bytes
    }

    public static func decodeCall(_ frame: some Collection<UInt8>) throws -> VarlinkCall {
        try VarlinkJSON.makeDecoder().decode(VarlinkCall.self, from: Data(frame))
    }

    public static func decodeReply(_ frame: some Collection<UInt8>) throws -> VarlinkReply {
        try VarlinkJSON.makeDecoder().decode(VarlinkReply.self, from: Data(frame))
    }
}

public enum VarlinkFramingError: Error, Sendable, Equatable, CustomStringConvertible {
    /// A message (or an unterminated run of bytes) exceeded the limit.
    case messageTooLarge(limit: Int)

    public var description: String {
        switch self {
        case .messageTooLarge(let limit): return "Varlink message larger than \(limit) bytes"
        }
    }
}

/// Splits a byte stream into NUL-terminated frames, enforcing a size limit.
///
/// Feed bytes with `append`, then call `nextFrame()` until it returns nil. Once it has thrown,
/// the stream is unusable (the peer cannot be resynchronised safely): close the connection.
public struct VarlinkFrameDecoder: Sendable {
    public let maxMessageSize: Int
    private var buffer: [UInt8] = []
    private var start = 0  // first unconsumed byte
    private var scanned = 0  // bytes after `start` already known to hold no NUL
    private var failed = false

    public init(maxMessageSize: Int = VarlinkFraming.maxMessageSize) {
        self.maxMessageSize = maxMessageSize
    }

    /// Bytes received but not yet returned as a frame.
    public var bufferedByteCount: Int { buffer.count - start }

    public mutating func append(_ bytes: some Sequence<UInt8>) {
        buffer.append(contentsOf: bytes)
    }

    /// The next complete frame without its terminator, or nil when more bytes are needed.
    public mutating func nextFrame() throws(VarlinkFramingError) -> [UInt8]? {
        if failed { throw .messageTooLarge(limit: maxMessageSize) }
        let from = start + scanned
        if let nul = buffer[from...].firstIndex(of: 0) {
            let length = nul - start
            if length > maxMessageSize {
                failed = true
                throw .messageTooLarge(limit: maxMessageSize)
            }
            let frame = Array(buffer[start..<nul])
            start = nul + 1
            scanned = 0
            compactIfNeeded()
            return frame
        }
        scanned = buffer.count - start
        if scanned > maxMessageSize {
            failed = true
            throw .messageTooLarge(limit: maxMessageSize)
        }
        compactIfNeeded()
        return nil
    }

    private mutating func compactIfNeeded() {
        if start == buffer.count {
            buffer.removeAll(keepingCapacity: true)
            start = 0
        } else if start > 4096 && start * 2 > buffer.count {
            buffer.removeSubrange(0..<start)
            start = 0
        }
    }
}
