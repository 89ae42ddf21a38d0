/// Aliases and devices in use: refused before a job opens anything.
package enum Placement {
    /// Refuses, with `.sameDevice`, a source and destination that share bytes through any stack
    /// (a loop device and its backing file, a partition and its disk, a dm/md device and what it
    /// is built on, recursively), and a metadata file whose filesystem lives on either of them;
    /// then refuses, with `.deviceInUse` (`path` and `holder` set), a source or destination that
    /// something else has open (a loop device, a process, a device stacked on it, a mount).
    /// Providers that cannot tell (simulated storage) accept everything.
    package static func check(source: String, dest: String, metadataPath: String, storage: any StorageProvider)
        throws(IdentityError)
    {
        let s = try placementStack(storage, source, what: "source")
        let d = try placementStack(storage, dest, what: "destination")
        let m = try placementStack(storage, metadataPath, what: "metadata")
        if let s, let d, let why = s.overlap(with: d, as: "source", otherLabel: "destination") {
            throw IdentityError(
                .sameDevice,
                "source \(source) and destination \(dest) share storage: \(why); hydrating would overwrite or release one through the other",
                path: dest, parameter: "source")
        }
        if let m {
            for (label, path, other) in [("source", source, s), ("destination", dest, d)] {
                if let other, let why = m.overlap(with: other, as: "metadata", otherLabel: label) {
                    throw IdentityError(
                        .sameDevice,
                        "metadata \(metadataPath) and \(label) \(path) share storage: \(why); the metadata must live on a device that is neither the source nor the destination",
                        path: metadataPath, parameter: "metadata")
                }
            }
        }
        for (label, path, other) in [("source", source, dest), ("destination", dest, source)] {
            let usage: DeviceUsage?
            do { usage = try storage.usage(of: path) } catch {
                throw IdentityError(
                    .io, "\(label): \(error)", path: path, parameter: DeviceRole(label: label)?.parameter,
                    errno: error.errno)
            }
            guard let usage else { continue }
            let all = usage.holders.isEmpty ? usage.holder : usage.holders.joined(separator: ", ")
            throw IdentityError(
                .inUse,
                "\(label) \(path) is in use by: \(all) (job \(label == "source" ? "\(path) → \(other)" : "\(other) → \(path)")); hydration needs it to itself until a live clone exists: move the workload off it first (stop the VM or process, detach the loop device, unmount the filesystem, remove what is stacked on it), then hydrate",
                path: path, parameter: DeviceRole(label: label)?.parameter, holder: usage.holder)
        }
    }

    private static func placementStack(_ storage: any StorageProvider, _ path: String, what: String)
        throws(IdentityError) -> StorageStack?
    {
        do { return try storage.stack(of: path) } catch {
            throw IdentityError(
                .io, "\(what): \(error)", path: path, parameter: DeviceRole(label: what)?.parameter,
                errno: error.errno)
        }
    }
}
