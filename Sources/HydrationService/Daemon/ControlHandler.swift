import ControlProtocol
import UnixSocketServer

/// What the control server calls for each `org.hydrationd.Control` method, after framing, decoding,
/// parameter validation and authorization. Throw a `VarlinkError` (e.g. `.noSuchJob(name)`) to reply
/// with that error; any other error is reported as `InternalError`.
///
/// Calls arrive concurrently from many connections; calls on one connection arrive one at a time.
public protocol ControlHandler: Sendable {
    func start(_ parameters: StartParameters, peer: PeerCredentials) async throws -> StartReply
    func pause(_ parameters: PauseParameters, peer: PeerCredentials) async throws -> JobReply
    func resume(_ parameters: ResumeParameters, peer: PeerCredentials) async throws -> JobReply
    func getStatus(_ parameters: GetStatusParameters, peer: PeerCredentials) async throws -> GetStatusReply
    /// `GetStatus` called with `more: true`. The first element should be the current state, then one
    /// per interval; an element with `isFinal` (the job ended) ends the call. Throw `NoSuchJob`
    /// before returning the stream for an unknown name. When the client leaves, the server stops
    /// iterating, which terminates the stream (its `onTermination` runs).
    func watchStatus(_ parameters: GetStatusParameters, peer: PeerCredentials) async throws
        -> AsyncThrowingStream<StatusUpdate, any Error>
    func list(_ parameters: ListParameters, peer: PeerCredentials) async throws -> ListReply
    func set(_ parameters: SetParameters, peer: PeerCredentials) async throws -> JobReply
    /// Must not return before the commit is durable.
    func commit(_ parameters: CommitParameters, peer: PeerCredentials) async throws -> JobReply
    func remove(_ parameters: RemoveParameters, peer: PeerCredentials) async throws -> RemoveReply
    func checkMetadata(_ parameters: CheckMetadataParameters, peer: PeerCredentials) async throws -> CheckMetadataReply
}
