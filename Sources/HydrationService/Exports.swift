// So is the libnbd remote source: `PosixStorage()` opens NBD URIs wherever the engine is imported.
@_exported import HydrationRemote
// The storage layer and metadata format are a target of their own (so clonectl can read metadata
// without linking the engine); everything that imports the engine sees them as before.
@_exported import HydrationStorage
