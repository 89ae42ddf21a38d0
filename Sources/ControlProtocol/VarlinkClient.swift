import FoundationEssentials
import Synchronization

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#elseif canImport(Darwin)
    import Darwin
#endif

/// Why a `VarlinkClient` could not talk to the daemon (as opposed to a `VarlinkError`, which is the
/// daemon's named refusal).
public enum VarlinkClientError: Error, Sendable, Equatable, CustomStringConvertible {
    /// connect() failed: no socket file, nobody listening, or no permission.
    case unreachable(path: String, errno: Int32)
    /// The socket path does not fit in `sockaddr_un`.
    case pathTooLong(path: String)
    /// The daemon closed the connection before replying (or in the middle of a stream).
    case connectionClosed
    /// A send/recv failed.
    case io(operation: String, errno: Int32)
    /// No reply within the configured timeout.
    case timedOut
    /// The reply was not valid Varlink JSON or did not have the expected shape.
    case invalidReply(String)
    /// A reply exceeded `VarlinkFraming.maxReplySize`.
    case replyTooLarge(limit: Int)
    /// The client was closed (or an earlier streaming call was abandoned mid-stream).
    case closed

    public var description: String {
        switch self {
        case .unreachable(let path, let e):
            let why = String(cString: strerror(e))
            switch e {
            case ENOENT, ECONNREFUSED:
                return "hydrationd is not reachable at \(path): \(why). Is the daemon running? "
                    + "Start it with 'systemctl start hydrationd' or 'hydrationd --socket \(path)', "
                    + "or point --socket / HYDRATION_SOCKET at its control socket."
            case EACCES, EPERM:
                return "permission denied connecting to \(path): \(why). Run as root or as a member of the "
                    + "daemon's --socket-group."
            default:
                return "cannot connect to hydrationd at \(path): \(why)"
            }
        case .pathTooLong(let path): return "socket path too long (max 107 bytes): \(path)"
        case .connectionClosed: return "hydrationd closed the connection"
        case .io(let op, let e): return "\(op) failed: \(String(cString: strerror(e)))"
        case .timedOut: return "timed out waiting for hydrationd"
        case .invalidReply(let why): return "invalid reply from hydrationd: \(why)"
        case .replyTooLarge(let limit): return "reply from hydrationd larger than \(limit) bytes"
        case .closed: return "the connection to hydrationd is closed"
        }
    }
}

/// A blocking Varlink client over a Unix stream socket (plain POSIX sockets, no NIO).
///
/// One connection; calls on it are serialised (a second thread calling while one call is in
/// progress waits for it). Every synchronous method blocks the calling thread on socket I/O, so
/// from async code use the `…Async` variants and `statusUpdates(name:)`, which run the blocking part on
/// a dedicated thread and keep the cooperative pool free. Do not call the client from inside a
/// `stream` callback (the call lock is held there).
public final class VarlinkClient: Sendable {
    public let socketPath: String
    private let fd: Int32
    /// The frame decoder and the connection state; held for the whole of a call, which also
    /// serialises calls.
    private let state: Mutex<ConnectionState>

    struct ConnectionState: ~Copyable {
        var decoder = VarlinkFrameDecoder(maxMessageSize: VarlinkFraming.maxReplySize)
        var usable = true
    }

    /// Connects to the daemon's control socket.
    /// - Parameter timeout: if set, a send or a wait for a reply longer than this fails with `.timedOut`.
    public init(socketPath: String, timeout: Duration? = nil) throws(VarlinkClientError) {
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let pathBytes = Array(socketPath.utf8)
        let capacity = MemoryLayout.size(ofValue: addr.sun_path)
        guard pathBytes.count < capacity else { throw .pathTooLong(path: socketPath) }

        #if canImport(Glibc) || canImport(Musl)
            let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        #else
            let fd = socket(AF_UNIX, SOCK_STREAM, 0)
        #endif
        guard fd >= 0 else { throw .io(operation: "socket", errno: errno) }

        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            raw.copyBytes(from: pathBytes)
            raw[pathBytes.count] = 0
        }
        let rc = withUnsafePointer(to: &addr) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        if rc != 0 {
            let e = errno
            _ = Glibc.close(fd)
            throw .unreachable(path: socketPath, errno: e)
        }
        if let timeout {
            let total = timeout.components
            var tv = timeval(
                tv_sec: Int(total.seconds),
                tv_usec: Int(total.attoseconds / 1_000_000_000_000)
            )
            _ = setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
            _ = setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        }
        self.socketPath = socketPath
        self.fd = fd
        self.state = Mutex(ConnectionState())
    }

    deinit {
        _ = Glibc.close(fd)
    }

    /// Shuts the connection down. A call blocked in another thread returns with `.connectionClosed`
    /// or `.closed`. The descriptor itself is released when the client is deallocated, so no other
    /// thread can ever read a reused descriptor number.
    public func close() {
        _ = shutdown(fd, Int32(SHUT_RDWR))
    }

    // MARK: raw calls

    /// Sends `call` and returns its single reply. Varlink errors are returned in the reply (not thrown).
    /// With `oneway` set, sends and returns nil without waiting.
    public func send(_ call: VarlinkCall) throws -> VarlinkReply? {
        try state.withLock { st throws -> VarlinkReply? in
            guard st.usable else { throw VarlinkClientError.closed }
            try writeAll(VarlinkFraming.encode(call))
            if call.isOneway { return nil }
            let reply = try readReply(&st)
            if reply.isContinued && !call.wantsMore {
                st.usable = false
                throw VarlinkClientError.invalidReply("server sent continues without more")
            }
            if reply.isContinued {
                // The caller asked for more but used send(): drain the rest so the connection stays usable.
                var r = reply
                while r.isContinued { r = try readReply(&st) }
                return r
            }
            return reply
        }
    }

    /// Calls `method` with `parameters` and decodes the reply's parameters as `R`.
    /// Throws `VarlinkError` for an error reply, `VarlinkClientError` for transport failures.
    public func call<P: Encodable, R: Decodable>(
        _ method: String, parameters: P, replyType: R.Type = R.self
    ) throws -> R {
        let call = try VarlinkCall(method: method, encoding: parameters)
        guard let reply = try send(call) else { throw VarlinkClientError.invalidReply("no reply") }
        do {
            return try reply.decodeParameters(R.self)
        } catch let e as VarlinkError {
            throw e
        } catch {
            throw VarlinkClientError.invalidReply("\(method): \(error)")
        }
    }

    /// Calls `method` with `more: true` and hands every reply to `onReply` until the server sends
    /// the last one (no `continues`) or `onReply` returns false. Stopping early leaves the connection
    /// mid-stream, so it is closed: use a fresh client afterwards.
    public func stream<P: Encodable, R: Decodable>(
        _ method: String, parameters: P, replyType: R.Type = R.self,
        onReply: (R) throws -> Bool
    ) throws {
        let call = try VarlinkCall(method: method, encoding: parameters, more: true)
        try state.withLock { st throws in
            guard st.usable else { throw VarlinkClientError.closed }
            try writeAll(VarlinkFraming.encode(call))
            while true {
                let reply = try readReply(&st)
                let value: R
                do {
                    value = try reply.decodeParameters(R.self)
                } catch let e as VarlinkError {
                    throw e
                } catch {
                    st.usable = false
                    throw VarlinkClientError.invalidReply("\(method): \(error)")
                }
                let wantMore = try onReply(value)
                if !reply.isContinued { return }
                if !wantMore {
                    st.usable = false
                    close()
                    return
                }
            }
        }
    }

    // MARK: typed methods of org.hydrationd.Control

    public func getInfo() throws -> VarlinkServiceInfo {
        try call("org.varlink.service.GetInfo", parameters: EmptyParameters())
    }

    public func getInterfaceDescription(_ interface: String) throws -> String {
        let r: GetInterfaceDescriptionReply = try call(
            "org.varlink.service.GetInterfaceDescription",
            parameters: GetInterfaceDescriptionParameters(interface: interface)
        )
        return r.description
    }

    public func start(_ p: StartParameters) throws -> StartReply {
        try call(ControlMethod.start.qualifiedName, parameters: p)
    }

    public func pause(_ name: String) throws -> JobStatus {
        try call(ControlMethod.pause.qualifiedName, parameters: JobNameParameters(name: name), replyType: JobReply.self)
            .job
    }

    public func resume(_ name: String, acceptDevices: Bool = false) throws -> JobStatus {
        try call(
            ControlMethod.resume.qualifiedName,
            parameters: ResumeParameters(name: name, acceptDevices: acceptDevices ? true : nil),
            replyType: JobReply.self
        ).job
    }

    public func getStatus(name: String? = nil) throws -> [JobStatus] {
        try call(
            ControlMethod.getStatus.qualifiedName, parameters: GetStatusParameters(name: name),
            replyType: GetStatusReply.self
        ).jobs
    }

    /// Streams status updates (`GetStatus` with `more`) until the job ends or `onUpdate` returns false.
    public func watchStatus(name: String? = nil, onUpdate: ([JobStatus]) throws -> Bool) throws {
        try stream(
            ControlMethod.getStatus.qualifiedName, parameters: GetStatusParameters(name: name),
            replyType: GetStatusReply.self
        ) { try onUpdate($0.jobs) }
    }

    public func list() throws -> [JobSummary] {
        try call(ControlMethod.list.qualifiedName, parameters: EmptyParameters(), replyType: ListReply.self).jobs
    }

    public func set(_ p: SetParameters) throws -> JobStatus {
        try call(ControlMethod.set.qualifiedName, parameters: p, replyType: JobReply.self).job
    }

    public func commit(_ name: String) throws -> JobStatus {
        try call(
            ControlMethod.commit.qualifiedName, parameters: JobNameParameters(name: name), replyType: JobReply.self
        ).job
    }

    /// Returns where the job's metadata was kept, when it was (see `RemoveReply`).
    @discardableResult
    public func remove(_ name: String, force: Bool = false) throws -> String? {
        try call(
            ControlMethod.remove.qualifiedName, parameters: RemoveParameters(name: name, force: force ? true : nil),
            replyType: RemoveReply.self
        ).keptMetadata
    }

    public func checkMetadata(path: String) throws -> MetadataReport {
        try call(
            ControlMethod.checkMetadata.qualifiedName, parameters: CheckMetadataParameters(path: path),
            replyType: CheckMetadataReply.self
        ).report
    }

    // MARK: async, off the cooperative pool

    /// Connects on a dedicated thread.
    public static func connect(socketPath: String, timeout: Duration? = nil) async throws -> VarlinkClient {
        try await onDedicatedThread { try VarlinkClient(socketPath: socketPath, timeout: timeout) }
    }

    /// `call` on a dedicated thread.
    public func callAsync<P: Encodable & Sendable, R: Decodable & Sendable>(
        _ method: String, parameters: P, replyType: R.Type = R.self
    ) async throws -> R {
        try await Self.onDedicatedThread { try self.call(method, parameters: parameters, replyType: R.self) }
    }

    /// Streamed status updates as an AsyncSequence; the blocking reads run on a dedicated thread.
    /// The sequence ends after the final update; cancelling the consuming task (or dropping the
    /// sequence) shuts the connection down.
    public func statusUpdates(name: String? = nil) -> AsyncThrowingStream<[JobStatus], any Error> {
        let (stream, continuation) = AsyncThrowingStream<[JobStatus], any Error>.makeStream()
        continuation.onTermination = { [self] termination in
            if case .cancelled = termination { self.close() }
        }
        let e = DedicatedThread.start { [self] in
            do {
                try self.watchStatus(name: name) { jobs in
                    if case .terminated = continuation.yield(jobs) { return false }
                    return true
                }
                continuation.finish()
            } catch {
                continuation.finish(throwing: error)
            }
        }
        if e != 0 { continuation.finish(throwing: VarlinkClientError.io(operation: "pthread_create", errno: e)) }
        return stream
    }

    static func onDedicatedThread<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
        try await withCheckedThrowingContinuation { (cont: CheckedContinuation<T, any Error>) in
            let e = DedicatedThread.start { cont.resume(with: Result { try body() }) }
            if e != 0 { cont.resume(throwing: VarlinkClientError.io(operation: "pthread_create", errno: e)) }
        }
    }

    // MARK: I/O

    private func writeAll(_ bytes: [UInt8]) throws {
        var offset = 0
        while offset < bytes.count {
            let n = bytes.withUnsafeBytes { raw in
                Glibc.send(fd, raw.baseAddress! + offset, raw.count - offset, Int32(MSG_NOSIGNAL))
            }
            if n < 0 {
                let e = errno
                if e == EINTR { continue }
                if e == EAGAIN || e == EWOULDBLOCK { throw VarlinkClientError.timedOut }
                if e == EPIPE || e == ECONNRESET { throw VarlinkClientError.connectionClosed }
                throw VarlinkClientError.io(operation: "send", errno: e)
            }
            offset += n
        }
    }

    private func readReply(_ st: inout ConnectionState) throws -> VarlinkReply {
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let frame: [UInt8]?
            do {
                frame = try st.decoder.nextFrame()
            } catch {
                st.usable = false
                throw VarlinkClientError.replyTooLarge(limit: VarlinkFraming.maxReplySize)
            }
            if let frame {
                do {
                    return try VarlinkFraming.decodeReply(frame)
                } catch {
                    st.usable = false
                    throw VarlinkClientError.invalidReply("\(error)")
                }
            }
            let n = chunk.withUnsafeMutableBytes { raw in recv(fd, raw.baseAddress!, raw.count, 0) }
            if n == 0 {
                st.usable = false
                throw VarlinkClientError.connectionClosed
            }
            if n < 0 {
                let e = errno
                if e == EINTR { continue }
                st.usable = false
                if e == EAGAIN || e == EWOULDBLOCK { throw VarlinkClientError.timedOut }
                if e == ECONNRESET { throw VarlinkClientError.connectionClosed }
                throw VarlinkClientError.io(operation: "recv", errno: e)
            }
            st.decoder.append(chunk[0..<n])
        }
    }
}

/// A detached POSIX thread for a client's blocking reads, kept off Swift's cooperative pool.
/// pthreads rather than Foundation's `Thread` so that clonectl links FoundationEssentials only
/// (full Foundation brings ICU, and a cold start three times as long).
enum DedicatedThread {
    private final class Body: Sendable {
        let run: @Sendable () -> Void
        init(_ run: @escaping @Sendable () -> Void) { self.run = run }
    }

    /// Starts `body` on a new detached thread; 0, or pthread_create's error (then `body` never runs).
    static func start(_ body: @escaping @Sendable () -> Void) -> Int32 {
        let box = Unmanaged.passRetained(Body(body)).toOpaque()
        #if canImport(Darwin)
            var tid: pthread_t?
        #else
            var tid = pthread_t()
        #endif
        let rc = pthread_create(
            &tid, nil,
            { arg in
                Unmanaged<Body>.fromOpaque(arg!).takeRetainedValue().run()
                return nil
            }, box)
        if rc != 0 {
            Unmanaged<Body>.fromOpaque(box).release()
            return rc
        }
        #if canImport(Darwin)
            if let tid { pthread_detach(tid) }
        #else
            pthread_detach(tid)
        #endif
        return 0
    }
}
