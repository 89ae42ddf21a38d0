import NIOCore

/// Buffers inbound bytes and runs a decoder over them until it yields a message.
struct NBDInboundReader {
    private var iterator: NIOAsyncChannelInboundStream<ByteBuffer>.AsyncIterator
    private var buffer = ByteBuffer()

    init(_ iterator: NIOAsyncChannelInboundStream<ByteBuffer>.AsyncIterator) { self.iterator = iterator }

    /// The next message `decode` finds, or nil at end of input.
    mutating func next<T>(_ decode: (inout ByteBuffer) throws(NBDWireError) -> T?) async throws -> T? {
        while true {
            if let value = try decode(&buffer) { return value }
            guard var chunk = try await iterator.next() else { return nil }
            if buffer.readableBytes == 0 {
                buffer = chunk
            } else {
                buffer.discardReadBytes()
                buffer.writeBuffer(&chunk)
            }
        }
    }
}
