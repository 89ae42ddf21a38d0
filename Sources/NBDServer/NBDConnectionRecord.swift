import NIOCore
import Synchronization

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
