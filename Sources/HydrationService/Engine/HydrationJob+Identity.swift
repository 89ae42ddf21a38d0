import HydrationEngine
import HydrationStorage

/// The job's use of the identity module (HydrationStorage's Identity/): the same checks, with
/// their refusals as the engine's errors.
extension HydrationJob {
    /// `Placement.check`: aliases and devices in use, refused before a job opens anything.
    static func checkPlacement(source: String, dest: String, metadataPath: String, storage: any StorageProvider)
        throws(HydrationError)
    {
        do { try Placement.check(source: source, dest: dest, metadataPath: metadataPath, storage: storage) } catch {
            throw HydrationError.from(error)
        }
    }

    /// `DeviceConfirmation.checkDistinct`.
    static func checkDistinct(source: DeviceInfo, dest: DeviceInfo?, metadata: DeviceInfo?) throws(HydrationError) {
        do { try DeviceConfirmation.checkDistinct(source: source, dest: dest, metadata: metadata) } catch {
            throw HydrationError.from(error)
        }
    }

    /// `DeviceConfirmation.confirm`.
    static func confirm(
        _ found: DeviceInfo, is recorded: DeviceRecord, what: String, metadataPath: String,
        exactSize: Bool, accept: Bool = false
    ) throws(HydrationError) {
        do {
            try DeviceConfirmation.confirm(
                found, is: recorded, what: what, metadataPath: metadataPath, exactSize: exactSize, accept: accept)
        } catch { throw HydrationError.from(error) }
    }

    /// `DeviceConfirmation.confirmedRemote`.
    static func confirmedRemote(
        _ found: DeviceInfo, recorded: DeviceRecord, device: (any StorageDevice)?,
        mayRead: (Range<UInt64>) -> Bool
    ) throws(HydrationError) -> DeviceInfo {
        do {
            return try DeviceConfirmation.confirmedRemote(found, recorded: recorded, device: device, mayRead: mayRead)
        } catch { throw HydrationError.from(error) }
    }
}
