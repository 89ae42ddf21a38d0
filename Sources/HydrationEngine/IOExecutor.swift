import HydrationStorage
import NIOPosix

/// Runs blocking storage calls on dedicated threads, off Swift's cooperative pool, so the control
/// socket and the actors stay responsive while a copy saturates the disk.
///
/// Deliberately not cancellable: a submitted call always runs to the end and reports its real
/// outcome. Cancelling a commit half-way (NIOThreadPool.runIfActive drops queued work when the
/// calling task is cancelled) would turn a healthy job into a failed one, and a write that may or
/// may not have happened is exactly the ambiguity the commit protocol exists to avoid.
public final class IOExecutor: Sendable {
    private let pool: NIOThreadPool

    /// `threads` bounds how many blocking calls run at once across every job that shares it.
    public init(threads: Int = 8) {
        pool = NIOThreadPool(numberOfThreads: max(1, threads))
        pool.start()
    }

    public struct ShutDown: Error, CustomStringConvertible {
        public var description: String { "the I/O executor is shut down" }
    }

    public func run<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<T, Error>) in
            pool.submit { state in
                switch state {
                case .active: continuation.resume(with: Result(catching: body))
                case .cancelled: continuation.resume(throwing: ShutDown())
                }
            }
        }
    }

    public func shutdown() async {
        try? await pool.shutdownGracefully()
    }
}
