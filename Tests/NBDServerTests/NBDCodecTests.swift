import NIOCore
import Testing

@testable import NBDServer

/// The pure decoders, encoders and request validation, and a fuzz run over them.
@Suite struct NBDCodecTests {
    static func option(_ code: UInt32, _ data: [UInt8]) -> [UInt8] {
        var b = ByteBuffer()
        b.writeInteger(NBDProtocol.optionMagic)
        b.writeInteger(code)
        b.writeInteger(UInt32(data.count))
        b.writeBytes(data)
        return Array(b.readableBytesView)
    }

    static func request(_ r: NBDRequest, payload: [UInt8] = []) -> [UInt8] {
        var b = ByteBuffer()
        b.writeInteger(NBDProtocol.requestMagic)
        b.writeInteger(r.flags.rawValue)
        b.writeInteger(r.type)
        b.writeInteger(r.cookie)
        b.writeInteger(r.offset)
        b.writeInteger(r.length)
        b.writeBytes(payload)
        return Array(b.readableBytesView)
    }

    @Test func optionsDecodeOnlyWhenWholeAndParseEveryKnownOption() throws {
        let go = Self.option(NBDOption.go.rawValue, OptionData.name("disk", infos: [1, 2, 3]))
        // Every prefix is "need more" and consumes nothing.
        for cut in 0..<go.count {
            var b = ByteBuffer(bytes: go[..<cut])
            #expect(try NBDDecoder.decodeOption(&b, maxLength: 4096) == nil)
            #expect(b.readerIndex == 0)
        }
        var b = ByteBuffer(bytes: go + [1, 2])
        let raw = try #require(try NBDDecoder.decodeOption(&b, maxLength: 4096))
        #expect(b.readableBytes == 2)
        #expect(NBDDecoder.parseOption(raw) == .go(name: "disk", requests: [1, 2, 3]))

        func parse(_ code: NBDOption, _ data: [UInt8]) -> NBDOptionRequest {
            NBDDecoder.parseOption(NBDRawOption(code: code.rawValue, data: ByteBuffer(bytes: data)))
        }
        #expect(parse(.exportName, Array("a".utf8)) == .exportName("a"))
        #expect(parse(.abort, [1, 2, 3]) == .abort, "ABORT ignores its data")
        #expect(parse(.list, []) == .list)
        #expect(parse(.structuredReply, []) == .structuredReply)
        #expect(parse(.info, OptionData.name("")) == .info(name: "", requests: []))
        #expect(
            parse(.setMetaContext, OptionData.meta("d", ["base:allocation", "x-a:b"]))
                == .setMetaContext(name: "d", queries: ["base:allocation", "x-a:b"]))
        #expect(parse(.listMetaContext, OptionData.meta("d", [])) == .listMetaContext(name: "d", queries: []))
        #expect(parse(.startTLS, []) == .unsupported(5))
        #expect(parse(.extendedHeaders, []) == .unsupported(11))
        #expect(NBDDecoder.parseOption(NBDRawOption(code: 999, data: ByteBuffer())) == .unsupported(999))

        // Malformed lengths are .invalid, never a crash.
        func isInvalid(_ r: NBDOptionRequest) -> Bool { if case .invalid = r { return true } else { return false } }
        #expect(isInvalid(parse(.list, [0])))
        #expect(isInvalid(parse(.structuredReply, [0])))
        #expect(isInvalid(parse(.go, [0, 0, 0])))
        #expect(isInvalid(parse(.go, [0, 0, 0, 9, 0x61, 0, 0])), "name length beyond the option")
        #expect(isInvalid(parse(.go, OptionData.name("d", infos: [1]).dropLast())), "info count does not match")
        #expect(isInvalid(parse(.go, OptionData.name("d") + [0])))
        #expect(isInvalid(parse(.exportName, [0x61, 0, 0x62])), "NUL in a name")
        #expect(isInvalid(parse(.exportName, [0xff, 0xfe])), "invalid UTF-8")
        #expect(isInvalid(parse(.exportName, [UInt8](repeating: 0x61, count: 4097))), "longer than 4096 bytes")
        #expect(
            isInvalid(parse(.setMetaContext, [0, 0, 0, 1, 0x61, 0xff, 0xff, 0xff, 0xff])), "query count beyond the data"
        )
        #expect(isInvalid(parse(.setMetaContext, OptionData.meta("d", ["q"]) + [7])))

        var bad = ByteBuffer(bytes: [UInt8](repeating: 0x41, count: 16))
        #expect(throws: NBDWireError.self) { try NBDDecoder.decodeOption(&bad, maxLength: 4096) }
        var long = ByteBuffer(bytes: Self.option(3, [UInt8](repeating: 0, count: 10)))
        #expect(throws: NBDWireError.optionTooLong(length: 10, limit: 8)) {
            try NBDDecoder.decodeOption(&long, maxLength: 8)
        }
    }

    @Test func framerSplitsRequestsAtAnyByteBoundaryAndSkipsOversizedWrites() throws {
        let read = NBDRequest(.read, cookie: 1, offset: 512, length: 4096)
        let write = NBDRequest(.write, flags: .fua, cookie: 2, offset: 0, length: 5)
        let big = NBDRequest(.write, cookie: 3, offset: 0, length: 100)
        let disc = NBDRequest(.disconnect, cookie: 4)
        let stream =
            Self.request(read) + Self.request(write, payload: [1, 2, 3, 4, 5])
            + Self.request(big, payload: [UInt8](repeating: 7, count: 100)) + Self.request(disc)
        for step in [1, 3, 7, 28, 29, 1000] {
            var framer = NBDRequestFramer(maxPayload: 64, maxSkip: 128)
            var buffer = ByteBuffer()
            var frames: [NBDFrame] = []
            var i = 0
            while i < stream.count {
                buffer.writeBytes(stream[i..<min(stream.count, i + step)])
                i += step
                while let f = try framer.next(&buffer) { frames.append(f) }
                #expect(buffer.readableBytes <= 64 + 28 + step, "never buffers more than one payload")
            }
            #expect(
                frames == [
                    .request(read, payload: nil), .request(write, payload: ByteBuffer(bytes: [1, 2, 3, 4, 5])),
                    .skippedWrite(big), .request(disc, payload: nil),
                ], "step \(step)")
        }
        var framer = NBDRequestFramer(maxPayload: 64, maxSkip: 128)
        var tooBig = ByteBuffer(bytes: Self.request(NBDRequest(.write, cookie: 1, offset: 0, length: 129)))
        #expect(throws: NBDWireError.writeTooLarge(length: 129, limit: 128)) { try framer.next(&tooBig) }
        var badMagic = ByteBuffer(bytes: [UInt8](repeating: 0, count: 28))
        #expect(throws: NBDWireError.badRequestMagic(0)) {
            var f = NBDRequestFramer(maxPayload: 64)
            _ = try f.next(&badMagic)
        }
    }

    @Test func validationGivesTheErrnoTheSpecAndNbdkitName() {
        let all: NBDTransmissionFlags = [
            .hasFlags, .sendFlush, .sendFUA, .sendTrim, .sendWriteZeroes, .sendFastZero, .sendDF, .sendCache,
        ]
        let ctx = NBDTransmissionContext(
            size: 1 << 20, flags: all, structuredReplies: true, metaContextCount: 1, maxPayload: 1 << 16)
        func check(_ r: NBDRequest, _ c: NBDTransmissionContext = ctx) -> NBDErrorCode? { r.validate(in: c)?.code }
        let mib: UInt64 = 1 << 20
        #expect(check(NBDRequest(.read, cookie: 1, offset: 0, length: 4096)) == nil)
        #expect(check(NBDRequest(.read, cookie: 1, offset: mib - 512, length: 4096)) == .EINVAL)
        #expect(check(NBDRequest(.write, cookie: 1, offset: mib - 512, length: 4096)) == .ENOSPC)
        #expect(check(NBDRequest(.writeZeroes, cookie: 1, offset: mib, length: 1)) == .ENOSPC)
        #expect(
            check(NBDRequest(.trim, cookie: 1, offset: UInt64.max, length: 2)) == .EINVAL, "offset + length overflows")
        #expect(check(NBDRequest(.read, cookie: 1, offset: 0, length: 0)) == .EINVAL)
        #expect(check(NBDRequest(.write, cookie: 1, offset: 0, length: 0)) == .ENOSPC, "as nbdkit")
        #expect(check(NBDRequest(type: 42, cookie: 1, offset: 0, length: 1)) == .EINVAL)
        #expect(check(NBDRequest(.flush, cookie: 1, offset: 1, length: 0)) == .EINVAL)
        #expect(
            check(NBDRequest(.read, flags: NBDCommandFlags(rawValue: 0x100), cookie: 1, offset: 0, length: 1))
                == .EINVAL)
        #expect(check(NBDRequest(.read, flags: .noHole, cookie: 1, offset: 0, length: 1)) == .EINVAL)
        #expect(check(NBDRequest(.read, flags: .reqOne, cookie: 1, offset: 0, length: 1)) == .EINVAL)
        #expect(check(NBDRequest(.write, flags: .dontFragment, cookie: 1, offset: 0, length: 1)) == .EINVAL)
        #expect(check(NBDRequest(.read, flags: .dontFragment, cookie: 1, offset: 0, length: 1)) == nil)
        #expect(check(NBDRequest(.writeZeroes, flags: [.fastZero, .noHole], cookie: 1, offset: 0, length: 1)) == nil)
        #expect(check(NBDRequest(.read, cookie: 1, offset: 0, length: 1 << 17)) == .EOVERFLOW)
        #expect(check(NBDRequest(.write, cookie: 1, offset: 0, length: 1 << 17)) == .EINVAL)
        #expect(check(NBDRequest(.trim, cookie: 1, offset: 0, length: 1 << 20)) == nil, "no payload: not limited")

        var plain = ctx
        plain.structuredReplies = false
        plain.flags = [.hasFlags]
        plain.metaContextCount = 0
        #expect(check(NBDRequest(.read, cookie: 1, offset: 0, length: 1 << 17), plain) == .EINVAL)
        #expect(check(NBDRequest(.read, flags: .dontFragment, cookie: 1, offset: 0, length: 1), plain) == .EINVAL)
        #expect(check(NBDRequest(.write, flags: .fua, cookie: 1, offset: 0, length: 1), plain) == .EINVAL)
        for c in [NBDCommand.flush, .trim, .cache, .writeZeroes, .blockStatus] {
            let len: UInt32 = c == .flush ? 0 : 1
            #expect(check(NBDRequest(c, cookie: 1, offset: 0, length: len), plain) == .EINVAL, "\(c) not negotiated")
        }
        var ro = ctx
        ro.flags.insert(.readOnly)
        #expect(check(NBDRequest(.write, cookie: 1, offset: 0, length: 1), ro) == .EPERM)
        #expect(check(NBDRequest(.trim, cookie: 1, offset: 0, length: 1), ro) == .EPERM)
        var aligned = ctx
        aligned.minimumBlock = 512
        aligned.size = 4096 + 100
        #expect(check(NBDRequest(.read, cookie: 1, offset: 512, length: 512), aligned) == nil)
        #expect(check(NBDRequest(.read, cookie: 1, offset: 100, length: 512), aligned) == .EINVAL)
        #expect(check(NBDRequest(.read, cookie: 1, offset: 0, length: 100), aligned) == .EINVAL)
        #expect(
            check(NBDRequest(.read, cookie: 1, offset: 4096, length: 100), aligned) == nil,
            "the unaligned tail stays reachable")
    }

    @Test func extentsAreMadeAValidReply() {
        let e = [
            NBDExtent(length: 0, flags: 1), NBDExtent(length: 100, flags: 3), NBDExtent(length: 50, flags: 3),
            NBDExtent(length: 200, flags: 0), NBDExtent(length: 9, flags: 1),
        ]
        #expect(normalizeExtents(e, length: 120, reqOne: false) == [NBDExtent(length: 150, flags: 3)])
        #expect(
            normalizeExtents(e, length: 300, reqOne: false) == [
                NBDExtent(length: 150, flags: 3), NBDExtent(length: 200, flags: 0),
            ])
        #expect(normalizeExtents(e, length: 60, reqOne: true) == [NBDExtent(length: 60, flags: 3)])
        #expect(normalizeExtents([], length: 60, reqOne: false) == nil)
        #expect(normalizeExtents([NBDExtent(length: 0, flags: 0)], length: 60, reqOne: true) == nil)
    }

    /// Seeded random bytes and mutations of valid messages through every decoder: no crash, no
    /// endless loop (every step consumes input or waits for more), buffering bounded.
    @Test func fuzzedInputNeverCrashesHangsOrGrowsUnbounded() throws {
        var rng = SeededRandom(seed: 0x6e62_64)
        let valid: [[UInt8]] = [
            Self.option(NBDOption.go.rawValue, OptionData.name("disk", infos: [0, 1, 2, 3])),
            Self.option(
                NBDOption.setMetaContext.rawValue, OptionData.meta("disk", ["base:allocation", "x-test:a"])),
            Self.option(NBDOption.listMetaContext.rawValue, OptionData.meta("", [])),
            Self.option(NBDOption.list.rawValue, []),
            Self.option(NBDOption.exportName.rawValue, Array("disk".utf8)),
            Self.request(NBDRequest(.read, cookie: 9, offset: 4096, length: 512)),
            Self.request(
                NBDRequest(.write, flags: .fua, cookie: 9, offset: 0, length: 8), payload: [1, 2, 3, 4, 5, 6, 7, 8]),
            Self.request(NBDRequest(.blockStatus, flags: .reqOne, cookie: 9, offset: 0, length: 1 << 20)),
        ]
        let ctx = NBDTransmissionContext(
            size: 1 << 30, flags: [.hasFlags, .sendFlush, .sendFUA, .sendTrim], structuredReplies: true,
            metaContextCount: 1, minimumBlock: 512)
        var parsed = 0, framed = 0, closed = 0
        for round in 0..<20_000 {
            var input: [UInt8]
            switch round % 3 {
            case 0:
                input = (0..<Int(rng.next() % 96)).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
            default:
                input = []
                for _ in 0..<(1 + Int(rng.next() % 4)) { input += valid[Int(rng.next() % UInt64(valid.count))] }
                for _ in 0..<(1 + Int(rng.next() % 6)) where !input.isEmpty {
                    let at = Int(rng.next() % UInt64(input.count))
                    switch rng.next() % 4 {
                    case 0: input[at] = UInt8(truncatingIfNeeded: rng.next())
                    case 1: input[at] ^= 1 << UInt8(rng.next() % 8)
                    case 2: input.remove(at: at)
                    default: input.insert(UInt8(truncatingIfNeeded: rng.next()), at: at)
                    }
                }
            }
            // Handshake side: options one after another until one is incomplete or fatal.
            var b = ByteBuffer(bytes: input)
            var steps = 0
            do {
                while let raw = try NBDDecoder.decodeOption(&b, maxLength: 1 << 16) {
                    _ = NBDDecoder.parseOption(raw)
                    parsed += 1
                    steps += 1
                    #expect(steps <= input.count / 16 + 1, "each option consumes at least its header")
                }
            } catch { closed += 1 }
            // Transmission side, fed in random pieces.
            var framer = NBDRequestFramer(maxPayload: 1 << 16)
            var buffer = ByteBuffer()
            var i = 0
            do {
                while i < input.count {
                    let n = 1 + Int(rng.next() % 40)
                    buffer.writeBytes(input[i..<min(input.count, i + n)])
                    i += n
                    var guardSteps = 0
                    while let frame = try framer.next(&buffer) {
                        framed += 1
                        guardSteps += 1
                        #expect(guardSteps <= 64)
                        if case .request(let r, _) = frame { _ = r.validate(in: ctx) }
                    }
                    #expect(buffer.readableBytes <= (1 << 16) + 28 + 40)
                }
            } catch { closed += 1 }
        }
        #expect(
            parsed > 1000 && framed > 1000 && closed > 1000,
            "the fuzz reaches every outcome: \(parsed) \(framed) \(closed)")
    }
}
