import NIOCore
import Synchronization

/// Requests in flight on one connection. While it is non-zero (a slow call, or a streaming one),
/// the idle timeout does not close the connection.
public final class ConnectionActivity: Sendable {
    private let inFlight = Atomic<Int>(0)
    public init() {}
    public func begin() { inFlight.add(1, ordering: .relaxed) }
    public func end() { inFlight.subtract(1, ordering: .relaxed) }
    public var isBusy: Bool { inFlight.load(ordering: .relaxed) > 0 }
}

/// Closes the connection when `IdleStateHandler` reports no inbound data for its read timeout and
/// no request is being served.
public final class IdleCloseHandler: ChannelInboundHandler {
    public typealias InboundIn = ByteBuffer
    public typealias InboundOut = ByteBuffer
    let activity: ConnectionActivity

    public init(activity: ConnectionActivity) { self.activity = activity }

    public func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let idle = event as? IdleStateHandler.IdleStateEvent, idle == .read {
            if !activity.isBusy { context.close(promise: nil) }
            return
        }
        context.fireUserInboundEventTriggered(event)
    }
}

extension ChannelPipeline.SynchronousOperations {
    /// Closes the connection once nothing has been received for `timeout` while `activity` has no
    /// request in flight.
    public func addIdleTimeout(_ timeout: Duration, activity: ConnectionActivity) throws {
        try addHandler(IdleStateHandler(readTimeout: TimeAmount(timeout)))
        try addHandler(IdleCloseHandler(activity: activity))
    }
}
