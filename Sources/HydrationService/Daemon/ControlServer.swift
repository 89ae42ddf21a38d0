import ControlProtocol
import Foundation
import Logging
import NIOCore
import NIOPosix
import ServiceLifecycle
import Synchronization
import UnixSocketServer

#if canImport(Glibc)
    import Glibc
#endif

/// The daemon's Varlink server on a Unix stream socket (`UnixSocketServer`, swift-nio).
///
/// Run it as a swift-service-lifecycle `Service`: `run()` binds (or adopts) the socket, calls
/// `onListening` once connections are accepted (send READY=1 there), serves until graceful
/// shutdown, task cancellation or `shutdown()`, then closes every connection and removes the socket
/// file it created.
///
/// Per connection: NUL framing (64 KiB limit), peer credentials (SO_PEERCRED), authorization
/// (`ControlAccessPolicy`), `org.varlink.service` handled here, `org.hydrationd.Control` dispatched to
/// the `ControlHandler`. A bad message gets a named error reply; only an oversized one closes the
/// connection. Nothing a connection does can stop the server.
public final class ControlServer: Service, Sendable {
    public typealias ListeningInfo = UnixSocketServer.ListeningInfo

    public let configuration: ControlServerConfiguration
    let handler: any ControlHandler
    private let logger: Logger
    private let onListening: @Sendable (ListeningInfo) async -> Void
    private let socket: UnixSocketServer
    private let admission: Mutex<ConnectionAdmission>

    struct Connection: Sendable {
        var channel: NIOAsyncChannel<ByteBuffer, ByteBuffer>
        var refusal: ConnectionAdmission.Refusal?
        var peer: PeerCredentials
        var activity: ConnectionActivity
    }

    public init(
        configuration: ControlServerConfiguration,
        handler: any ControlHandler,
        eventLoopGroup: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton,
        logger: Logger = Logger(label: "hydrationd.control"),
        onListening: @escaping @Sendable (ListeningInfo) async -> Void = { _ in }
    ) {
        self.configuration = configuration
        self.handler = handler
        self.logger = logger
        self.onListening = onListening
        self.socket = UnixSocketServer(
            listener: configuration.listener, socketMode: configuration.socketMode,
            socketGroup: configuration.socketGroup, eventLoopGroup: eventLoopGroup)
        self.admission = Mutex(
            ConnectionAdmission(limits: configuration.admissionLimits, privileged: configuration.privilegedPeers))
    }

    /// Number of connections currently admitted (below the limit).
    public var activeConnections: Int { admission.withLock { $0.activeConnections } }

    /// Stops accepting, closes every connection; `run()` then returns. Safe to call at any time.
    public func shutdown() {
        socket.shutdown()
    }

    public func run() async throws {
        try await withGracefulShutdownHandler {
            try await socket.run(
                bootstrap: socket.makeBootstrap(),
                initializer: { channel in
                    // The peer's credentials decide its admission; read on the channel's event loop,
                    // the future is already complete (no round trip).
                    PeerCredentials.future(of: channel).flatMapThrowing { peer in
                        try self.initializeConnection(channel, peer: peer)
                    }
                },
                onListening: { info in
                    self.logger.info("control socket listening", metadata: ["path": "\(info.path ?? "fd")"])
                    await self.onListening(info)
                },
                serve: { await self.serve($0) })
        } onGracefulShutdown: {
            self.shutdown()
        }
        logger.info("control socket closed")
    }

    // MARK: connections

    /// Runs on the child channel's event loop for each accepted connection.
    private func initializeConnection(_ channel: any Channel, peer: PeerCredentials) throws -> Connection {
        let refusal = admission.withLock { $0.admit(peer) }
        let isAdmitted = refusal == nil
        channel.closeFuture.whenComplete { _ in
            if isAdmitted { self.admission.withLock { $0.release(peer) } }
        }
        socket.track(channel) { channel.close(promise: nil) }

        let activity = ConnectionActivity()
        let timeout =
            isAdmitted ? configuration.idleTimeout : min(configuration.overLimitGrace, configuration.idleTimeout)
        let ops = channel.pipeline.syncOperations
        try ops.addIdleTimeout(timeout, activity: activity)
        try ops.addHandler(ByteToMessageHandler(VarlinkFrameNIODecoder(maxMessageSize: configuration.maxMessageSize)))
        let async = try NIOAsyncChannel<ByteBuffer, ByteBuffer>(wrappingChannelSynchronously: channel)
        return Connection(channel: async, refusal: refusal, peer: peer, activity: activity)
    }

    private func serve(_ connection: Connection) async {
        let peer = connection.peer
        var log = logger
        log[metadataKey: "peer"] = "\(peer)"
        do {
            try await connection.channel.executeThenClose { inbound, outbound in
                if let refusal = connection.refusal {
                    log.warning("connection refused: too many connections", metadata: ["reason": "\(refusal)"])
                    var it = inbound.makeAsyncIterator()
                    if (try? await it.next()) != nil {
                        try? await outbound.write(
                            Self.frame(VarlinkReply(error: .tooManyConnections(limit: refusal.limit))))
                    }
                    return
                }
                do {
                    for try await frame in inbound {
                        try await self.handleFrame(
                            frame, peer: peer, connection: connection, outbound: outbound, logger: log)
                    }
                } catch let error as VarlinkFramingError {
                    log.notice("closing connection: \(error)")
                    try? await outbound.write(
                        Self.frame(VarlinkReply(error: .messageTooLarge(limit: configuration.maxMessageSize))))
                }
            }
        } catch {
            log.debug("connection ended: \(error)")
        }
    }

    static func frame(_ reply: VarlinkReply) throws -> ByteBuffer {
        ByteBuffer(bytes: try VarlinkFraming.encode(reply))
    }

    // MARK: dispatch

    private typealias Outbound = NIOAsyncChannelOutboundWriter<ByteBuffer>

    private func handleFrame(
        _ frame: ByteBuffer, peer: PeerCredentials, connection: Connection, outbound: Outbound, logger: Logger
    ) async throws {
        let call: VarlinkCall
        do {
            call = try VarlinkFraming.decodeCall(frame.readableBytesView)
        } catch {
            try await outbound.write(Self.frame(VarlinkReply(error: .invalidMessage(Self.describe(error)))))
            return
        }
        connection.activity.begin()
        defer { connection.activity.end() }

        func reply(_ r: VarlinkReply) async throws {
            if call.isOneway { return }
            let buffer: ByteBuffer
            do {
                buffer = try Self.frame(r)
            } catch {
                logger.error("cannot encode reply to \(call.method): \(error)")
                buffer = try Self.frame(VarlinkReply(error: .internalError("cannot encode reply: \(error)")))
            }
            try await outbound.write(buffer)
        }

        do {
            if call.upgrade == true { throw VarlinkError.serviceInvalidParameter("upgrade") }
            if let denied = configuration.accessPolicy.authorize(method: call.method, peer: peer),
                isKnownMethod(call.method)
            {
                logger.notice("permission denied", metadata: ["method": "\(call.method)"])
                throw denied
            }
            if call.method == ControlMethod.getStatus.qualifiedName && call.wantsMore && !call.isOneway {
                try await streamStatus(call, peer: peer, channel: connection.channel.channel, outbound: outbound)
                return
            }
            try await reply(dispatch(call, peer: peer))
        } catch let error as VarlinkError {
            try await reply(VarlinkReply(error: error))
        } catch is CancellationError {
            throw CancellationError()
        } catch {
            if !connection.channel.channel.isActive { throw error }
            logger.error("\(call.method) failed: \(error)")
            try await reply(VarlinkReply(error: .internalError(Self.describe(error))))
        }
    }

    private func isKnownMethod(_ method: String) -> Bool {
        method == "org.varlink.service.GetInfo" || method == "org.varlink.service.GetInterfaceDescription"
            || ControlMethod.allCases.contains { $0.qualifiedName == method }
    }

    private func dispatch(_ call: VarlinkCall, peer: PeerCredentials) async throws -> VarlinkReply {
        let iface = call.interfaceName
        switch iface {
        case ControlInterface.serviceInterfaceName:
            switch call.memberName {
            case "GetInfo":
                _ = try Self.decodeParameters(call, as: EmptyParameters.self)
                return try VarlinkReply(
                    encoding: VarlinkServiceInfo(
                        vendor: configuration.vendor, product: configuration.product, version: configuration.version,
                        url: configuration.url,
                        interfaces: [ControlInterface.serviceInterfaceName, ControlInterface.name]))
            case "GetInterfaceDescription":
                let p = try Self.decodeParameters(call, as: GetInterfaceDescriptionParameters.self)
                guard let text = ControlInterface.descriptions[p.interface] else {
                    throw VarlinkError.interfaceNotFound(p.interface)
                }
                return try VarlinkReply(encoding: GetInterfaceDescriptionReply(description: text))
            default:
                throw VarlinkError.methodNotFound(call.method)
            }
        case ControlInterface.name:
            guard let method = ControlMethod(rawValue: call.memberName) else {
                throw VarlinkError.methodNotFound(call.method)
            }
            let h = handler
            switch method {
            case .start:
                return try VarlinkReply(
                    encoding: await h.start(Self.decodeParameters(call, as: StartParameters.self), peer: peer))
            case .pause:
                return try VarlinkReply(
                    encoding: await h.pause(Self.decodeParameters(call, as: PauseParameters.self), peer: peer))
            case .resume:
                return try VarlinkReply(
                    encoding: await h.resume(Self.decodeParameters(call, as: ResumeParameters.self), peer: peer))
            case .getStatus:
                return try VarlinkReply(
                    encoding: await h.getStatus(Self.decodeParameters(call, as: GetStatusParameters.self), peer: peer))
            case .list:
                return try VarlinkReply(
                    encoding: await h.list(Self.decodeParameters(call, as: ListParameters.self), peer: peer))
            case .set:
                return try VarlinkReply(
                    encoding: await h.set(Self.decodeParameters(call, as: SetParameters.self), peer: peer))
            case .commit:
                return try VarlinkReply(
                    encoding: await h.commit(Self.decodeParameters(call, as: CommitParameters.self), peer: peer))
            case .remove:
                return try VarlinkReply(
                    encoding: await h.remove(Self.decodeParameters(call, as: RemoveParameters.self), peer: peer))
            case .checkMetadata:
                return try VarlinkReply(
                    encoding: await h.checkMetadata(
                        Self.decodeParameters(call, as: CheckMetadataParameters.self), peer: peer))
            }
        default:
            throw VarlinkError.interfaceNotFound(iface)
        }
    }

    /// `GetStatus` with `more`: one reply per update, `continues` on all but the last. Ends when the
    /// handler's stream sends a final update or finishes, or when the client goes away.
    private func streamStatus(
        _ call: VarlinkCall, peer: PeerCredentials, channel: any Channel, outbound: Outbound
    ) async throws {
        let p = try Self.decodeParameters(call, as: GetStatusParameters.self)
        let updates = try await handler.watchStatus(p, peer: peer)
        let (closed, closedContinuation) = AsyncStream<Void>.makeStream()
        channel.closeFuture.whenComplete { _ in closedContinuation.finish() }
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask {
                var last: [JobStatus] = []
                for try await update in updates {
                    try await outbound.write(
                        Self.frame(
                            try VarlinkReply(
                                encoding: GetStatusReply(jobs: update.jobs), continues: !update.isFinal)))
                    if update.isFinal { return }
                    last = update.jobs
                }
                try Task.checkCancellation()
                // The stream ended without a final update: close the call with the last state.
                try await outbound.write(Self.frame(try VarlinkReply(encoding: GetStatusReply(jobs: last))))
            }
            group.addTask {
                for await _ in closed {}
                try Task.checkCancellation()
                throw CancellationError()  // the client left
            }
            defer { closedContinuation.finish() }
            try await group.next()
            group.cancelAll()
        }
    }
}
