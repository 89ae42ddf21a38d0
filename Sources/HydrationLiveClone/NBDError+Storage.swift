import HydrationEngine
import HydrationStorage
import NBDServer

extension NBDError {
    /// A storage failure: its errno mapped to the NBD error, its description as the message.
    public init(_ error: StorageError) {
        self.init(NBDErrorCode(errno: error.errno), error.description)
    }
}

extension IOExecutor {
    /// Runs an export's blocking storage call on the executor and turns its failure into the
    /// request's NBD error: a `StorageError` its errno's (with its description as the message),
    /// a shut-down executor ESHUTDOWN, anything else EIO.
    func runForNBD<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws(NBDError) -> T {
        do {
            return try await run(body)
        } catch let e as StorageError {
            throw NBDError(e)
        } catch let e as NBDError {
            throw e
        } catch is IOExecutor.ShutDown {
            throw NBDError(.ESHUTDOWN, "the I/O executor is shut down")
        } catch {
            throw NBDError.io("\(error)")
        }
    }
}
