import Synchronization

/// Counters of the crash-safety tests (crash points, faults injected), printed as they grow:
/// shared by the explorers and the metadata fuzzing, whichever test target they are in.
package let crashCounters = Mutex<[String: Int]>([:])
package func countCrash(_ key: String, _ n: Int) {
    let total = crashCounters.withLock { c -> Int in
        c[key, default: 0] += n; return c[key]!
    }
    print("[crash-safety] \(key): +\(n), \(total) so far in this run")
}
