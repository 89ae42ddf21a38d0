import Logging
import NIOCore
import NIOHTTP1
import NIOPosix
import Synchronization

/// A minimal HTTP/1.1 server for Prometheus: `GET /metrics` answers the exposition, any other
/// path 404, any other method 405. One request per connection (`Connection: close`).
///
/// It runs on NIO's event loops; the exposition is made by `render` in a task (it awaits the job
/// manager, which answers status calls without waiting on I/O). A scraper is a single trusted
/// process, so the server admits only a few connections at once and gives each a deadline from
/// its accept: an idle or slow client (one that never sends its request, or trickles it) is cut
/// when it expires and cannot hold a slot for longer.
public final class MetricsServer: Sendable {
    public struct Limits: Sendable, Equatable {
        /// Connections open at once; more are closed at accept.
        public var connections: Int
        /// From accept to the end of the response.
        public var deadline: Duration
        public init(connections: Int = 8, deadline: Duration = .seconds(30)) {
            self.connections = connections; self.deadline = deadline
        }
    }

    let channel: any Channel
    public let address: MetricsListenAddress
    /// The port bound (the one asked for, or the kernel's choice for port 0 in tests).
    public let boundPort: Int

    private init(channel: any Channel, address: MetricsListenAddress, boundPort: Int) {
        self.channel = channel; self.address = address; self.boundPort = boundPort
    }

    /// Binds and listens; a failure (address in use, not an address of this host, no permission
    /// for a low port) is `MetricsError.cannotListen`, naming the address.
    public static func start(
        address: MetricsListenAddress, limits: Limits = Limits(),
        group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton, logger: Logger,
        render: @escaping @Sendable () async -> [UInt8]
    ) async throws(MetricsError) -> MetricsServer {
        let open = OpenConnections()
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
            .serverChannelOption(ChannelOptions.backlog, value: 16)
            .childChannelInitializer { channel in
                let now = open.count.add(1, ordering: .relaxed).newValue
                channel.closeFuture.whenComplete { _ in open.count.subtract(1, ordering: .relaxed) }
                guard now <= limits.connections else {
                    logger.debug(
                        "metrics: connection refused, all slots in use", metadata: ["limit": "\(limits.connections)"])
                    return channel.close()
                }
                let deadline = channel.eventLoop.scheduleTask(in: TimeAmount(limits.deadline)) {
                    channel.close(promise: nil)
                }
                channel.closeFuture.whenComplete { _ in deadline.cancel() }
                return channel.eventLoop.makeCompletedFuture(withResultOf: {
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline(withErrorHandling: true)
                    try channel.pipeline.syncOperations.addHandler(MetricsHTTPHandler(render: render))
                })
            }
            .childChannelOption(ChannelOptions.socketOption(.so_keepalive), value: 1)
        do {
            let channel = try await bootstrap.bind(host: address.host, port: address.port).get()
            let port = channel.localAddress?.port ?? address.port
            return MetricsServer(channel: channel, address: address, boundPort: port)
        } catch {
            throw MetricsError.cannotListen(address.description, "\(error)")
        }
    }

    /// Stops listening (connections in progress finish or meet their deadline).
    public func close() { channel.close(promise: nil) }

    /// Returns once the listener is closed.
    public func waitClosed() async { try? await channel.closeFuture.get() }
}

/// The connections open now, shared by the accept path and each connection's close.
final class OpenConnections: Sendable {
    let count = Atomic<Int>(0)
}

final class MetricsHTTPHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    let render: @Sendable () async -> [UInt8]
    private var head: HTTPRequestHead?
    private var answered = false

    init(render: @escaping @Sendable () async -> [UInt8]) { self.render = render }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch Self.unwrapInboundIn(data) {
        case .head(let h): head = h
        case .body: break
        case .end:
            guard let h = head, !answered else { return }
            answered = true
            let path = h.uri.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false).first ?? ""
            guard h.method == .GET || h.method == .HEAD else {
                respond(
                    context, h, .methodNotAllowed, Array("only GET is served\n".utf8), extra: [("Allow", "GET, HEAD")])
                return
            }
            guard path == "/metrics" else {
                respond(context, h, .notFound, Array("not found: metrics are at /metrics\n".utf8))
                return
            }
            let promise = context.eventLoop.makePromise(of: [UInt8].self)
            let render = self.render
            promise.completeWithTask { await render() }
            let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
            promise.futureResult.whenSuccess { body in
                let (handler, context) = bound.value
                handler.respond(
                    context, h, .ok, body,
                    extra: [("Content-Type", "text/plain; version=0.0.4; charset=utf-8")])
            }
        }
    }

    private func respond(
        _ context: ChannelHandlerContext, _ request: HTTPRequestHead, _ status: HTTPResponseStatus, _ body: [UInt8],
        extra: [(String, String)] = []
    ) {
        var headers = HTTPHeaders(extra)
        if !headers.contains(name: "Content-Type") {
            headers.add(name: "Content-Type", value: "text/plain; charset=utf-8")
        }
        headers.add(name: "Content-Length", value: "\(body.count)")
        headers.add(name: "Connection", value: "close")
        let head = HTTPResponseHead(version: request.version, status: status, headers: headers)
        context.write(Self.wrapOutboundOut(.head(head)), promise: nil)
        if request.method != .HEAD {
            context.write(
                Self.wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(bytes: body)))), promise: nil)
        }
        let channel = context.channel
        context.writeAndFlush(Self.wrapOutboundOut(.end(nil))).whenComplete { _ in channel.close(promise: nil) }
    }
}
