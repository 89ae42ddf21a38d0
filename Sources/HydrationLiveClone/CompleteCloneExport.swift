import HydrationEngine
import HydrationStorage
import NBDServer
import NIOCore

/// The export of a complete job restored after a restart from its metadata alone: such a job has
/// no `HydrationJob` (its source is never opened again; it may belong to someone else by now), and
/// its clone is simply its destination, every region hydrated. Served as a `FileNBDExport` of the
/// target size, once the destination is confirmed to be the device the metadata names (the same
/// rule as `HydrationJob.open`: a renumbered or reused device is not served; the service's
/// `CompleteCloneExport.open` confirms it, from the job's definition).
///
/// It offers the same contexts as the job's `LiveCloneExport` did before the restart: a client
/// that selects `x-hydrationd:state` (to see how far the clone is) finds it on a complete job
/// too, every region hydrated and committed, and released when the job discarded its source
/// (a restored job has every release done).
package final class CompleteCloneExport: NBDExport {
    private let file: FileNBDExport
    /// `RegionStateBits` of every region.
    let stateBits: UInt32

    package init(file: FileNBDExport, discardSource: Bool) {
        self.file = file
        stateBits =
            RegionStateBits.hydrated | RegionStateBits.committed | (discardSource ? RegionStateBits.released : 0)
    }

    package var name: String { file.name }
    package var size: UInt64 { file.size }
    package var description: String? { file.description }
    package var capabilities: NBDExportCapabilities { file.capabilities }
    package var blockSize: NBDBlockSize { file.blockSize }
    package var metaContexts: [String] { [NBDProtocol.baseAllocation, LiveCloneExport.stateContext] }

    package func read(offset: UInt64, length: UInt32) async throws(NBDError) -> ByteBuffer {
        try await file.read(offset: offset, length: length)
    }
    package func write(offset: UInt64, data: ByteBuffer, fua: Bool) async throws(NBDError) {
        try await file.write(offset: offset, data: data, fua: fua)
    }
    package func flush() async throws(NBDError) { try await file.flush() }
    package func trim(offset: UInt64, length: UInt32, fua: Bool) async throws(NBDError) {
        try await file.trim(offset: offset, length: length, fua: fua)
    }
    package func writeZeroes(offset: UInt64, length: UInt32, noHole: Bool, fastZero: Bool, fua: Bool)
        async throws(NBDError)
    {
        try await file.writeZeroes(offset: offset, length: length, noHole: noHole, fastZero: fastZero, fua: fua)
    }
    package func cache(offset: UInt64, length: UInt32) async throws(NBDError) {
        try await file.cache(offset: offset, length: length)
    }
    package func blockStatus(context: String, offset: UInt64, length: UInt32) async throws(NBDError) -> [NBDExtent] {
        guard context == LiveCloneExport.stateContext else {
            return try await file.blockStatus(context: context, offset: offset, length: length)
        }
        // Every region has the same state: one extent to the end of the request.
        return [NBDExtent(length: UInt32(min(UInt64(length), size - min(offset, size))), flags: stateBits)]
    }
}
