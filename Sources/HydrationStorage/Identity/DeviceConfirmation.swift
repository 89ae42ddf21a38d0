/// Whether the devices found at a job's paths are the ones it was created for, and distinct
/// from each other: used by the job when it opens, and by the complete clone's export.
package enum DeviceConfirmation {
    /// Refuses, with `.sameDevice`, a source, destination and metadata of which two are the same
    /// file or device (by what they are while open, not by name).
    package static func checkDistinct(source: DeviceInfo, dest: DeviceInfo?, metadata: DeviceInfo?)
        throws(IdentityError)
    {
        if let dest, dest.identity == source.identity {
            throw IdentityError(
                .sameDevice, "source \(source.path) and destination \(dest.path) are the same \(source.identity)",
                path: dest.path, parameter: "source")
        }
        if let metadata {
            if metadata.identity == source.identity {
                throw IdentityError(
                    .sameDevice, "metadata \(metadata.path) is the source \(source.path)", path: metadata.path,
                    parameter: "metadata")
            }
            if let dest, metadata.identity == dest.identity {
                throw IdentityError(
                    .sameDevice, "metadata \(metadata.path) is the destination \(dest.path)", path: metadata.path,
                    parameter: "metadata")
            }
        }
    }

    /// Is `found` (what the path names now) the device the metadata was created for? Device
    /// numbers and /dev names are reused and renumbered (another disk of the same size can appear
    /// as /dev/sdb after a reboot, a loop number is reused at once): the stable identity decides.
    /// Without one (version 1 metadata, or a device that has none), a regular file is recognised
    /// by filesystem and inode as before, and a block device cannot be confirmed: the job stays
    /// stopped rather than write to or release a device that may be another one.
    /// A mismatch names the metadata file (`path`); an unconfirmed device names the device.
    package static func confirm(
        _ found: DeviceInfo, is recorded: DeviceRecord, what: String, metadataPath: String,
        exactSize: Bool, accept: Bool = false
    ) throws(IdentityError) {
        let parameter = DeviceRole(label: what)?.parameter
        let kindChanged = found.identity.kind != recorded.identity.kind
        let sizeChanged = exactSize ? found.size != recorded.size : found.size < recorded.size
        if kindChanged || sizeChanged {
            throw IdentityError(
                .mismatch,
                "\(what) \(found.path) (\(found.identity), \(found.size) bytes) is not the device metadata \(metadataPath) was created for (\(recorded.path): \(recorded.identity), \(recorded.size) bytes)",
                path: metadataPath, parameter: parameter)
        }
        // The operator has vouched for the device: kind and size were the checks left.
        if accept { return }
        if !recorded.stableID.isEmpty {
            guard StableID(recorded.stableID).confirms(StableID(found.stableID)) else {
                throw IdentityError(
                    .unconfirmed,
                    "\(what) \(found.path) is not the device the job was created for: it was \(recorded.stableID), it is now \(found.stableID.isEmpty ? "a device without a stable identity" : found.stableID). Nothing is written or released; put the right device at \(found.path) and resume, or remove the job",
                    path: found.path, parameter: parameter)
            }
            return
        }
        switch recorded.identity.kind {
        case .regularFile where found.identity == recorded.identity:
            return
        case .regularFile:
            throw IdentityError(
                .mismatch,
                "\(what) \(found.path) (\(found.identity)) is not the file metadata \(metadataPath) was created for (\(recorded.path): \(recorded.identity))",
                path: metadataPath, parameter: parameter)
        case .blockDevice, .remote:
            throw IdentityError(
                .unconfirmed,
                "\(what) \(found.path) cannot be confirmed to be the device the job was created for (its metadata records no stable identity, and device numbers are reused). Nothing is written or released; check the device and re-create the job",
                path: found.path, parameter: parameter)
        }
    }

    /// A remote source found at a reopen, compared with the recorded one. Non-remote devices are
    /// returned unchanged (`confirm` decides). For a remote export: the base identity (export
    /// name, size, description) must match; with `device`, every recorded sample that may still
    /// be read (`mayRead`) is read again and must have the same checksum. When all of that holds
    /// the result carries the recorded stable ID (so `confirm` accepts it); otherwise it carries
    /// what was found, and `confirm` refuses with `DeviceUnconfirmed`, naming both. Blocking.
    package static func confirmedRemote(
        _ found: DeviceInfo, recorded: DeviceRecord, device: (any StorageDevice)?,
        mayRead: (Range<UInt64>) -> Bool
    ) throws(IdentityError) -> DeviceInfo {
        guard found.identity.kind == .remote, recorded.identity.kind == .remote else { return found }
        let (recordedBase, samples) = RemoteIdentity.parse(recorded.stableID)
        guard found.stableID == recordedBase else { return found }
        var confirmed = found
        if let device {
            var mismatched: [RemoteIdentity.Sample] = []
            for s in samples where s.offset + UInt64(RemoteIdentity.sampleSize) <= found.size {
                guard mayRead(s.offset..<s.offset + UInt64(RemoteIdentity.sampleSize)) else { continue }
                let crc: UInt32
                do { crc = try RemoteIdentity.crc(device, s.offset) } catch {
                    throw IdentityError(
                        .io, "source: reading \(found.path) to confirm its identity: \(error)", path: found.path,
                        parameter: "source", errno: error.errno)
                }
                if crc != s.crc { mismatched.append(RemoteIdentity.Sample(offset: s.offset, crc: crc)) }
            }
            if !mismatched.isEmpty {
                confirmed.stableID = RemoteIdentity.format(base: found.stableID, samples: mismatched)
                return confirmed
            }
        }
        confirmed.stableID = recorded.stableID
        return confirmed
    }
}
