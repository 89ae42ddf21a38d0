import ControlProtocol

/// Who is on the other end of a control connection, from SO_PEERCRED (and SO_PEERGROUPS).
public struct PeerCredentials: Sendable, Equatable, CustomStringConvertible {
    public var pid: Int32
    public var uid: UInt32
    public var gid: UInt32
    /// Supplementary groups of the peer process (SO_PEERGROUPS; at most 64, group 0 not reported).
    public var groups: [UInt32]

    public init(pid: Int32, uid: UInt32, gid: UInt32, groups: [UInt32] = []) {
        self.pid = pid; self.uid = uid; self.gid = gid; self.groups = groups
    }

    /// Credentials that could not be read: an invalid uid/gid (-1) that no policy authorizes.
    public static let unknown = PeerCredentials(pid: 0, uid: UInt32.max, gid: UInt32.max)

    public var description: String { "pid=\(pid) uid=\(uid) gid=\(gid)" }
}

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
