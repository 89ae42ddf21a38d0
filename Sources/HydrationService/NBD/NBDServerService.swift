import NBDServer
import ServiceLifecycle

/// The NBD server as a swift-service-lifecycle `Service` (the server itself knows only
/// cancellation and `shutdown()`): a graceful shutdown stops it the gentle way, requests in flight
/// answered within `shutdownGrace`.
public struct NBDServerService: Service {
    public let server: NBDServer

    public init(_ server: NBDServer) { self.server = server }

    public func run() async throws {
        try await withGracefulShutdownHandler {
            try await server.run()
        } onGracefulShutdown: {
            server.shutdown()
        }
    }
}
