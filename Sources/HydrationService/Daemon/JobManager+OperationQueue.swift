import ControlProtocol
import Foundation
import HydrationEngine
import Logging

extension JobManager {
    // MARK: one operation at a time per job

    func acquire(_ name: String) async {
        if operationQueues[name] == nil {
            operationQueues[name] = []
            return
        }
        await withCheckedContinuation { operationQueues[name]!.append($0) }
    }

    func release(_ name: String) {
        guard var queue = operationQueues[name] else { return }
        if queue.isEmpty {
            operationQueues[name] = nil
        } else {
            // Ownership passes straight to the next waiter: nobody can slip in between.
            let next = queue.removeFirst()
            operationQueues[name] = queue
            next.resume()
        }
    }

    func serialized<T>(_ name: String, _ body: () async throws(HydrationError) -> T)
        async throws(HydrationError) -> T
    {
        await acquire(name)
        defer { release(name) }
        return try await body()
    }
}
