import ControlProtocol
import Foundation
import Testing

@Suite struct FramingTests {
    @Test func encodeAppendsOneNulAfterJSON() throws {
        let bytes = try VarlinkFraming.encode(VarlinkCall(method: "org.varlink.service.GetInfo"))
        #expect(bytes.last == 0)
        #expect(bytes.dropLast().contains(0) == false)
        let text = String(decoding: bytes.dropLast(), as: UTF8.self)
        #expect(text == #"{"method":"org.varlink.service.GetInfo"}"#)
    }

    @Test func decoderSplitsSeveralFramesInOneChunk() throws {
        var d = VarlinkFrameDecoder()
        d.append(Array("{\"a\":1}\0{\"b\":2}\0{\"c\"".utf8))
        #expect(try d.nextFrame().map { String(decoding: $0, as: UTF8.self) } == "{\"a\":1}")
        #expect(try d.nextFrame().map { String(decoding: $0, as: UTF8.self) } == "{\"b\":2}")
        #expect(try d.nextFrame() == nil)
        #expect(d.bufferedByteCount == 4)
        d.append(Array(":3}\0".utf8))
        #expect(try d.nextFrame().map { String(decoding: $0, as: UTF8.self) } == "{\"c\":3}")
        #expect(try d.nextFrame() == nil)
        #expect(d.bufferedByteCount == 0)
    }

    @Test func decoderHandlesByteByByteInput() throws {
        var d = VarlinkFrameDecoder()
        var frames: [String] = []
        for byte in Array("{\"x\":\"y\"}\0{}\0\0".utf8) {
            d.append([byte])
            while let f = try d.nextFrame() { frames.append(String(decoding: f, as: UTF8.self)) }
        }
        #expect(frames == ["{\"x\":\"y\"}", "{}", ""])
    }

    @Test func messageOfExactlyTheLimitIsAccepted() throws {
        var d = VarlinkFrameDecoder(maxMessageSize: 16)
        d.append([UInt8](repeating: 0x41, count: 16) + [0])
        #expect(try d.nextFrame()?.count == 16)
    }

    @Test func unterminatedRunOverTheLimitThrows() throws {
        var d = VarlinkFrameDecoder(maxMessageSize: 16)
        d.append([UInt8](repeating: 0x41, count: 16))
        #expect(try d.nextFrame() == nil)
        d.append([0x41])
        #expect(throws: VarlinkFramingError.messageTooLarge(limit: 16)) { try d.nextFrame() }
        // Once failed, the stream stays failed even if a NUL arrives.
        d.append([0])
        #expect(throws: VarlinkFramingError.messageTooLarge(limit: 16)) { try d.nextFrame() }
    }

    @Test func terminatedMessageOverTheLimitThrows() throws {
        var d = VarlinkFrameDecoder(maxMessageSize: 16)
        d.append([UInt8](repeating: 0x41, count: 17) + [0])
        #expect(throws: VarlinkFramingError.messageTooLarge(limit: 16)) { try d.nextFrame() }
    }

    @Test func defaultLimitIs64KiB() throws {
        #expect(VarlinkFraming.maxMessageSize == 65536)
        var d = VarlinkFrameDecoder()
        d.append([UInt8](repeating: 0x20, count: 65536) + [0])
        #expect(try d.nextFrame()?.count == 65536)
        d.append([UInt8](repeating: 0x20, count: 65537))
        #expect(throws: VarlinkFramingError.self) { try d.nextFrame() }
    }

    @Test func largeStreamIsNotRescannedQuadratically() throws {
        // 2000 frames fed in 7-byte pieces: all come out intact and in order.
        var d = VarlinkFrameDecoder()
        var input: [UInt8] = []
        for i in 0..<2000 { input += Array("{\"i\":\(i)}".utf8) + [0] }
        var out: [Int] = []
        var offset = 0
        while offset < input.count {
            d.append(input[offset..<min(offset + 7, input.count)])
            offset += 7
            while let f = try d.nextFrame() {
                let obj = try JSONDecoder().decode([String: Int].self, from: Data(f))
                out.append(obj["i"]!)
            }
        }
        #expect(out == Array(0..<2000))
    }
}
