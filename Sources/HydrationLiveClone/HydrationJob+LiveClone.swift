import HydrationEngine
import HydrationStorage

/// The job's clone served over NBD: the live export, attached to the engine's job as its clients.
extension HydrationJob {
    /// The job's clone as an NBD export named after the job (the same object on every call), with
    /// dm-clone's semantics (`LiveCloneExport`). From the first call on, regions hydrated by
    /// clients are committed every commit interval even while the copy is paused, and a complete
    /// job keeps its destination open for the export until it is closed.
    /// `hydrateOnRead`: a read the source serves also hydrates the regions it read, in the background.
    public func liveExport(hydrateOnRead: Bool = false) throws(HydrationError) -> LiveCloneExport {
        if let export = clients as? LiveCloneExport { return export }
        try checkClientsMayAttach()
        let e = LiveCloneExport(
            name: name, geometry: geometry, source: sourceReader, dest: dest,
            io: IOExecutor(threads: LiveCloneExport.threadsPerExport),
            ownership: ownership, committer: committer, progress: progress, logger: logger,
            hydrateOnRead: hydrateOnRead, ownsIO: true,
            sourceIO: IOExecutor(threads: LiveCloneExport.threadsPerExport))
        try attachClients(e)
        return e
    }

    /// Another export of this job that reads its source through `source` (tests: a source that
    /// stops answering). Not registered as the job's export.
    func detachedExport(readingSourceThrough source: SourceReader, io: IOExecutor, sourceIO: IOExecutor)
        -> LiveCloneExport
    {
        LiveCloneExport(
            name: name, geometry: geometry, source: source, dest: dest, io: io, ownership: ownership,
            committer: committer, progress: progress, logger: logger, sourceIO: sourceIO)
    }
}

extension LiveCloneExport: JobClients {}
