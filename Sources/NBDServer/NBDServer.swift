import Logging
import NIOCore
import NIOPosix
import Synchronization
import UnixSocketServer

#if canImport(Glibc)
    import Glibc
#endif

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
    func admitHandshake(_ channel: any Channel, peer: PeerCredentials) -> String? {
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
    func admitTransmission(_ channel: any Channel, export: String) -> String? {
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

    var exportLookup: any NBDExportLookup { lookup }
    var accessCheck: NBDAccessCheck { access }
    var isShuttingDown: Bool { socket.isShuttingDown }
}
