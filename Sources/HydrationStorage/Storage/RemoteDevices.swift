/// A source named by an NBD URI instead of a path: `nbd://HOST[:PORT]/EXPORT`,
/// `nbd+unix:///EXPORT?socket=PATH`, and with TLS `nbds://…` / `nbds+unix://…` (certificates, or a
/// PSK file with `?tls-psk-file=FILE`), as libnbd parses them (`nbd_connect_uri`). The client is
/// libnbd's (HydrationService's `NBDRemoteDevices`); nothing here speaks the protocol.
public enum RemoteSource {
    public static let schemes = ["nbd://", "nbds://", "nbd+unix://", "nbds+unix://", "nbd+vsock://", "nbds+vsock://"]

    /// Whether `path` is an NBD URI (the storage layer then opens it through its `RemoteDevices`).
    public static func isURI(_ path: String) -> Bool {
        schemes.contains { path.hasPrefix($0) }
    }
}

/// Opens `RemoteSource` URIs for `PosixStorage`. A protocol so that this target needs no NBD
/// client: the engine plugs in libnbd's, and clonectl's offline metadata reader, which only ever
/// opens local files, plugs in none.
public protocol RemoteDevices: Sendable {
    func open(_ uri: String, mode: OpenMode) throws(StorageError) -> any StorageDevice
    func identify(_ uri: String) throws(StorageError) -> DeviceInfo?
}
