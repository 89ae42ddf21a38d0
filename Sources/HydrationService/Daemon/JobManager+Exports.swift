import ControlProtocol
import Foundation
import HydrationEngine
import Logging

extension JobManager {
    // MARK: exports

    /// Serves the job's clone if its definition asks for it and it is open (a live entry). A job
    /// that could not be opened, or that is complete and restored from its metadata alone (its
    /// devices are not opened), is not served.
    func publishExport(_ name: String) async {
        guard let host = exportHost, let entry = jobs[name], entry.definition.export, !published.contains(name) else {
            return
        }
        if case .finished(let def, let header) = entry {
            // Complete and restored from its metadata alone: the clone is the destination itself.
            // Only the destination is opened (confirmed to be the job's own), never the source.
            let storage = self.storage
            do {
                let (export, device) = try await io.run {
                    try CompleteCloneExport.open(def, header: header, storage: storage, io: LiveCloneExport.clientIO)
                }
                do {
                    try host.publish(export)
                } catch {
                    device.close()
                    throw error
                }
                servedDestinations[name] = device
                published.insert(name)
                logger.info(
                    "complete job's destination exported over NBD",
                    metadata: ["job": "\(name)", "uri": "\(host.uri(for: name))"])
            } catch {
                exportErrors[name] =
                    error as? HydrationError ?? HydrationError(.ioError, "\(error)", path: entry.definition.dest)
                logger.error("complete job not exported", metadata: ["job": "\(name)", "error": "\(error)"])
            }
            return
        }
        guard case .live(let job, _) = entry else {
            logger.notice("exported job is not served: it is not open", metadata: ["job": "\(name)"])
            return
        }
        do {
            try host.publish(await job.liveExport(hydrateOnRead: entry.definition.hydrateOnRead))
            published.insert(name)
            logger.info("job exported over NBD", metadata: ["job": "\(name)", "uri": "\(host.uri(for: name))"])
        } catch {
            logger.error("job not exported", metadata: ["job": "\(name)", "error": "\(error)"])
        }
    }

    /// Stops serving the job's clone: out of the registry, then its connections ended and waited
    /// for. Called before the job is closed for good or replaced.
    func withdrawExport(_ name: String) async {
        guard let host = exportHost, published.remove(name) != nil else { return }
        let ended = await host.withdraw(name)
        servedDestinations.removeValue(forKey: name)?.close()
        logger.info("job export withdrawn", metadata: ["job": "\(name)", "clients_disconnected": "\(ended)"])
    }

    /// The job's export as the status shows it, nil when it is not served.
    func exportStatus(_ name: String) -> JobStatus.Export? {
        guard let host = exportHost, published.contains(name) else { return nil }
        return JobStatus.Export(uri: host.uri(for: name), clients: host.clients(of: name))
    }
}
