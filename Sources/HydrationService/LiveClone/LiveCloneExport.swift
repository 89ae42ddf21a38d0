import NIOCore

/// A job's clone served over NBD with dm-clone's I/O semantics (docs/live-clone.md).
///
/// CONTRACT ONLY (work in progress on main, replaced within this session): the daemon wiring
/// registers `await job.liveExport()` in its `NBDExportRegistry` under the job's name. Every I/O
/// call below currently fails with EIO.
public final class LiveCloneExport: NBDExport {
    public let name: String
    public let size: UInt64
    public let regionSize: UInt64

    init(name: String, size: UInt64, regionSize: UInt64) {
        self.name = name; self.size = size; self.regionSize = regionSize
    }

    public var description: String? { "hydrationd live clone of job \(name)" }
    public var capabilities: NBDExportCapabilities { [.flush, .fua, .trim, .writeZeroes, .fastZero, .cache, .multiConn] }
    public var blockSize: NBDBlockSize {
        NBDBlockSize(minimum: 1, preferred: UInt32(min(regionSize, 32 << 20)), maximum: 32 << 20)
    }
    public var metaContexts: [String] { [NBDProtocol.baseAllocation, "x-hydrationd:state"] }

    public func read(offset: UInt64, length: UInt32) async throws(NBDError) -> ByteBuffer {
        throw NBDError(.EIO, "live clone not wired yet")
    }
}

extension HydrationJob {
    /// The job's clone as an NBD export named after the job. The same object on every call.
    public func liveExport() -> LiveCloneExport {
        LiveCloneExport(name: name, size: configuration.sourcePath.isEmpty ? 0 : status().source.sizeBytes,
                        regionSize: status().regionSize)
    }
}
