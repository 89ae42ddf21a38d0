/// The export of a complete job restored after a restart from its metadata alone: such a job has
/// no `HydrationJob` (its source is never opened again; it may belong to someone else by now), and
/// its clone is simply its destination, every region hydrated. Served as a `FileNBDExport` of the
/// target size, once the destination is confirmed to be the device the metadata names (the same
/// rule as `HydrationJob.open`: a renumbered or reused device is not served).
enum CompleteCloneExport {
    static func open(_ def: JobDefinition, header: MetadataHeader, storage: any StorageProvider,
                     io: IOExecutor) throws(HydrationError) -> (FileNBDExport, any StorageDevice) {
        let dest = try HydrationJob.openDevice(storage, def.dest, .destination(createSize: nil), what: "destination")
        do throws(HydrationError) {
            try HydrationJob.confirm(dest.info, is: header.dest, what: "destination", metadataPath: def.metadata, exactSize: false)
            guard dest.info.size >= header.targetSize else {
                throw HydrationError(.metadataMismatch, "destination \(def.dest) has \(dest.info.size) bytes, fewer than the job's \(header.targetSize)")
            }
        } catch {
            dest.close()
            throw error
        }
        let export = FileNBDExport(name: def.name, device: dest, io: io,
                                   description: "hydrationd live clone of job \(def.name) (complete)", size: header.targetSize)
        return (export, dest)
    }
}
