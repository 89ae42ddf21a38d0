import NIOCore
import NIOPosix
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// A server on a Unix stream socket (swift-nio): binds a path or adopts a socket-activated
/// descriptor, accepts connections until `shutdown()` or cancellation, serves each in a task of its
/// own, stops the connections it was told about (`track`), and removes the socket file it created.
///
/// What a connection is and how it is served is the caller's: a child channel `initializer`
/// (on the connection's event loop; it reads `PeerCredentials`, applies `ConnectionAdmission`,
/// an idle timeout, and calls `track`) and a `serve` function. The Varlink control server and the
/// NBD server both run on it.
public final class UnixSocketServer: Sendable {
    public struct ListeningInfo: Sendable {
        /// The socket path (nil for an adopted socket whose path is unknown).
        public var path: String?
    }

    public let listener: UnixSocketListener
    public let socketMode: UInt32
    public let socketGroup: UInt32?
    public let eventLoopGroup: any EventLoopGroup
    private let state = Mutex(State())

    private struct State: ~Copyable {
        var started = false
        var shuttingDown = false
        var listener: (any Channel)?
        /// How to stop each open connection at shutdown.
        var connections: [ObjectIdentifier: @Sendable () -> Void] = [:]
    }

    public init(
        listener: UnixSocketListener, socketMode: UInt32 = 0o660, socketGroup: UInt32? = nil,
        eventLoopGroup: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton
    ) {
        self.listener = listener
        self.socketMode = socketMode
        self.socketGroup = socketGroup
        self.eventLoopGroup = eventLoopGroup
    }

    /// A bootstrap on the server's event loops with the listen backlog set; add child channel
    /// options to it and pass it to `run`.
    public func makeBootstrap() -> ServerBootstrap {
        ServerBootstrap(group: eventLoopGroup).serverChannelOption(.backlog, value: 128)
    }

    public var isShuttingDown: Bool { state.withLock { $0.shuttingDown } }

    /// Remembers an accepted connection until it closes; `shutdown()` calls `stop` for it (at once
    /// if the server is already shutting down). Call it from the child channel initializer.
    public func track(_ channel: any Channel, stop: @escaping @Sendable () -> Void) {
        let id = ObjectIdentifier(channel)
        let stopNow = state.withLock { st in
            st.connections[id] = stop
            return st.shuttingDown
        }
        channel.closeFuture.whenComplete { _ in
            _ = self.state.withLock { $0.connections.removeValue(forKey: id) }
        }
        if stopNow { stop() }
    }

    /// Stops accepting and stops every tracked connection; `run()` then returns once the
    /// connections' `serve` calls have. Safe to call at any time.
    public func shutdown() {
        let (listener, stops): ((any Channel)?, [@Sendable () -> Void]) = state.withLock { st in
            st.shuttingDown = true
            return (st.listener, Array(st.connections.values))
        }
        listener?.close(promise: nil)
        for stop in stops { stop() }
    }

    /// Binds (or adopts) the socket, calls `onListening` once connections are accepted, serves
    /// until `shutdown()` or task cancellation, then removes the socket file it created.
    public func run<Accepted: Sendable>(
        bootstrap: ServerBootstrap,
        initializer: @escaping @Sendable (any Channel) -> EventLoopFuture<Accepted>,
        onListening: @Sendable (ListeningInfo) async -> Void,
        serve: @escaping @Sendable (Accepted) async -> Void
    ) async throws {
        let alreadyStarted = state.withLock { st in
            defer { st.started = true }
            return st.started
        }
        if alreadyStarted { throw UnixSocketServerError.alreadyStarted }

        // SIGPIPE must not kill the process when a client leaves mid-reply.
        signal(SIGPIPE, SIG_IGN)

        let bound = try await BoundListener.bind(
            bootstrap, listener: listener, mode: socketMode, group: socketGroup, initializer: initializer)
        let stop = state.withLock { st in
            st.listener = bound.channel.channel
            return st.shuttingDown
        }
        if stop { bound.channel.channel.close(promise: nil) }
        defer { if let path = bound.path { UnixSocketFile.remove(path, inode: bound.inode) } }

        await onListening(ListeningInfo(path: bound.path ?? listener.path))

        try await withTaskCancellationHandler {
            try await bound.channel.executeThenClose { inbound in
                try await withThrowingDiscardingTaskGroup { group in
                    for try await connection in inbound {
                        group.addTask { await serve(connection) }
                    }
                }
            }
        } onCancel: {
            shutdown()
        }
    }
}
