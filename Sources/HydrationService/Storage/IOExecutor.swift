import NIOPosix

/// Runs blocking storage calls on dedicated threads, off Swift's cooperative pool, so the control
/// socket and the actors stay responsive while a copy saturates the disk.
public final class IOExecutor: Sendable {
    private let pool: NIOThreadPool

    /// `threads` bounds how many blocking calls run at once across every job that shares it.
    public init(threads: Int = 8) {
        pool = NIOThreadPool(numberOfThreads: max(1, threads))
        pool.start()
    }

    public func run<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
        try await pool.runIfActive(body)
    }

    public func shutdown() async {
        try? await pool.shutdownGracefully()
    }
}
