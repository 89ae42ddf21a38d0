// The live clone is a target of its own; the service's API speaks its types (`LiveCloneExport`
// in `JobExports`), and callers of `HydrationJob.liveExport()` see them as before.
@_exported import HydrationLiveClone
// So is the libnbd remote source: `PosixStorage()` opens NBD URIs wherever the engine is imported.
@_exported import HydrationRemote
// The storage layer and metadata format are a target of their own (so clonectl can read metadata
// without linking the engine); everything that imports the engine sees them as before.
@_exported import HydrationStorage
// The Unix-socket server and the NBD server are libraries of their own; the service's API speaks
// their types (`PeerCredentials` in `ControlHandler`, `NBDServer` in `JobExportHost`).
@_exported import NBDServer
@_exported import UnixSocketServer
