/// A file or device as the metadata remembers it: enough to refuse resuming against another one.
public struct DeviceRecord: Sendable, Equatable, Codable {
    public var path: String
    public var identity: DeviceIdentity
    public var size: UInt64
    /// `DeviceInfo.stableID` at creation: what confirms the device after a restart. Empty in
    /// version 1 files and for devices that have none.
    public var stableID: String
    public init(path: String, identity: DeviceIdentity, size: UInt64, stableID: String = "") {
        self.path = path; self.identity = identity; self.size = size; self.stableID = stableID
    }
    public init(_ info: DeviceInfo) {
        self.init(
            path: info.path, identity: info.identity, size: info.size, stableID: Self.recordedForm(of: info.stableID))
    }

    /// A stable ID as the metadata keeps it (`StableID.recorded`).
    public static func recordedForm(of stableID: String) -> String { StableID(stableID).recorded.text }

    /// Whether a device found now has this record's stable ID (`StableID.confirms`).
    public func hasStableID(of found: DeviceInfo) -> Bool { StableID(stableID).confirms(StableID(found.stableID)) }
}
