import ControlProtocol
import NIOCore

/// Splits inbound bytes into NUL-terminated Varlink messages (the NUL is dropped). A message longer
/// than `maxMessageSize`, or that many bytes without a NUL, fails the pipeline with
/// `VarlinkFramingError.messageTooLarge`; the server then replies `MessageTooLarge` and closes.
struct VarlinkFrameNIODecoder: NIOSingleStepByteToMessageDecoder {
    typealias InboundOut = ByteBuffer
    let maxMessageSize: Int
    /// Bytes after the reader index already known to contain no NUL (avoids rescanning).
    private var scanned = 0

    init(maxMessageSize: Int) { self.maxMessageSize = maxMessageSize }

    mutating func decode(buffer: inout ByteBuffer) throws -> ByteBuffer? {
        let view = buffer.readableBytesView
        let from = view.index(view.startIndex, offsetBy: min(scanned, view.count))
        if let nul = view[from...].firstIndex(of: 0) {
            let length = nul - view.startIndex
            guard length <= maxMessageSize else { throw VarlinkFramingError.messageTooLarge(limit: maxMessageSize) }
            let frame = buffer.readSlice(length: length)!
            buffer.moveReaderIndex(forwardBy: 1)
            scanned = 0
            return frame
        }
        scanned = view.count
        if scanned > maxMessageSize { throw VarlinkFramingError.messageTooLarge(limit: maxMessageSize) }
        return nil
    }

    mutating func decodeLast(buffer: inout ByteBuffer, seenEOF: Bool) throws -> ByteBuffer? {
        // A trailing partial message at EOF is dropped: the peer left before finishing it.
        try decode(buffer: &buffer)
    }
}
