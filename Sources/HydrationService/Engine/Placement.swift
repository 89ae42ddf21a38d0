import HydrationEngine

/// Aliases and devices in use (issue 11): refused before a job opens anything.
extension HydrationJob {
    /// Refuses, with `.sameDevice`, a source and destination that share bytes through any stack
    /// (a loop device and its backing file, a partition and its disk, a dm/md device and what it
    /// is built on, recursively), and a metadata file whose filesystem lives on either of them;
    /// then refuses, with `.deviceInUse` (`path` and `holder` set), a source or destination that
    /// something else has open (a loop device, a process, a device stacked on it, a mount).
    /// Providers that cannot tell (simulated storage) accept everything.
    static func checkPlacement(source: String, dest: String, metadataPath: String, storage: any StorageProvider)
        throws(HydrationError)
    {
        let s = try placementStack(storage, source, what: "source")
        let d = try placementStack(storage, dest, what: "destination")
        let m = try placementStack(storage, metadataPath, what: "metadata")
        if let s, let d, let why = s.overlap(with: d, as: "source", otherLabel: "destination") {
            var e = HydrationError(
                .sameDevice,
                "source \(source) and destination \(dest) share storage: \(why); hydrating would overwrite or release one through the other"
            )
            e.path = dest
            throw e
        }
        if let m {
            for (label, path, other) in [("source", source, s), ("destination", dest, d)] {
                if let other, let why = m.overlap(with: other, as: "metadata", otherLabel: label) {
                    var e = HydrationError(
                        .sameDevice,
                        "metadata \(metadataPath) and \(label) \(path) share storage: \(why); the metadata must live on a device that is neither the source nor the destination"
                    )
                    e.path = metadataPath
                    throw e
                }
            }
        }
        for (label, path, other) in [("source", source, dest), ("destination", dest, source)] {
            let usage: DeviceUsage?
            do { usage = try storage.usage(of: path) } catch {
                throw HydrationError(.ioError, "\(label): \(error)", errno: error.errno)
            }
            guard let usage else { continue }
            let all = usage.holders.isEmpty ? usage.holder : usage.holders.joined(separator: ", ")
            var e = HydrationError(
                .deviceInUse,
                "\(label) \(path) is in use by: \(all) (job \(label == "source" ? "\(path) → \(other)" : "\(other) → \(path)")); hydration needs it to itself until a live clone exists: move the workload off it first (stop the VM or process, detach the loop device, unmount the filesystem, remove what is stacked on it), then hydrate"
            )
            e.path = path
            e.holder = usage.holder
            throw e
        }
    }

    private static func placementStack(_ storage: any StorageProvider, _ path: String, what: String)
        throws(HydrationError) -> StorageStack?
    {
        do { return try storage.stack(of: path) } catch {
            throw HydrationError(.ioError, "\(what): \(error)", errno: error.errno)
        }
    }
}
