import HydrationEngine
import HydrationLiveClone
import HydrationStorage

/// Opening a complete job's export after a restart: its destination opened and confirmed to be
/// the device the metadata names (the rule of `HydrationJob.open`), from the job's definition.
extension CompleteCloneExport {
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
}
