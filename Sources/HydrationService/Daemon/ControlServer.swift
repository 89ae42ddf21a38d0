import ControlProtocol
import Foundation
import Logging
import NIOCore
import NIOPosix
import ServiceLifecycle
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// Settings of the control socket server.
public struct ControlServerConfiguration: Sendable {
    /// Where connections come from.
    public enum Listener: Sendable, Equatable {
        /// Bind a Unix socket at this path: the parent directory is created, a stale socket file
        /// (nobody listening) is replaced, the socket gets `socketMode` and `socketGroup`.
        case path(String)
        /// Adopt an already bound and listening Unix stream socket (systemd socket activation).
        /// Its mode and owner are the activator's business; the path is only for logs.
        case descriptor(Int32, path: String?)
    }

    public var listener: Listener
    /// gid that owns the socket and whose members may call mutating methods (`--socket-group`).
    public var socketGroup: UInt32?
    public var socketMode: UInt32 = 0o660
    /// Connections served at once. Beyond it a new connection gets `TooManyConnections` in reply to
    /// its first call (or is closed after `overLimitGrace` without one). Within it
    /// (`ConnectionAdmission`): read-only peers together may hold all but `privilegedReserve`,
    /// socket-group members with them all but `ownerReserve`, and each uid other than root and the
    /// daemon's own at most `maxConnectionsPerPeer`; root and the daemon's user always find room
    /// unless they themselves hold it.
    public var maxConnections = 64
    public var maxConnectionsPerPeer = 16
    public var privilegedReserve = 32
    public var ownerReserve = 8
    /// A connection with no request in flight and nothing received for this long is closed.
    public var idleTimeout: Duration = .seconds(60)
    public var overLimitGrace: Duration = .seconds(2)
    public var maxMessageSize = VarlinkFraming.maxMessageSize
    /// Returned by `org.varlink.service.GetInfo` (the `interfaces` field is filled in by the server).
    public var vendor = "hydrationd"
    public var product = "hydrationd"
    public var version = "0.1.0"
    public var url = "https://github.com/hydrationd/hydrationd"
    /// The daemon's effective uid, privileged like root (defaults to geteuid()).
    public var ownerUID: UInt32 = geteuid()

    public init(listener: Listener, socketGroup: UInt32? = nil) {
        self.listener = listener
        self.socketGroup = socketGroup
    }

    public var accessPolicy: ControlAccessPolicy {
        ControlAccessPolicy(socketGroup: socketGroup, ownerUID: ownerUID)
    }

    var admissionLimits: ConnectionAdmission.Limits {
        .init(
            total: maxConnections, perPeer: maxConnectionsPerPeer, privilegedReserve: privilegedReserve,
            ownerReserve: ownerReserve)
    }
}

/// Who gets one of the control socket's connection slots. Decided at accept from the peer's
/// credentials (SO_PEERCRED), so a flood by one class of peer cannot lock out a more privileged
/// one: streaming `GetStatus more` calls are never idle-cut, so without these limits a read-only
/// peer holding every slot would lock root out indefinitely.
///
/// - root and the daemon's own user: admitted while fewer than `total` connections are open;
/// - socket-group members: while fewer than `total - ownerReserve` are open and their uid holds
///   fewer than `perPeer`;
/// - any other (read-only) peer: while read-only peers hold fewer than `total - privilegedReserve`
///   and its uid holds fewer than `perPeer`; a peer whose credentials are unknown counts as read-only.
/// Reserves are capped at half the total so that a small limit still admits everyone.
public struct ConnectionAdmission: Sendable {
    public struct Limits: Sendable, Equatable {
        public var total: Int
        public var perPeer: Int
        public var privilegedReserve: Int
        public var ownerReserve: Int

        public init(total: Int = 64, perPeer: Int = 16, privilegedReserve: Int = 32, ownerReserve: Int = 8) {
            self.total = total; self.perPeer = perPeer; self.privilegedReserve = privilegedReserve;
            self.ownerReserve = ownerReserve
        }
    }

    public enum PeerClass: Sendable, Equatable { case owner, privileged, readOnly }

    /// A refusal, for the log and the reply.
    public struct Refusal: Sendable, Equatable, CustomStringConvertible {
        public var limit: Int
        public var reason: String
        public var description: String { reason }
    }

    public let limits: Limits
    public let policy: ControlAccessPolicy
    private(set) var total = 0
    private(set) var readOnly = 0
    private(set) var nonOwner = 0
    private(set) var perUID: [UInt32: Int] = [:]

    public init(limits: Limits, policy: ControlAccessPolicy) {
        self.limits = limits
        self.policy = policy
    }

    public func peerClass(_ peer: PeerCredentials) -> PeerClass {
        if peer.uid != UInt32.max && (peer.uid == 0 || peer.uid == policy.ownerUID) { return .owner }
        return policy.isPrivileged(peer) ? .privileged : .readOnly
    }

    public var activeConnections: Int { total }

    /// Takes a slot for `peer`, or says why not. Each admitted peer must be `release`d once.
    public mutating func admit(_ peer: PeerCredentials) -> Refusal? {
        let cls = peerClass(peer)
        let half = limits.total / 2
        if total >= limits.total {
            return Refusal(limit: limits.total, reason: "all \(limits.total) connections are in use")
        }
        if cls != .owner {
            let cap = limits.total - min(limits.ownerReserve, half)
            if nonOwner >= cap {
                return Refusal(
                    limit: cap,
                    reason:
                        "\(cap) connections of peers other than root and the daemon's user are in use (\(limits.total - cap) kept for them)"
                )
            }
            if perUID[peer.uid, default: 0] >= limits.perPeer {
                return Refusal(
                    limit: limits.perPeer,
                    reason: "uid \(peer.uid) already holds \(limits.perPeer) connections, the limit per peer")
            }
        }
        if cls == .readOnly {
            let cap = limits.total - min(limits.privilegedReserve, half)
            if readOnly >= cap {
                return Refusal(
                    limit: cap,
                    reason:
                        "read-only peers hold \(cap) connections, their share (\(limits.total - cap) kept for privileged peers)"
                )
            }
        }
        total += 1
        if cls != .owner { nonOwner += 1; perUID[peer.uid, default: 0] += 1 }
        if cls == .readOnly { readOnly += 1 }
        return nil
    }

    public mutating func release(_ peer: PeerCredentials) {
        let cls = peerClass(peer)
        total -= 1
        if cls != .owner {
            nonOwner -= 1
            let n = perUID[peer.uid, default: 1] - 1
            perUID[peer.uid] = n > 0 ? n : nil
        }
        if cls == .readOnly { readOnly -= 1 }
    }
}

public enum ControlServerError: Error, Sendable, Equatable, CustomStringConvertible {
    /// Another process is accepting connections on the path.
    case socketInUse(path: String)
    /// The path exists and is not a socket; it is never removed.
    case notASocket(path: String)
    case setupFailed(path: String, operation: String, errno: Int32)
    case alreadyStarted

    public var description: String {
        switch self {
        case .socketInUse(let p): return "\(p) is in use: another hydrationd is listening there"
        case .notASocket(let p): return "\(p) exists and is not a socket; refusing to replace it"
        case .setupFailed(let p, let op, let e): return "\(op) \(p): \(String(cString: strerror(e)))"
        case .alreadyStarted: return "the control server was already started"
        }
    }
}

/// The daemon's Varlink server on a Unix stream socket (swift-nio).
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
    public struct ListeningInfo: Sendable {
        /// The socket path (nil for an adopted socket whose path is unknown).
        public var path: String?
    }

    public let configuration: ControlServerConfiguration
    private let handler: any ControlHandler
    private let group: any EventLoopGroup
    private let logger: Logger
    private let onListening: @Sendable (ListeningInfo) async -> Void
    private let state = Mutex(State())
    private let admission: Mutex<ConnectionAdmission>

    private struct State: ~Copyable {
        var started = false
        var shuttingDown = false
        var listener: (any Channel)?
        var connections: [ObjectIdentifier: any Channel] = [:]
    }

    private struct Connection: Sendable {
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
        self.group = eventLoopGroup
        self.logger = logger
        self.onListening = onListening
        self.admission = Mutex(
            ConnectionAdmission(limits: configuration.admissionLimits, policy: configuration.accessPolicy))
    }

    /// Number of connections currently admitted (below the limit).
    public var activeConnections: Int { admission.withLock { $0.activeConnections } }

    /// Stops accepting, closes every connection; `run()` then returns. Safe to call at any time.
    public func shutdown() {
        let channels: [any Channel] = state.withLock { st in
            st.shuttingDown = true
            return (st.listener.map { [$0] } ?? []) + Array(st.connections.values)
        }
        for c in channels { c.close(promise: nil) }
    }

    public func run() async throws {
        let alreadyStarted = state.withLock { st in
            defer { st.started = true }
            return st.started
        }
        if alreadyStarted { throw ControlServerError.alreadyStarted }

        // SIGPIPE must not kill the daemon when a client leaves mid-reply.
        signal(SIGPIPE, SIG_IGN)

        let (serverChannel, boundPath, boundInode) = try await bind()
        let stop = state.withLock { st in
            st.listener = serverChannel.channel
            return st.shuttingDown
        }
        if stop { serverChannel.channel.close(promise: nil) }
        defer { if let boundPath { Self.removeSocketFile(boundPath, inode: boundInode) } }

        logger.info("control socket listening", metadata: ["path": "\(boundPath ?? listenerPathForLogs ?? "fd")"])
        await onListening(ListeningInfo(path: boundPath ?? listenerPathForLogs))

        try await Self.acceptLoop(serverChannel, serve: { await self.serve($0) }, shutdown: { self.shutdown() })
        logger.info("control socket closed")
    }

    private var listenerPathForLogs: String? {
        if case .descriptor(_, let path) = configuration.listener { return path }
        return nil
    }

    // MARK: socket setup

    private func bind() async throws -> (NIOAsyncChannel<Connection, Never>, String?, ino_t) {
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 128)
        return try await Self.bindUnixListener(
            bootstrap, listener: configuration.listener, mode: configuration.socketMode,
            group: configuration.socketGroup
        ) { channel in
            // The peer's credentials decide its admission; read on the channel's event loop, the
            // future is already complete (no round trip).
            Self.peerCredentialsFuture(of: channel).flatMapThrowing { peer in
                try self.initializeConnection(channel, peer: peer)
            }
        }
    }

    /// Binds `listener` (an adopted descriptor, or a path: stale socket replaced, `mode` and
    /// `group` applied) for a server whose connections `initializer` sets up. Shared by the
    /// control and NBD servers. Returns the channel, the path this process bound (nil for an
    /// adopted descriptor) and its inode, so that shutdown removes only that file.
    static func bindUnixListener<Accepted: Sendable>(
        _ bootstrap: ServerBootstrap, listener: ControlServerConfiguration.Listener, mode: UInt32, group: UInt32?,
        initializer: @escaping @Sendable (any Channel) -> EventLoopFuture<Accepted>
    ) async throws -> (NIOAsyncChannel<Accepted, Never>, String?, ino_t) {
        switch listener {
        case .descriptor(let fd, _):
            return (try await bootstrap.bind(fd, childChannelInitializer: initializer), nil, 0)
        case .path(let path):
            try prepareSocketPath(path)
            let ch = try await bootstrap.bind(unixDomainSocketPath: path, childChannelInitializer: initializer)
            do {
                try applySocketAccess(path, mode: mode, group: group)
            } catch {
                try? await ch.channel.close()
                removeSocketFile(path, inode: nil)
                throw error
            }
            return (ch, path, socketInode(path))
        }
    }

    /// Accepts connections until the listener closes, each served in a task of its own; a
    /// graceful shutdown (swift-service-lifecycle) or a cancellation calls `shutdown`.
    static func acceptLoop<Accepted: Sendable>(
        _ serverChannel: NIOAsyncChannel<Accepted, Never>, serve: @escaping @Sendable (Accepted) async -> Void,
        shutdown: @escaping @Sendable () -> Void
    ) async throws {
        try await withTaskCancellationHandler {
            try await withGracefulShutdownHandler {
                try await serverChannel.executeThenClose { inbound in
                    try await withThrowingDiscardingTaskGroup { group in
                        for try await connection in inbound {
                            group.addTask { await serve(connection) }
                        }
                    }
                }
            } onGracefulShutdown: {
                shutdown()
            }
        } onCancel: {
            shutdown()
        }
    }

    /// Gives a freshly bound socket file its mode and group (shared with the NBD server).
    static func applySocketAccess(_ path: String, mode: UInt32, group: UInt32?) throws {
        guard chmod(path, mode_t(mode)) == 0 else {
            throw ControlServerError.setupFailed(path: path, operation: "chmod", errno: errno)
        }
        if let gid = group, chown(path, uid_t.max, gid_t(gid)) != 0 {
            throw ControlServerError.setupFailed(path: path, operation: "chown", errno: errno)
        }
    }

    /// The inode of the socket file this process bound, so that shutdown removes only that file.
    static func socketInode(_ path: String) -> ino_t {
        var st = stat()
        return lstat(path, &st) == 0 ? st.st_ino : 0
    }

    /// Creates the parent directory; removes a stale socket file; refuses a live socket or a non-socket.
    static func prepareSocketPath(_ path: String) throws {
        let parent = (path as NSString).deletingLastPathComponent
        if !parent.isEmpty {
            do {
                try FileManager.default.createDirectory(
                    atPath: parent, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o755])
            } catch {
                let underlying = (error as NSError).userInfo[NSUnderlyingErrorKey] as? NSError
                let code = underlying?.domain == NSPOSIXErrorDomain ? Int32(underlying!.code) : EIO
                throw ControlServerError.setupFailed(path: parent, operation: "mkdir", errno: code)
            }
        }
        var st = stat()
        guard lstat(path, &st) == 0 else { return }  // nothing there
        guard (st.st_mode & S_IFMT) == S_IFSOCK else { throw ControlServerError.notASocket(path: path) }
        if isListening(path) { throw ControlServerError.socketInUse(path: path) }
        guard unlink(path) == 0 || errno == ENOENT else {
            throw ControlServerError.setupFailed(path: path, operation: "unlink", errno: errno)
        }
    }

    /// Whether something listens on the Unix socket at `path`, asked without ever waiting: a
    /// non-blocking connect succeeds, or finds the listener's backlog full (EAGAIN), when a server
    /// is there, and is refused when the file is stale. (A blocking connect waited for as long as
    /// a hung server's full backlog stayed full, on the thread that starts the daemon.)
    static func isListening(_ path: String) -> Bool {
        let fd = socket(
            AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: addr.sun_path) else { return false }
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        if rc == 0 { return true }
        return errno == EAGAIN || errno == EINPROGRESS
    }

    /// Removes the socket file if it is still the one this server bound (same inode).
    static func removeSocketFile(_ path: String, inode: ino_t?) {
        var st = stat()
        guard lstat(path, &st) == 0, (st.st_mode & S_IFMT) == S_IFSOCK else { return }
        if let inode, inode != 0, st.st_ino != inode { return }
        unlink(path)
    }

    // MARK: connections

    /// Runs on the child channel's event loop for each accepted connection.
    private func initializeConnection(_ channel: any Channel, peer: PeerCredentials) throws -> Connection {
        let refusal = admission.withLock { $0.admit(peer) }
        let isAdmitted = refusal == nil
        let id = ObjectIdentifier(channel)
        let countedAdmission = isAdmitted
        let closeNow = state.withLock { st in
            st.connections[id] = channel
            return st.shuttingDown
        }
        channel.closeFuture.whenComplete { _ in
            if countedAdmission { self.admission.withLock { $0.release(peer) } }
            _ = self.state.withLock { $0.connections.removeValue(forKey: id) }
        }
        if closeNow { channel.close(promise: nil) }

        let activity = ConnectionActivity()
        let timeout =
            isAdmitted ? configuration.idleTimeout : min(configuration.overLimitGrace, configuration.idleTimeout)
        let ops = channel.pipeline.syncOperations
        try ops.addHandler(IdleStateHandler(readTimeout: TimeAmount(timeout)))
        try ops.addHandler(IdleCloseHandler(activity: activity))
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

    static func peerCredentials(of channel: any Channel) async -> PeerCredentials {
        (try? await peerCredentialsFuture(of: channel).get()) ?? .unknown
    }

    /// SO_PEERCRED and SO_PEERGROUPS of a connection (`.unknown` when they cannot be read).
    static func peerCredentialsFuture(of channel: any Channel) -> EventLoopFuture<PeerCredentials> {
        guard let provider = channel as? any SocketOptionProvider else {
            return channel.eventLoop.makeSucceededFuture(.unknown)
        }
        let cred: EventLoopFuture<PeerUCred> = provider.unsafeGetSocketOption(
            level: SocketOptionLevel(SOL_SOCKET), name: SocketOptionName(SO_PEERCRED))
        // SO_PEERGROUPS (Linux 4.13+); the buffer is zero-filled, so zero entries are padding.
        let rawGroups: EventLoopFuture<InlineArray<64, UInt32>> = provider.unsafeGetSocketOption(
            level: SocketOptionLevel(SOL_SOCKET), name: SocketOptionName(59))
        return cred.flatMap { cred in
            rawGroups.map { raw -> [UInt32] in
                var groups: [UInt32] = []
                for i in raw.indices where raw[i] != 0 { groups.append(raw[i]) }
                return groups
            }.recover { _ in [] }.map { groups in
                PeerCredentials(pid: cred.pid, uid: cred.uid, gid: cred.gid, groups: groups)
            }
        }.recover { _ in .unknown }
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

    /// Decodes `call.parameters` as `P`, rejecting unknown, missing or ill-typed parameters with
    /// `org.varlink.service.InvalidParameter` naming the parameter.
    static func decodeParameters<P: VarlinkParameters>(_ call: VarlinkCall, as type: P.Type) throws(VarlinkError) -> P {
        let object: [String: JSONValue]
        switch call.parameters {
        case nil, .null?: object = [:]
        case .object(let o)?: object = o
        default: throw .serviceInvalidParameter("parameters")
        }
        if let unknown = object.keys.sorted().first(where: { !P.parameterNames.contains($0) }) {
            throw .serviceInvalidParameter(unknown)
        }
        do {
            return try JSONValue.object(object).decode(P.self)
        } catch let DecodingError.keyNotFound(key, ctx) {
            throw .serviceInvalidParameter(path(ctx.codingPath + [key]))
        } catch let DecodingError.typeMismatch(_, ctx) {
            throw .serviceInvalidParameter(path(ctx.codingPath))
        } catch let DecodingError.valueNotFound(_, ctx) {
            throw .serviceInvalidParameter(path(ctx.codingPath))
        } catch let DecodingError.dataCorrupted(ctx) where !ctx.codingPath.isEmpty {
            throw .serviceInvalidParameter(path(ctx.codingPath))
        } catch {
            throw .serviceInvalidParameter(culprit(in: object, as: P.self) ?? "parameters")
        }
    }

    /// For failures the decoder reports without a coding path (a number out of range for its field,
    /// e.g. negative for an unsigned one): the numeric parameter whose replacement by 0 removes the
    /// pathless failure.
    private static func culprit<P: VarlinkParameters>(in object: [String: JSONValue], as type: P.Type) -> String? {
        for (key, value) in object.sorted(by: { $0.key < $1.key }) {
            switch value {
            case .int, .uint, .double: break
            default: continue
            }
            var probe = object
            probe[key] = .int(0)
            do {
                _ = try JSONValue.object(probe).decode(P.self)
                return key
            } catch let DecodingError.dataCorrupted(ctx) where ctx.codingPath.isEmpty {
                continue
            } catch {
                return key  // a different (located) failure remains: this key was the pathless one
            }
        }
        return nil
    }

    private static func path(_ keys: [any CodingKey]) -> String {
        keys.isEmpty
            ? "parameters" : keys.map { $0.intValue.map { "[\($0)]" } ?? $0.stringValue }.joined(separator: ".")
    }

    private static func describe(_ error: any Error) -> String {
        switch error {
        case DecodingError.dataCorrupted(let ctx):
            let underlying = (ctx.underlyingError as? NSError)?.debugDescription ?? ""
            return "malformed JSON: \(ctx.debugDescription) \(underlying)".trimmingCharacters(in: .whitespaces)
        case DecodingError.keyNotFound(let key, _):
            return "missing field '\(key.stringValue)'"
        case DecodingError.typeMismatch(_, let ctx):
            return "wrong type for '\(path(ctx.codingPath))'"
        case DecodingError.valueNotFound(_, let ctx):
            return "null for '\(path(ctx.codingPath))'"
        default:
            return "\(error)"
        }
    }
}

/// `struct ucred` of <sys/socket.h> (only visible to C with _GNU_SOURCE): what SO_PEERCRED returns.
struct PeerUCred: Sendable, BitwiseCopyable {
    var pid: Int32
    var uid: UInt32
    var gid: UInt32
}

extension TimeAmount {
    init(_ duration: Duration) {
        let c = duration.components
        self = .nanoseconds(c.seconds * 1_000_000_000 + c.attoseconds / 1_000_000_000)
    }
}
