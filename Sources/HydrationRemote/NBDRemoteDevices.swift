import HydrationStorage

/// The storage layer's way to NBD exports (`RemoteSource` URIs): libnbd's client, plugged into
/// `PosixStorage` by the engine. It lives here, not in HydrationStorage, so that only what
/// links the engine links libnbd.
public struct NBDRemoteDevices: RemoteDevices {
    public init() {}
    public func open(_ uri: String, mode: OpenMode) throws(StorageError) -> any StorageDevice {
        try RemoteNBDDevice.open(uri, mode: mode)
    }
    public func identify(_ uri: String) throws(StorageError) -> DeviceInfo? {
        try RemoteNBDDevice.identify(uri)
    }
}

extension PosixStorage {
    /// The engine's storage: local files and block devices, and NBD exports through libnbd.
    public init(topology: DeviceTopology = DeviceTopology(), directIO: Bool? = nil) {
        self.init(topology: topology, directIO: directIO, remote: NBDRemoteDevices())
    }
}
