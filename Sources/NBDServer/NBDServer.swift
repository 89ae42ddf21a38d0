import Logging
import NIOCore
import NIOPosix
import Synchronization
import UnixSocketServer

#if canImport(Glibc)
    import Glibc
#endif

/// Settings of the NBD server.
public struct NBDServerConfiguration: Sendable {
    /// A socket path to bind (parent created, stale socket replaced, `socketMode`/`socketGroup`
    /// applied) or an adopted listening descriptor (socket activation), as for the control socket.
    public var listener: UnixSocketListener
    public var socketGroup: UInt32?
    public var socketMode: UInt32 = 0o660
    /// Connections in transmission at once, over every export; an OPT_GO beyond it gets
    /// NBD_REP_ERR_POLICY (EXPORT_NAME: closed).
    public var maxConnections = 64
    /// Connections in transmission with one export at once, so one export's clients (idle ones
    /// never time out) cannot take every connection from the others; an OPT_GO beyond it gets
    /// NBD_REP_ERR_POLICY naming the export (EXPORT_NAME: closed).
    public var maxConnectionsPerExport = 16
    /// Connections negotiating at once; beyond it a connection gets NBD_REP_ERR_POLICY to every
    /// option and is closed after 2 s.
    public var maxHandshakes = 64
    /// Connections of one peer process (SO_PEERCRED pid) negotiating at once; beyond it a
    /// connection is refused like one over `maxHandshakes`. A process that opens connections and
    /// never finishes their handshakes holds this many at most, for `handshakeTimeout` each.
    public var maxHandshakesPerPeer = 8
    /// Requests executing at once on one connection; the connection stops reading beyond it.
    public var maxRequestsInFlight = 64
    /// Bytes held at once by one connection's requests in flight: READ and WRITE payloads, and
    /// BLOCK_STATUS replies at their largest (`blockStatusCost`).
    public var maxBytesInFlight = 128 << 20
    /// Extents in one context's BLOCK_STATUS reply at most (8 bytes each); the client asks
    /// again from where the reply ends.
    public var maxBlockStatusExtents = 1 << 16
    /// Largest READ/WRITE payload (the export's `blockSize.maximum` may lower it). A WRITE up to
    /// twice this is read, dropped and refused with EINVAL; beyond, the connection is closed.
    public var maxPayload: UInt32 = NBDProtocol.defaultMaxPayload
    /// Option data beyond this closes the connection (a name and queries fit easily).
    public var maxOptionLength = 64 << 10
    /// Options one connection may send before it is considered abusive and closed.
    public var maxOptions = 256
    /// The handshake must end (OPT_GO / EXPORT_NAME) within this time (qemu-nbd's default too),
    /// else the connection is closed.
    public var handshakeTimeout: Duration = .seconds(10)
    /// On shutdown, requests in flight get this long to finish before connections are closed.
    public var shutdownGrace: Duration = .seconds(5)
    /// The daemon's effective uid, privileged in the default access policy.
    public var ownerUID: UInt32 = geteuid()
    /// Decides who may use which export; nil: `NBDAccessPolicy(socketGroup:ownerUID:)`.
    public var access: NBDAccessCheck?

    public init(
        listener: UnixSocketListener, socketGroup: UInt32? = nil, access: NBDAccessCheck? = nil
    ) {
        self.listener = listener
        self.socketGroup = socketGroup
        self.access = access
    }

    var accessCheck: NBDAccessCheck {
        if let access { return access }
        let policy = NBDAccessPolicy(socketGroup: socketGroup, ownerUID: ownerUID)
        return { peer, export in policy.check(peer: peer, export: export) }
    }
}

/// A Network Block Device server (fixed newstyle, structured replies, meta contexts) on a Unix
/// stream socket, serving the exports an `NBDExportLookup` provides. See `docs/nbd.md`.
///
/// `run()` binds or adopts the socket (`UnixSocketServer`), calls `onListening`, serves until
/// cancellation or `shutdown()`, then lets requests in flight finish (within `shutdownGrace`),
/// closes every connection and removes its socket file. Nothing a client sends can stop the server
/// or disturb another connection.
public final class NBDServer: Sendable {
    public let configuration: NBDServerConfiguration
    private let lookup: any NBDExportLookup
    private let socket: UnixSocketServer
    private let logger: Logger
    private let onListening: @Sendable (UnixSocketServer.ListeningInfo) async -> Void
    private let access: NBDAccessCheck
    private let state = Mutex(State())
    /// Times a connection stopped reading because its requests in flight held the byte budget
    /// (tests watch it to know the bound is holding a request back).
    let budgetWaits = Atomic<Int>(0)

    private struct State: ~Copyable {
        var connections: [ObjectIdentifier: ConnectionRecord] = [:]
        /// What each admitted connection counts against; refused ones are not here.
        var slots: [ObjectIdentifier: Slot] = [:]
    }

    private enum Slot {
        case negotiating(pid: Int32)
        case transmission(export: String)
    }

    public init(
        configuration: NBDServerConfiguration,
        exports: any NBDExportLookup,
        eventLoopGroup: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton,
        logger: Logger = Logger(label: "hydrationd.nbd"),
        onListening: @escaping @Sendable (UnixSocketServer.ListeningInfo) async -> Void = { _ in }
    ) {
        self.configuration = configuration
        self.lookup = exports
        self.socket = UnixSocketServer(
            listener: configuration.listener, socketMode: configuration.socketMode,
            socketGroup: configuration.socketGroup, eventLoopGroup: eventLoopGroup)
        self.logger = logger
        self.onListening = onListening
        self.access = configuration.accessCheck
    }

    /// Connections currently admitted (negotiating within the handshake limits, or in transmission).
    public var activeConnections: Int { state.withLock { $0.slots.count } }

    /// Admits a connection to negotiate, or says why not (`maxHandshakes`, `maxHandshakesPerPeer`).
    fileprivate func admitHandshake(_ channel: any Channel, peer: PeerCredentials) -> String? {
        let id = ObjectIdentifier(channel)
        return state.withLock { st -> String? in
            // Closed already (its record is gone): nothing to count, and nobody to refuse.
            guard st.connections[id] != nil else { return nil }
            var total = 0, fromPeer = 0
            for slot in st.slots.values {
                if case .negotiating(let pid) = slot {
                    total += 1
                    if pid == peer.pid { fromPeer += 1 }
                }
            }
            if total >= configuration.maxHandshakes {
                return "too many connections negotiating (limit \(configuration.maxHandshakes))"
            }
            if fromPeer >= configuration.maxHandshakesPerPeer {
                return
                    "process \(peer.pid) has too many connections negotiating (limit \(configuration.maxHandshakesPerPeer))"
            }
            st.slots[id] = .negotiating(pid: peer.pid)
            return nil
        }
    }

    /// Moves a negotiating connection into transmission with `export`, or says why not
    /// (`maxConnectionsPerExport`, `maxConnections`); it then goes on negotiating.
    fileprivate func admitTransmission(_ channel: any Channel, export: String) -> String? {
        let id = ObjectIdentifier(channel)
        return state.withLock { st -> String? in
            var total = 0, onExport = 0
            for (other, slot) in st.slots where other != id {
                if case .transmission(let e) = slot {
                    total += 1
                    if e == export { onExport += 1 }
                }
            }
            if onExport >= configuration.maxConnectionsPerExport {
                return
                    "export '\(export)' has too many connections (limit \(configuration.maxConnectionsPerExport) per export)"
            }
            if total >= configuration.maxConnections {
                return "too many connections (limit \(configuration.maxConnections))"
            }
            guard st.connections[id] != nil else { return "closed" }
            st.slots[id] = .transmission(export: export)
            return nil
        }
    }

    /// Stops accepting; connections still negotiating are closed; connections in transmission stop
    /// reading, finish their requests in flight and close (forced after `shutdownGrace`).
    public func shutdown() {
        socket.shutdown()
    }

    /// Connections in transmission with the export called `name` (past OPT_GO / EXPORT_NAME and
    /// not yet closed). Connections still negotiating are not counted.
    public func connections(export name: String) -> Int {
        state.withLock { st in
            st.connections.values.reduce(0) { $0 + ($1.inTransmission && $1.exportName == name ? 1 : 0) }
        }
    }

    /// `disconnect(export:)`, then waits until those connections have closed (their requests in
    /// flight answered, or cut off after `shutdownGrace`). Returns how many there were.
    @discardableResult
    public func disconnectAndWait(export name: String) async -> Int {
        let records = state.withLock { st in st.connections.values.filter { $0.exportName == name } }
        for r in records { r.stop(grace: configuration.shutdownGrace) }
        for r in records { try? await r.channel.closeFuture.get() }
        return records.count
    }

    /// Ends every connection using the export called `name` the same gentle way as `shutdown()`
    /// (for an export about to go away). Returns how many connections were told to stop.
    @discardableResult
    public func disconnect(export name: String) -> Int {
        let records = state.withLock { st in st.connections.values.filter { $0.exportName == name } }
        for r in records { r.stop(grace: configuration.shutdownGrace) }
        return records.count
    }

    public func run() async throws {
        let bootstrap = socket.makeBootstrap()
            .childChannelOption(.allowRemoteHalfClosure, value: true)
            .childChannelOption(
                .recvAllocator,
                value: AdaptiveRecvByteBufferAllocator(minimum: 1024, initial: 64 << 10, maximum: 1 << 20))
        try await socket.run(
            bootstrap: bootstrap,
            initializer: { channel in channel.eventLoop.makeCompletedFuture { try self.initializeConnection(channel) }
            },
            onListening: { info in
                self.logger.info("NBD socket listening", metadata: ["path": "\(info.path ?? "fd")"])
                await self.onListening(info)
            },
            serve: { await self.serve($0) })
        logger.info("NBD socket closed")
    }

    // MARK: connections

    private struct Accepted: Sendable {
        var channel: NIOAsyncChannel<ByteBuffer, ByteBuffer>
        var record: ConnectionRecord
    }

    /// Runs on the child channel's event loop for each accepted connection. Admission waits for
    /// the peer's credentials (`serve`): the handshake limits are per peer process.
    private func initializeConnection(_ channel: any Channel) throws -> Accepted {
        let record = ConnectionRecord(channel: channel)
        let id = ObjectIdentifier(channel)
        state.withLock { st in st.connections[id] = record }
        channel.closeFuture.whenComplete { _ in
            self.state.withLock { st in
                st.connections.removeValue(forKey: id)
                st.slots.removeValue(forKey: id)
            }
        }
        let grace = configuration.shutdownGrace
        socket.track(channel) { record.stop(grace: grace) }
        let async = try NIOAsyncChannel<ByteBuffer, ByteBuffer>(wrappingChannelSynchronously: channel)
        return Accepted(channel: async, record: record)
    }

    private func serve(_ accepted: Accepted) async {
        let channel = accepted.channel.channel
        let peer = await PeerCredentials.of(channel)
        var log = logger
        log[metadataKey: "peer"] = "\(peer)"
        let refusal = admitHandshake(channel, peer: peer)
        if let refusal { log.warning("NBD connection refused: \(refusal)") }
        let timeout = refusal == nil ? configuration.handshakeTimeout : min(configuration.handshakeTimeout, .seconds(2))
        let timer = channel.eventLoop.scheduleTask(in: TimeAmount(timeout)) {
            if !accepted.record.inTransmission { channel.close(promise: nil) }
        }
        defer { timer.cancel() }
        do {
            try await accepted.channel.executeThenClose { inbound, outbound in
                let session = NBDSession(
                    server: self, peer: peer, record: accepted.record, refusal: refusal,
                    outbound: outbound, logger: log)
                var reader = NBDInboundReader(inbound.makeAsyncIterator())
                try await session.run(&reader)
            }
        } catch {
            log.debug("NBD connection ended: \(error)")
        }
    }

    fileprivate var exportLookup: any NBDExportLookup { lookup }
    fileprivate var accessCheck: NBDAccessCheck { access }
    fileprivate var isShuttingDown: Bool { socket.isShuttingDown }
}

/// What the server knows of one connection, for shutdown and `disconnect(export:)`.
final class ConnectionRecord: Sendable {
    let channel: any Channel
    private let phase = Mutex<(transmission: Bool, export: String?)>((false, nil))

    init(channel: any Channel) { self.channel = channel }

    var inTransmission: Bool { phase.withLock { $0.transmission } }
    var exportName: String? { phase.withLock { $0.export } }

    func enterTransmission(export: String) {
        phase.withLock { $0 = (true, export) }
    }

    /// Negotiating: close now. In transmission: stop reading (the session then finishes its
    /// requests in flight and closes), and close for good after `grace`.
    func stop(grace: Duration) {
        guard inTransmission else {
            channel.close(promise: nil)
            return
        }
        channel.close(mode: .input, promise: nil)
        let ch = channel
        channel.eventLoop.scheduleTask(in: TimeAmount(grace)) { ch.close(promise: nil) }
    }
}

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

/// One connection's protocol: handshake, then transmission.
private struct NBDSession: Sendable {
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

    // MARK: handshake

    private struct Close: Error {}

    enum OptionOutcome {
        case next
        case close
        case transmission(Selected)
    }

    /// Replies to one option: negotiation goes on, the connection closes, or transmission begins.
    private func handleOption(_ raw: NBDRawOption, _ n: inout Negotiation) async throws -> OptionOutcome {
        do {
            return try await handleOptionThrowing(raw, &n).map { .transmission($0) } ?? .next
        } catch is Close {
            return .close
        }
    }

    private func handleOptionThrowing(_ raw: NBDRawOption, _ n: inout Negotiation) async throws -> Selected? {
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

    private func effectiveBlockSize(_ export: any NBDExport) -> NBDBlockSize {
        var b = export.blockSize
        b.maximum = min(b.maximum, config.maxPayload)
        return b
    }

    private func select(_ export: any NBDExport, access: NBDAccess, name: String, _ n: Negotiation) -> Selected {
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

    // MARK: transmission

    private func transmission(_ reader: inout NBDInboundReader, _ selected: Selected) async throws {
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
    private func execute(_ request: NBDRequest, payload: ByteBuffer?, _ s: Selected) async -> [ByteBuffer] {
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
    private func errorReply(_ request: NBDRequest, _ error: NBDError, _ s: Selected) -> [ByteBuffer] {
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
