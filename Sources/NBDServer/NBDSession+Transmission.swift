import Logging
import NIOCore
import UnixSocketServer

extension NBDSession {

    func transmission(_ reader: inout NBDInboundReader, _ selected: Selected) async throws {
        var framer = NBDRequestFramer(maxPayload: selected.context.maxPayload)
        let maxRequests = max(1, config.maxRequestsInFlight)
        // A request larger than the budget still runs, alone.
        let maxBytes = config.maxBytesInFlight
        try await withThrowingTaskGroup(of: Int.self) { group in
            var inFlight = 0
            var bytes = 0
            loop: while true {
                let frame: NBDFrame?
                do {
                    frame = try await reader.next { (b: inout ByteBuffer) throws(NBDWireError) in try framer.next(&b) }
                } catch let e as NBDWireError {
                    logger.notice("closing NBD connection: \(e)")
                    break loop
                } catch {
                    break loop  // the connection failed or its input was closed
                }
                guard let frame else { break loop }
                switch frame {
                case .skippedWrite(let request):
                    let e = NBDError.invalid(
                        "write of \(request.length) bytes exceeds the maximum payload of \(selected.context.maxPayload)"
                    )
                    try? await outbound.write(contentsOf: errorReply(request, e, selected))
                case .request(let request, let payload):
                    if request.type == NBDCommand.disconnect.rawValue { break loop }
                    let cost = Self.cost(of: request, selected, maxExtents: config.maxBlockStatusExtents)
                    if inFlight > 0 && bytes + cost > maxBytes { server.budgetWaits.add(1, ordering: .relaxed) }
                    while inFlight >= maxRequests || (inFlight > 0 && bytes + cost > maxBytes) {
                        guard let done = try await group.next() else { break }
                        inFlight -= 1
                        bytes -= done
                    }
                    inFlight += 1
                    bytes += cost
                    group.addTask {
                        let replies = await self.execute(request, payload: payload, selected)
                        try? await self.outbound.write(contentsOf: replies)
                        return cost
                    }
                }
            }
            try await group.waitForAll()
        }
    }

    /// Bytes a request holds while in flight, counted against `maxBytesInFlight`: its READ or
    /// WRITE payload, or its BLOCK_STATUS reply at its largest (one chunk per selected context, an
    /// extent per byte of the request up to `maxBlockStatusExtents`; with 4 KiB regions a 2 GiB
    /// request's `x-hydrationd:state` reply alone is 512 KiB). Other requests hold nothing.
    static func cost(of request: NBDRequest, _ s: Selected, maxExtents: Int) -> Int {
        switch request.type {
        case NBDCommand.read.rawValue, NBDCommand.write.rawValue:
            return Int(min(request.length, s.context.maxPayload))
        case NBDCommand.blockStatus.rawValue:
            let extents = request.flags.contains(.reqOne) ? 1 : min(Int(request.length), max(1, maxExtents))
            return s.metaContexts.count * (NBDEncoder.blockStatusChunkOverhead + 8 * extents)
        default:
            return 0
        }
    }

    /// Runs one request and returns its whole reply (written at once, so replies never interleave).
    func execute(_ request: NBDRequest, payload: ByteBuffer?, _ s: Selected) async -> [ByteBuffer] {
        if let e = request.validate(in: s.context) { return errorReply(request, e, s) }
        let export = s.export
        let fua = request.flags.contains(.fua)
        do throws(NBDError) {
            switch request.command! {
            case .read:
                let data = try await export.read(offset: request.offset, length: request.length)
                guard data.readableBytes == Int(request.length) else {
                    throw NBDError.io("the export returned \(data.readableBytes) bytes for a read of \(request.length)")
                }
                if s.context.structuredReplies {
                    return [
                        NBDEncoder.offsetDataHeader(
                            cookie: request.cookie, offset: request.offset, dataLength: data.readableBytes, done: true),
                        data,
                    ]
                }
                return [NBDEncoder.simpleReply(cookie: request.cookie), data]
            case .write:
                try await export.write(offset: request.offset, data: payload ?? ByteBuffer(), fua: fua)
            case .flush:
                try await export.flush()
            case .trim:
                try await export.trim(offset: request.offset, length: request.length, fua: fua)
            case .cache:
                try await export.cache(offset: request.offset, length: request.length)
            case .writeZeroes:
                try await export.writeZeroes(
                    offset: request.offset, length: request.length, noHole: request.flags.contains(.noHole),
                    fastZero: request.flags.contains(.fastZero), fua: fua)
            case .blockStatus:
                var out: [ByteBuffer] = []
                for (i, c) in s.metaContexts.enumerated() {
                    let raw = try await export.blockStatus(
                        context: c.name, offset: request.offset, length: request.length)
                    guard
                        let extents = normalizeExtents(
                            raw, length: request.length, reqOne: request.flags.contains(.reqOne),
                            maxExtents: config.maxBlockStatusExtents)
                    else {
                        throw NBDError.io("the export returned no extents for \(c.name)")
                    }
                    out.append(
                        NBDEncoder.blockStatusChunk(
                            cookie: request.cookie, contextID: c.id, extents: extents,
                            done: i == s.metaContexts.count - 1))
                }
                return out
            case .disconnect:
                return []
            }
        } catch {
            return errorReply(request, error, s)
        }
        return [NBDEncoder.simpleReply(cookie: request.cookie)]
    }

    /// An error reply: a structured error chunk with the message once structured replies are
    /// negotiated, a simple reply otherwise. ENOTSUP is only allowed for FAST_ZERO and EOVERFLOW
    /// only for DF or oversized reads; elsewhere they become EINVAL (as nbdkit does).
    func errorReply(_ request: NBDRequest, _ error: NBDError, _ s: Selected) -> [ByteBuffer] {
        var code = error.code
        if code == .ENOTSUP && !request.flags.contains(.fastZero) { code = .EINVAL }
        if code == .EOVERFLOW && !(request.type == NBDCommand.read.rawValue && s.context.structuredReplies) {
            code = .EINVAL
        }
        if code == .ENOMEM { code = .EIO }
        logger.debug(
            "NBD request failed",
            metadata: ["command": "\(request.commandName)", "error": "\(code)", "message": "\(error.message)"])
        if s.context.structuredReplies {
            return [NBDEncoder.errorChunk(cookie: request.cookie, error: code, message: error.message)]
        }
        return [NBDEncoder.simpleReply(cookie: request.cookie, error: code.rawValue)]
    }
}
