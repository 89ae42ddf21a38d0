import HydrationEngine
import NIOCore

/// The export of a complete job restored after a restart from its metadata alone: such a job has
/// no `HydrationJob` (its source is never opened again; it may belong to someone else by now), and
/// its clone is simply its destination, every region hydrated. Served as a `FileNBDExport` of the
/// target size, once the destination is confirmed to be the device the metadata names (the same
/// rule as `HydrationJob.open`: a renumbered or reused device is not served).
///
/// It offers the same contexts as the job's `LiveCloneExport` did before the restart: a client
/// that selects `x-hydrationd:state` (to see how far the clone is) finds it on a complete job
/// too, every region hydrated and committed, and released when the job discarded its source
/// (a restored job has every release done).
final class CompleteCloneExport: NBDExport {
    private let file: FileNBDExport
    /// `RegionStateBits` of every region.
    let stateBits: UInt32

    init(file: FileNBDExport, discardSource: Bool) {
        self.file = file
        stateBits =
            RegionStateBits.hydrated | RegionStateBits.committed | (discardSource ? RegionStateBits.released : 0)
    }

    static func open(
        _ def: JobDefinition, header: MetadataHeader, storage: any StorageProvider,
        io: IOExecutor
    ) throws(HydrationError) -> (CompleteCloneExport, any StorageDevice) {
        let dest = try HydrationJob.openDevice(storage, def.dest, .destination(createSize: nil), what: "destination")
        do throws(HydrationError) {
            try HydrationJob.confirm(
                dest.info, is: header.dest, what: "destination", metadataPath: def.metadata, exactSize: false)
            guard dest.info.size >= header.targetSize else {
                throw HydrationError(
                    .metadataMismatch,
                    "destination \(def.dest) has \(dest.info.size) bytes, fewer than the job's \(header.targetSize)",
                    path: def.metadata, parameter: "dest")
            }
        } catch {
            dest.close()
            throw error
        }
        let file = FileNBDExport(
            name: def.name, device: dest, io: io,
            description: "hydrationd live clone of job \(def.name) (complete)", size: header.targetSize)
        return (CompleteCloneExport(file: file, discardSource: header.discardSource), dest)
    }

    var name: String { file.name }
    var size: UInt64 { file.size }
    var description: String? { file.description }
    var capabilities: NBDExportCapabilities { file.capabilities }
    var blockSize: NBDBlockSize { file.blockSize }
    var metaContexts: [String] { [NBDProtocol.baseAllocation, LiveCloneExport.stateContext] }

    func read(offset: UInt64, length: UInt32) async throws(NBDError) -> ByteBuffer {
        try await file.read(offset: offset, length: length)
    }
    func write(offset: UInt64, data: ByteBuffer, fua: Bool) async throws(NBDError) {
        try await file.write(offset: offset, data: data, fua: fua)
    }
    func flush() async throws(NBDError) { try await file.flush() }
    func trim(offset: UInt64, length: UInt32, fua: Bool) async throws(NBDError) {
        try await file.trim(offset: offset, length: length, fua: fua)
    }
    func writeZeroes(offset: UInt64, length: UInt32, noHole: Bool, fastZero: Bool, fua: Bool) async throws(NBDError) {
        try await file.writeZeroes(offset: offset, length: length, noHole: noHole, fastZero: fastZero, fua: fua)
    }
    func cache(offset: UInt64, length: UInt32) async throws(NBDError) {
        try await file.cache(offset: offset, length: length)
    }
    func blockStatus(context: String, offset: UInt64, length: UInt32) async throws(NBDError) -> [NBDExtent] {
        guard context == LiveCloneExport.stateContext else {
            return try await file.blockStatus(context: context, offset: offset, length: length)
        }
        // Every region has the same state: one extent to the end of the request.
        return [NBDExtent(length: UInt32(min(UInt64(length), size - min(offset, size))), flags: stateBits)]
    }
}
