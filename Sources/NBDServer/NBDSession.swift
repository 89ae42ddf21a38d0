import Logging
import NIOCore
import UnixSocketServer

/// One connection's protocol: handshake, then transmission.
struct NBDSession: Sendable {
    typealias Outbound = NIOAsyncChannelOutboundWriter<ByteBuffer>
    let server: NBDServer
    let peer: PeerCredentials
    let record: ConnectionRecord
    /// Why the connection was not admitted to negotiate (every option is refused), or nil.
    let refusal: String?
    let outbound: Outbound
    let logger: Logger

    var config: NBDServerConfiguration { server.configuration }

    /// Negotiated during the handshake.
    struct Negotiation {
        var noZeroes = false
        var structured = false
        /// Export name given with the last SET_META_CONTEXT and the contexts it selected.
        var metaExport: String?
        var metaContexts: [(id: UInt32, name: String)] = []
    }

    /// The export and settings transmission runs with.
    struct Selected: Sendable {
        var export: any NBDExport
        var context: NBDTransmissionContext
        var metaContexts: [(id: UInt32, name: String)]
    }

    func run(_ reader: inout NBDInboundReader) async throws {
        try await outbound.write(NBDEncoder.greeting())
        guard let clientFlags = try await reader.next({ NBDDecoder.decodeClientFlags(&$0) }) else { return }
        let known = NBDProtocol.clientFlagFixedNewstyle | NBDProtocol.clientFlagNoZeroes
        guard clientFlags & ~known == 0 else {
            logger.notice("closing NBD connection: unknown client flags 0x\(String(clientFlags, radix: 16))")
            return
        }
        var negotiation = Negotiation(noZeroes: clientFlags & NBDProtocol.clientFlagNoZeroes != 0)
        var count = 0
        while true {
            count += 1
            if count > config.maxOptions {
                logger.notice("closing NBD connection: more than \(config.maxOptions) options")
                return
            }
            let raw: NBDRawOption?
            do {
                raw = try await reader.next { (b: inout ByteBuffer) throws(NBDWireError) in
                    try NBDDecoder.decodeOption(&b, maxLength: config.maxOptionLength)
                }
            } catch let e as NBDWireError {
                logger.notice("closing NBD connection: \(e)")
                return
            }
            guard let raw else { return }
            let selected: Selected
            switch try await handleOption(raw, &negotiation) {
            case .next: continue
            case .close: return
            case .transmission(let s): selected = s
            }
            record.enterTransmission(export: selected.export.name)
            logger.debug("NBD transmission", metadata: ["export": "\(selected.export.name)"])
            try await transmission(&reader, selected)
            return
        }
    }
}
