import Logging
import NIOCore
import UnixSocketServer

extension NBDSession {

    private struct Close: Error {}

    enum OptionOutcome {
        case next
        case close
        case transmission(Selected)
    }

    /// Replies to one option: negotiation goes on, the connection closes, or transmission begins.
    func handleOption(_ raw: NBDRawOption, _ n: inout Negotiation) async throws -> OptionOutcome {
        do {
            return try await handleOptionThrowing(raw, &n).map { .transmission($0) } ?? .next
        } catch is Close {
            return .close
        }
    }

    func handleOptionThrowing(_ raw: NBDRawOption, _ n: inout Negotiation) async throws -> Selected? {
        let code = raw.code
        let request = NBDDecoder.parseOption(raw)
        func reply(_ buffers: [ByteBuffer]) async throws { try await outbound.write(contentsOf: buffers) }
        func error(_ type: NBDOptionReply, _ message: String) async throws {
            try await reply([NBDEncoder.optionError(code, type, message)])
        }

        if let refusal {
            switch request {
            case .abort:
                try? await reply([NBDEncoder.optionReply(code, .ack)])
                throw Close()
            case .exportName: throw Close()
            default:
                try await error(.errPolicy, refusal)
                return nil
            }
        }

        switch request {
        case .abort:
            try? await reply([NBDEncoder.optionReply(code, .ack)])
            throw Close()

        case .unsupported(let c):
            try await error(.errUnsupported, "option \(c) is not supported")

        case .invalid(let c, let reason):
            if c == NBDOption.exportName.rawValue { throw Close() }
            try await error(.errInvalid, reason)

        case .list:
            if server.isShuttingDown { try await error(.errShutdown, "the server is shutting down"); return nil }
            var out: [ByteBuffer] = []
            for e in await server.exportLookup.exports() {
                if case .denied = server.accessCheck(peer, e) { continue }
                out.append(NBDEncoder.server(code, name: e.name, description: e.description))
            }
            out.append(NBDEncoder.optionReply(code, .ack))
            try await reply(out)

        case .structuredReply:
            if n.structured { try await error(.errInvalid, "structured replies are already negotiated"); return nil }
            n.structured = true
            try await reply([NBDEncoder.optionReply(code, .ack)])

        case .listMetaContext(let name, let queries), .setMetaContext(let name, let queries):
            let isSet = code == NBDOption.setMetaContext.rawValue
            if isSet {
                n.metaContexts = []
                n.metaExport = nil
            }
            guard n.structured else {
                try await error(.errInvalid, "negotiate structured replies first"); return nil
            }
            guard let export = await server.exportLookup.export(named: name) else {
                try await error(.errUnknown, "no export named '\(name)'"); return nil
            }
            if case .denied(let why) = server.accessCheck(peer, export) {
                try await error(.errPolicy, why); return nil
            }
            if let bad = queries.first(where: { !$0.contains(":") }) {
                try await error(.errInvalid, "query '\(bad)' has no namespace"); return nil
            }
            let available = export.metaContexts
            var chosen: [String] = []
            if queries.isEmpty {
                if !isSet { chosen = available }
            } else {
                for q in queries {
                    let isNamespace = q.hasSuffix(":")
                    for c in available where !chosen.contains(c) {
                        if c == q || (!isSet && isNamespace && c.hasPrefix(q)) { chosen.append(c) }
                    }
                }
            }
            var out: [ByteBuffer] = []
            if isSet {
                n.metaContexts = chosen.enumerated().map { (UInt32($0.offset + 1), $0.element) }
                n.metaExport = name
                for c in n.metaContexts { out.append(NBDEncoder.metaContext(code, id: c.id, name: c.name)) }
            } else {
                for c in chosen { out.append(NBDEncoder.metaContext(code, id: 0, name: c)) }
            }
            out.append(NBDEncoder.optionReply(code, .ack))
            try await reply(out)

        case .info(let name, let requests), .go(let name, let requests):
            let isGo = code == NBDOption.go.rawValue
            if server.isShuttingDown { try await error(.errShutdown, "the server is shutting down"); return nil }
            guard let export = await server.exportLookup.export(named: name) else {
                try await error(.errUnknown, "no export named '\(name)'"); return nil
            }
            let access = server.accessCheck(peer, export)
            if case .denied(let why) = access {
                logger.notice("NBD access denied", metadata: ["export": "\(export.name)"])
                try await error(.errPolicy, why); return nil
            }
            if isGo, let full = server.admitTransmission(record.channel, export: export.name) {
                logger.notice("NBD connection refused", metadata: ["export": "\(export.name)", "reason": "\(full)"])
                try await error(.errPolicy, full); return nil
            }
            let selected = select(export, access: access, name: name, n)
            var out = [NBDEncoder.infoExport(code, size: selected.context.size, flags: selected.context.flags)]
            if requests.contains(NBDInfo.name.rawValue) { out.append(NBDEncoder.infoString(code, .name, export.name)) }
            if requests.contains(NBDInfo.description.rawValue), let d = export.description {
                out.append(NBDEncoder.infoString(code, .description, d))
            }
            out.append(NBDEncoder.infoBlockSize(code, effectiveBlockSize(export)))
            out.append(NBDEncoder.optionReply(code, .ack))
            try await reply(out)
            return isGo ? selected : nil

        case .exportName(let name):
            guard !server.isShuttingDown, let export = await server.exportLookup.export(named: name) else {
                throw Close()
            }
            let access = server.accessCheck(peer, export)
            if case .denied = access { throw Close() }
            if server.admitTransmission(record.channel, export: export.name) != nil { throw Close() }
            let selected = select(export, access: access, name: name, n)
            try await reply([
                NBDEncoder.exportNameReply(
                    size: selected.context.size, flags: selected.context.flags, noZeroes: n.noZeroes)
            ])
            return selected
        }
        return nil
    }

    func effectiveBlockSize(_ export: any NBDExport) -> NBDBlockSize {
        var b = export.blockSize
        b.maximum = min(b.maximum, config.maxPayload)
        return b
    }

    func select(_ export: any NBDExport, access: NBDAccess, name: String, _ n: Negotiation) -> Selected {
        let caps = export.capabilities
        let readOnly = caps.contains(.readOnly) || access == .readOnly
        var flags: NBDTransmissionFlags = [.hasFlags]
        if readOnly { flags.insert(.readOnly) }
        if caps.contains(.flush) { flags.insert(.sendFlush) }
        if caps.contains(.fua) && !readOnly { flags.insert(.sendFUA) }
        if caps.contains(.trim) && !readOnly { flags.insert(.sendTrim) }
        if caps.contains(.writeZeroes) && !readOnly {
            flags.insert(.sendWriteZeroes)
            if caps.contains(.fastZero) { flags.insert(.sendFastZero) }
        }
        if n.structured { flags.insert(.sendDF) }
        if caps.contains(.multiConn) { flags.insert(.canMultiConn) }
        if caps.contains(.cache) { flags.insert(.sendCache) }
        if caps.contains(.rotational) { flags.insert(.rotational) }
        // Contexts selected for another export name do not carry over (spec).
        let contexts = n.metaExport == name ? n.metaContexts : []
        let block = effectiveBlockSize(export)
        let context = NBDTransmissionContext(
            size: export.size, flags: flags, structuredReplies: n.structured, metaContextCount: contexts.count,
            minimumBlock: block.minimum, maxPayload: block.maximum)
        return Selected(export: export, context: context, metaContexts: contexts)
    }
}
